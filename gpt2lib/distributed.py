"""Processes: setting up the process group under torchrun, and DistContext, through which every
decision that steers the run is taken on rank 0 (or agreed by all ranks) and shared."""

import dataclasses
import gc
import os
import socket
import sys
import threading
import time
import uuid
from datetime import timedelta

import torch

from gpt2lib.common import UserError, one_line, pick_device

CPU = torch.device("cpu")  # DistContext's default device: a single process on the CPU


class FollowerStop(UserError):
    """Raised on every rank but 0 when rank 0 (or another rank) stopped the run with a UserError:
    the run ends on all ranks alike, and only rank 0 prints the message."""


class _Slot:
    """A tensor's place in a structure sent from rank 0: the tensor itself follows separately."""

    def __init__(self, index, shape, dtype):
        self.index, self.shape, self.dtype = index, shape, dtype


class DistContext:
    """Rank, world size and device of this process, and the collectives the loop needs.
    A single process (no torchrun) is world_size 1 and every collective is a no-op."""

    def __init__(self, rank=0, local_rank=0, world_size=1, device=CPU, watchdog=None):
        self.rank, self.local_rank, self.world_size, self.device = rank, local_rank, world_size, device
        self.master_process = rank == 0
        self.watchdog = watchdog

    def progress(self, step=None):
        """This rank moved on (a step done, an eval batch): the watchdog's measure; no I/O."""
        if self.watchdog is not None:
            self.watchdog.progress(step)

    @property
    def ddp(self):
        return self.world_size > 1

    def sum(self, tensor):
        if self.ddp:
            tensor = tensor.clone()
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def mean(self, tensor):
        return self.sum(tensor) / self.world_size

    def gather_objects(self, obj):
        if not self.ddp:
            return [obj]
        out = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def decide(self, fn, src=0):
        """fn() on rank src only (rank 0 unless another rank holds what fn needs); its result
        (tensors included) on every rank. When fn fails there, every rank stops, and rank 0 prints
        why: nothing waits forever for a rank that is gone."""
        if not self.ddp:
            return fn()
        result, failure, reason = None, None, None
        if self.rank == src:
            try:
                result = fn()
            except Exception as e:
                failure = e
                if not isinstance(e, UserError):
                    reason = f"rank {src} failed: {one_line(e)}"
                else:
                    reason = str(e) if src == 0 else f"rank {src}: {e}"
        reason, result = self.broadcast((reason, result), src)
        if failure is not None and self.master_process:
            raise failure
        if reason is not None:
            raise FollowerStop(reason) if not self.master_process else UserError(reason)
        return result

    def on_every_rank(self, fn):
        """fn() on each rank (for what each rank must do for itself, like opening its data). If fn
        raises a UserError on any rank, every rank stops with that rank's message."""
        try:
            value, error = fn(), None
        except UserError as e:
            value, error = None, str(e)
        failed = [(rank, message) for rank, message in enumerate(self.gather_objects(error)) if message]
        if failed:
            rank, message = failed[0]
            message = message if not self.ddp else f"rank {rank}: {message}"
            raise FollowerStop(message) if not self.master_process else UserError(message)
        return value

    def broadcast(self, obj, src=0):
        """Rank src's obj on every rank. Its structure (dicts, lists, tuples, dataclasses) is pickled;
        its tensors are sent one by one on this process's device (NCCL moves device tensors only) and
        arrive on the CPU, so no rank needs another rank's files."""
        if not self.ddp:
            return obj
        tensors = []

        def strip(value):
            if not isinstance(value, torch.Tensor):
                return value
            tensors.append(value)
            return _Slot(len(tensors) - 1, value.shape, value.dtype)

        def fill(value):
            if not isinstance(value, _Slot):
                return value
            if self.rank == src:
                tensor = tensors[value.index].to(self.device).contiguous()
            else:
                tensor = torch.empty(value.shape, dtype=value.dtype, device=self.device)
            torch.distributed.broadcast(tensor, src=src)  # every rank walks the structure in the same order
            return tensor.cpu()

        box = [map_leaves(obj, strip) if self.rank == src else None]
        torch.distributed.broadcast_object_list(box, src=src, device=self.device)
        return map_leaves(box[0], fill)


