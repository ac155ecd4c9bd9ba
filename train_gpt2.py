"""
Pretrain GPT-2 (124M and its larger siblings) from scratch, nanoGPT-style.

Read top to bottom: the model config, the GPT-2 model (HuggingFace's key names), the sharded token
DataLoader, the training config, one optimizer step, the training loop, the run's construction (the
start every rank agrees on, the checkpoint to resume, the model and optimizer), the other modes and
the command line. gpt2lib/ offers the services this script, hellaswag.py, fineweb.py and tools/ share
(checkpoint files, the resume agreement, the run directory, HF interchange, the chunked loss, HellaSwag
scoring, sampling, tracking), one module per job; they take this script's instances and values.

    python train_gpt2.py                                  # one GPU (or CPU/MPS for small models)
    torchrun --standalone --nproc_per_node=8 train_gpt2.py  # one node, eight GPUs
    python train_gpt2.py --init-from gpt2 --data-dir data/mine --log-dir log_ft  # fine-tune OpenAI's 124M
"""

import os
import signal

if __name__ == "__main__":
    # Ctrl-C during the imports below (seconds: torch's alone) exits quietly with the shell's 130, not a
    # KeyboardInterrupt traceback. Nothing is written yet, so nothing needs cleaning up.
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(128 + signum))

import argparse
import contextlib
import math
import re
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass, field, fields, replace

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

from gpt2lib import (
    checkpoints,
    distributed,
    hf,
    optimizers,
    parallel,
    previous_runs,
    resume,
    rundir,
    tracking,
)
from gpt2lib.checkpoints import finish_save, save
from gpt2lib.common import (
    DTYPES,
    GPT2_EOT,
    GPT2_VOCAB_SIZE,
    Precision,
    UserError,
    canonical_dtype,
    check_model_shape,
    get_encoding,
    pick_device,
    raise_failure,
    resolve_dtype,
)
from gpt2lib.distributed import DistContext, FollowerStop, StopRequest, setup_distributed
from gpt2lib.evals import load_hellaswag, run_evals
from gpt2lib.flops import gpu_peak_flops
from gpt2lib.losses import LOSS_IMPLS, chunked_cross_entropy
from gpt2lib.parallel import wrap_model
from gpt2lib.resume import (
    check_model_flag,
    check_resumable,
    cooldown_start,
    print_schedule,
    restore,
    schedule_config,
    shape_text,
)
from gpt2lib.run_state import Run, Start
from gpt2lib.runlog import RunLog
from gpt2lib.sampling import generate, print_samples, sample_and_print
from gpt2lib.shards import ShardFile, find_shards
from gpt2lib.step_metrics import StepTimer, log_step, report_benchmark

# what users' code imports from this script; generate, get_encoding, GPT2_EOT and DistContext live in gpt2lib
__all__ = [
    "GPT",
    "GPTConfig",
    "DataLoaderLite",
    "TrainConfig",
    "DistContext",
    "config_for",
    "generate",
    "get_encoding",
    "GPT2_EOT",
    "train",
    "main",
]

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


def model_config(name, **fields_):
    """GPTConfig's fields as a dict: of a config_for name, or of the fields given (defaults filled)
    when name is None."""
    return asdict(config_for(name, **fields_) if name else GPTConfig(**fields_))


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
    """The SDPA kernels allowed, in order of preference, for an SDPA_BACKENDS name; None for
    PyTorch's choice."""
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
        self.sdpa_kernels = (
            None  # a plain attribute, not a buffer: state_dict keys stay HF's; see GPT.set_sdpa_backend
        )

    def forward(self, x, cache=None):
        """cache: None (training, evals: x is whole sequences), or when sampling one layer's KV cache
        (gpt2lib.sampling.LayerCache): x continues the sequences it holds."""
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        kernels = (
            sdpa_kernel(self.sdpa_kernels, set_priority=True)
            if self.sdpa_kernels is not None
            else contextlib.nullcontext()
        )
        with kernels:
            if cache is None:
                y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
            else:
                y = cache.attend(q, k, v)  # (B, nh, T, hs)
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
        self.recompute = False  # a plain attribute, not state; see GPT.set_recompute

    def forward(self, x, cache=None):
        if self.recompute and torch.is_grad_enabled():
            # keep only x for backward, which reruns the block: (B, T, C) saved instead of ~20x that
            return checkpoint(self._forward, x, cache, use_reentrant=False)
        return self._forward(x, cache)

    def _forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
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

    def decode(self, idx, cache):
        """Sampling's path (gpt2lib.sampling): (B, T) new token ids that continue the sequences in the KV
        cache, which stores their keys and values and gives their positions -> (B, vocab_size) logits
        of the last position only (the lm_head is a third of a 124M model's work per token)."""
        x = self.transformer.wte(idx) + self.transformer.wpe(cache.positions(idx.size(1)))  # (B, T, C)
        for block, layer_cache in zip(self.transformer.h, cache.layers):
            x = block(x, layer_cache)
        return self.lm_head(self.transformer.ln_f(x[:, -1]))[:, : self.config.vocab_size]  # (B, V)

    def set_sdpa_backend(self, name):
        """Prefer one attention kernel (an SDPA_BACKENDS name, e.g. "cudnn") in every layer; "default"
        leaves the choice to PyTorch. Set it before torch.compile traces the model."""
        kernels = sdpa_priority(name)
        for block in self.transformer.h:
            block.attn.sdpa_kernels = kernels

    def set_recompute(self, on):
        """Activation recompute (--recompute): each Block keeps only its input for backward and runs
        its forward again there, trading about a third more compute for most of the activation memory.
        Inside the Block's forward, so FSDP's gather of the Block's weights wraps the recompute."""
        for block in self.transformer.h:
            block.recompute = on

    def forward(self, idx, targets=None, loss_impl=None):
        """(B, T) token ids -> (logits, loss), as nanoGPT's GPT does: logits (B, T, vocab_size) over the
        real vocabulary only, loss the mean cross-entropy when targets are given, else None.

        Training passes loss_impl (a LOSS_IMPLS name, see gpt2lib/losses.py) and gets (None, loss):
        "chunked" and "fused" never hold the (B, T, vocab) logits, "full" computes and drops them."""
        x = self.hidden_states(idx)
        if loss_impl is not None:
            if targets is None:
                raise ValueError("loss_impl computes a loss: pass targets")
            if loss_impl != "full":
                return None, chunked_cross_entropy(
                    x, self.lm_head.weight, targets, self.config.vocab_size, loss_impl=loss_impl
                )
        logits = self.lm_head(x)[..., : self.config.vocab_size]  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        return (None if loss_impl is not None else logits), loss

    # HuggingFace interchange (gpt2lib/hf.py) and training checkpoints (gpt2lib/checkpoints.py)

    @classmethod
    def from_pretrained(cls, name_or_dir, vocab_multiple=1):
        """An OpenAI GPT-2 from the HuggingFace hub (`gpt2` ... `gpt2-xl`) or a local directory
        written by HuggingFace `save_pretrained` (ours or transformers')."""
        if os.path.isdir(name_or_dir):
            directory = name_or_dir
        elif name_or_dir in OPENAI_SIZES:
            directory = hf.download_hf_model(name_or_dir)
        else:
            raise UserError(f"'{name_or_dir}' is neither a directory nor one of {', '.join(OPENAI_SIZES)}")
        shape, hf_state = hf.read_hf_checkpoint(directory)
        model = cls(GPTConfig(**shape, vocab_multiple=vocab_multiple))
        model.load_state_dict(hf.state_dict_from_hf(hf_state, model.state_dict(), directory))
        return model

    def save_pretrained(self, directory):
        """Write a directory that transformers (AutoTokenizer, AutoModelForCausalLM, pipeline) and
        lm-evaluation-harness load offline; see gpt2lib.hf.write_hf_checkpoint."""
        hf.write_hf_checkpoint(self, directory)

    @classmethod
    def from_checkpoint(cls, path, checkpoint=None):
        """The model of a training checkpoint (log_dir/model_XXXXX.pt, or a sharded log_dir/model_XXXXX/
        directory, its shards gathered; `checkpoint`: its contents, already read and verified), on the
        CPU, verified first (checksum, shape, every weight)."""
        checkpoint = checkpoint or read_verified(path)  # every key and shape checked
        model = cls(GPTConfig(**checkpoint["config"]))
        model.load_state_dict(checkpoint["model"])
        return model


