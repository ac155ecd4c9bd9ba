"""
HellaSwag evaluation in two scoring styles:
  completion (default): build-nanogpt's, so numbers compare with it and with training logs;
  harness: lm-evaluation-harness 0.4's zero-shot `hellaswag` task, so numbers compare with its tables.

    python hellaswag.py -m gpt2                      # an OpenAI GPT-2 from the HuggingFace hub
    python hellaswag.py -m path/to/hf_dir --limit 200
    python hellaswag.py -c log/model_19072.pt --json result.json
    python hellaswag.py -m gpt2 --style harness

Each example is a context and four candidate endings. Every candidate becomes one row,
context tokens followed by the ending's tokens, and the model's cross-entropy is taken over
the ending tokens only (token t predicted from position t-1). `acc` picks the ending with the
lowest summed loss. Completion style: the context is `ctx`, each ending `" " + ending`, and
`acc_norm` picks the lowest mean loss per token. Harness style: the context is
`activity_label: ctx_a Ctx_b` and the endings are cleaned of WikiHow's [tags] (see
harness_query), the ending tokens are those of context+ending encoded as one string after the
context's own tokens, and `acc_norm` picks the lowest loss per character of the cleaned ending.

For speed the rows of many examples are scored in one forward: rows are sorted by length,
right-padded, and only the positions that predict an ending token go through the lm_head.
Everything stays on the device and the host syncs once, at the end.

The training loop uses the functions:
    examples = load_examples("val")                  # raises UserError when the data is unavailable
    tokenized = tokenize_examples(examples)          # once; caches the device batches between evals
    counts = evaluate(raw_model, tokenized, device, rank, world_size)  # tensor [n, correct, correct_norm]
    dist.all_reduce(counts)
"""

import argparse
import json
import os
import re
import sys
import tempfile
import time

import numpy as np
import torch
from torch.nn import functional as F

from train_gpt2 import (TORCH_DTYPES, UserError, atomic_write, autocast_context, get_encoding, one_line, pick_device,
                        resolve_dtype, unwrap_model)

DATA_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data"
SPLITS = ("val", "train")
VAL_ROWS = 10042  # rows in the official hellaswag_val.jsonl
DEFAULT_BATCH_SIZE = 64  # examples (4 rows each) per forward
TOKENS_PER_ROW = 128  # with batch_size, bounds rows * T per forward
LOGITS_CHUNK = 4096  # positions whose (chunk, vocab) logits exist at once
STYLES = ("completion", "harness")
HARNESS_FIELDS = ("activity_label", "ctx_a", "ctx_b")  # what harness style reads besides endings and label


# -----------------------------------------------------------------------------
# data: download, read, validate

def default_cache_dir():
    """$HELLASWAG_CACHE, else hellaswag/ next to this script."""
    return os.environ.get("HELLASWAG_CACHE") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "hellaswag")


def _check_split(split):
    if split not in SPLITS:
        raise UserError(f"unknown HellaSwag split {split!r}: use one of {', '.join(SPLITS)} "
                        "(the test split has no labels)")


class _Retry(Exception):
    """A failed download attempt worth repeating (server error, truncated or unreadable body)."""


class _GiveUp(Exception):
    """A failed download that repeating will not fix (a 4xx status)."""


