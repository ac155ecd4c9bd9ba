"""HellaSwag scoring, shared by the training loop and hellaswag.py, in two styles:
  completion (default): build-nanogpt's, so numbers compare with it and with training logs;
  harness: lm-evaluation-harness 0.4's zero-shot `hellaswag` task, so numbers compare with its tables.

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

The training loop uses:
    tokenized = tokenize_examples(examples)          # once; caches the device batches between evals
    counts = evaluate(raw_model, tokenized, device, rank, world_size)  # tensor [n, correct, correct_norm]
    dist.all_reduce(counts)
"""

import re
import sys

import numpy as np
import torch
from torch.nn import functional as F

from gpt2lib.common import (
    TORCH_DTYPES,
    UserError,
    autocast_context,
    get_encoding,
    resolve_dtype,
    unwrap_model,
)
from gpt2lib.hellaswag_data import check_style

DEFAULT_BATCH_SIZE = 64  # examples (4 rows each) per forward
TOKENS_PER_ROW = 128  # with batch_size, bounds rows * T per forward
LOGITS_CHUNK = 4096  # positions whose (chunk, vocab) logits exist at once


# -----------------------------------------------------------------------------
# tokenization


class TokenizedExamples:
    """Pre-tokenized examples: ctx[i] a list of ids, endings[i] four lists, labels[i] an int,
    norm_lengths[i] the four lengths acc_norm divides the summed loss by (default: the endings'
    token counts), style the scoring style they were tokenized for, sources[i] the example's
    `file:line` (or None).
    evaluate() keeps the padded device batches it builds from this object, so a training loop
    that tokenizes once pays for tokenizing, sorting and copying once."""

    def __init__(self, ctx, endings, labels, norm_lengths=None, style="completion", sources=None):
        self.ctx, self.endings, self.labels, self.style = ctx, endings, labels, style
        self.sources = sources if sources is not None else [None] * len(labels)
        self.norm_lengths = (
            norm_lengths if norm_lengths is not None else [[len(e) for e in ends] for ends in endings]
        )
        self._batches = {}  # (rank, world_size, batch_size, max_tokens, device) -> _Batches

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return TokenizedExamples(
                self.ctx[index],
                self.endings[index],
                self.labels[index],
                self.norm_lengths[index],
                self.style,
                self.sources[index],
            )
        return self.ctx[index], self.endings[index], self.labels[index]


def tokenize_examples(examples, style="completion"):
    """Tokenize validated example dicts once for a scoring style (see the module docstring).
    completion: the context `ctx` as is, each ending with a leading space, encoded apart."""
    check_style(style)
    examples = list(examples)
    if style == "harness":
        return _tokenize_harness(examples)
    enc = get_encoding()
    ctx = enc.encode_ordinary_batch([ex["ctx"] for ex in examples])
    flat = enc.encode_ordinary_batch([" " + ending for ex in examples for ending in ex["endings"]])
    endings = [flat[4 * i : 4 * i + 4] for i in range(len(examples))]
    return TokenizedExamples(
        ctx, endings, [int(ex["label"]) for ex in examples], sources=[ex.get("_where") for ex in examples]
    )


def check_fits(tokenized, context_length):
    """Raise a one-line UserError naming the first example (its file:line) with a row longer than
    the model's context: it could not be scored."""
    for i, (ctx, endings) in enumerate(zip(tokenized.ctx, tokenized.endings)):
        longest = len(ctx) + max(len(ending) for ending in endings)
        if longest > context_length:
            raise UserError(
                f"{tokenized.sources[i] or f'HellaSwag example {i}'}: a HellaSwag row is {longest} "
                f"tokens long, more than the model's context of {context_length}"
            )


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
    wholes = enc.encode_ordinary_batch(
        [query + " " + choice for query, four in zip(queries, choices) for choice in four]
    )
    ctx, endings = [], []
    for i, context_tokens in enumerate(enc.encode_ordinary_batch(contexts)):
        endings.append([whole[len(context_tokens) :] for whole in wholes[4 * i : 4 * i + 4]])
        ctx.append(context_tokens or [enc.eot_token])
    # acc_norm divides by len(choice): the cleaned ending without the " " the continuation adds,
    # as the harness's process_results computes completion_len from doc_to_choice
    norm_lengths = [[len(choice) for choice in four] for four in choices]
    return TokenizedExamples(
        ctx,
        endings,
        [int(ex["label"]) for ex in examples],
        norm_lengths,
        style="harness",
        sources=[ex.get("_where") for ex in examples],
    )


# -----------------------------------------------------------------------------
# batching: rows sorted by length, padded, with the positions that predict ending tokens


