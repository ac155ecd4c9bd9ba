"""Sampling token ids from a GPT with a KV cache: a batch of prompts of different lengths, left-padded.

The model is passed in; it needs `config` (n_layer, block_size, vocab_size) and
`decode(idx, cache)`, which runs (B, T) new tokens through the model with this module's KVCache and
returns the (B, vocab_size) logits of the last position. Text (tokenizing, decoding) is the
caller's job: this module sees only token ids.

Every row is computed as if it were alone: its padding is masked out of attention and its
positions count from its first real token, so a row's greedy continuation equals that prompt's
own. Beyond block_size the context is cropped to the last block_size tokens, as the model without
a cache would see it; learned absolute positions then shift by one at every token, so from there on
each new token refills the cache from the cropped window (one full-window forward per token).
"""

import contextlib

import torch
import torch.nn as nn
from torch.nn import functional as F

from gpt2lib import parallel
from gpt2lib.common import GPT2_EOT, get_encoding


class KVCache:
    """Keys and values of every layer for B left-padded rows, written in place into buffers of
    capacity positions (allocated on first use, in the dtype the model computes them in: autocast's
    under autocast). `pad[b]` is the number of padding columns at the left of row b."""

    def __init__(self, n_layer, capacity, pad):
        self.capacity = capacity
        self.layers = [LayerCache(self) for _ in range(n_layer)]
        self.reset(pad)

    def reset(self, pad):
        """Empty the cache (the buffers stay) for rows with these left-padding counts, a (B,) tensor."""
        self.pad = pad
        self.padded = bool(pad.any())  # one host sync here rather than one per token
        self.length = 0  # columns filled
        self.mask = None

    def positions(self, T):
        """(B, T) position ids of the next T columns: each row counts from its first real token."""
        cols = torch.arange(self.length, self.length + T, device=self.pad.device)
        return (cols[None, :] - self.pad[:, None]).clamp_min(0)

    def begin(self, T):
        """Prepare the attention mask for a forward of the next T columns; None where SDPA's own
        (causal, or none for one query) masking is exact."""
        if self.length + T > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} positions cannot take {self.length + T}")
        if not self.padded and (T == 1 or self.length == 0):
            self.mask = None
            return
        keys = torch.arange(self.length + T, device=self.pad.device)  # (L,)
        queries = keys[self.length :, None]  # (T, 1)
        # a padded query sees only itself: a row with every key masked would give NaN, and NaN
        # values would leak through the zero weights that real queries give the padding
        allowed = ((keys <= queries) & (keys >= self.pad[:, None, None])) | (keys == queries)  # (B, T, L)
        self.mask = allowed[:, None]  # (B, 1, T, L)

    def advance(self, T):
        self.length += T


class LayerCache:
    """One layer's keys and values, (B, nh, capacity, hs) each."""

    def __init__(self, cache):
        self.cache = cache
        self.k = self.v = None

    def attend(self, q, k, v):
        """Store the new keys and values (B, nh, T, hs) after the cached ones; return the attention of
        the new queries over all of them, (B, nh, T, hs)."""
        cache = self.cache
        if self.k is None or self.k.dtype != k.dtype:
            B, nh, _, hs = k.shape
            self.k = k.new_empty(B, nh, cache.capacity, hs)
            self.v = v.new_empty(B, nh, cache.capacity, hs)
        start, end = cache.length, cache.length + k.size(2)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        causal = cache.mask is None and start == 0 and q.size(2) > 1
        return F.scaled_dot_product_attention(
            q, self.k[:, :, :end], self.v[:, :, :end], attn_mask=cache.mask, is_causal=causal
        )


def left_pad(prompts, pad_id, device):
    """(B, W) tokens with each prompt (a list of ids) right-aligned, and (B,) padding counts."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for row, ids in enumerate(prompts):
        tokens[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
    pad = torch.tensor([width - len(p) for p in prompts], dtype=torch.long)
    return tokens.to(device), pad.to(device)


def next_tokens(logits, top_k, temperature, rng):
    """(B, V) logits -> (B, 1) sampled ids: top-k (0 or None: the whole vocabulary), then the
    temperature's softmax. top_k=1 is greedy."""
    logits = logits.float() / max(temperature, 1e-6)
    if top_k:
        values, indices = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1)
        choice = torch.multinomial(F.softmax(values, dim=-1), 1, generator=rng)
        return torch.gather(indices, -1, choice)
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=rng)


def sample(model, prompts, max_new_tokens, top_k=50, temperature=1.0, rng=None, pad_id=0, device=None):
    """Continue each prompt (a non-empty list of token ids) by max_new_tokens sampled ids; returns a
    list of lists, prompt included. The tokens live on device (default: the model's); rng is a
    torch.Generator there (None: the global RNG). pad_id fills the left padding (any valid id: it is
    masked out)."""
    device = device or next(model.parameters()).device
    with column_major_weights(model), torch.inference_mode():
        return sample_tokens(model, prompts, max_new_tokens, top_k, temperature, rng, pad_id, device)


