"""What the training loop measures and evaluates: the step's time and metrics (printed on rank 0 and
logged), the val loss averaged over ranks, HellaSwag spread over ranks. Works on train_gpt2's Run."""

import math
import time

import numpy as np
import torch

from gpt2lib import parallel
from gpt2lib.common import UserError, raise_failure
from gpt2lib.hellaswag_scoring import evaluate as hellaswag_counts
from gpt2lib.metrics import flops_per_token


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
    metrics = {"lr": result.lr, "norm": result.norm, "dt_ms": seconds * 1000,
               "tokens_per_sec": cfg.total_batch_size / seconds, **run.counts}
    line = (f"step {step:5d} | loss {result.loss:.6f} | lr {result.lr:.4e} | norm {result.norm:.4f} | "
            f"dt {seconds * 1000:.2f}ms | tok/sec {metrics['tokens_per_sec']:.0f}")
    if run.gpu_peak_flops:
        step_flops = flops_per_token(run.raw_model.config, cfg.seq_len) * cfg.total_batch_size
        metrics["mfu"] = step_flops / seconds / run.dist_ctx.world_size / run.gpu_peak_flops
        line += f" | mfu {metrics['mfu'] * 100:.1f}%"
    if device.type == "cuda":
        metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        line += f" | mem {metrics['peak_mem_gib']:.1f}GiB"
    if run.dist_ctx.master_process:
        print(line)
    run.dist_ctx.progress(step)
    run.log.write(step, "train", result.loss, **metrics)
    return metrics


def count_step_outcome(counts, norm, grad_clip, fp16):
    """Add a step to the run's counts: clipped (the norm exceeded --grad-clip) or, with fp16, skipped
    (an overflow: the scaler skipped the update)."""
    skipped = fp16 and not math.isfinite(norm)
    counts["skipped_steps"] = counts.get("skipped_steps", 0) + int(skipped)
    counts["clipped_steps"] = counts.get("clipped_steps", 0) + int(not skipped and 0 < grad_clip < norm)


def stop_agreed(stop, dist_ctx):
    """Whether any rank was asked to stop (a signal): one scalar all-reduced, so all ranks agree."""
    if not dist_ctx.ddp:
        return stop.requested
    return dist_ctx.sum(torch.tensor(float(stop.requested), device=dist_ctx.device)).item() > 0


@torch.no_grad()
def evaluate_val_loss(model, val_loader, val_steps, precision, dist_ctx, loss_impl="chunked", stop=None):
    """Mean loss over the first val_steps batches of the val split, averaged over all ranks. None when
    a stop (a StopRequest on any rank) came first: the ranks ask before every batch and end together."""
    model.eval()
    val_loader.reset()
    loss_sum = torch.zeros((), device=dist_ctx.device)
    failure = None  # a val shard that changed: every rank goes through the same collectives, then stops
    for _ in range(val_steps):
        if stop is not None and stop_agreed(stop, dist_ctx):
            model.train()
            return None
        dist_ctx.progress()
        try:
            x, y = val_loader.next_batch()
        except UserError as e:
            failure = failure or str(e)
            x = y = torch.zeros((val_loader.B, val_loader.T), dtype=torch.long, device=dist_ctx.device)
        with precision.autocast():
            _, loss = model(x, y, loss_impl=loss_impl)
        loss_sum += loss.float()
    model.train()
    mean_loss, failed = dist_ctx.mean(torch.stack([loss_sum / val_steps, torch.tensor(float(failure is not None),
                                                                                       device=dist_ctx.device)]))
    if failed > 0:
        dist_ctx.on_every_rank(lambda: raise_failure(failure))
    return mean_loss


@torch.no_grad()
def evaluate_hellaswag(raw_model, examples, precision, dist_ctx, stop=None):
    """acc_norm over all of HellaSwag's val split, examples divided among the ranks. Runs on the
    uncompiled module (sharing weights with the compiled one), so new shapes never recompile. None
    when a stop came first: a rank asked ends its share at the next batch (the forwards are no
    collectives, so it asks only itself), and the counts' all-reduce tells every rank."""

    def between_batches():
        dist_ctx.progress()
        return stop is not None and stop.requested

    with parallel.full_weights(raw_model):  # with --fsdp: the ranks' shares differ in size
        counts = hellaswag_counts(raw_model, examples, dist_ctx.device, rank=dist_ctx.rank,
                                  world_size=dist_ctx.world_size, autocast_dtype=precision.dtype,
                                  should_stop=between_batches)
    stopped = counts is None
    counts = torch.zeros(3, device=dist_ctx.device) if stopped else counts
    n, correct, correct_norm, stops = dist_ctx.sum(torch.cat([counts.to(torch.float64), torch.tensor(
        [float(stopped)], dtype=torch.float64, device=dist_ctx.device)])).tolist()
    return None if stops else {"n": int(n), "acc": correct / n, "acc_norm": correct_norm / n}


def run_evals(run, step, stop=None):
    """Val loss (through the training module: same shapes, no recompile) and HellaSwag. False when a
    stop ended them at a batch boundary: what was left unfinished is neither logged nor kept."""
    master = run.dist_ctx.master_process
    val_loss = evaluate_val_loss(run.model, run.val_loader, run.cfg.val_steps, run.precision, run.dist_ctx,
                                 run.cfg.loss_impl, stop)
    if val_loss is None:
        return False
    run.val_loss = val_loss.item()
    if master:
        print(f"step {step:5d} | val loss {run.val_loss:.4f}")
    run.log.write(step, "val", run.val_loss)
    if run.hella_examples is not None:
        hella = evaluate_hellaswag(run.raw_model, run.hella_examples, run.precision, run.dist_ctx, stop)
        if hella is None:
            return False
        if master:
            print(f"step {step:5d} | HellaSwag acc_norm {hella['acc_norm']:.4f} ({hella['n']} examples)")
        run.log.write(step, "hella", hella["acc_norm"], acc=hella["acc"], n=hella["n"])
    return True


def report_benchmark(timed, name, cfg, dist_ctx):
    """The median of the timed steps' metrics (peak memory: their maximum), printed on rank 0 in one
    line; None when no step was timed."""
    if not timed:
        return None
    median = {key: float(np.median([m[key] for m in timed])) for key in timed[0] if key != "peak_mem_gib"}
    if "peak_mem_gib" in timed[0]:
        median["peak_mem_gib"] = max(m["peak_mem_gib"] for m in timed)
    if dist_ctx.master_process:
        line = (f"benchmark {name} | B {cfg.batch_size} T {cfg.seq_len} x {dist_ctx.world_size} "
                f"process(es) | {len(timed)} steps | median {median['dt_ms']:.1f} ms/step | {median['tokens_per_sec']:,.0f} tokens/s")
        if "mfu" in median:
            line += f" | MFU {median['mfu'] * 100:.1f}%"
        if "peak_mem_gib" in median:
            line += f" | peak memory {median['peak_mem_gib']:.2f} GiB"
        print(line)
    return median
