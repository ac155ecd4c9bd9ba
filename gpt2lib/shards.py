"""Token shard files: build-nanogpt's .npy (written by fineweb.py) and llm.c's .bin, found by name
and opened as read-only memory maps after their format is checked."""

import os
import re

import numpy as np

from gpt2lib.common import UserError


LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_BYTES = 20240520, 1, 256 * 4


def make_command(data_root):
    """The command that makes data_root's shards: `fineweb.py --demo` for the directory it writes (data/pydoc)."""
    demo = os.path.normpath(os.path.abspath(data_root)).split(os.sep)[-2:] == ["data", "pydoc"]
    return "`python fineweb.py --demo`" if demo else "`python fineweb.py`"


def find_shards(data_root, split):
    """Sorted shard paths of one split: files named like `{prefix}_{split}_{idx}.npy` or `.bin`."""
    if not os.path.isdir(data_root):
        raise UserError(f"data directory {data_root} does not exist: run {make_command(data_root)} to make it, "
                        "or pass --data-dir")
    pattern = re.compile(rf"(^|_){re.escape(split)}_\d+\.(npy|bin)$")
    shards = sorted(os.path.join(data_root, name) for name in os.listdir(data_root) if pattern.search(name))
    if not shards:
        raise UserError(f"no '{split}' shards (*_{split}_NNNNNN.npy or .bin) in {data_root}: "
                        f"run {make_command(data_root)} to make them, or pass --data-dir")
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