# -----------------------------------------------------------------------------
# data: batches from the token shards that fineweb.py writes (gpt2lib/shards.py reads the files)


class DataLoaderLite:
    """Batches of (B, T) token windows from the shards of one split, each window read from the files
    (gpt2lib.shards.ShardFile), which are checked to be the ones opened: a shard that changes under
    the run stops it before a token of it is used.

    The split's shards, in order (or in a seeded order that changes every epoch when
    shuffle_seed is set), form one token stream; documents already run across shard ends.
    Each step takes the next B*T*num_processes tokens of the stream: rank r reads the window
    [pos + r*B*T, pos + (r+1)*B*T + 1), the extra token giving the last target. Windows may
    cross shard boundaries, so over an epoch every token is used once, by exactly one rank; only
    the stream's final tail, shorter than one step, is skipped before the next epoch starts.
    The position is global, so state_dict() is the same on every rank.

    With shuffle_seed and block_tokens (training passes the optimizer step's tokens, a multiple of
    B*T*num_processes that does not depend on the world size), the stream is also cut into blocks of
    block_tokens (each with the token after it as its last target) that every epoch reads in a
    seeded order: the position counts through the permuted blocks, so coverage and exact resume,
    on any world size with the same blocks, stay as above; the tail skipped is shorter than a block.
    """

    def __init__(
        self,
        B,
        T,
        process_rank,
        num_processes,
        split,
        data_root,
        shuffle_seed=None,
        vocab_size=GPT2_VOCAB_SIZE,
        device="cpu",
        block_tokens=None,
    ):
        self.B, self.T = B, T
        self.process_rank, self.num_processes = process_rank, num_processes
        self.split, self.shuffle_seed, self.vocab_size = split, shuffle_seed, vocab_size
        self.block_tokens = block_tokens
        self.device = torch.device(device)
        self.shards = find_shards(data_root, split)
        self.files = [ShardFile(path) for path in self.shards]
        self.shard_lengths = [len(file) for file in self.files]
        needed = max(B * T * num_processes, block_tokens or 0) + 1
        if sum(self.shard_lengths) < needed:
            raise UserError(
                f"split '{split}' in {data_root} has {sum(self.shard_lengths)} tokens, fewer than one "
                f"step needs ({needed} = B*T*processes, or the shuffled block, + 1): use smaller "
                "-B/-T/--total-batch-size or more data"
            )
        self._checked = set()  # shards whose token ids were checked
        self.reset()

    def reset(self):
        self.epoch, self.position = 0, 0
        self._set_order()

    def _set_order(self):
        order = list(range(len(self.shards)))
        self.blocks = None  # stream order
        if self.shuffle_seed is not None:
            rng = np.random.default_rng([self.shuffle_seed, self.epoch])
            order = [int(i) for i in rng.permutation(order)]
        self.order = order
        self.starts = np.cumsum([0] + [self.shard_lengths[i] for i in order])  # stream offset of each shard
        self.epoch_tokens = int(self.starts[-1]) - 1  # every input needs the next token as its target
        if self.shuffle_seed is not None and self.block_tokens:
            self.blocks = rng.permutation(
                self.epoch_tokens // self.block_tokens
            )  # block k of the epoch is blocks[k]
            self.epoch_tokens = len(self.blocks) * self.block_tokens

    def _check_vocab(self, shard_index):
        """Token ids below the vocabulary size, checked once per shard, when it is first read."""
        if shard_index not in self._checked:
            top = self.files[shard_index].max_token()
            if top >= self.vocab_size:
                raise UserError(
                    f"shard {self.shards[shard_index]} holds token id {top}, "
                    f">= vocab size {self.vocab_size}: the file is not GPT-2 tokens"
                )
            self._checked.add(shard_index)

    def _read(self, start, length):
        """`length` tokens of the stream from offset `start`, as int64."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while filled < length:
            shard_index = self.order[k]
            self._check_vocab(shard_index)
            offset = start + filled - int(self.starts[k])
            count = min(length - filled, self.shard_lengths[shard_index] - offset)
            out[filled : filled + count] = self.files[shard_index].read(offset, count)
            filled += count
            k += 1
        return out

    def _stream_offset(self, position):
        """Where the epoch's `position` is in the stream: the same, or inside its permuted block."""
        if self.blocks is None:
            return position
        block, offset = divmod(position, self.block_tokens)
        return int(self.blocks[block]) * self.block_tokens + offset

    def next_batch(self):
        B, T = self.B, self.T
        step_tokens = B * T * self.num_processes
        if self.position + step_tokens > self.epoch_tokens:  # the tail is shorter than a step (or block)
            self.epoch += 1
            self.position = 0
            self._set_order()
        # a window never crosses a block's end: blocks are a whole number of steps
        buf = torch.from_numpy(
            self._read(self._stream_offset(self.position + self.process_rank * B * T), B * T + 1)
        )
        self.position += step_tokens
        x, y = buf[:-1].view(B, T), buf[1:].view(B, T)  # targets are the inputs shifted by one
        if self.device.type == "cuda":  # pinned memory lets the copy overlap with the GPU's work
            x = x.pin_memory().to(self.device, non_blocking=True)
            y = y.pin_memory().to(self.device, non_blocking=True)
        elif self.device.type != "cpu":
            x, y = x.to(self.device), y.to(self.device)
        return x, y

    def state_dict(self):
        return {
            "split": self.split,
            "epoch": self.epoch,
            "position": self.position,
            "shuffle_seed": self.shuffle_seed,
            "block_tokens": self.block_tokens,
            "shards": [os.path.basename(p) for p in self.shards],
            "shard_lengths": list(self.shard_lengths),
            "shard_digests": [file.digest() for file in self.files],
        }

    def load_state_dict(self, state):
        if (
            state["shards"] != [os.path.basename(p) for p in self.shards]
            or state["shard_lengths"] != self.shard_lengths
        ):
            raise UserError(
                f"the '{self.split}' shards differ from those the checkpoint was trained on: "
                "resume with the same --data-dir, or start a new run with --resume none"
            )
        # the token counts match, so the position still means something; checkpoints from before
        # digests have none
        changed = [
            name
            for name, digest, file in zip(state["shards"], state.get("shard_digests") or [], self.files)
            if digest != file.digest()
        ]
        if changed and self.process_rank == 0:
            print(
                f"warning: {len(changed)} '{self.split}' shard(s) changed since the checkpoint ({changed[0]}"
                f"{', ...' if len(changed) > 1 else ''}): same names and token counts, other tokens; "
                "resuming on them"
            )
        # the order the run was trained in goes on (checkpoints from before block shuffling have none)
        self.shuffle_seed, self.block_tokens = state["shuffle_seed"], state.get("block_tokens")
        if self.block_tokens and self.block_tokens % (self.B * self.T * self.num_processes):
            raise UserError(
                f"the checkpoint shuffles blocks of {self.block_tokens} tokens, which B*T*processes = "
                f"{self.B * self.T * self.num_processes} does not divide: resume with its --total-batch-size "
                "and a -B/-T that divides it"
            )
        self.epoch, self.position = state["epoch"], state["position"]
        self._set_order()


