"""How often a finished two-rank gloo run aborts at exit: each try launches torchrun with two CPU
processes that build a DDP model, train a few steps, share tensors through DistContext as a run does,
and close the process group; then the process either exits normally (the interpreter tears down, as
train_gpt2.py did) or ends by distributed.end_process (no teardown, as it does now). The two ways
alternate, under the same load.

    python3 tools/exit_check.py                 # 100 tries of each, with one busy process beside them
    python3 tools/exit_check.py --tries 300 --busy 2

Prints one line per way: tries, failed exits, and how many of those were SIGABRT.
"""

import argparse
import os
import subprocess
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from gpt2lib.distributed import close_process_group, end_process, setup_distributed  # noqa: E402

WAYS = ("teardown", "end_process")


def worker(way):
    """One rank: what a short DDP run does with its process group, then the exit under test."""
    ctx = setup_distributed("cpu")
    layers = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64))
    model = torch.nn.parallel.DistributedDataParallel(layers)
    optimizer = torch.optim.AdamW(model.parameters())
    for step in range(5):
        model(torch.randn(8, 64)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        ctx.gather_objects({"step": step})
        ctx.broadcast({"tensor": torch.randn(100)}, src=step % 2)
    del layers, model, optimizer
    close_process_group()
    if way == "end_process":
        end_process(0)


def one_try(way):
    """The exit code torchrun reports, and whether a rank died of SIGABRT."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        os.path.abspath(__file__),
        "--worker",
        way,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    return proc.returncode, "SIGABRT" in proc.stderr


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tries", type=int, default=100, help="launches of each way")
    parser.add_argument("--busy", type=int, default=1, help="busy-looping processes beside the runs")
    parser.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.busy)]
    failed, aborted = dict.fromkeys(WAYS, 0), dict.fromkeys(WAYS, 0)
    try:
        for _ in range(args.tries):
            for way in WAYS:
                rc, abort = one_try(way)
                failed[way] += rc != 0
                aborted[way] += abort
    finally:
        for proc in busy:
            proc.kill()
    for way in WAYS:
        print(
            f"{way}: {args.tries} tries, {failed[way]} failed exits, {aborted[way]} of them SIGABRT "
            f"(busy processes beside: {args.busy})"
        )


if __name__ == "__main__":
    main()