def _fetch_once(url, final_path, timeout, expected_rows):
    """One GET of url, streamed to a temporary file next to final_path, checked, then renamed."""
    import requests

    with requests.get(url, stream=True, timeout=timeout) as response:
        if response.status_code >= 500 or response.status_code == 429:
            raise _Retry(f"HTTP {response.status_code}")
        if response.status_code != 200:
            raise _GiveUp(f"HTTP {response.status_code}")
        # Content-Length counts the bytes on the wire: compare only when they are not compressed
        expected_bytes = None if response.headers.get("Content-Encoding") else response.headers.get("Content-Length")
        directory = os.path.dirname(final_path)
        fd, tmp_path = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(final_path) + ".", suffix=".part")
        try:
            written = 0
            with os.fdopen(fd, "wb") as f:
                for chunk in response.iter_content(chunk_size=1 << 16):
                    f.write(chunk)
                    written += len(chunk)
                f.flush()
                os.fsync(f.fileno())
            if expected_bytes is not None and written != int(expected_bytes):
                raise _Retry(f"truncated: got {written} of {expected_bytes} bytes")
            if written == 0:
                raise _Retry("empty response")
            try:
                rows = read_jsonl(tmp_path, name=url)  # never rename a file that would not load
            except UserError as e:  # e.g. a proxy's error page: try again
                raise _Retry(str(e)) from None
            if expected_rows is not None and len(rows) != expected_rows:
                raise _Retry(f"got {len(rows)} rows, expected {expected_rows:,}")
            os.replace(tmp_path, final_path)
        except BaseException:
            try:
                os.unlink(tmp_path)
            except OSError:
                pass
            raise


def download(split="val", cache_dir=None, url_base=None, retries=3, backoff=1.0, timeout=30.0):
    """Path of hellaswag_{split}.jsonl in cache_dir, downloaded from url_base if not there yet.
    The file is streamed to a temporary name, its HTTP status, length and rows checked, and
    only then renamed into place: an interrupted or broken download is never reused.
    Raises UserError (naming --data as the way out) when every try fails."""
    _check_split(split)
    cache_dir = cache_dir or default_cache_dir()
    url_base = url_base or os.environ.get("HELLASWAG_URL") or DATA_URL
    name = f"hellaswag_{split}.jsonl"
    final_path = os.path.join(cache_dir, name)
    if os.path.isfile(final_path):
        return final_path
    url = f"{url_base.rstrip('/')}/{name}"
    try:
        os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the HellaSwag cache directory {cache_dir}: {e.strerror}") from None
    import requests

    print(f"downloading {url} to {final_path}", file=sys.stderr)
    reason = "no attempt"
    for attempt in range(max(1, retries)):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            _fetch_once(url, final_path, timeout, VAL_ROWS if split == "val" else None)
            return final_path
        except _Retry as e:
            reason = str(e)
        except _GiveUp as e:
            raise UserError(f"could not download {url} ({e}): pass --data FILE with a local copy of {name}") from None
        except requests.RequestException as e:
            reason = type(e).__name__
        except OSError as e:
            raise UserError(f"cannot write {final_path}: {e.strerror or e}") from None
    raise UserError(f"could not download {url} after {max(1, retries)} tries ({reason}): "
                    f"check the network, or pass --data FILE with a local copy of {name}")


def _check_style(style):
    if style not in STYLES:
        raise UserError(f"unknown HellaSwag style {style!r}: use one of {', '.join(STYLES)}")


def validate_example(row, where, style="completion"):
    """Raise UserError (prefixed with where, e.g. 'file:line') unless row is a usable HellaSwag
    example for this scoring style."""
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(row).__name__}")
    ctx = row.get("ctx")
    if ctx is None:
        raise UserError(f"{where}: missing 'ctx'")
    if not isinstance(ctx, str) or not ctx:
        raise UserError(f"{where}: 'ctx' must be a non-empty string, got {ctx!r:.40}")
    endings = row.get("endings")
    if endings is None:
        raise UserError(f"{where}: missing 'endings'")
    if not isinstance(endings, list):
        raise UserError(f"{where}: 'endings' must be a list of 4 strings, got {type(endings).__name__}")
    if len(endings) != 4:
        raise UserError(f"{where}: 'endings' has {len(endings)} items, expected 4")
    for i, ending in enumerate(endings):
        if not isinstance(ending, str):
            raise UserError(f"{where}: ending {i} is {type(ending).__name__}, expected a string")
    label = row.get("label")
    if label is None:
        raise UserError(f"{where}: missing 'label'")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label <= 3:
        raise UserError(f"{where}: 'label' must be an integer 0-3, got {label!r}")
    if style == "harness":
        for field in HARNESS_FIELDS:
            if not isinstance(row.get(field), str):
                problem = "missing" if row.get(field) is None else "not a string:"
                raise UserError(f"{where}: {problem} {field!r}, which --style harness needs "
                                "(the official HellaSwag jsonl has it; or use --style completion)")


