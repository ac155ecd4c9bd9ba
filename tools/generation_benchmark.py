"""Time train_gpt2.generate (KV cache) against transformers' generate (its own cache) on the same
weights, greedy, on the CPU, and print a markdown table: wall seconds, and CPU seconds of this
process (all its threads), which a machine shared with other work inflates less than wall time.

The model is a seeded random init of the chosen shape (default: 124M), exported with our
save_pretrained and loaded with GPT2LMHeadModel, so both run exactly the same weights offline; the
time of a dense forward does not depend on the values. Both produce exactly --tokens new tokens
(transformers' stop at <|endoftext|> is turned off) and the table says whether the texts agree.

    python tools/generation_benchmark.py                          # 1 thread and all, 100 and 500 tokens
    python tools/generation_benchmark.py --threads 4 --tokens 200 --repeats 3
"""

import argparse
import logging
import os
import platform
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt2lib.common import GPT2_EOT, get_encoding  # noqa: E402
from train_gpt2 import GPT, config_for, generate  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", help="gpt2 ... gpt2-xl or dN (default: gpt2, 124M)")
    parser.add_argument("--prompt", default="Hello, I'm a language model,")
    parser.add_argument("--tokens", type=int, nargs="+", default=[100, 500], help="new tokens per run")
    parser.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=None,
        help="torch CPU threads to try (default: 1 and torch's default, all cores)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="runs per cell; the fastest counts")
    return parser.parse_args(argv)


def load_models(name):
    """Our model and transformers' GPT2LMHeadModel with the same (random, seeded) weights."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.manual_seed(0)
    ours = GPT(config_for(name)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        ours.save_pretrained(tmp)
        theirs = GPT2LMHeadModel.from_pretrained(tmp).eval()
    theirs.generation_config.eos_token_id = None  # a random model may emit <|endoftext|>: always n tokens
    return ours, theirs


def timed(fn):
    """(wall seconds, CPU seconds, result) of one call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main(argv=None):
    args = parse_args(argv)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    threads = args.threads or sorted({1, torch.get_num_threads()})
    ours, theirs = load_models(args.model)
    enc = get_encoding()
    ids = torch.tensor([enc.encode(args.prompt)])

    def run_ours(n):
        return generate(ours, args.prompt, n, top_k=1)[0]

    def run_theirs(n):
        out = theirs.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False, pad_token_id=GPT2_EOT
        )
        assert out.shape[1] == ids.shape[1] + n
        return enc.decode(out[0].tolist())

    run_ours(4), run_theirs(4)  # warm-up: first-call allocations, lazy imports
    print(
        f"{args.model} ({ours.num_parameters():,} parameters), greedy, prompt of {ids.shape[1]} tokens, "
        f"torch {torch.__version__}, transformers {__import__('transformers').__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, fastest of {args.repeats}"
    )
    print()
    print(
        "| threads | new tokens | ours wall (s) | transformers wall (s) | ours CPU (s) | "
        "transformers CPU (s) | speed-up (wall) | speed-up (CPU) | same text |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        for n in args.tokens:
            ours_runs, theirs_runs = [], []
            for _ in range(args.repeats):  # interleaved, so a busy spell of the machine hits both
                ours_runs.append(timed(lambda: run_ours(n)))
                theirs_runs.append(timed(lambda: run_theirs(n)))
            ours_wall, ours_cpu = min(t[0] for t in ours_runs), min(t[1] for t in ours_runs)
            theirs_wall, theirs_cpu = min(t[0] for t in theirs_runs), min(t[1] for t in theirs_runs)
            same = "yes" if ours_runs[-1][2] == theirs_runs[-1][2] else "NO"
            print(
                f"| {n_threads} | {n} | {ours_wall:.2f} | {theirs_wall:.2f} | {ours_cpu:.2f} | "
                f"{theirs_cpu:.2f} | {theirs_wall / ours_wall:.2f}x | {theirs_cpu / ours_cpu:.2f}x | "
                f"{same} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
