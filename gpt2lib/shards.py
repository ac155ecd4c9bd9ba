"""Token shard files: build-nanogpt's .npy (written by fineweb.py) and llm.c's .bin, found by name
and opened as read-only memory maps after their format is checked."""

import os
import re

import numpy as np
import xxhash

from gpt2lib.common import UserError

LLMC_MAGIC, LLMC_VERSION, LLMC_HEADER_BYTES = 20240520, 1, 256 * 4
# a shard's fingerprint reads 16 evenly spaced samples of 16K tokens (512 KB): a full hash of a 100M-token
# shard takes 0.2 s even with xxh3 from the page cache, so 20 s plus reading 20 GB at each start of a 10B run
DIGEST_SAMPLES, DIGEST_SAMPLE_TOKENS = 16, 16384


def make_command(data_root):
    """The command that makes data_root's shards: `fineweb.py --demo` for the directory it writes
    (data/pydoc)."""
    demo = os.path.normpath(os.path.abspath(data_root)).split(os.sep)[-2:] == ["data", "pydoc"]
    return "`python fineweb.py --demo`" if demo else "`python fineweb.py`"


def find_shards(data_root, split):
    """Sorted shard paths of one split: files named like `{prefix}_{split}_{idx}.npy` or `.bin`."""
    if not os.path.isdir(data_root):
        raise UserError(
            f"data directory {data_root} does not exist: run {make_command(data_root)} to make it, "
            "or pass --data-dir"
        )
    pattern = re.compile(rf"(^|_){re.escape(split)}_\d+\.(npy|bin)$")
    shards = sorted(os.path.join(data_root, name) for name in os.listdir(data_root) if pattern.search(name))
    if not shards:
        raise UserError(
            f"no '{split}' shards (*_{split}_NNNNNN.npy or .bin) in {data_root}: "
            f"run {make_command(data_root)} to make them, or pass --data-dir"
        )
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
            raise UserError(
                f"shard {path} has llm.c version {header[1]}, expected {LLMC_VERSION} (uint16 GPT-2 tokens)"
            )
        expected = LLMC_HEADER_BYTES + 2 * int(header[2])
        if os.path.getsize(path) != expected:
            raise UserError(
                f"shard {path} is {os.path.getsize(path)} bytes but its header promises "
                f"{header[2]} tokens ({expected} bytes): the file is truncated or damaged"
            )
        return np.memmap(path, dtype=np.uint16, mode="r", offset=LLMC_HEADER_BYTES, shape=(int(header[2]),))
    try:
        tokens = np.load(path, mmap_mode="r")
    except (ValueError, EOFError, OSError) as e:
        raise UserError(
            f"shard {path} is truncated or not a .npy file ({e}): delete it and rerun fineweb.py"
        ) from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UserError(
            f"shard {path} holds {tokens.dtype} of shape {tokens.shape}, expected 1-D uint16 tokens"
        )
    return tokens


def identity(stat):
    """What changes when a file is replaced, truncated or rewritten: device, inode, size, mtime, ctime."""
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


class ShardFile:
    """A shard whose identity is recorded when it is opened and checked around every read, so a
    shard truncated, rewritten or deleted under a run is a one-line error before any of its tokens
    is used. Tokens are read with pread, not through a memory map: a read past the end of a
    truncated file returns short, where a memory map would kill the process with SIGBUS."""

    def __init__(self, path):
        self.path = path
        before = self._stat()
        tokens = open_shard(path)  # checks the format
        self.offset, self.length = tokens.offset, len(tokens)  # where the uint16 tokens start, and how many
        del tokens
        self.identity = identity(before)
        self.check()
        self._digest = None

    def __len__(self):
        return self.length

    def _stat(self):
        try:
            return os.stat(self.path)
        except FileNotFoundError:
            raise UserError(
                f"shard {self.path} was deleted while the run was using it: restore it and "
                "resume (the checkpoints written so far are good)"
            ) from None

    def check(self, stat=None):
        """Raise a one-line UserError unless the file (or the open file's stat) is as it was at open."""
        now = identity(stat or self._stat())
        if now != self.identity:
            how = "truncated" if now[2] < self.identity[2] else "rewritten or replaced"
            raise UserError(
                f"shard {self.path} was {how} while the run was using it: restore the original and "
                "resume (the checkpoints written so far are good), or start over with --resume none"
            )

    def read(self, start, count):
        """count tokens from token index start, as uint16; checked before and after the read."""
        self.check()
        try:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                self.check(os.fstat(fd))  # replaced between the check and the open
                data = os.pread(fd, 2 * count, self.offset + 2 * start)
            finally:
                os.close(fd)
        except OSError as e:
            self._stat()
            raise UserError(f"shard {self.path}: cannot read it ({e.strerror or e})") from None
        self.check()  # a rewrite during the read
        if len(data) != 2 * count:
            raise UserError(
                f"shard {self.path} is shorter than when the run opened it: restore the original and resume"
            )
        return np.frombuffer(data, dtype=np.uint16)

    def digest(self):
        """A fingerprint of the tokens, read once: xxh3-128 of the token count and of DIGEST_SAMPLES evenly
        spaced samples, the first and last included. It tells a shard regenerated from other data (same
        name and size) from the one a checkpoint was trained on; a few tokens edited between samples pass."""
        if self._digest is None:
            count = min(DIGEST_SAMPLE_TOKENS, self.length)
            h = xxhash.xxh3_128(str(self.length).encode())
            for start in np.unique(np.linspace(0, self.length - count, DIGEST_SAMPLES).astype(np.int64)):
                h.update(self.read(int(start), count).tobytes())
            self._digest = h.hexdigest()
        return self._digest

    def max_token(self, chunk=2**24):
        """The largest token id, read chunk by chunk (a shard may be larger than memory)."""
        return max(
            (int(self.read(i, min(chunk, self.length - i)).max()) for i in range(0, self.length, chunk)),
            default=-1,
        )