def read_jsonl(path, name=None, style="completion"):
    """The rows of a HellaSwag jsonl file, validated for `style`; errors name `name:line` (name defaults to path)."""
    name = name or path
    rows = []
    try:
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                where = f"{name}:{lineno}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise UserError(f"{where}: not UTF-8 text") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
                validate_example(row, where, style)
                rows.append(row)
    except FileNotFoundError:
        raise UserError(f"HellaSwag data file {name} does not exist") from None
    except OSError as e:
        raise UserError(f"cannot read HellaSwag data file {name}: {e.strerror or e}") from None
    if not rows:
        raise UserError(f"{name}: no examples")
    return rows


def load_examples(split="val", data_path=None, limit=None, cache_dir=None, url_base=None, style="completion"):
    """The validated examples (dicts with at least ctx, endings, label; with style="harness" also
    activity_label, ctx_a, ctx_b) of a split, in file order.
    data_path: a local jsonl; None downloads the official file into cache_dir (see download).
    limit: keep only the first `limit`. Raises UserError for unavailable or malformed data, so a
    training loop can catch it and skip HellaSwag with a warning."""
    _check_split(split)
    _check_style(style)
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1, got {limit}")
    if data_path is not None:
        examples = read_jsonl(data_path, style=style)
    else:
        path = download(split, cache_dir=cache_dir, url_base=url_base)
        examples = read_jsonl(path, style=style)
        if split == "val" and len(examples) != VAL_ROWS:
            raise UserError(f"{path} has {len(examples):,} rows, expected {VAL_ROWS:,} for the official val "
                            "split: delete it to download it again")
    return examples[:limit] if limit is not None else examples


def iterate_examples(split):
    """The examples of a split one by one (build-nanogpt's name), downloading the file if needed."""
    yield from load_examples(split)


# -----------------------------------------------------------------------------
# tokenization

def render_example(example):
    """build-nanogpt's per-example view: (data, tokens, mask, label) with tokens (4, T) the four
    context+ending rows right-padded with 0, and mask (4, T) 1 on the ending tokens."""
    enc = get_encoding()
    ctx_tokens = enc.encode_ordinary(example["ctx"])
    ending_tokens = [enc.encode_ordinary(" " + ending) for ending in example["endings"]]
    data = {"label": example["label"], "ctx_tokens": ctx_tokens, "ending_tokens": ending_tokens}
    width = max(len(ctx_tokens) + len(e) for e in ending_tokens)
    tokens = torch.zeros((4, width), dtype=torch.long)
    mask = torch.zeros((4, width), dtype=torch.long)
    for i, end in enumerate(ending_tokens):
        row = ctx_tokens + end
        tokens[i, :len(row)] = torch.tensor(row)
        mask[i, len(ctx_tokens):len(row)] = 1
    return data, tokens, mask, example["label"]


class TokenizedExamples:
    """Pre-tokenized examples: ctx[i] a list of ids, endings[i] four lists, labels[i] an int,
    norm_lengths[i] the four lengths acc_norm divides the summed loss by (default: the endings'
    token counts), style the scoring style they were tokenized for.
    evaluate() keeps the padded device batches it builds from this object, so a training loop
    that tokenizes once pays for tokenizing, sorting and copying once."""

    def __init__(self, ctx, endings, labels, norm_lengths=None, style="completion"):
        self.ctx, self.endings, self.labels, self.style = ctx, endings, labels, style
        self.norm_lengths = norm_lengths if norm_lengths is not None else [[len(e) for e in ends] for ends in endings]
        self._batches = {}  # (rank, world_size, batch_size, max_tokens, device) -> _Batches

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return TokenizedExamples(self.ctx[index], self.endings[index], self.labels[index],
                                     self.norm_lengths[index], self.style)
        return self.ctx[index], self.endings[index], self.labels[index]

    def max_length(self):
        return max((len(c) + max(len(e) for e in ends) for c, ends in zip(self.ctx, self.endings)), default=0)