# -----------------------------------------------------------------------------
# training config: one dataclass, one flag per field (its --help written beside it), one validation pass


def flag(default, help):
    """A TrainConfig field: its default, and the --help text build_parser gives its flag."""
    return field(default=default, metadata={"help": help})


@dataclass
class TrainConfig:
    """Every setting of a run; each field is a flag (--batch-size for batch_size) whose --help is its text."""

    model: str = flag(
        "", "gpt2, gpt2-medium, gpt2-large, gpt2-xl or dN (default: gpt2, or the shape of --init-from)"
    )
    init_from: str = flag(
        "",
        "fine-tune: start from the weights and shape of an OpenAI GPT-2 (gpt2 ... gpt2-xl), an HF directory "
        "or a training checkpoint (.pt), with a fresh optimizer at step 0",
    )
    eval_only: bool = flag(
        False,
        "evaluate the initial (--init-from, seeded or resumed) model, log it at its step into a new or empty "
        "--log-dir (any other is left as it is: results printed only), and exit",
    )
    export_hf: str = flag(
        "", "write the --init-from model, else the checkpoint --resume picks, as an HF directory, and exit"
    )
    generate: str = flag(
        "",
        "print --num-samples continuations of this prompt by the --init-from model, else the checkpoint "
        "--resume picks, and exit",
    )
    data_dir: str = flag(
        "edu_fineweb10B", "directory of *_train_NNNNNN / *_val_NNNNNN token shards (.npy, or llm.c .bin)"
    )
    batch_size: int = flag(64, "micro-batch: sequences per forward pass per process")
    seq_len: int = flag(1024, "sequence length T (at most the model's block size)")
    # 2**19, about 0.5M tokens a step, as GPT-3 124M; 19073 steps are 10B tokens, one epoch of
    # FineWeb-Edu sample-10BT; 715 warmup steps are GPT-3's 375M tokens
    total_batch_size: int = flag(
        524288, "tokens per optimizer step; divisible by B*T*processes (the rest is gradient accumulation)"
    )
    max_steps: int = flag(19073, "optimizer steps of the whole run; the schedule ends here")
    warmup_steps: int = flag(715, "steps of linear lr warmup")
    lr: float = flag(6e-4, "peak learning rate")
    min_lr_ratio: float = flag(0.1, "the schedule decays to lr times this")
    lr_schedule: str = flag(
        "cosine",
        "cosine: decay from the end of warmup to --max-steps; wsd: warmup, hold --lr, cool down over "
        "--cooldown-steps (a stable-phase checkpoint can be resumed with another --max-steps)",
    )
    cooldown_steps: int = flag(0, "wsd: the last steps, over which the lr decays; 0: 20% of --max-steps")
    cooldown_shape: str = flag("linear", "wsd: the cooldown's decay")
    weight_decay: float = flag(0.1, "AdamW weight decay on matrices and embeddings")
    optimizer: str = flag(
        "adamw",
        "adamw: AdamW for every parameter; muon: Muon (torch.optim.Muon) for the blocks' weight matrices, "
        "AdamW at --lr for the embeddings, LayerNorms and biases (see docs/optimizers.md)",
    )
    muon_lr: float = flag(0.02, "with --optimizer muon: Muon's peak lr, scaled by the same schedule as --lr")
    muon_momentum: float = flag(0.95, "with --optimizer muon: Muon's (Nesterov) momentum")
    muon_weight_decay: float = flag(
        0.0,
        "with --optimizer muon: Muon's decoupled weight decay (each step scales the matrices by "
        "1 - lr * this)",
    )
    grad_clip: float = flag(1.0, "clip the gradient norm to this; 0: no clipping")
    eval_every: int = flag(250, "val loss (and HellaSwag) every N steps and at the end; 0: never")
    val_steps: int = flag(20, "val batches per evaluation")
    hellaswag: bool = flag(
        True, "HellaSwag acc_norm at every eval (skipped with a warning when its data cannot be had)"
    )
    hellaswag_data: str = flag("", "a local hellaswag_val.jsonl; empty: download it")
    sample_every: int = flag(250, "print (and log) text samples every N steps; 0: never")
    sample_prompt: str = flag("Hello, I'm a language model,", "the samples' prompt")
    num_samples: int = flag(4, "samples per prompt, for --generate and the training samples")
    max_new_tokens: int = flag(32, "tokens each sample adds to its prompt")
    top_k: int = flag(50, "sample among the k likeliest tokens; 0: the whole vocabulary; 1: greedy")
    temperature: float = flag(1.0, "divides the logits before sampling: lower is more conservative")
    checkpoint_every: int = flag(
        1000, "write a checkpoint every N steps and at the end; 0: only when stopped by a signal"
    )
    keep_last: int = flag(3, "checkpoints of this run kept in --log-dir; 0: all")
    log_dir: str = flag("log", "log.txt, metrics.jsonl, checkpoints and tracking files of the run")
    resume: str = flag("auto", "auto (the newest good checkpoint in --log-dir), none, or a checkpoint path")
    device: str = flag("auto", "auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps")
    dtype: str = flag(
        "auto", "auto: bf16 on CUDA (fp16 with loss scaling where bf16 is missing), fp32 elsewhere"
    )
    compile: bool | None = flag(None, "torch.compile the model (default: on with CUDA)")
    loss_impl: str = flag(
        "chunked", "full computes the (B, T, vocab) logits; chunked and fused never hold them"
    )
    sdpa_backend: str = flag(
        "default", "attention kernel to prefer; default (the default) leaves the choice to PyTorch"
    )
    shuffle: bool = flag(
        False,
        "seeded shuffle, every epoch, of the train shards' order and of the blocks of one optimizer step",
    )
    seed: int = flag(1337, "seed of the init, the shuffle and the samples")
    vocab_multiple: int = flag(64, "pad the embedding rows to a multiple of this (64: 50257 -> 50304)")
    benchmark: int = flag(
        0, "time N steps on random tokens (no data, evals or checkpoints), print the median, and exit"
    )
    wandb: str = flag(
        "",
        "log every metric to this Weights & Biases project (WANDB_MODE=offline or disabled is respected); "
        "rank 0 only",
    )
    wandb_name: str = flag("", "the W&B run's name (default: the log dir's name)")
    tensorboard: bool = flag(False, "write TensorBoard event files under {log_dir}/tensorboard/")
    fsdp: bool = flag(
        False,
        "shard weights, gradients and AdamW state across the ranks (FSDP2) and write sharded checkpoint "
        "directories; for gpt2-medium and up (default: DDP, a full copy on every rank)",
    )
    recompute: bool = flag(
        False, "recompute each Block's activations in backward instead of keeping them (less memory)"
    )
    async_checkpoint: bool = flag(
        False,
        "with --fsdp: copy the state to CPU memory and write the checkpoint while the next steps run (a stop "
        "or the end of the run waits for it)",
    )
    collective_timeout: float = flag(
        600.0,
        "under torchrun: seconds without progress (a step, an eval batch) after which every live rank "
        "names the stalled rank and exits, for torchrun to restart; longer than a checkpoint write or "
        "an eval",
    )


