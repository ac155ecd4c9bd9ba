"""What the checkpoint checksum costs: a 124M checkpoint (weights, AdamW moments, loader and RNG
state, as train_gpt2.py writes it) is hashed, written (temporary file, fsync, rename) and read back
and verified, each timed on its own.

    python3 tools/checkpoint_cost.py                   # 124M, written into a temporary directory
    python3 tools/checkpoint_cost.py --dir /data/log    # on the disk a run would write to

Prints one line: seconds to hash, write and read, and the hash as a share of the write and the read.
"""

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt2lib import checkpoints  # noqa: E402
from gpt2lib.common import atomic_write  # noqa: E402
from train_gpt2 import GPT, config_for, configure_optimizer  # noqa: E402


def best_of(n, fn):
    """The fastest of n runs of fn, in seconds, and fn's last result."""
    times, result = [], None
    for _ in range(n):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return min(times), result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument(
        "--dir", default=None, help="where to write the checkpoint (default: a temporary directory)"
    )
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(config_for(args.model, vocab_multiple=64))
    optimizer = configure_optimizer(model, 0.1, 6e-4, "cpu")
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    optimizer.step()  # AdamW's moments exist, as in any checkpoint after step 0
    checkpoint = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": 1,
        "config": {"n_layer": model.config.n_layer},
        "loader": [{"position": 0}],
        "rng": [{"cpu": torch.get_rng_state(), "cuda": None}],
    }
    size = sum(t.numel() * t.element_size() for t in model.state_dict().values()) + sum(
        t.numel() * t.element_size() for s in optimizer.state_dict()["state"].values() for t in s.values()
    )
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "model_00001.pt")
        hash_s, digest = best_of(args.repeat, lambda: checkpoints.checksum(checkpoint))
        write_s, _ = best_of(args.repeat, lambda: atomic_write(path, lambda f: torch.save(checkpoint, f)))
        read_s, loaded = best_of(args.repeat, lambda: torch.load(path, map_location="cpu", weights_only=True))
        assert checkpoints.checksum(loaded) == digest
    print(
        f"checkpoint {args.model}: {size / 2**30:.2f} GiB of tensors | checksum {hash_s:.3f} s | "
        f"write (fsync) {write_s:.3f} s | read {read_s:.3f} s | checksum = {100 * hash_s / write_s:.1f}% of "
        f"the write, {100 * hash_s / read_s:.1f}% of the read"
    )


if __name__ == "__main__":
    main()
