"""What the training loop evaluates: the val loss averaged over ranks, and HellaSwag spread over ranks
(its data read once, on rank 0)."""

import torch

from gpt2lib import parallel
from gpt2lib.common import UserError, raise_failure
from gpt2lib.hellaswag_data import load_examples
from gpt2lib.hellaswag_scoring import check_fits, tokenize_examples
from gpt2lib.hellaswag_scoring import evaluate as hellaswag_counts


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
    mean_loss, failed = dist_ctx.mean(
        torch.stack([loss_sum / val_steps, torch.tensor(float(failure is not None), device=dist_ctx.device)])
    )
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
        counts = hellaswag_counts(
            raw_model,
            examples,
            dist_ctx.device,
            rank=dist_ctx.rank,
            world_size=dist_ctx.world_size,
            autocast_dtype=precision.dtype,
            should_stop=between_batches,
        )
    stopped = counts is None
    counts = torch.zeros(3, device=dist_ctx.device) if stopped else counts
    n, correct, correct_norm, stops = dist_ctx.sum(
        torch.cat(
            [
                counts.to(torch.float64),
                torch.tensor([float(stopped)], dtype=torch.float64, device=dist_ctx.device),
            ]
        )
    ).tolist()
    return None if stops else {"n": int(n), "acc": correct / n, "acc_norm": correct_norm / n}


def run_evals(run, step, stop=None):
    """Val loss (through the training module: same shapes, no recompile) and HellaSwag. False when a
    stop ended them at a batch boundary: what was left unfinished is neither logged nor kept."""
    master = run.dist_ctx.master_process
    val_loss = evaluate_val_loss(
        run.model, run.val_loader, run.cfg.val_steps, run.precision, run.dist_ctx, run.cfg.loss_impl, stop
    )
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


def load_hellaswag(data_path, context_length):
    """Tokenized HellaSwag val examples, or None (with a warning) when the data is unavailable or
    holds a row longer than the model's context. Runs on rank 0 only: one download, and the
    examples are sent to the other ranks."""
    try:
        examples = tokenize_examples(load_examples("val", data_path=data_path))
        check_fits(examples, context_length)
        return examples
    except UserError as e:
        print(f"warning: HellaSwag eval is off: {e}")
        return None