# A few minutes on a CPU: a d4 model on the Python docs that `python fineweb.py --demo` prepares.
# B=4: the 1,024-token step is 2 micro-batches in one process, or 1 on each of 2 ranks under torchrun.
DEMO = dict(
    model="d4",
    data_dir="data/pydoc",
    batch_size=4,
    seq_len=128,
    total_batch_size=1024,
    max_steps=200,
    warmup_steps=10,
    lr=3e-3,
    eval_every=50,
    val_steps=8,
    hellaswag=False,
    sample_every=100,
    sample_prompt="The",
    checkpoint_every=100,
    log_dir="log_demo",
)

DEFAULT_MODEL = "gpt2"
# An AdamW step moves each weight by about lr (GPT-2's peak is 6e-4): above 10 is a typo (1e3 for 1e-3),
# not a setting; 1e308 made the first update's weights inf.
MAX_LR = 10.0


def validate(cfg, world_size, rank=0):
    """Every problem with the settings, as a list of one-line messages (empty when all is well).
    It reads no files, so every rank finds the same problems; files are checked on rank 0. The one
    exception, the trackers' packages, is checked on rank 0 alone: only rank 0 opens the trackers, so
    another node's Python install must not stop the run."""
    problems = []
    # nan passes every comparison below (nan <= 0 is False) and inf most of them: refuse both first,
    # and leave such a flag out of its range check so that it gets one message, not two
    not_finite = {f.name for f in fields(cfg) if f.type is float and not math.isfinite(getattr(cfg, f.name))}
    problems += [
        f"--{name.replace('_', '-')} must be a finite number, got {getattr(cfg, name)}"
        for name in sorted(not_finite)
    ]
    model_config = None
    if cfg.model or not cfg.init_from:  # with --init-from alone the shape is only known once it is read
        try:
            model_config = config_for(cfg.model or DEFAULT_MODEL)
            check_model_shape(asdict(model_config), cfg.model or DEFAULT_MODEL)
        except UserError as e:
            problems.append(f"--model: {e}")
            model_config = None
    for name in ("batch_size", "seq_len", "total_batch_size", "max_steps", "val_steps", "collective_timeout"):
        if name not in not_finite and getattr(cfg, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in (
        "benchmark",
        "warmup_steps",
        "eval_every",
        "sample_every",
        "checkpoint_every",
        "keep_last",
        "weight_decay",
        "grad_clip",
    ):
        if name not in not_finite and getattr(cfg, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if "lr" not in not_finite and not 0 < cfg.lr <= MAX_LR:
        problems.append(f"--lr must be positive and at most {MAX_LR:g}, got {cfg.lr}")
    elif not {"lr", "weight_decay"} & not_finite and cfg.lr * cfg.weight_decay >= 1:
        # AdamW multiplies each decayed weight by 1 - lr * weight_decay every step
        problems.append(
            f"--weight-decay {cfg.weight_decay} times --lr {cfg.lr} must be below 1: each step would "
            "zero or flip the sign of every decayed weight"
        )
    if cfg.optimizer not in OPTIMIZERS:
        problems.append(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg.optimizer}")
    if not {"muon_lr", "muon_momentum", "muon_weight_decay"} & not_finite and (
        cfg.muon_lr <= 0 or not 0 <= cfg.muon_momentum < 1 or cfg.muon_weight_decay < 0
    ):
        problems.append(
            f"Muon needs --muon-lr > 0, 0 <= --muon-momentum < 1 and --muon-weight-decay >= 0, got "
            f"{cfg.muon_lr}, {cfg.muon_momentum} and {cfg.muon_weight_decay}"
        )
    if "min_lr_ratio" not in not_finite and not 0 <= cfg.min_lr_ratio <= 1:
        problems.append(f"--min-lr-ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        problems.append(f"--lr-schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg.lr_schedule}")
    if cfg.cooldown_shape not in COOLDOWN_SHAPES:
        problems.append(
            f"--cooldown-shape must be one of {', '.join(COOLDOWN_SHAPES)}, got {cfg.cooldown_shape}"
        )
    if not 0 <= cfg.cooldown_steps <= cfg.max_steps:
        problems.append(
            f"--cooldown-steps must be in [0, --max-steps {cfg.max_steps}], got {cfg.cooldown_steps}"
        )
    if model_config and cfg.seq_len > model_config.block_size:
        problems.append(f"--seq-len {cfg.seq_len} exceeds the model's block size {model_config.block_size}")
    micro = cfg.batch_size * cfg.seq_len * world_size
    if micro > 0 and cfg.total_batch_size % micro:
        problems.append(
            f"--total-batch-size {cfg.total_batch_size} is not divisible by B*T*processes = "
            f"{cfg.batch_size}*{cfg.seq_len}*{world_size} = {micro}"
        )
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
    for name in ("num_samples", "max_new_tokens", "temperature"):
        if name not in not_finite and getattr(cfg, name) <= 0:
            problems.append(f"--{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    if cfg.top_k < 0:
        problems.append(f"--top-k must be >= 0 (0: the whole vocabulary, 1: greedy), got {cfg.top_k}")
    modes = [
        flag
        for flag, on in (
            ("--benchmark", cfg.benchmark),
            ("--eval-only", cfg.eval_only),
            ("--export-hf", cfg.export_hf),
            ("--generate", cfg.generate),
        )
        if on
    ]
    if len(modes) > 1:
        problems.append(f"{' and '.join(modes)} exclude each other: choose one")
    for flag, on in (("--export-hf", cfg.export_hf), ("--generate", cfg.generate)):
        if on and world_size > 1:
            problems.append(f"{flag} runs in one process: run it with python, not torchrun")
    if rank == 0:
        problems += tracking.missing_packages(cfg.wandb, cfg.tensorboard)
    if cfg.fsdp and cfg.optimizer == "muon":
        problems.append(
            "--optimizer muon trains with DDP, not --fsdp: torch.optim.Muon orthogonalizes whole "
            "matrices and is not FSDP-aware (every rank would gather and orthogonalize each one)"
        )
    if cfg.async_checkpoint and not cfg.fsdp:
        problems.append("--async-checkpoint writes sharded checkpoints: it needs --fsdp")
    return problems


# -----------------------------------------------------------------------------
# one optimizer step: lr, micro-steps (the DDP sync flag set before each forward), clip, update

LR_SCHEDULES = ("cosine", "wsd")
OPTIMIZERS = ("adamw", "muon")
COOLDOWN_SHAPES = ("linear", "1-sqrt")


def get_lr(step, cfg):
    """Linear warmup to cfg.lr, then a decay to cfg.lr * min_lr_ratio at max_steps: cosine over all
    the steps after warmup, or (wsd: warmup-stable-decay) cfg.lr held until the last cooldown steps,
    which decay linearly or as 1 - sqrt(progress)."""
    min_lr = cfg.lr * cfg.min_lr_ratio
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if step >= cfg.max_steps:
        return min_lr
    if cfg.lr_schedule == "wsd":
        start = cooldown_start(cfg.max_steps, cfg.cooldown_steps)
        if step < start:
            return cfg.lr
        progress = (step - start) / (cfg.max_steps - start)
        decayed = progress if cfg.cooldown_shape == "linear" else math.sqrt(progress)
        return min_lr + (1.0 - decayed) * (cfg.lr - min_lr)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


def configure_optimizer(model, weight_decay, lr, device_type, muon=None):
    """AdamW with weight decay on matrices and embeddings only (not on biases and LayerNorm gains);
    with muon (a dict of Muon's lr, momentum and weight_decay: see muon_settings), Muon for the blocks'
    matrices and that AdamW for the rest (gpt2lib/optimizers.py)."""
    if muon is not None:
        return optimizers.muon_adamw(
            model,
            weight_decay,
            lr,
            device_type == "cuda",
            muon["lr"],
            muon.get("momentum", 0.95),
            muon.get("weight_decay", 0.0),
        )
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # the fused kernel does the whole update in one launch: noticeably faster on CUDA
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device_type == "cuda")


def muon_settings(cfg):
    """configure_optimizer's muon argument for --optimizer (None: AdamW alone)."""
    if cfg.optimizer != "muon":
        return None
    return dict(lr=cfg.muon_lr, momentum=cfg.muon_momentum, weight_decay=cfg.muon_weight_decay)


def set_lr(optimizer, step, cfg):
    """Every param group's lr at this step: its peak lr (--muon-lr for Muon's groups, --lr for
    AdamW's) times the schedule's factor get_lr(step) / --lr."""
    factor = get_lr(step, cfg) / cfg.lr
    for group in optimizer.param_groups:
        group["lr"] = factor * (cfg.muon_lr if group.get(optimizers.MUON_GROUP) else cfg.lr)


class NonFiniteLoss(Exception):
    """The loss or gradient norm is NaN or infinite: the run stops before the optimizer step."""


@dataclass
class StepResult:
    loss: float  # mean over micro-steps and ranks
    norm: float  # gradient norm before clipping
    lr: float
    stop: bool  # some rank asked to stop
    failed: bool = False  # some rank could not go on (a shard changed, a log append failed)


def train_step(run, step, stop=None):
    """Optimizer step `step` over run.grad_accum_steps micro-batches, on every rank alike.
    Raises NonFiniteLoss, on every rank, instead of stepping on NaN/inf. `stop` (this process's
    StopRequest) is read after the micro-steps, so a signal during them stops this very step."""
    model, optimizer, precision, cfg = run.model, run.optimizer, run.precision, run.cfg
    lr = get_lr(step, cfg)  # AdamW's, logged; Muon's follows it (set_lr)
    set_lr(optimizer, step, cfg)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=precision.device)  # summed on the device: no host sync per micro-step
    failure = run.log.failure  # a log append that failed on rank 0, or a shard that changed (below)
    for micro_step in range(run.grad_accum_steps):
        try:
            x, y = run.train_loader.next_batch()
        except UserError as e:
            # keep in step with the other ranks' collectives on a stand-in batch; the step is not taken
            failure = failure or str(e)
            x = y = torch.zeros((cfg.batch_size, cfg.seq_len), dtype=torch.long, device=precision.device)
        last_micro_step = micro_step == run.grad_accum_steps - 1
        if cfg.fsdp:  # FSDP's counterpart: only the last micro-step's backward reduce-scatters
            model.set_requires_gradient_sync(last_micro_step)
        elif run.dist_ctx.ddp:
            # DDP decides in forward() whether the coming backward all-reduces the gradients, so
            # the flag must be set before the forward pass: only the last micro-step syncs.
            model.require_backward_grad_sync = last_micro_step
        with precision.autocast():
            _, loss = model(x, y, loss_impl=cfg.loss_impl)
        # the gradients of a big batch are the mean over its micro-batches, not their sum
        loss = loss / run.grad_accum_steps
        loss_sum += loss.detach().float()
        precision.scaler.scale(loss).backward()  # the scale is 1 unless fp16
    norm = clip_gradients(model, optimizer, precision, cfg.grad_clip)
    result = share_step_outcome(
        loss_sum, norm, lr, stop is not None and stop.requested, failure is not None, run.dist_ctx
    )
    if result.failed:
        run.dist_ctx.on_every_rank(lambda: raise_failure(failure))
    check_finite(result, precision)
    precision.scaler.step(optimizer)  # optimizer.step(), skipped by fp16 on overflow
    precision.scaler.update()
    return result


def clip_gradients(model, optimizer, precision, grad_clip):
    """The gradient norm (a tensor), after clipping it to grad_clip (0: no clipping)."""
    precision.scaler.unscale_(optimizer)  # a no-op unless fp16 scaled the loss
    # with --fsdp each rank holds a shard of every gradient: the norm is taken over all shards
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    return parallel.full_norm(norm)


def share_step_outcome(loss, norm, lr, stop_requested, failed, dist_ctx):
    """One all-reduce carries the loss, every rank's stop request (e.g. a SIGTERM on one node) and
    whether any rank failed, and one host sync reads loss, norm and the verdicts. The norm is the
    same on every rank: the gradients it measures were all-reduced (or, with --fsdp, measured over all
    shards)."""
    flags = torch.tensor([float(stop_requested), float(failed)], device=loss.device)
    summed = dist_ctx.sum(torch.cat([loss[None], flags]))
    mean_loss, norm, stops, failures = torch.cat(
        [summed[:1] / dist_ctx.world_size, norm.float()[None], summed[1:]]
    ).tolist()
    return StepResult(mean_loss, norm, lr, stops > 0, failures > 0)


def check_finite(result, precision):
    """Stop before stepping on a non-finite loss or gradient norm. With fp16 an overflowing
    gradient is routine: the scaler skips that step and lowers its scale, so only the loss counts."""
    if not math.isfinite(result.loss) or (
        not math.isfinite(result.norm) and not precision.scaler.is_enabled()
    ):
        raise NonFiniteLoss(
            f"non-finite loss {result.loss} or gradient norm {result.norm}: "
            "stopped before the optimizer step; resume from the last checkpoint with a lower --lr"
        )


# -----------------------------------------------------------------------------
# the training loop


def train(cfg, dist_ctx, stop=None):
    """Train as configured; returns {"losses": [...], "metrics": [...], "val_loss": float}, the train loss
    and the logged metrics of every step this call ran, and the last val loss.

    At the top of step s the model has had s updates: evals, samples and checkpoints happen there,
    and once more at s = max_steps, after the final update. Once any rank has asked to stop, the
    next top of a step writes a checkpoint and nothing else: the evals would be redone on resume.

    With --eval-only, only the evals of the start step run (logged as a training run logs them, into
    a new or empty log dir only: see rundir.claim): no training, no checkpoint."""
    stop = stop or StopRequest()
    # rank 0 holds log_dir's lock throughout; False: an --eval-only that leaves a log dir with files as it is
    with rundir.claim(
        cfg.log_dir, "--log-dir", checkpoints.RUN_FILE_NAMES, dist_ctx, read_only=cfg.eval_only
    ) as writes_log:
        run = setup_run(cfg, dist_ctx, writes_log)
        with run.log:  # at the end, the trackers' runs finish (as failed when training raised)
            if cfg.eval_only:
                run_evals(run, run.start_step)
                dist_ctx.on_every_rank(lambda: raise_failure(run.log.failure))  # a log append that failed
                return {"losses": [], "metrics": [], "val_loss": run.val_loss}
            losses, step_metrics, stopping = [], [], False
            for step in range(run.start_step, cfg.max_steps + 1):
                last_step = step == cfg.max_steps
                if not stopping and run.val_loader is not None and due(cfg.eval_every, step, last_step):
                    stopping = not run_evals(
                        run, step, stop
                    )  # a stop ends them at the next batch: redone on resume
                if stopping:
                    save(step, run)
                    if dist_ctx.master_process:
                        print(f"stopped by signal after step {step - 1}; resume with the same command")
                    break
                if step > 0 and due(cfg.sample_every, step, last_step):  # rank 0 samples; see print_samples
                    print_samples(run, step)
                if step > run.start_step and due(cfg.checkpoint_every, step, last_step):
                    save(step, run)
                if last_step:
                    break
                with StepTimer(
                    dist_ctx.device
                ) as timer:  # the step alone: evals and checkpoints are not timed
                    # stop is this process's signal; result.stop, all ranks' verdict, is what everyone acts on
                    result = train_step(run, step, stop)
                step_metrics.append(log_step(run, step, result, timer.seconds))
                losses.append(result.loss)
                # ranks agree through the step's all-reduce; one process also heeds a signal that came
                # after it
                stopping = result.stop or (not dist_ctx.ddp and stop.requested)
            finish_save(run)  # an --async-checkpoint write still in flight
            dist_ctx.on_every_rank(lambda: raise_failure(run.log.failure))  # an append of the last evals
    return {"losses": losses, "metrics": step_metrics, "val_loss": run.val_loss}


def due(every, step, last_step):
    return every > 0 and (step % every == 0 or last_step)


# -----------------------------------------------------------------------------
# setting up a run: data, the start rank 0 chooses, model, optimizer, logs


def setup_run(cfg, dist_ctx, writes_log=True):
    """Model (seeded, from --init-from, or resumed from a checkpoint of this run when rank 0 finds one),
    optimizer, data and logs (writes_log False: log_dir is left as it is, results are only printed)."""
    master, device = dist_ctx.master_process, dist_ctx.device
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 for any fp32 matmul left outside autocast
        torch.backends.cudnn.allow_tf32 = True
    # --dtype auto depends on the GPU: rank 0's choice holds for all, or mixed nodes would mix fp16 and bf16
    precision = Precision(dist_ctx.decide(lambda: resolve_dtype(cfg.dtype, device)), device)
    train_loader, val_loader = make_loaders(cfg, dist_ctx)
    start = agree_on_start(cfg, dist_ctx, writes_log)
    if cfg.fsdp and not cfg.eval_only:
        rundir.check_shared_log_dir(cfg.log_dir, dist_ctx)
    raw_model = setup_model(start, cfg, dist_ctx, precision)
    optimizer = (
        None
        if cfg.eval_only
        else configure_optimizer(raw_model, cfg.weight_decay, cfg.lr, device.type, muon=muon_settings(cfg))
    )
    checkpoint = start.checkpoint
    resumed = checkpoint is not None
    cfg = schedule_config(cfg, checkpoint)  # the holder checked it in check_resumable
    start_step = (
        restore(checkpoint, raw_model, optimizer, precision, train_loader, dist_ctx) if resumed else 0
    )
    val_loss = checkpoint.get("val_loss") if resumed else None
    run_id = start.run_id
    counts = dict(checkpoint.get("counts") or {}) if resumed else {}
    del checkpoint, start  # full copies of the weights (and optimizer state)
    hella_examples = None
    if cfg.hellaswag and (cfg.eval_every or cfg.eval_only):
        hella_examples = dist_ctx.decide(
            lambda: load_hellaswag(cfg.hellaswag_data or None, raw_model.config.block_size)
        )

    # evals alone need neither compilation nor DDP's gradient hooks
    model, use_compile = (raw_model, False) if cfg.eval_only else wrap_model(raw_model, cfg, dist_ctx)
    grad_accum_steps = cfg.total_batch_size // (cfg.batch_size * cfg.seq_len * dist_ctx.world_size)
    if master:
        how = (
            f"resuming at step {start_step}"
            if resumed
            else "weights from --init-from"
            if cfg.init_from
            else "fresh start"
        )
        print(
            f"model {model_name(cfg)}: {raw_model.num_parameters():,} parameters | "
            f"{dist_ctx.world_size} process(es) on {device.type} | {precision.name} | "
            f"compile {use_compile} | grad accum {grad_accum_steps} | {how}"
            f"{' | fsdp' if cfg.fsdp else ''}{' | recompute' if cfg.recompute else ''}"
            f"{' | eval only' if cfg.eval_only else ''}"
        )
        print_schedule(cfg)
    trackers = (
        tracking.Tracking.open(
            cfg.log_dir, start_step, cfg.wandb, cfg.wandb_name, cfg.tensorboard, asdict(cfg)
        )
        if master and writes_log
        else None
    )
    # background writes collect on a gloo group of their own, never interleaved with training's collectives
    save_group = torch.distributed.new_group(backend="gloo") if cfg.async_checkpoint else None
    return Run(
        cfg,
        dist_ctx,
        raw_model,
        model,
        optimizer,
        precision,
        train_loader,
        val_loader,
        hella_examples,
        RunLog(cfg.log_dir, master and writes_log, trackers),
        grad_accum_steps,
        gpu_peak_flops(device, master),
        start_step,
        val_loss,
        run_id,
        counts,
        save_group,
    )


def make_loaders(cfg, dist_ctx):
    """This rank's train and val loaders. Every rank reads its own --data-dir (nodes need not share
    a filesystem), so all ranks check that they see the same shards as rank 0."""
    loader_args = dict(
        B=cfg.batch_size,
        T=cfg.seq_len,
        process_rank=dist_ctx.rank,
        num_processes=dist_ctx.world_size,
        data_root=cfg.data_dir,
        device=dist_ctx.device,
    )

    def open_loaders():
        train_loader = (
            None
            if cfg.eval_only
            else DataLoaderLite(
                split="train",
                shuffle_seed=cfg.seed if cfg.shuffle else None,
                block_tokens=cfg.total_batch_size if cfg.shuffle else None,
                **loader_args,
            )
        )
        val_loader = DataLoaderLite(split="val", **loader_args) if cfg.eval_every or cfg.eval_only else None
        return train_loader, val_loader

    train_loader, val_loader = dist_ctx.on_every_rank(open_loaders)
    seen = [
        ([os.path.basename(p) for p in loader.shards], loader.shard_lengths)
        for loader in (train_loader, val_loader)
        if loader is not None
    ]
    rank0_seen = dist_ctx.gather_objects(seen)[0]

    def check_same_shards():
        if seen != rank0_seen:
            raise UserError(
                f"the shards in {cfg.data_dir} differ from rank 0's (names or lengths): "
                "give every node the same data"
            )

    dist_ctx.on_every_rank(check_same_shards)
    return train_loader, val_loader


# ---- how a run starts: a seeded init, --init-from's weights, or a checkpoint of this run to resume


def agree_on_start(cfg, dist_ctx, writes_log=True):
    """Every node reports its newest good checkpoint; the rank that holds the newest of all builds the
    Start from it (choose_start) and sends it to every rank. Then rank 0, which writes checkpoints and
    logs from now on, sets its log dir up, with the holder's logs when the checkpoint came from another
    node (unless writes_log is False: see rundir.claim)."""
    holder = resume.find_holder(local_checkpoint(cfg, dist_ctx), cfg.resume, dist_ctx)
    start = dist_ctx.decide(lambda: choose_start(cfg, holder), src=holder.rank if holder else 0)
    resume_step = start.checkpoint["step"] if start.checkpoint else None
    if holder is not None and holder.rank != 0 and dist_ctx.master_process:
        logs = f"; its logs continue in this node's {cfg.log_dir}" if start.logs is not None else ""
        print(
            f"resuming from another node: {holder.host} (rank {holder.rank}) holds the newest checkpoint, "
            f"{holder.path} at step {resume_step}{logs}"
        )
    here = holder.path if holder is not None and holder.rank == 0 else None
    if writes_log:
        dist_ctx.decide(lambda: previous_runs.prepare_run_dir(cfg.log_dir, here, resume_step, start.logs))
    return start


def local_checkpoint(cfg, dist_ctx):
    """This process's report for resume.find_holder: the newest good checkpoint in its node's log dir
    (with --resume PATH: that file, when this node has it), or None. Each node's first process looks."""

    def look():
        if not resume.looks_here(cfg.resume, dist_ctx):
            return None
        try:
            path, checkpoint = find_checkpoint(cfg.resume, cfg.log_dir)
        except UserError as e:
            if cfg.resume != "auto":
                raise
            return resume.local_holding(dist_ctx.rank, None, None, damaged=str(e))
        return resume.local_holding(dist_ctx.rank, path, checkpoint)

    return dist_ctx.on_every_rank(look)


def find_checkpoint(resume, log_dir, training=True):
    """(path, checkpoint read and verified) that --resume picks, or (None, None) to start fresh: auto
    takes the newest good checkpoint in log_dir (a damaged one is skipped with a warning, and set aside
    when the run starts), none none, a path that file (damaged: an error). training False: for a mode
    that only reads the model (no optimizer, data position or RNG), which gets a sharded checkpoint's
    weights gathered. The checkpoint is read once, into memory. One that disappears while it is read
    was pruned by a live run writing log_dir (--keep-last), which has a newer one by then: the newest
    is looked for again."""
    if resume == "none":
        return None, None
    if resume != "auto":
        return resume, read_verified(resume, resume=training, weights=not training)
    damaged, listed, pruned = [], checkpoints.list_checkpoints(log_dir), 0
    while listed:
        path = listed.pop(0)
        try:
            return path, read_verified(path, resume=training, weights=not training)
        except UserError as e:
            if os.path.lexists(path):
                print(f"warning: skipping {path}: {e}")
                damaged.append(os.path.basename(path))
                continue
        pruned += 1  # while it was read
        if pruned > checkpoints.MAX_PRUNED_WHILE_READ:
            raise UserError(
                f"the checkpoints in {log_dir} were pruned faster than they could be read "
                f"({pruned} times): pass --resume PATH, or wait for the run to end"
            )
        listed = [p for p in checkpoints.list_checkpoints(log_dir) if os.path.basename(p) not in damaged]
    if damaged:
        raise checkpoints.all_damaged(log_dir, damaged)
    return None, None


def read_verified(path, resume=False, weights=True):
    """A checkpoint read and verified by gpt2lib.checkpoints (checksum, config), then checked against the
    model its config builds here; resume: also what a resume restores (optimizer, data position, RNG).
    weights False: a sharded checkpoint's weights stay on disk (restore loads each rank's part)."""
    checkpoint = checkpoints.read_checkpoint(path, weights)
    layout, optimizer_layout = checkpoint_layout(checkpoint["config"], checkpoints.trained_with(checkpoint))
    checkpoints.check_layout(path, checkpoint, layout, optimizer_layout if resume else None)
    return checkpoint


def checkpoint_layout(config, optimizer="adamw"):
    """({key: shape} of the model's state_dict, [(shape, state names)] of each parameter of the
    --optimizer's state in its order) for a GPTConfig dict, built on the meta device: checking a
    checkpoint's structure allocates nothing."""
    with torch.device("meta"):
        model = GPT(GPTConfig(**config))
    built = configure_optimizer(model, 0.0, 1.0, "meta", muon=dict(lr=1.0) if optimizer == "muon" else None)
    return (
        {key: tuple(t.shape) for key, t in model.state_dict().items()},
        [
            (tuple(p.shape), optimizers.state_names(group))
            for group in built.param_groups
            for p in group["params"]
        ],
    )


def choose_start(cfg, holder):
    """On the rank that holds the checkpoint to resume (rank 0 when there is none): the Start.
    A checkpoint of this run takes precedence over --init-from: a preempted fine-tune continues."""
    if holder is not None:
        path, checkpoint = holder.path, holder.checkpoint
        config, weights, source = model_config(None, **checkpoint["config"]), None, path
        check_resumable(path, checkpoint, config, cfg, wanted_model(cfg))
        if cfg.init_from:
            print(
                f"resuming {path}, a run started from --init-from {cfg.init_from}, which is not loaded again"
            )
    elif cfg.init_from:
        checkpoint, model = None, load_init_source(cfg.init_from, cfg.vocab_multiple)
        config, weights, source = asdict(model.config), model.state_dict(), f"--init-from {cfg.init_from}"
        check_model_flag(config, source, cfg.model, wanted_model(cfg))
    else:
        checkpoint, weights = None, None
        config = asdict(config_for(cfg.model or DEFAULT_MODEL, vocab_multiple=cfg.vocab_multiple))
        source = f"--model {cfg.model or DEFAULT_MODEL}"
    if cfg.seq_len > config["block_size"]:
        raise UserError(f"--seq-len {cfg.seq_len} exceeds the block size {config['block_size']} of {source}")
    run_id = (checkpoint or {}).get("run_id") or uuid.uuid4().hex  # checkpoints from before run ids get one
    # rank 0 is on another node: it takes over the run's logs, when the checkpoint is in this log dir
    moved = holder is not None and holder.rank != 0 and checkpoints.continues_in(cfg.log_dir, holder.path)
    return Start(config, checkpoint, weights, run_id, resume.read_logs(cfg.log_dir) if moved else None)


def wanted_model(cfg):
    """GPTConfig's fields that --model asks for (default gpt2), with --vocab-multiple; None with
    --init-from and no --model: the shape is then the one --init-from (or its run's checkpoint) brings."""
    if cfg.init_from and not cfg.model:
        return None
    return model_config(cfg.model or DEFAULT_MODEL, vocab_multiple=cfg.vocab_multiple)


def model_name(cfg):
    """The model as the command line names it: --init-from's source, else --model (gpt2 by default)."""
    return cfg.init_from or cfg.model or DEFAULT_MODEL


def load_init_source(source, vocab_multiple):
    """The model of --init-from SOURCE on the CPU, its vocabulary padded to vocab_multiple: an OpenAI
    GPT-2 from the hub (`gpt2` ... `gpt2-xl`), a local HF directory, or a training checkpoint."""
    if (os.path.isdir(source) and not checkpoints.is_sharded_checkpoint(source)) or source in OPENAI_SIZES:
        model = GPT.from_pretrained(source, vocab_multiple)
    elif os.path.exists(source) or source.endswith(".pt"):
        trained = GPT.from_checkpoint(source)
        model = GPT(replace(trained.config, vocab_multiple=vocab_multiple))
        # through HF's layout, which has no padding rows: padded again as configured
        model.load_state_dict(hf.state_dict_from_hf(hf.hf_state_dict(trained), model.state_dict(), source))
    else:
        raise UserError(
            f"--init-from {source}: not one of {', '.join(OPENAI_SIZES)}, an existing HF model "
            "directory or a training checkpoint (.pt)"
        )
    if model.config.vocab_size != GPT2_VOCAB_SIZE:
        raise UserError(
            f"--init-from {source}: its vocabulary has {model.config.vocab_size} tokens, not GPT-2's "
            f"{GPT2_VOCAB_SIZE}: the shards, HellaSwag and samples use the GPT-2 tokenizer"
        )
    return model


# ---- the model and the start-up line


def setup_model(start, cfg, dist_ctx, precision):
    """The model in training mode on this rank's device, the same initial weights on every rank:
    --init-from's (read by rank 0, sent to the others) or a seeded init; with --fsdp sharded across
    the ranks, before an optimizer sees its parameters. A resumed checkpoint's weights are loaded
    later, by restore."""
    torch.manual_seed(cfg.seed)
    model = GPT(GPTConfig(**start.config))
    if start.weights is not None:
        model.load_state_dict(start.weights)
    model.set_sdpa_backend(cfg.sdpa_backend)  # before torch.compile traces the attention
    model.set_recompute(cfg.recompute)
    model = model.to(dist_ctx.device)
    if cfg.fsdp:
        parallel.shard_for_training(model, precision, dist_ctx.device)
    return model


# -----------------------------------------------------------------------------
# the other modes: --benchmark, --export-hf and --generate

BENCHMARK_WARMUP_STEPS = 3  # the first steps compile and warm up allocators: not timed


def benchmark(cfg, dist_ctx, stop=None):
    """Train cfg.benchmark steps on random tokens and report the median step: ms, tokens/s, MFU and
    peak memory. No data, evals, samples or checkpoints; compilation and warm-up are excluded."""
    steps = BENCHMARK_WARMUP_STEPS + cfg.benchmark
    with tempfile.TemporaryDirectory() as tmp:
        tokens = np.random.default_rng(cfg.seed).integers(0, GPT2_VOCAB_SIZE, 2 * cfg.total_batch_size + 1)
        np.save(os.path.join(tmp, "random_train_000001.npy"), tokens.astype(np.uint16))
        run = replace(
            cfg,
            data_dir=tmp,
            log_dir=os.path.join(tmp, "log"),
            max_steps=steps,
            benchmark=0,
            eval_every=0,
            sample_every=0,
            checkpoint_every=0,
            hellaswag=False,
            resume="none",
            wandb="",
            tensorboard=False,
        )
        timed = train(run, dist_ctx, stop)["metrics"][BENCHMARK_WARMUP_STEPS:]
    return report_benchmark(timed, model_name(cfg), cfg, dist_ctx)


def export_hf(cfg):
    """--export-hf DIR: the model of --init-from, else of the checkpoint --resume picks, written as a
    self-contained HF directory. A path of its own: it reads no data and leaves log_dir as it is."""
    hf.check_replaceable(os.path.abspath(cfg.export_hf))  # before a load that may take minutes
    source, model = load_cli_model(cfg, "--export-hf: no model to export")
    model.save_pretrained(cfg.export_hf)
    print(
        f"wrote {cfg.export_hf} from {source}: {model.num_parameters():,} parameters, "
        f"{shape_text(asdict(model.config))}"
    )


def load_cli_model(cfg, what):
    """(source, model on the CPU) for a mode that only reads a model: --init-from's, else the
    checkpoint --resume picks. `what` starts the error when there is neither."""
    if cfg.init_from:
        return f"--init-from {cfg.init_from}", load_init_source(cfg.init_from, cfg.vocab_multiple)
    path, checkpoint = find_checkpoint(cfg.resume, cfg.log_dir, training=False)
    if path is None:
        reason = "--resume none" if cfg.resume == "none" else f"no checkpoint in {cfg.log_dir}"
        raise UserError(f"{what} ({reason}): pass --init-from SOURCE or --resume PATH")
    return path, GPT.from_checkpoint(path, checkpoint)  # read once: a live run may prune it


def print_generated(cfg):
    """--generate PROMPT: samples of the --init-from model, else of the checkpoint --resume picks, on
    --device in the run's --dtype, one `sample: '...'` line each. Like --export-hf it reads no data and
    leaves log_dir as it is."""
    device = pick_device(cfg.device)
    precision = Precision(resolve_dtype(cfg.dtype, device), device)
    source, model = load_cli_model(cfg, "--generate: no model to sample from")
    model.set_sdpa_backend(cfg.sdpa_backend)
    model.to(device).eval()
    print(
        f"generating from {source} on {device.type} in {precision.name}: {cfg.num_samples} sample(s) of "
        f"{cfg.max_new_tokens} tokens, top-k {cfg.top_k}, temperature {cfg.temperature}, seed {cfg.seed}"
    )
    with precision.autocast():
        sample_and_print(model, cfg.generate, cfg, cfg.seed)


# -----------------------------------------------------------------------------
# command line

# the values an enumerated flag takes, shown as its metavar in --help
FLAG_CHOICES = {
    "dtype": DTYPES,
    "loss_impl": LOSS_IMPLS,
    "sdpa_backend": tuple(SDPA_BACKENDS),
    "lr_schedule": LR_SCHEDULES,
    "cooldown_shape": COOLDOWN_SHAPES,
    "resume": ("auto", "none", "PATH"),
    "optimizer": OPTIMIZERS,
}


def build_parser():
    parser = argparse.ArgumentParser(
        description="Pretrain or fine-tune GPT-2. Defaults reproduce GPT-2 124M on FineWeb-Edu 10B "
        "(build-nanogpt's run).",
        argument_default=argparse.SUPPRESS,
    )  # unset flags keep the config's (or --demo's) value
    parser.add_argument(
        "--demo",
        action="store_true",
        help="small d4 model on the Python docs prepared by `python fineweb.py --demo`; minutes on a CPU",
    )
    short = {"batch_size": "-B", "seq_len": "-T"}
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        names = [short[f.name], flag] if f.name in short else [flag]
        text, default = f.metadata["help"], getattr(defaults, f.name)
        if "default" not in text and default not in ("", None):
            text += f" (default: {default})"
        text = text.replace("%", "%%")  # argparse formats help with %
        if f.type in (bool, bool | None):
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, help=text)
        else:
            # choices are checked by validate(), with every other problem, not by argparse
            metavar = "{" + ",".join(FLAG_CHOICES[f.name]) + "}" if f.name in FLAG_CHOICES else None
            parser.add_argument(*names, type=f.type, help=text, metavar=metavar)
    return parser


