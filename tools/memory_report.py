"""Memory, measured on the CPU: what each rank holds for weights, gradients and AdamW state under DDP
and --fsdp at several world sizes (gloo processes, one training step of train_gpt2's own code), its
peak RSS, and the activation bytes one micro-batch keeps for backward with and without --recompute.

    python tools/memory_report.py --model gpt2 --worlds 1 2 4       # bytes per rank, markdown table
    python tools/memory_report.py --model gpt2 --activations -T 1024  # --recompute's saving
"""

import argparse
import os
import resource
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_gpt2  # noqa: E402
from gpt2lib import parallel  # noqa: E402
from gpt2lib.distributed import close_process_group, end_process  # noqa: E402

MIB = 2**20


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state_worker(rank, world_size, port, model_name, fsdp, out_dir):
    """One optimizer step on one random micro-batch (B=1, T=64), then this rank's bytes and peak RSS."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = train_gpt2.GPT(train_gpt2.config_for(model_name, vocab_multiple=64))
    if fsdp:
        parallel.shard_model(model, torch.device("cpu"))
        trained = model
    else:
        trained = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = train_gpt2.configure_optimizer(model, 0.1, 6e-4, "cpu")
    x = torch.randint(0, 50257, (1, 64))
    _, loss = trained(x, x, loss_impl="chunked")
    loss.backward()
    optimizer.step()
    counted = parallel.state_bytes(model, optimizer)
    counted["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    torch.save(counted, os.path.join(out_dir, f"rank{rank}.pt"))
    close_process_group()
    end_process(0)  # a normal exit can abort: see distributed.end_process


def measure_state(model_name, world_size, fsdp):
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(state_worker, args=(world_size, free_port(), model_name, fsdp, out), nprocs=world_size)
        return [torch.load(os.path.join(out, f"rank{r}.pt")) for r in range(world_size)]


def state_table(model_name, worlds, modes):
    print(
        f"| {model_name} | world | params MiB | grads MiB | AdamW MiB | total MiB per rank | "
        "peak RSS MiB (max rank) |"
    )
    print("|---|---|---|---|---|---|---|")
    for fsdp in [mode == "fsdp" for mode in modes]:
        for world in worlds:
            ranks = measure_state(model_name, world, fsdp)
            worst = max(ranks, key=lambda r: r["params"] + r["grads"] + r["optimizer"])
            total = worst["params"] + worst["grads"] + worst["optimizer"]
            print(
                f"| {'FSDP' if fsdp else 'DDP'} | {world} | {worst['params'] / MIB:,.1f} | "
                f"{worst['grads'] / MIB:,.1f} | {worst['optimizer'] / MIB:,.1f} | {total / MIB:,.1f} | "
                f"{max(r['peak_rss'] for r in ranks) / MIB:,.0f} |",
                flush=True,
            )


def activation_bytes(model_name, B, T, recompute):
    """Bytes the Blocks save for backward in one forward of a (B, T) batch (weights left out)."""
    torch.manual_seed(0)
    model = train_gpt2.GPT(train_gpt2.config_for(model_name, vocab_multiple=64))
    model.set_recompute(recompute)
    total, inside = [0], [False]

    def pack(tensor):
        if inside[0] and not (tensor.is_leaf and tensor.requires_grad):
            total[0] += tensor.numel() * tensor.element_size()
        return tensor

    for block in model.transformer.h:
        block.register_forward_pre_hook(lambda *_: inside.__setitem__(0, True))
        block.register_forward_hook(lambda *_: inside.__setitem__(0, False))
    x = torch.randint(0, 50257, (B, T))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x, x, loss_impl="chunked")
    return total[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--modes", nargs="+", choices=["ddp", "fsdp"], default=["ddp", "fsdp"])
    parser.add_argument(
        "--activations", action="store_true", help="measure --recompute's activation bytes instead"
    )
    parser.add_argument("-B", type=int, default=1)
    parser.add_argument("-T", type=int, default=1024)
    args = parser.parse_args()
    if args.activations:
        torch.set_num_threads(max(1, os.cpu_count() // 2))
        plain, recomputed = (activation_bytes(args.model, args.B, args.T, r) for r in (False, True))
        print(
            f"{args.model} B={args.B} T={args.T} fp32: the Blocks keep {plain / MIB:,.1f} MiB for backward, "
            f"{recomputed / MIB:,.1f} MiB with --recompute ({recomputed / plain:.1%})"
        )
    else:
        state_table(args.model, args.worlds, args.modes)


if __name__ == "__main__":
    main()