class _Batches:
    """Device tensors for scoring n examples: a list of (tokens (R, T), positions (P,) into the
    flattened (R*T) predictions, targets (P,), row ids (P,) into the n*4 rows), plus the
    lengths acc_norm divides by (n, 4) and labels (n,)."""

    def __init__(self, batches, lengths, labels, n, n_rows, max_len, longest_source=None):
        self.batches, self.lengths, self.labels = batches, lengths, labels
        self.n, self.n_rows, self.max_len = n, n_rows, max_len
        self.longest_source = longest_source  # file:line of the longest row's example, when known


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
        chunk = rows[start : start + count]
        tokens = np.zeros((count, width), dtype=np.int64)
        positions, targets, row_ids = [], [], []
        for r, (length, row_id, ctx, end) in enumerate(chunk):
            tokens[r, : len(ctx)] = ctx
            tokens[r, len(ctx) : length] = end
            # ending token t is predicted from position t-1
            positions.append(np.arange(r * width + len(ctx) - 1, r * width + length - 1, dtype=np.int64))
            targets.append(np.asarray(end, dtype=np.int64))
            row_ids.append(np.full(len(end), row_id, dtype=np.int64))
        batches.append(
            tuple(
                torch.from_numpy(a).to(device)
                for a in (tokens, np.concatenate(positions), np.concatenate(targets), np.concatenate(row_ids))
            )
        )
        start += count
    lengths = torch.tensor(tok.norm_lengths, dtype=torch.float32).reshape(n, 4)
    labels = torch.tensor(tok.labels, dtype=torch.long)
    max_len, longest_source = (rows[0][0], tok.sources[rows[0][1] // 4]) if rows else (0, None)
    return _Batches(batches, lengths.to(device), labels.to(device), n, 4 * n, max_len, longest_source)


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
            examples._batches[key] = _build_batches(
                examples[rank::world_size], device, batch_size, max_tokens
            )
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
def _row_losses(model, batches, device, autocast_dtype, progress, should_stop=None):
    """(n, 4) summed ending losses (fp32, on device) for prepared batches; None when should_stop(),
    asked before each batch, said so."""
    hidden_fn, head_fn, context_length = _model_parts(model)
    if context_length is not None and batches.max_len > context_length:
        raise UserError(
            f"{batches.longest_source or 'HellaSwag'}: a HellaSwag row is {batches.max_len} tokens long, "
            f"more than the model's context of {context_length}"
        )
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
            if should_stop is not None and should_stop():
                return None
            with _resolve_autocast(device, autocast_dtype):
                if hidden_fn is not None:
                    h = hidden_fn(tokens)
                    selected = h.reshape(-1, h.size(-1)).index_select(0, positions)  # (P, C)
                else:
                    logits = head_fn(tokens)
                    selected = logits.reshape(-1, logits.size(-1)).index_select(0, positions)  # (P, V)
                for s in range(0, positions.numel(), LOGITS_CHUNK):
                    part = selected[s : s + LOGITS_CHUNK]
                    logits = head_fn(part) if hidden_fn is not None else part
                    loss = F.cross_entropy(logits.float(), targets[s : s + LOGITS_CHUNK], reduction="none")
                    row_loss.index_add_(0, row_ids[s : s + LOGITS_CHUNK], loss)
            if bar is not None:
                bar.update(tokens.size(0))
    finally:
        if bar is not None:
            bar.close()
        if isinstance(module, torch.nn.Module):
            module.train(was_training)
    return row_loss.view(batches.n, 4)


def evaluate(
    model,
    examples,
    device,
    rank=0,
    world_size=1,
    batch_size=DEFAULT_BATCH_SIZE,
    autocast_dtype=None,
    max_tokens=None,
    progress=False,
    style=None,
    should_stop=None,
):
    """This rank's LOCAL counts over its share examples[rank::world_size], as an int64 tensor
    [n, n_correct, n_correct_norm] on `device`: all_reduce it (SUM) across ranks once.

    model: train_gpt2.GPT (pass the uncompiled module; DDP and torch.compile wrappers are
    stripped), transformers' GPT2LMHeadModel, or any callable mapping (N, T) ids to logits,
    already on `device`. examples: dicts from load_examples or, better, tokenize_examples(...),
    whose device batches are then cached between calls. batch_size: examples per forward (at most
    4*batch_size rows and max_tokens = rows*T, default batch_size*4*128). autocast_dtype: None
    means bf16 on CUDA and fp32 elsewhere; torch.float32 forces full precision. style: the scoring
    style for dicts (None: completion); tokenized examples carry their own, and a different one
    given here is an error. should_stop: asked before each batch; when it says so, the result is None.
    Nothing syncs with the host."""
    device = torch.device(device)
    counts = torch.zeros(3, dtype=torch.long, device=device)
    batches = _local_batches(examples, device, rank, world_size, batch_size, max_tokens, style)
    if batches.n == 0:
        return counts
    sums = _row_losses(model, batches, device, autocast_dtype, progress, should_stop)
    if sums is None:
        return None
    normalized = sums / batches.lengths  # per token (completion) or per character (harness)
    counts[0] = batches.n
    counts[1] = (sums.argmin(dim=1) == batches.labels).sum()
    counts[2] = (normalized.argmin(dim=1) == batches.labels).sum()
    return counts


def evaluate_model(
    model,
    examples,
    device=None,
    batch_size=DEFAULT_BATCH_SIZE,
    autocast_dtype=None,
    max_tokens=None,
    progress=False,
    style=None,
):
    """Single process: {"n", "acc", "acc_norm"} over all examples (one host sync)."""
    if device is None:
        device = next(unwrap_model(model).parameters()).device
    n, correct, correct_norm = evaluate(
        model,
        examples,
        device,
        batch_size=batch_size,
        autocast_dtype=autocast_dtype,
        max_tokens=max_tokens,
        progress=progress,
        style=style,
    ).tolist()
    if n == 0:
        raise UserError("no HellaSwag examples to evaluate")
    return {"n": n, "acc": correct / n, "acc_norm": correct_norm / n}
