"""What the loop measures of each step: its wall time, its metrics (printed on rank 0 and logged, MFU
included), the clipped and skipped counts, and the median a --benchmark run reports."""

import math
import time

import numpy as np
import torch

from gpt2lib.flops import flops_per_token


class StepTimer:
    """Wall time of the block it wraps, waiting for the GPU's queued work; resets CUDA's peak memory."""

    def __init__(self, device):
        self.device, self.seconds = device, None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - self.t0


def log_step(run, step, result, seconds):
    """Print (rank 0) and log a step's numbers; returns them as metrics.jsonl has them."""
    cfg, device = run.cfg, run.dist_ctx.device
    count_step_outcome(run.counts, result.norm, cfg.grad_clip, run.precision.scaler.is_enabled())
    metrics = {
        "lr": result.lr,
        "norm": result.norm,
        "dt_ms": seconds * 1000,
        "tokens_per_sec": cfg.total_batch_size / seconds,
        **run.counts,
    }
    line = (
        f"step {step:5d} | loss {result.loss:.6f} | lr {result.lr:.4e} | norm {result.norm:.4f} | "
        f"dt {seconds * 1000:.2f}ms | tok/sec {metrics['tokens_per_sec']:.0f}"
    )
    if run.gpu_peak_flops:
        step_flops = flops_per_token(run.raw_model.config, cfg.seq_len) * cfg.total_batch_size
        metrics["mfu"] = step_flops / seconds / run.dist_ctx.world_size / run.gpu_peak_flops
        line += f" | mfu {metrics['mfu'] * 100:.1f}%"
    if device.type == "cuda":
        metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        line += f" | mem {metrics['peak_mem_gib']:.1f}GiB"
    if run.dist_ctx.master_process:
        print(line)
    run.dist_ctx.progress(step)  # what the watchdog reads (--collective-timeout)
    run.log.write(step, "train", result.loss, **metrics)
    return metrics


def count_step_outcome(counts, norm, grad_clip, fp16):
    """Add a step to the run's counts: clipped (the norm exceeded --grad-clip) or, with fp16, skipped
    (an overflow: the scaler skipped the update)."""
    skipped = fp16 and not math.isfinite(norm)
    counts["skipped_steps"] = counts.get("skipped_steps", 0) + int(skipped)
    counts["clipped_steps"] = counts.get("clipped_steps", 0) + int(not skipped and 0 < grad_clip < norm)


def report_benchmark(timed, name, cfg, dist_ctx):
    """The median of the timed steps' metrics (peak memory: their maximum), printed on rank 0 in one
    line; None when no step was timed."""
    if not timed:
        return None
    median = {key: float(np.median([m[key] for m in timed])) for key in timed[0] if key != "peak_mem_gib"}
    if "peak_mem_gib" in timed[0]:
        median["peak_mem_gib"] = max(m["peak_mem_gib"] for m in timed)
    if dist_ctx.master_process:
        line = (
            f"benchmark {name} | B {cfg.batch_size} T {cfg.seq_len} x {dist_ctx.world_size} "
            f"process(es) | {len(timed)} steps | median {median['dt_ms']:.1f} ms/step | "
            f"{median['tokens_per_sec']:,.0f} tokens/s"
        )
        if "mfu" in median:
            line += f" | MFU {median['mfu'] * 100:.1f}%"
        if "peak_mem_gib" in median:
            line += f" | peak memory {median['peak_mem_gib']:.2f} GiB"
        print(line)
    return median
