"""Which checkpoint a run resumes from, when its nodes need not share a filesystem.

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

from gpt2lib import tracking
from gpt2lib.checkpoints import LOG_FILES, TRAIN_STATE, find_resume_checkpoint
from gpt2lib.common import UserError, one_line
from gpt2lib.distributed import FollowerStop


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


def local_holding(resume, log_dir, layout, dist_ctx):
    """This node's newest good checkpoint (with --resume PATH: that file, if this node has it), or None.
    Only each node's first process looks, so a node reads its files once."""
    if dist_ctx.local_rank != 0 or resume == "none":
        return None
    if resume != "auto" and not os.path.exists(resume):
        return None  # another node may have it
    try:
        path, checkpoint = find_resume_checkpoint(resume, log_dir, layout)
    except UserError as e:
        if resume != "auto":
            raise
        # every checkpoint here is damaged: a good one on another node may still do
        return Holding(dist_ctx.rank, socket.gethostname(), None, -1, None, damaged=str(e))
    if checkpoint is None:
        return None
    return Holding(dist_ctx.rank, socket.gethostname(), path, checkpoint["step"], checkpoint.get("run_id"),
                   checkpoint=checkpoint)


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
        raise UserError(f"the nodes' log dirs hold checkpoints of different runs ({listing}): "
                        "give every node this run's log dir, or pass --resume PATH or --resume none")
    top = max(r.step for r in found)
    return [r for r in found if r.step == top]


def check_same_contents(candidates):
    """Nodes that hold the same step must hold the same checkpoint: a shared filesystem seen twice,
    or copies. Different contents mean two histories, and neither is chosen silently."""
    if len({r.digest for r in candidates}) > 1:
        listing = "; ".join(r.where() for r in candidates)
        raise UserError(f"the nodes hold different checkpoints for step {candidates[0].step} ({listing}): "
                        "keep the one to resume on one node, or pass --resume PATH")


def find_holder(resume, log_dir, layout, dist_ctx):
    """The Holding of the checkpoint this run resumes from, or None: the same on every rank. On the
    holder it carries the checkpoint already read and verified (layout: see read_checkpoint). A
    collective: every rank calls it."""
    mine = dist_ctx.on_every_rank(lambda: local_holding(resume, log_dir, layout, dist_ctx))
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
