"""Checkpoints and the run directory: one run per --log-dir.

A checkpoint is log_dir/model_{step:05d}.pt, a dict saved by torch.save and read with
weights_only=True: model (our state_dict), optimizer, scaler, step, config (the GPTConfig fields in
MODEL_CONFIG_KEYS), train_config, val_loss, and every rank's loader and rng state.

A --fsdp run writes sharded checkpoints instead: a directory log_dir/model_{step:05d}/ in which every
rank wrote its shards of the model and optimizer state with torch.distributed.checkpoint (DCP, keys
"model" and "optimizer", the optimizer's state keyed by parameter name), and rank 0 wrote the rest of
what a .pt holds to train_state.pt. It is written as model_{step:05d}.partial/ and renamed once
COMPLETE is in it, so a directory named model_{step:05d} is complete; OWNER marks every directory
this project wrote (only those are ever deleted). Either kind resumes a run of either kind, on any
number of ranks.

This module writes and reads them, picks the one to resume, sets other runs' files aside in
previous_N/, and keeps the run log (log.txt, metrics.jsonl)."""

import json
import os
import re
import shutil
import warnings
from dataclasses import asdict

import torch

from gpt2lib.common import UserError, atomic_write, one_line

# the model config a checkpoint stores: train_gpt2.GPTConfig's fields (a test keeps the two equal)
MODEL_CONFIG_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "vocab_multiple")
CHECKPOINT_PATTERN = re.compile(r"^model_(\d+)\.pt$")
SHARDED_PATTERN = re.compile(r"^model_(\d+)$")  # a directory
TRAIN_STATE = "train_state.pt"  # in a sharded checkpoint: everything but the model and optimizer
COMPLETE = "COMPLETE"  # written into a sharded checkpoint last, before the rename
OWNER = ".train_gpt2"  # in every directory this project writes, partial or complete
LOG_FILES = ("log.txt", "metrics.jsonl")


# -----------------------------------------------------------------------------
# checkpoints

def read_checkpoint(path, weights=True):
    """A checkpoint dict, loaded with weights_only=True: opening a checkpoint never runs code. For a
    sharded checkpoint directory, "sharded" is its path and "model" the full weights gathered from its
    shards (without weights=False: then every rank of a resumed run reads its own shards)."""
    if os.path.isdir(path):
        return read_sharded_checkpoint(path, weights)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    checkpoint = load_file(path)
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= checkpoint.keys():
        raise UserError(f"checkpoint {path} is not a train_gpt2.py checkpoint (no 'model' and 'config')")
    return check_config(path, checkpoint)


def load_file(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle error, ...: torch raises many types
        raise UserError(f"checkpoint {path} is damaged or not a train_gpt2.py checkpoint ({one_line(e)})") from None


def check_config(path, checkpoint):
    if not isinstance(checkpoint["config"], dict) or not set(checkpoint["config"]) <= set(MODEL_CONFIG_KEYS):
        raise UserError(f"checkpoint {path} has an unreadable config: {checkpoint['config']!r}")
    return checkpoint


def is_sharded_checkpoint(path):
    """Whether path is a sharded checkpoint directory (complete or not), not an HF model directory."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name)) for name in (OWNER, TRAIN_STATE))


def read_sharded_checkpoint(path, weights):
    if not os.path.isfile(os.path.join(path, COMPLETE)) or not os.path.isfile(os.path.join(path, ".metadata")):
        raise UserError(f"checkpoint {path} is incomplete (its write was cut off) or not a sharded "
                        f"train_gpt2.py checkpoint (no {COMPLETE} or .metadata)")
    checkpoint = load_file(os.path.join(path, TRAIN_STATE))
    if not isinstance(checkpoint, dict) or "config" not in checkpoint:
        raise UserError(f"checkpoint {path} is not a train_gpt2.py checkpoint (no config in {TRAIN_STATE})")
    checkpoint = {**check_config(path, checkpoint), "sharded": path}
    if weights:
        checkpoint["model"] = gather_sharded_model(path)
    return checkpoint


def gather_sharded_model(path):
    """The full weights of a sharded checkpoint, read by this process alone (no process group)."""
    import torch.distributed.checkpoint as dcp

    try:
        metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        model = {key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
                 for key, meta in metadata.items() if key.startswith("model.")}
        with warnings.catch_warnings():  # DCP warns that it loads in a single process: that is the point
            warnings.simplefilter("ignore")
            dcp.load({"model": model}, checkpoint_id=path, no_dist=True)
    except Exception as e:  # a missing or damaged shard file: DCP raises many types
        raise UserError(f"checkpoint {path}: cannot read its shards ({one_line(e)})") from None
    return model


def load_sharded(path, model, optimizer):
    """Every rank of a run loads a sharded checkpoint directory into its model (sharded by --fsdp or
    not: DCP reads each rank's part, whatever the world size that wrote it) and, unless None, optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_state_dict,
                                                         set_model_state_dict, set_state_dict)

    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model, state["model"])
        return
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def list_checkpoints(log_dir):
    """Checkpoint paths in log_dir (.pt files and sharded directories), newest (highest step) first."""
    if not os.path.isdir(log_dir):
        return []
    found = [(checkpoint_step(name), name) for name in os.listdir(log_dir)
             if CHECKPOINT_PATTERN.match(name) or
             (SHARDED_PATTERN.match(name) and os.path.isdir(os.path.join(log_dir, name)))]
    return [os.path.join(log_dir, name) for _, name in sorted(found, reverse=True)]


