"""Resuming a run: which checkpoint it resumes from, when its nodes need not share a filesystem; the
checks that a checkpoint belongs to this run (same --init-from, same model, the schedule it trained
with); and restoring a checkpoint into this rank's model, optimizer, data position and RNG.

Rank 0 writes checkpoints and logs into its own --log-dir. After a restart rank 0 can be on another
node (torchrun's c10d rendezvous orders nodes by address and agent PID, so a replaced node, or other
nodes than last time, can move it), so no single node's view
decides: the first process of every node reports the newest good checkpoint in its own log dir
(or whether it has the file --resume PATH names), every rank applies the same choice to the same
reports, and the rank that holds the chosen checkpoint reads it and sends it to the others.
"""

import hashlib
import os
import socket
from dataclasses import dataclass, field, replace

from gpt2lib import checkpoints, parallel, tracking
from gpt2lib.checkpoints import TRAIN_STATE
from gpt2lib.common import UserError, one_line
from gpt2lib.distributed import FollowerStop
from gpt2lib.runlog import LOG_FILES


@dataclass
class Holding:
    """The newest good checkpoint one node has, as its first process reports it."""

    rank: int
    host: str
    path: str
    step: int
    run_id: str | None  # None for checkpoints written before runs had an id
    digest: str | None = None  # of the file; computed only when two nodes hold the same step
    checkpoint: dict | None = field(default=None, repr=False)  # stays on the holder: never gathered
    damaged: str | None = None  # under auto: why this node has checkpoints but none good (path None)

    def where(self):
        return f"{self.host} (rank {self.rank}) {self.path}"


def looks_here(resume, dist_ctx):
    """Whether this process looks for the node's checkpoint: each node's first process, so a node reads
    its files once, unless --resume none, or --resume PATH names a file this node lacks (another node
    may have it)."""
    return dist_ctx.local_rank == 0 and resume != "none" and (resume == "auto" or os.path.exists(resume))


def local_holding(rank, path, checkpoint, damaged=None):
    """This node's report: the checkpoint it found (path None: none), or why all of its are damaged."""
    if damaged is not None:  # under auto a good checkpoint on another node may still do
        return Holding(rank, socket.gethostname(), None, -1, None, damaged=damaged)
    if path is None:
        return None
    return Holding(
        rank, socket.gethostname(), path, checkpoint["step"], checkpoint.get("run_id"), checkpoint=checkpoint
    )


def file_digest(path):
    """Of a .pt checkpoint's bytes; of a sharded directory's train_state.pt, which holds its step,
    data positions and RNG states, and differs between any two histories."""
    if os.path.isdir(path):
        path = os.path.join(path, TRAIN_STATE)
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "blake2b").hexdigest()
    except OSError as e:
        raise UserError(f"{path}: cannot read it again ({one_line(e)})") from None


def newest(reports, resume):
    """The reports that hold the newest checkpoint (several when nodes hold the same step), or []
    to start without one. The same reports give the same answer on every rank."""
    found = [r for r in reports if r is not None and r.damaged is None]
    if not found:
        damaged = [r for r in reports if r is not None]
        if damaged:  # and no node has a good one
            r = damaged[0]
            raise UserError(r.damaged if r.rank == 0 else f"{r.host} (rank {r.rank}): {r.damaged}")
        if resume not in ("auto", "none"):
            where = " on any node" if len(reports) > 1 else ""
            raise UserError(f"checkpoint {resume} does not exist{where}")
        return []
    runs = {r.run_id for r in found if r.run_id is not None}
    if len(runs) > 1:
        listing = "; ".join(f"{r.where()} of run {r.run_id}" for r in found if r.run_id is not None)
        raise UserError(
            f"the nodes' log dirs hold checkpoints of different runs ({listing}): "
            "give every node this run's log dir, or pass --resume PATH or --resume none"
        )
    top = max(r.step for r in found)
    return [r for r in found if r.step == top]


def check_same_contents(candidates):
    """Nodes that hold the same step must hold the same checkpoint: a shared filesystem seen twice,
    or copies. Different contents mean two histories, and neither is chosen silently."""
    if len({r.digest for r in candidates}) > 1:
        listing = "; ".join(r.where() for r in candidates)
        raise UserError(
            f"the nodes hold different checkpoints for step {candidates[0].step} ({listing}): "
            "keep the one to resume on one node, or pass --resume PATH"
        )


