"""Time hellaswag.evaluate on synthetic examples shaped like the real val split (10,042 examples,
contexts of 30-100 tokens, endings of 10-30), with a randomly initialised model: the time of one
HellaSwag eval during training, without the data or a tokenizer.

    python3 tools/hellaswag_timing.py                          # 124M on the GPU, bf16
    python3 tools/hellaswag_timing.py --model d2 --examples 200 --device cpu

Prints one line that tools/device_report.py reads: the first eval (which builds and caches the padded
device batches, as training's first eval does) and a second one (the cached case of every later eval).
"""

import argparse
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt2lib import hellaswag_scoring  # noqa: E402
from gpt2lib.common import GPT2_VOCAB_SIZE, pick_device  # noqa: E402
from gpt2lib.hellaswag_data import VAL_ROWS  # noqa: E402
from train_gpt2 import GPT, config_for  # noqa: E402


def synthetic_examples(n, seed=0):
    """TokenizedExamples of random ids with the val split's shape."""
    rng = np.random.default_rng(seed)
    ctx = [rng.integers(0, GPT2_VOCAB_SIZE, int(rng.integers(30, 101))).tolist() for _ in range(n)]
    endings = [
        [rng.integers(0, GPT2_VOCAB_SIZE, int(rng.integers(10, 31))).tolist() for _ in range(4)]
        for _ in range(n)
    ]
    return hellaswag_scoring.TokenizedExamples(ctx, endings, rng.integers(0, 4, n).tolist())


def timed_eval(model, examples, device, batch_size):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    hellaswag_scoring.evaluate(
        model, examples, device, batch_size=batch_size
    ).tolist()  # .tolist() waits for the GPU
    return time.perf_counter() - t0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--examples", type=int, default=VAL_ROWS)
    parser.add_argument("--batch-size", type=int, default=hellaswag_scoring.DEFAULT_BATCH_SIZE)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    torch.manual_seed(0)
    model = GPT(config_for(args.model, vocab_multiple=64)).to(device).eval()
    examples = synthetic_examples(args.examples)
    timed_eval(model, synthetic_examples(4 * args.batch_size, seed=1), device, args.batch_size)  # warm-up
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first = timed_eval(model, examples, device, args.batch_size)
    seconds = timed_eval(model, examples, device, args.batch_size)
    memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f}" if device.type == "cuda" else "-"
    tokens = sum(4 * len(c) + sum(len(e) for e in ends) for c, ends in zip(examples.ctx, examples.endings))
    print(
        f"hellaswag timing | {len(examples)} examples | first eval {first:.2f} s | eval {seconds:.3f} s | "
        f"{seconds / len(examples) * 1000:.3f} ms/example | {tokens / seconds:,.0f} tokens/s | "
        f"peak memory {memory} GiB"
    )


if __name__ == "__main__":
    main()