def checkpoint_step(path):
    name = os.path.basename(os.path.normpath(path))
    return int((CHECKPOINT_PATTERN.match(name) or SHARDED_PATTERN.match(name)).group(1))


def find_resume_checkpoint(resume, log_dir):
    """(path, checkpoint already read) to resume from, or (None, None) to start fresh. resume is
    --resume: auto (the newest good checkpoint in log_dir), none, or a path."""
    if resume == "none":
        return None, None
    if resume != "auto":
        return resume, read_checkpoint(resume, weights=False)  # an explicit path that is bad is an error
    for path in list_checkpoints(log_dir):
        try:
            checkpoint = read_checkpoint(path, weights=False)
            if {"step", "loader"} <= checkpoint.keys() and ("optimizer" in checkpoint or "sharded" in checkpoint):
                return path, checkpoint
            problem = "it has no optimizer or loader state"
        except UserError as e:
            problem = str(e)
        print(f"warning: skipping {path}: {problem}")
    return None, None


def files_of_other_runs(log_dir, resume_path, resume_step):
    """(files to move, files to copy) out of log_dir before this run starts. On a fresh start, or when
    resuming from a checkpoint kept elsewhere, everything in log_dir belongs to another run. Resuming
    from log_dir, checkpoints newer than the resume point (another branch of the run, or damaged ones
    that were skipped) are another run's; the logs stay, and that run gets a copy of them."""
    if not os.path.isdir(log_dir):
        return [], []
    checkpoints = list_checkpoints(log_dir)
    logs = [os.path.join(log_dir, name) for name in LOG_FILES
            if os.path.isfile(os.path.join(log_dir, name)) and os.path.getsize(os.path.join(log_dir, name))]
    continues_here = resume_path is not None and \
        os.path.samefile(os.path.dirname(os.path.abspath(resume_path)), log_dir)
    if not continues_here:
        return checkpoints + logs, []
    newer = [path for path in checkpoints if checkpoint_step(path) > resume_step]
    return (newer, logs) if newer else ([], [])


def set_aside(log_dir, move, copy):
    """Move (or copy) files into a new log_dir/previous_N/: nothing of an earlier run is deleted or
    overwritten. Returns that directory."""
    n = 1
    while os.path.exists(os.path.join(log_dir, f"previous_{n}")):
        n += 1
    aside = os.path.join(log_dir, f"previous_{n}")
    os.makedirs(aside)
    for path in copy:
        shutil.copy2(path, os.path.join(aside, os.path.basename(path)))
    for path in move:
        os.replace(path, os.path.join(aside, os.path.basename(path)))
    return aside


def train_state(step, config, precision, cfg, val_loss, loader_states, rng_states):
    """What a checkpoint holds beside the model and optimizer."""
    return {
        "scaler": precision.scaler.state_dict(),  # empty unless fp16
        "step": step,  # optimizer steps done; training resumes at this step index
        "config": asdict(config),
        "train_config": asdict(cfg),
        "val_loss": val_loss,
        "loader": loader_states,  # per rank
        "rng": rng_states,  # per rank
    }


def write_checkpoint(step, raw_model, optimizer, precision, cfg, val_loss, loader_states, rng_states):
    """Write log_dir/model_{step}.pt atomically; then, with --keep-last, delete this run's oldest
    checkpoints (log_dir holds only this run's: others were set aside at start)."""
    path = os.path.join(cfg.log_dir, f"model_{step:05d}.pt")
    checkpoint = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                  **train_state(step, raw_model.config, precision, cfg, val_loss, loader_states, rng_states)}
    atomic_write(path, lambda f: torch.save(checkpoint, f))
    remove_old_checkpoints(cfg, step)
    return path


def remove_old_checkpoints(cfg, step):
    """With --keep-last, this run's checkpoints beyond the newest keep_last."""
    if not cfg.keep_last:
        return
    for old in list_checkpoints(cfg.log_dir)[cfg.keep_last:]:
        if checkpoint_step(old) < step:
            if os.path.isfile(old):
                os.remove(old)
            elif os.path.isfile(os.path.join(old, OWNER)):
                shutil.rmtree(old)