def find_holder(mine, resume, dist_ctx):
    """The Holding of the checkpoint this run resumes from, or None: the same on every rank. mine is
    this process's report (local_holding; None when it did not look or found nothing); on the holder
    the result carries the checkpoint it read and verified. A collective: every rank calls it."""
    reports = dist_ctx.gather_objects(replace(mine, checkpoint=None) if mine else None)
    try:
        candidates = newest(reports, resume)
        if len(candidates) > 1:
            holds_one = mine is not None and any(r.rank == mine.rank for r in candidates)
            digest = dist_ctx.on_every_rank(lambda: file_digest(mine.path) if holds_one else None)
            digests = dist_ctx.gather_objects(digest)
            candidates = [replace(r, digest=digests[r.rank]) for r in candidates]
            check_same_contents(candidates)
    except UserError as e:  # every rank found the same problem in the same reports; rank 0 says it
        raise e if dist_ctx.master_process else FollowerStop(str(e)) from None
    if not candidates:
        return None
    holder = min(candidates, key=lambda r: r.rank)  # rank 0 when it has it: nothing to move
    return mine if mine is not None and mine.rank == holder.rank else holder


def read_logs(log_dir):
    """{name relative to log_dir: bytes} of the run log in log_dir, sent to a new rank 0 with the
    checkpoint: log.txt and metrics.jsonl, and the trackers' files that continue the run there
    (TensorBoard's event files, the W&B run id; W&B's own run directories stay, the server has them)."""
    names = [*LOG_FILES, tracking.WANDB_ID_FILE]
    for directory, _, files in os.walk(os.path.join(log_dir, tracking.TENSORBOARD_DIR)):
        names += [os.path.relpath(os.path.join(directory, name), log_dir) for name in sorted(files)]
    logs = {}
    for name in names:
        path = os.path.join(log_dir, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                logs[name] = f.read()
    return logs


SHAPE_FIELDS = ("n_layer", "n_head", "n_embd")


def shape_text(config):
    return f"{config['n_layer']} layers, {config['n_head']} heads, width {config['n_embd']}"


def same_source(a, b):
    return os.path.normpath(a) == os.path.normpath(b) if a and b else a == b


def origin_text(init_from):
    return f"--init-from {init_from}" if init_from else "scratch (no --init-from)"


def cooldown_start(max_steps, cooldown_steps):
    """The first step of wsd's cooldown; --cooldown-steps 0 means 20% of --max-steps."""
    return max_steps - (cooldown_steps or max_steps // 5)


def print_schedule(cfg):
    """One line at start for a wsd run: where its stable phase ends and how it cools down."""
    if cfg.lr_schedule == "wsd" and not cfg.eval_only:
        print(
            f"lr schedule wsd: warmup {cfg.warmup_steps} steps, lr {cfg.lr:g} until step "
            f"{cfg.max_steps - cfg.cooldown_steps}, {cfg.cooldown_shape} cooldown to "
            f"{cfg.lr * cfg.min_lr_ratio:g} at step {cfg.max_steps}"
        )


def schedule_config(cfg, checkpoint):
    """cfg with the wsd cooldown fixed, so that the lr of the steps a resumed checkpoint already
    trained never changes. A checkpoint of the stable phase continues it under a larger --max-steps,
    and under a smaller one the cooldown starts at the checkpoint at the earliest. A checkpoint
    already in its cooldown keeps that cooldown: another --max-steps is refused."""
    if cfg.eval_only:  # no step is trained
        return cfg
    past = (checkpoint or {}).get("train_config") or {}
    if checkpoint is not None and past.get("lr_schedule", "cosine") != cfg.lr_schedule:
        raise UserError(
            f"the checkpoint at step {checkpoint['step']} was trained with --lr-schedule "
            f"{past.get('lr_schedule', 'cosine')}, not {cfg.lr_schedule}: pass the same --lr-schedule, "
            "or --resume none"
        )
    if cfg.lr_schedule != "wsd":
        return cfg
    start = cooldown_start(cfg.max_steps, cfg.cooldown_steps)
    if checkpoint is not None:
        step, past_start = checkpoint["step"], cooldown_start(past["max_steps"], past["cooldown_steps"])
        if step <= past_start:
            start = max(start, step)
        elif cfg.max_steps != past["max_steps"]:
            raise UserError(
                f"the checkpoint at step {step} is in the cooldown that started at step {past_start}: "
                f"resume it with --max-steps {past['max_steps']}, or resume a checkpoint of the stable phase"
            )
        else:  # the cooldown under way goes on as it started, whatever --cooldown-steps says now
            start = past_start
    return replace(cfg, cooldown_steps=cfg.max_steps - start)


def check_model_flag(config, source, model_flag, wanted):
    """An explicit --model must have the shape of the model that `source` brings (config: GPTConfig's
    fields). wanted: --model's GPTConfig fields; model_flag: --model as given (empty: not given)."""
    if model_flag and any(wanted[k] != config[k] for k in SHAPE_FIELDS):
        raise UserError(
            f"--model {model_flag} ({shape_text(wanted)}) conflicts with {source} ({shape_text(config)}): "
            f"leave --model out, the shape comes from {source}"
        )


def check_resumable(path, checkpoint, config, cfg, wanted):
    """Resume only a checkpoint of this run: one started from the same --init-from (or from scratch),
    with the same model. config: the checkpoint's GPTConfig fields, defaults filled; wanted: those of
    --model with --vocab-multiple (None with --init-from and no --model: the shape is the checkpoint's)."""
    started_from = (checkpoint.get("train_config") or {}).get("init_from", "")
    if not same_source(started_from, cfg.init_from):
        raise UserError(
            f"{path} is a run started from {origin_text(started_from)}, not from "
            f"{origin_text(cfg.init_from)}: pass the same --init-from, another --log-dir, or --resume none"
        )
    schedule_config(cfg, checkpoint)
    if checkpoints.trained_with(checkpoint) != cfg.optimizer:
        raise UserError(
            f"{path} was trained with --optimizer {checkpoints.trained_with(checkpoint)}, not "
            f"{cfg.optimizer}: pass the same --optimizer, another --log-dir, or --resume none"
        )
    if not cfg.init_from:
        if config != wanted:
            raise UserError(
                f"the checkpoint's model {config} differs from --model's {wanted}: "
                "pass the same --model and --vocab-multiple, or --resume none"
            )
        return
    check_model_flag(config, path, cfg.model, wanted)
    if config["vocab_multiple"] != cfg.vocab_multiple:
        raise UserError(
            f"{path} pads its vocabulary to a multiple of {config['vocab_multiple']}, not "
            f"{cfg.vocab_multiple}: pass the same --vocab-multiple, or --resume none"
        )


def restore(checkpoint, raw_model, optimizer, precision, train_loader, dist_ctx):
    """Load a checkpoint's model into this process and, when it trains (an optimizer is given), its
    optimizer, loss scale, data position and RNG. Sharded or not, a checkpoint loads into a model
    sharded by --fsdp or not, at any world size."""
    if "sharded" in checkpoint:  # a directory: every rank reads its part; a failed read stops every rank
        dist_ctx.on_every_rank(lambda: checkpoints.load_sharded(checkpoint["sharded"], raw_model, optimizer))
    elif parallel.is_sharded(raw_model):  # a .pt under --fsdp: every rank keeps its shard of the full state
        parallel.load_full_state(raw_model, optimizer, checkpoint["model"], checkpoint["optimizer"])
    else:
        raw_model.load_state_dict(checkpoint["model"])
        if optimizer is not None:
            optimizer.load_state_dict(checkpoint["optimizer"])
    if optimizer is None:  # --eval-only
        return checkpoint["step"]
    if checkpoint.get("scaler"):
        precision.scaler.load_state_dict(checkpoint["scaler"])
    # every rank's state is stored; with another world size the (global) data position still holds
    same_world = len(checkpoint["loader"]) == dist_ctx.world_size
    train_loader.load_state_dict(checkpoint["loader"][dist_ctx.rank if same_world else 0])
    checkpoints.set_rng_state(checkpoint["rng"][dist_ctx.rank if same_world else 0], dist_ctx.device)
    return checkpoint["step"]