def map_leaves(value, fn):
    """value with fn applied to every leaf inside its dataclasses, dicts, lists and tuples."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(
            value, **{f.name: map_leaves(getattr(value, f.name), fn) for f in dataclasses.fields(value)}
        )
    if isinstance(value, dict):
        return {k: map_leaves(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(map_leaves(v, fn) for v in value)
    return fn(value)


def setup_distributed(requested_device, group_of_one=False, collective_timeout=600.0):
    """DistContext from torchrun's environment (NCCL on CUDA, gloo otherwise), or a single process:
    with group_of_one in a process group of its own (FSDP shards over a process group, even of one).
    Under torchrun a Watchdog ends every live rank when the run makes no progress for
    collective_timeout seconds; the process group's own timeout, twice that, is only a backstop."""
    device = pick_device(requested_device)
    if "RANK" not in os.environ:
        if group_of_one:
            torch.distributed.init_process_group(
                "nccl" if device.type == "cuda" else "gloo",
                store=torch.distributed.HashStore(),
                rank=0,
                world_size=1,
            )
        return DistContext(device=device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per process
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(
        backend,
        store=attempt_store(),
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=2 * collective_timeout),
    )
    dist_ctx = DistContext(rank, local_rank, world_size, device)
    global _watchdog
    _watchdog = dist_ctx.watchdog = Watchdog.start(dist_ctx, collective_timeout)
    return dist_ctx


def close_process_group():
    """End the process group, if there is one; True when there was. The wrapped models' reference
    cycles (DDP's and FSDP's hooks) are collected first, while the group they use still exists. The
    watchdog stops first: ranks that end at different moments are no stall."""
    if _watchdog is not None:
        _watchdog.stop()
    if not torch.distributed.is_initialized():
        return False
    gc.collect()
    torch.distributed.destroy_process_group()
    return True


def end_process(exit_code):
    """Exit a process that had a process group, skipping the interpreter's teardown. Once a DDP model
    was built, the group's gloo worker threads outlive destroy_process_group, and one that frees a
    finished collective's tensors while the interpreter tears down aborts the process ("terminate
    called without an active exception", SIGABRT): a finished run then reports a failure (2 of 120
    two-rank CPU runs, 0 of 120 ended here: tools/exit_check.py). Every file and tracker is closed by
    then; the standard streams are flushed here."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


ATTEMPT_KEYS = "train_gpt2/attempt"
JOIN_TIMEOUT = timedelta(minutes=5)


def attempt_store():
    """The key-value store the processes meet in, private to this torchrun attempt. torchrun gives
    every attempt (a --max-restarts restart, a rendezvous re-run after a node joined or was replaced)
    the store that earlier attempts used, whose stale worker addresses the new workers could read and
    then wait on forever; a prefix that rank 0 draws afresh for each attempt keeps them apart.
    (TORCHELASTIC_RESTART_COUNT cannot be that prefix: it counts per node, so a replacement node
    starts at 0 while the survivors are at 1, and a restart for a joining node leaves it unchanged.)"""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None  # init_process_group's own env:// rendezvous
    store = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=JOIN_TIMEOUT
    )
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = open_attempt(store, world_size) if rank == 0 else join_attempt(store, rank)
    return torch.distributed.PrefixStore(f"{ATTEMPT_KEYS}/{attempt}", store)


def join_attempt(store, rank):
    """Rank > 0: learn this attempt's id from rank 0. The store still holds earlier attempts' answers,
    so the question carries a token of this process that no earlier rank 0 can have answered."""
    token = uuid.uuid4().hex
    store.set(f"{ATTEMPT_KEYS}/hello/{rank}", token)
    answer = f"{ATTEMPT_KEYS}/welcome/{token}"
    try:
        store.wait([answer], JOIN_TIMEOUT)
    except torch.distributed.DistStoreError:
        raise UserError(
            f"rank {rank}: rank 0 did not start within {JOIN_TIMEOUT} (see rank 0's node)"
        ) from None
    attempt = store.get(answer).decode()
    store.add(f"{ATTEMPT_KEYS}/{attempt}/joined", 1)
    return attempt


def open_attempt(store, world_size, poll_s=0.05):
    """Rank 0: draw a new attempt id, and answer each rank's latest token until every rank has joined.
    A token left by an earlier attempt's rank gets an answer too, which nobody reads."""
    attempt = uuid.uuid4().hex
    joined, answered = f"{ATTEMPT_KEYS}/{attempt}/joined", {}
    deadline = time.monotonic() + JOIN_TIMEOUT.total_seconds()
    while store.add(joined, 0) < world_size - 1:
        if time.monotonic() > deadline:
            missing = world_size - 1 - store.add(joined, 0)
            raise UserError(
                f"{missing} of {world_size} ranks did not start within {JOIN_TIMEOUT} (see their nodes' logs)"
            )
        for rank in range(1, world_size):
            question = f"{ATTEMPT_KEYS}/hello/{rank}"
            if store.check([question]):
                token = store.get(question).decode()
                if answered.get(rank) != token:
                    store.set(f"{ATTEMPT_KEYS}/welcome/{token}", attempt)
                    answered[rank] = token
        time.sleep(poll_s)
    return attempt