def begin_sharded_checkpoint(log_dir, step):
    """On rank 0: the empty directory model_{step:05d}.partial/ that every rank writes its shards into.
    One left by a write that was cut off (marked OWNER) is deleted first."""
    partial = os.path.join(log_dir, f"model_{step:05d}.partial")
    if os.path.exists(partial):
        if not os.path.isfile(os.path.join(partial, OWNER)):
            raise UserError(f"{partial} is in the way and was not written by train_gpt2.py: move it elsewhere")
        shutil.rmtree(partial)
    os.makedirs(partial)
    with open(os.path.join(partial, OWNER), "w"):
        pass
    return partial


def write_shards(directory, model, optimizer, background_group=None):
    """On every rank: this rank's shards of the model and optimizer state, into directory. With
    background_group (a process group of its own, so that its collectives never meet training's), the
    state is copied to CPU memory and written by a background thread: returns a Future for
    wait_for_shards. Otherwise returns None once written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        if background_group is not None:
            return dcp.async_save(state, checkpoint_id=directory, process_group=background_group)
        dcp.save(state, checkpoint_id=directory)
    except Exception as e:  # DCP gathers every rank's failure (a full disk, ...) and raises on all ranks
        raise UserError(f"{directory}: writing the checkpoint shards failed ({one_line(e)})") from None
    return None


def wait_for_shards(future, directory):
    """Wait for a background write_shards (future None: there is none)."""
    if future is None:
        return
    try:
        future.result()
    except Exception as e:
        raise UserError(f"{directory}: writing the checkpoint shards failed ({one_line(e)})") from None


def finish_sharded_checkpoint(directory, step, config, precision, cfg, val_loss, loader_states, rng_states):
    """On rank 0, once every rank has written its shards: train_state.pt, then COMPLETE, then the rename
    to model_{step:05d}/ that makes the checkpoint visible. Returns its path."""
    state = train_state(step, config, precision, cfg, val_loss, loader_states, rng_states)
    atomic_write(os.path.join(directory, TRAIN_STATE), lambda f: torch.save(state, f))
    atomic_write(os.path.join(directory, COMPLETE), lambda f: f.write(b"complete\n"))
    path = os.path.join(cfg.log_dir, f"model_{step:05d}")
    os.rename(directory, path)
    remove_old_checkpoints(cfg, step)
    return path


def rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


class RunLog:
    """log.txt with build-nanogpt's lines (`{step} train {loss}`, `... val ...`, `... hella ...`)
    and metrics.jsonl with everything else. Only the master process writes."""

    def __init__(self, log_dir, enabled):
        self.enabled = enabled
        self.text_path = os.path.join(log_dir, "log.txt")
        self.jsonl_path = os.path.join(log_dir, "metrics.jsonl")

    @staticmethod
    def prepare(log_dir, resume_step):
        """Keep the lines of steps before resume_step (a crashed run's later lines will be redone)
        and drop a line torn by a kill in mid-append, with a warning. A fresh run (resume_step None)
        starts with empty files; earlier runs' files were set aside before."""
        os.makedirs(log_dir, exist_ok=True)
        for name in LOG_FILES:
            path = os.path.join(log_dir, name)
            kept, torn = [], 0
            if resume_step is not None and os.path.exists(path):
                with open(path, errors="replace") as f:
                    for line in f:
                        step = RunLog.line_step(line)
                        if step is None:
                            torn += 1
                        elif step < resume_step:
                            kept.append(line)
            if torn:
                print(f"warning: {path}: dropped {torn} malformed line(s), left by a run killed while writing")
            atomic_write(path, lambda f: f.write("".join(kept).encode()))

    @staticmethod
    def line_step(line):
        """The step of a well-formed log.txt or metrics.jsonl line, else None."""
        if not line.endswith("\n"):
            return None
        try:
            if line.startswith("{"):
                row = json.loads(line)
                return row["step"] if isinstance(row, dict) and isinstance(row.get("step"), int) else None
            step, kind, value = line.split()
            float(value)
            return int(step)
        except ValueError:
            return None

    def write(self, step, kind, value, **metrics):
        if not self.enabled:
            return
        with open(self.text_path, "a") as f:
            f.write(f"{step} {kind} {value:.6f}\n" if kind == "train" else f"{step} {kind} {value:.4f}\n")
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps({"step": step, "kind": kind, "value": value, **metrics}) + "\n")


def prepare_run_dir(log_dir, resume_path, resume_step):
    """On rank 0, once every input has been read (so a bad one moves nothing): set aside what other
    runs left in log_dir, then trim the logs to the resume point (resume_step None: a fresh start)."""
    move, copy = files_of_other_runs(log_dir, resume_path, resume_step)
    if move:
        aside = set_aside(log_dir, move, copy)
        print(f"{log_dir} held files this run does not continue: moved them to {aside} "
              f"({', '.join(sorted(os.listdir(aside)))})")
    RunLog.prepare(log_dir, resume_step)


def write_probe(log_dir):
    """On rank 0: an empty file in log_dir with a name no other run uses; the other ranks look for it."""
    path = os.path.join(log_dir, f".shared_probe_{os.getpid()}_{os.urandom(4).hex()}")
    with open(path, "w"):
        pass
    return path