@contextlib.contextmanager
def column_major_weights(model):
    """On the CPU, store every nn.Linear weight (the tied lm_head too) column-major while sampling:
    the same values and shapes, only the strides change, and the originals are put back on exit.

    F.linear computes x @ weight.t(); with a column-major weight, weight.t() is a contiguous
    (in, out) matrix, the layout transformers' Conv1D keeps, and MKL's products of one row (one
    token per sequence) run faster that way: on this project's 2-core AVX-512 machine, 0.21 instead
    of 0.30 ms for a 768x3072 layer and 7.6 instead of 12 ms for the 124M lm_head. Making the
    copies costs about 0.45 s of one core for 124M per call, and one copy of the weights in memory."""
    weights = {id(m.weight): m.weight for m in model.modules() if isinstance(m, nn.Linear)}.values()
    originals = []
    try:
        if next(model.parameters()).device.type == "cpu" and not fsdp_managed(model):
            with torch.no_grad():
                for weight in weights:
                    originals.append((weight, weight.data))
                    weight.data = weight.data.t().contiguous().t()
        yield
    finally:
        for weight, data in originals:
            weight.data = data


def fsdp_managed(model):
    """A model sharded by FSDP2 owns its parameters' storage (it frees and regathers it): leave it be."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def sample_tokens(model, prompts, max_new_tokens, top_k, temperature, rng, pad_id, device):
    """sample()'s loop: prefill the cache with the prompts, then one token per step; `out` holds
    every row's tokens, left-padded, (B, width + max_new_tokens)."""
    tokens, pad = left_pad(prompts, pad_id, device)
    B, width = tokens.shape
    block = model.config.block_size
    out = torch.empty(B, width + max_new_tokens, dtype=torch.long, device=device)
    out[:, :width] = tokens
    cache = KVCache(model.config.n_layer, min(width + max_new_tokens, block), pad)
    end = width  # columns of `out` filled
    logits = refill(model, cache, out, end, pad)
    for step in range(max_new_tokens):
        out[:, end : end + 1] = next_tokens(logits, top_k, temperature, rng)
        end += 1
        if step == max_new_tokens - 1:
            break
        if cache.length < cache.capacity:
            logits = feed(model, cache, out[:, end - 1 : end])
        else:  # the window is full: crop it by one token and recompute it
            logits = refill(model, cache, out, end, pad)
    return [row[int(p) :].tolist() for row, p in zip(out, pad)]


def feed(model, cache, idx):
    """(B, T) new tokens through the model and into the cache -> (B, vocab_size) logits of the last."""
    cache.begin(idx.size(1))
    logits = model.decode(idx, cache)
    cache.advance(idx.size(1))
    return logits


def refill(model, cache, out, end, pad):
    """Empty the cache and run the last block_size columns of out[:, :end] through it: the padding
    that falls outside the window is gone, rows longer than the window lose their oldest tokens."""
    window = min(end, model.config.block_size)
    cache.reset((pad - (end - window)).clamp_min(0))
    return feed(model, cache, out[:, end - window : end])


def generate(model, prompt, max_new_tokens, num_samples=1, top_k=50, temperature=1.0, seed=42, device=None):
    """Sample continuations of `prompt` (text, or a list of texts of any lengths); returns num_samples
    strings per prompt, prompt included (a list of prompts: all samples of the first, then the next).
    top_k 0 or None samples from the whole vocabulary, 1 is greedy. Deterministic for a given seed: a
    private generator leaves the global RNG (training) untouched. With a KV cache (gpt2lib/sampling.py);
    a row's greedy text is that of its prompt alone, and past block_size the context is cropped."""
    enc = get_encoding()
    if device is None:
        device = next(model.parameters()).device
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    encoded = [enc.encode(text, allowed_special={"<|endoftext|>"}) or [GPT2_EOT] for text in texts]
    rows = [ids for ids in encoded for _ in range(num_samples)]
    rng = torch.Generator(device=device).manual_seed(seed)
    out = sample(
        model,
        rows,
        max_new_tokens,
        top_k=top_k,
        temperature=temperature,
        rng=rng,
        pad_id=GPT2_EOT,
        device=device,
    )
    return [enc.decode(ids) for ids in out]


def sample_and_print(model, prompt, settings, seed):
    """generate() with settings' num_samples, max_new_tokens, top_k and temperature (the flags of
    --generate and of the training samples); prints one `sample: '...'` line each, returns the texts."""
    texts = generate(
        model,
        prompt,
        settings.max_new_tokens,
        settings.num_samples,
        settings.top_k,
        settings.temperature,
        seed=seed,
    )
    for text in texts:
        print(f"sample: {text!r}")
    return texts


def print_samples(run, step):
    """The training run's samples at this step (run: a run_state.Run), written to its log. Rank 0
    samples; with --fsdp every rank takes part in gathering the full weights it samples from."""
    master = run.dist_ctx.master_process
    if not master and not run.cfg.fsdp:
        return
    run.raw_model.eval()
    with parallel.full_weights(run.raw_model), run.precision.autocast():
        if master:
            texts = sample_and_print(run.raw_model, run.cfg.sample_prompt, run.cfg, run.cfg.seed + step)
            run.log.write_samples(step, run.cfg.sample_prompt, texts)
    run.raw_model.train()