def parse_config(argv=None):
    args = vars(build_parser().parse_args(argv))
    preset = DEMO if args.pop("demo", False) else {}
    if "init_from" in args:  # the model comes from there, not from the preset
        preset = {k: v for k, v in preset.items() if k != "model"}
    cfg = TrainConfig(**{**preset, **args})
    return replace(cfg, dtype=canonical_dtype(cfg.dtype))  # bf16 and bfloat16 alike


def main(argv=None):
    cfg = parse_config(argv)
    problems = validate(cfg, int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0)))
    if problems:
        sys.exit("error: " + "\nerror: ".join(problems))
    stop, exit_code = StopRequest(), 0
    try:
        if cfg.export_hf or cfg.generate:
            (export_hf if cfg.export_hf else print_generated)(cfg)
            return
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: an SSH session that dropped
            signal.signal(signum, stop)
        dist_ctx = setup_distributed(
            cfg.device, group_of_one=cfg.fsdp, collective_timeout=cfg.collective_timeout
        )
        (benchmark if cfg.benchmark else train)(cfg, dist_ctx, stop)
    # no exit in here: the process exits below, once close_process_group has run
    except FollowerStop:
        exit_code = 2  # rank 0 prints the reason
    except (UserError, NonFiniteLoss) as e:  # a setting or input to fix, or a run that diverged
        print(f"error: {e}", file=sys.stderr)
        exit_code = 1 if isinstance(e, NonFiniteLoss) else 2
    finally:
        had_group = distributed.close_process_group()
    if had_group:
        distributed.end_process(exit_code)  # see there: a normal exit can abort
    if exit_code:
        sys.exit(exit_code)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # imported: Ctrl-C is main()'s to handle
    main()