def tokenize_examples(examples, style="completion"):
    """Tokenize validated example dicts once for a scoring style (see the module docstring).
    completion: the context `ctx` as is, each ending with a leading space, encoded apart."""
    _check_style(style)
    examples = list(examples)
    if style == "harness":
        return _tokenize_harness(examples)
    enc = get_encoding()
    ctx = enc.encode_ordinary_batch([ex["ctx"] for ex in examples])
    flat = enc.encode_ordinary_batch([" " + ending for ex in examples for ending in ex["endings"]])
    endings = [flat[4 * i:4 * i + 4] for i in range(len(examples))]
    return TokenizedExamples(ctx, endings, [int(ex["label"]) for ex in examples])


def harness_preprocess(text):
    """lm-evaluation-harness's cleanup of HellaSwag text. The WikiHow rows carry markers such as
    "[header]", "[title]", "[step]": " [title]" ends a sentence, every other [tag] goes, and then
    each pair of spaces becomes one, in a single pass (three spaces leave two, as there)."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def harness_query(example):
    """The harness's context. str.capitalize() also lowercases the rest of ctx_b, as there."""
    ctx = example["ctx_a"] + " " + example["ctx_b"].capitalize()
    return harness_preprocess(example["activity_label"] + ": " + ctx)


def harness_choices(example):
    """The harness's four choices; each is scored as the continuation " " + choice."""
    return [harness_preprocess(ending) for ending in example["endings"]]


def _tokenize_harness(examples):
    """Harness style, as its HF backend splits a (context, " " + choice) request: whitespace at the
    end of the context moves to the start of the continuation, context + continuation is encoded
    as one string, and the continuation's tokens are those after the context's own tokens. A
    context left empty is replaced by <|endoftext|>, as the harness does with an empty one."""
    enc = get_encoding()
    queries = [harness_query(ex) for ex in examples]
    choices = [harness_choices(ex) for ex in examples]
    contexts = [query.rstrip() for query in queries]
    wholes = enc.encode_ordinary_batch([query + " " + choice for query, four in zip(queries, choices)
                                        for choice in four])
    ctx, endings = [], []
    for i, context_tokens in enumerate(enc.encode_ordinary_batch(contexts)):
        endings.append([whole[len(context_tokens):] for whole in wholes[4 * i:4 * i + 4]])
        ctx.append(context_tokens or [enc.eot_token])
    # acc_norm divides by len(choice): the cleaned ending without the " " the continuation adds,
    # as the harness's process_results computes completion_len from doc_to_choice
    norm_lengths = [[len(choice) for choice in four] for four in choices]
    return TokenizedExamples(ctx, endings, [int(ex["label"]) for ex in examples], norm_lengths, style="harness")


# -----------------------------------------------------------------------------
# batching: rows sorted by length, padded, with the positions that predict ending tokens

class _Batches:
    """Device tensors for scoring n examples: a list of (tokens (R, T), positions (P,) into the
    flattened (R*T) predictions, targets (P,), row ids (P,) into the n*4 rows), plus the
    lengths acc_norm divides by (n, 4) and labels (n,)."""

    def __init__(self, batches, lengths, labels, n, n_rows, max_len):
        self.batches, self.lengths, self.labels = batches, lengths, labels
        self.n, self.n_rows, self.max_len = n, n_rows, max_len