STALL_EXIT_CODE = 3
_watchdog = None  # this process's Watchdog, stopped by close_process_group


class Watchdog:
    """Notices a run that makes no progress: a rank stopped (SIGSTOP, a dead node) or hung. The main
    thread counts its progress in memory (DistContext.progress: each step and eval batch); a thread
    publishes it with a tick of its own through the rendezvous store every poll, and reads every
    rank's. When this rank made no progress for timeout_s, it prints one line naming the rank at
    fault: one whose tick stood still too (its whole process is stopped or gone), else the one whose
    step is behind; then it ends this process with STALL_EXIT_CODE, so that torchrun's restart takes
    over. Every live rank does the same. The clock starts at the first step: setting up is not timed."""

    def __init__(self, store, rank, world_size, timeout_s):
        self.store, self.rank, self.world_size, self.timeout_s = store, rank, world_size, timeout_s
        self.poll_s = min(5.0, timeout_s / 4)
        self.step, self.count = None, 0
        self.seen = {}  # rank -> (its last published (step, count, tick, host), local time that changed)
        self.stopped = threading.Event()

    @classmethod
    def start(cls, dist_ctx, timeout_s):
        """Its own store connection (its waits never hold up the process group's), keys private to
        this run: rank 0 draws their prefix."""
        prefix = dist_ctx.broadcast(uuid.uuid4().hex)
        store = torch.distributed.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=timedelta(seconds=max(1.0, min(30.0, timeout_s / 2))),
        )
        watchdog = cls(
            torch.distributed.PrefixStore(f"train_gpt2/watchdog/{prefix}", store),
            dist_ctx.rank,
            dist_ctx.world_size,
            timeout_s,
        )
        threading.Thread(target=watchdog._watch, name="watchdog", daemon=True).start()
        return watchdog

    def progress(self, step=None):
        self.count += 1
        if step is not None:
            self.step = step

    def stop(self):
        self.stopped.set()

    def _watch(self):
        host, tick, mine, since = socket.gethostname(), 0, None, None
        while not self.stopped.wait(self.poll_s):
            tick, now = tick + 1, time.monotonic()
            if self.count and (self.step, self.count) != mine:
                mine, since = (self.step, self.count), now
            try:
                self.store.set(str(self.rank), f"{self.step} {self.count} {tick} {host}")
                self._read(now)
                reachable = True
            except Exception:  # the store's host is stopped or gone: decided below, if this rank is stuck
                reachable = False
            if since is not None and now - since >= self.timeout_s and not self.stopped.is_set():
                print(
                    f"error: rank {self.rank}: no progress for {now - since:.0f} s (--collective-timeout "
                    f"{self.timeout_s:g}): {self._culprit(now, reachable)}; ending this rank so that "
                    "torchrun can restart the run",
                    file=sys.stderr,
                    flush=True,
                )
                os._exit(STALL_EXIT_CODE)

    def _read(self, now):
        for r in range(self.world_size):
            if r != self.rank and self.store.check([str(r)]):
                value = self.store.get(str(r)).decode().split()
                if self.seen.get(r, (None,))[0] != value:
                    self.seen[r] = (value, now)

    def _culprit(self, now, reachable):
        """Which rank stalled, in words."""
        if not reachable:
            return (
                "the rendezvous store does not answer (its host, or rank 0 without torchrun, "
                "is stopped or gone)"
            )
        others = [r for r in range(self.world_size) if r != self.rank]
        silent = [r for r in others if r not in self.seen or now - self.seen[r][1] >= 3 * self.poll_s]
        if silent:
            return "; ".join(
                f"rank {r} (host {self.seen[r][0][3] if r in self.seen else 'unknown'}) stopped "
                f"responding {where(self.seen[r][0][0] if r in self.seen else 'None')}"
                for r in silent
            )
        steps = {r: int(self.seen[r][0][0]) for r in others if self.seen[r][0][0] != "None"}
        behind = [r for r in steps if self.step is not None and steps[r] < self.step]
        if behind:
            return "; ".join(
                f"rank {r} (host {self.seen[r][0][3]}) is stuck at step {steps[r]}" for r in behind
            )
        return f"every rank waits at step {self.step} (a collective, or a hung device on some rank)"


def where(step):
    """A rank's last published step, in words (published a poll apart: it may be a step behind)."""
    return "before its first step" if step == "None" else f"after step {step}"


class StopRequest:
    """Set by SIGTERM/SIGINT/SIGHUP: the loop finishes its step, writes a checkpoint and exits cleanly."""

    def __init__(self):
        self.requested = False

    def __call__(self, signum, frame):
        self.requested = True