def _build_batches(tok, device, batch_size, max_tokens):
    n = len(tok)
    rows = []  # (length, row id, ctx, ending)
    for i in range(n):
        ctx = tok.ctx[i]
        for j, end in enumerate(tok.endings[i]):
            rows.append((len(ctx) + len(end), 4 * i + j, ctx, end))
    rows.sort(key=lambda r: (-r[0], r[1]))  # longest first: an out-of-memory shows up at once
    max_rows = 4 * batch_size
    batches = []
    start = 0
    while start < len(rows):
        width = rows[start][0]
        count = max(1, min(max_rows, max_tokens // width, len(rows) - start))
        chunk = rows[start:start + count]
        tokens = np.zeros((count, width), dtype=np.int64)
        positions, targets, row_ids = [], [], []
        for r, (length, row_id, ctx, end) in enumerate(chunk):
            tokens[r, :len(ctx)] = ctx
            tokens[r, len(ctx):length] = end
            # ending token t is predicted from position t-1
            positions.append(np.arange(r * width + len(ctx) - 1, r * width + length - 1, dtype=np.int64))
            targets.append(np.asarray(end, dtype=np.int64))
            row_ids.append(np.full(len(end), row_id, dtype=np.int64))
        batches.append(tuple(torch.from_numpy(a).to(device) for a in
                             (tokens, np.concatenate(positions), np.concatenate(targets), np.concatenate(row_ids))))
        start += count
    lengths = torch.tensor(tok.norm_lengths, dtype=torch.float32).reshape(n, 4)
    labels = torch.tensor(tok.labels, dtype=torch.long)
    max_len = rows[0][0] if rows else 0
    return _Batches(batches, lengths.to(device), labels.to(device), n, 4 * n, max_len)


def _local_batches(examples, device, rank, world_size, batch_size, max_tokens, style):
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    max_tokens = max_tokens or batch_size * 4 * TOKENS_PER_ROW
    if isinstance(examples, TokenizedExamples):
        if style is not None and style != examples.style:
            raise ValueError(f"examples were tokenized for style {examples.style!r}, not {style!r}")
        key = (rank, world_size, batch_size, max_tokens, str(device))
        if key not in examples._batches:
            examples._batches[key] = _build_batches(examples[rank::world_size], device, batch_size, max_tokens)
        return examples._batches[key]
    tokenized = tokenize_examples(list(examples)[rank::world_size], style=style or "completion")
    return _build_batches(tokenized, device, batch_size, max_tokens)


# -----------------------------------------------------------------------------
# scoring

def _model_parts(model):
    """(hidden_fn, head_fn, context_length) for a model. With a hidden_fn, only the positions
    that are scored go through the lm_head; otherwise head_fn maps tokens to full logits.
    Understands train_gpt2.GPT, transformers' GPT2LMHeadModel and any callable returning logits,
    a (logits, ...) tuple, or an object with .logits."""
    m = unwrap_model(model)
    config = getattr(m, "config", None)
    lm_head = getattr(m, "lm_head", None)
    if callable(getattr(m, "hidden_states", None)) and lm_head is not None and hasattr(config, "block_size"):
        vocab = config.vocab_size  # train_gpt2.GPT: the lm_head may have padded rows

        def head(h):
            return F.linear(h, lm_head.weight[:vocab])
        return m.hidden_states, head, config.block_size
    transformer = getattr(m, "transformer", None)
    if transformer is not None and isinstance(lm_head, torch.nn.Linear) and hasattr(config, "n_positions"):
        vocab = config.vocab_size  # transformers' GPT2LMHeadModel

        def hidden(idx):
            return transformer(input_ids=idx, use_cache=False).last_hidden_state

        def head(h):
            bias = None if lm_head.bias is None else lm_head.bias[:vocab]
            return F.linear(h, lm_head.weight[:vocab], bias)
        return hidden, head, config.n_positions

    def logits_fn(idx):
        out = m(idx)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return getattr(out, "logits", out)
    return None, logits_fn, None


def _resolve_autocast(device, autocast_dtype):
    """The training loop's autocast policy: None picks what `train_gpt2.py --dtype auto` does (bf16 on
    CUDA, fp16 on CUDA cards without bf16, full precision elsewhere); torch.float32 disables it."""
    device = torch.device(device)
    if autocast_dtype is None:
        autocast_dtype = TORCH_DTYPES[resolve_dtype("auto", device)]
    return autocast_context(device, autocast_dtype)


@torch.no_grad()
def _row_losses(model, batches, device, autocast_dtype, progress):
    """(n, 4) summed ending losses (fp32, on device) for prepared batches."""
    hidden_fn, head_fn, context_length = _model_parts(model)
    if context_length is not None and batches.max_len > context_length:
        raise UserError(f"a HellaSwag row is {batches.max_len} tokens long, more than the model's "
                        f"context of {context_length}")
    row_loss = torch.zeros(batches.n_rows, dtype=torch.float32, device=device)
    module = unwrap_model(model)
    was_training = getattr(module, "training", False)
    if isinstance(module, torch.nn.Module):
        module.eval()  # no dropout; restored below
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=batches.n_rows, unit="row", desc="hellaswag", file=sys.stderr)
    try:
        for tokens, positions, targets, row_ids in batches.batches:
            with _resolve_autocast(device, autocast_dtype):
                if hidden_fn is not None:
                    h = hidden_fn(tokens)
                    selected = h.reshape(-1, h.size(-1)).index_select(0, positions)  # (P, C)
                else:
                    logits = head_fn(tokens)
                    selected = logits.reshape(-1, logits.size(-1)).index_select(0, positions)  # (P, V)
                for s in range(0, positions.numel(), LOGITS_CHUNK):
                    part = selected[s:s + LOGITS_CHUNK]
                    logits = head_fn(part) if hidden_fn is not None else part
                    loss = F.cross_entropy(logits.float(), targets[s:s + LOGITS_CHUNK], reduction="none")
                    row_loss.index_add_(0, row_ids[s:s + LOGITS_CHUNK], loss)
            if bar is not None:
                bar.update(tokens.size(0))
    finally:
        if bar is not None:
            bar.close()
        if isinstance(module, torch.nn.Module):
            module.train(was_training)
    return row_loss.view(batches.n, 4)


def evaluate(model, examples, device, rank=0, world_size=1, batch_size=DEFAULT_BATCH_SIZE,
             autocast_dtype=None, max_tokens=None, progress=False, style=None):
    """This rank's LOCAL counts over its share examples[rank::world_size], as an int64 tensor
    [n, n_correct, n_correct_norm] on `device`: all_reduce it (SUM) across ranks once.

    model: train_gpt2.GPT (pass the uncompiled module; DDP and torch.compile wrappers are
    stripped), transformers' GPT2LMHeadModel, or any callable mapping (N, T) ids to logits,
    already on `device`. examples: dicts from load_examples or, better, tokenize_examples(...),
    whose device batches are then cached between calls. batch_size: examples per forward (at most
    4*batch_size rows and max_tokens = rows*T, default batch_size*4*128). autocast_dtype: None
    means bf16 on CUDA and fp32 elsewhere; torch.float32 forces full precision. style: the scoring
    style for dicts (None: completion); tokenized examples carry their own, and a different one
    given here is an error. Nothing syncs with the host."""
    device = torch.device(device)
    counts = torch.zeros(3, dtype=torch.long, device=device)
    batches = _local_batches(examples, device, rank, world_size, batch_size, max_tokens, style)
    if batches.n == 0:
        return counts
    sums = _row_losses(model, batches, device, autocast_dtype, progress)
    normalized = sums / batches.lengths  # per token (completion) or per character (harness)
    counts[0] = batches.n
    counts[1] = (sums.argmin(dim=1) == batches.labels).sum()
    counts[2] = (normalized.argmin(dim=1) == batches.labels).sum()
    return counts


def evaluate_model(model, examples, device=None, batch_size=DEFAULT_BATCH_SIZE, autocast_dtype=None,
                   max_tokens=None, progress=False, style=None):
    """Single process: {"n", "acc", "acc_norm"} over all examples (one host sync)."""
    if device is None:
        device = next(unwrap_model(model).parameters()).device
    n, correct, correct_norm = evaluate(model, examples, device, batch_size=batch_size, autocast_dtype=autocast_dtype,
                                        max_tokens=max_tokens, progress=progress, style=style).tolist()
    if n == 0:
        raise UserError("no HellaSwag examples to evaluate")
    return {"n": n, "acc": correct / n, "acc_norm": correct_norm / n}


def example_losses(model, examples, device=None, batch_size=DEFAULT_BATCH_SIZE, autocast_dtype=None, max_tokens=None,
                   style=None):
    """Per-example ending losses in input order, on the CPU: (sum (n, 4), normalized (n, 4)), where
    normalized is the sum per ending token (completion style) or per character of the cleaned
    ending (harness style). For analysis and tests; predictions are sum.argmin(1) (acc) and
    normalized.argmin(1) (acc_norm)."""
    if device is None:
        device = next(unwrap_model(model).parameters()).device
    device = torch.device(device)
    batches = _local_batches(examples, device, 0, 1, batch_size, max_tokens, style)
    sums = _row_losses(model, batches, device, autocast_dtype, progress=False)
    return sums.cpu(), (sums / batches.lengths).cpu()


# -----------------------------------------------------------------------------
# command line

def load_model(model_name=None, checkpoint=None):
    """An fp32 model from an HF hub name or directory (-m) or a train_gpt2.py checkpoint (-c)."""
    if checkpoint is not None:
        from train_gpt2 import GPT

        return GPT.from_checkpoint(checkpoint)
    import transformers

    try:
        model = transformers.GPT2LMHeadModel.from_pretrained(model_name)
    except Exception as e:  # hub, file and format errors come in many types
        raise UserError(f"could not load model {model_name!r} ({one_line(e)})") from None
    return model.float()


def write_json_atomic(path, obj):
    """Write obj as JSON to a temporary file next to path, then rename it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="HellaSwag accuracy, scored as build-nanogpt (completion style) "
                                                 "or as lm-evaluation-harness 0.4 (harness style).")
    parser.add_argument("-m", "--model", help="HuggingFace hub name (gpt2 ... gpt2-xl) or local HF directory")
    parser.add_argument("-c", "--checkpoint", help="a train_gpt2.py checkpoint, e.g. log/model_19072.pt")
    parser.add_argument("-d", "--device", default="auto", help="auto (cuda, mps, cpu), cpu, cuda, cuda:N, mps")
    parser.add_argument("--data", help="a local HellaSwag jsonl file (default: download the official split)")
    parser.add_argument("--split", default="val", choices=SPLITS)
    parser.add_argument("--limit", type=int, help="only the first N examples")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="examples per forward")
    parser.add_argument("--dtype", default="auto", choices=list(DTYPES),
                        help="autocast dtype; auto: bfloat16 on CUDA, float32 elsewhere")
    parser.add_argument("--style", default="completion", choices=STYLES,
                        help="completion: build-nanogpt's scoring (the training loop's); "
                             "harness: lm-evaluation-harness 0.4's zero-shot hellaswag task")
    parser.add_argument("--json", help='write {"n", "acc", "acc_norm", "style", "seconds"} to this file')
    return parser.parse_args(argv)


def run(args):
    if (args.model is None) == (args.checkpoint is None):
        raise UserError("pass exactly one of -m/--model (HuggingFace name or directory) and "
                        "-c/--checkpoint (train_gpt2.py checkpoint)")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    device = pick_device(args.device)
    # data errors before the slow part
    examples = load_examples(args.split, data_path=args.data, limit=args.limit, style=args.style)
    model = load_model(args.model, args.checkpoint).to(device)
    model.eval()
    t0 = time.time()
    tokenized = tokenize_examples(examples, style=args.style)
    result = evaluate_model(model, tokenized, device, batch_size=args.batch_size,
                            autocast_dtype=DTYPES[args.dtype], progress=True)
    result["style"] = args.style
    result["seconds"] = round(time.time() - t0, 3)
    print(f"hellaswag {args.split}, {args.style} style: n={result['n']} acc={result['acc']:.4f} "
          f"acc_norm={result['acc_norm']:.4f} ({result['seconds']:.1f} s on {device})")
    if args.json:
        write_json_atomic(args.json, result)
    return result


def main(argv=None):
    try:
        return run(parse_args(argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
