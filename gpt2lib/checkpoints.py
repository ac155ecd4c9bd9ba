"""Checkpoints and the run directory: one run per --log-dir.

A checkpoint is log_dir/model_{step:05d}.pt, a dict saved by torch.save and read with
weights_only=True: model (our state_dict), optimizer, scaler, step, config (the GPTConfig fields in
MODEL_CONFIG_KEYS), train_config, val_loss, every rank's loader and rng state, and counts (clipped
and skipped steps). This module writes
and reads them, picks the one to resume, sets other runs' files aside in previous_N/, and keeps the
run log (log.txt, metrics.jsonl)."""

import json
import os
import re
import shutil
from dataclasses import asdict

import torch

from gpt2lib import tracking
from gpt2lib.common import UserError, atomic_write, one_line

# the model config a checkpoint stores: train_gpt2.GPTConfig's fields (a test keeps the two equal)
MODEL_CONFIG_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "vocab_multiple")
CHECKPOINT_PATTERN = re.compile(r"^model_(\d+)\.pt$")
LOG_FILES = ("log.txt", "metrics.jsonl")


# -----------------------------------------------------------------------------
# checkpoints

def read_checkpoint(path):
    """A checkpoint dict, loaded with weights_only=True: opening a checkpoint never runs code."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle error, ...: torch raises many types
        raise UserError(f"checkpoint {path} is damaged or not a train_gpt2.py checkpoint ({one_line(e)})") from None
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= checkpoint.keys():
        raise UserError(f"checkpoint {path} is not a train_gpt2.py checkpoint (no 'model' and 'config')")
    if not isinstance(checkpoint["config"], dict) or not set(checkpoint["config"]) <= set(MODEL_CONFIG_KEYS):
        raise UserError(f"checkpoint {path} has an unreadable config: {checkpoint['config']!r}")
    return checkpoint


def list_checkpoints(log_dir):
    """Checkpoint paths in log_dir, newest (highest step) first."""
    if not os.path.isdir(log_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(log_dir) if (m := CHECKPOINT_PATTERN.match(name))]
    return [os.path.join(log_dir, name) for _, name in sorted(found, reverse=True)]


def checkpoint_step(path):
    return int(CHECKPOINT_PATTERN.match(os.path.basename(path)).group(1))


def find_resume_checkpoint(resume, log_dir):
    """(path, checkpoint already read) to resume from, or (None, None) to start fresh. resume is
    --resume: auto (the newest good checkpoint in log_dir), none, or a path."""
    if resume == "none":
        return None, None
    if resume != "auto":
        return resume, read_checkpoint(resume)  # an explicit path that is bad is an error
    for path in list_checkpoints(log_dir):
        try:
            checkpoint = read_checkpoint(path)
            if {"optimizer", "step", "loader"} <= checkpoint.keys():
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
    if not continues_here:  # W&B and TensorBoard files go too: this run starts its own
        trackers = [os.path.join(log_dir, name) for name in tracking.PATHS if os.path.exists(os.path.join(log_dir, name))]
        return checkpoints + logs + trackers, []
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


def write_checkpoint(step, raw_model, optimizer, precision, cfg, val_loss, loader_states, rng_states, run_id,
                     counts=None):
    """Write log_dir/model_{step}.pt atomically; then, with --keep-last, delete this run's oldest
    checkpoints (log_dir holds only this run's: others were set aside at start)."""
    path = os.path.join(cfg.log_dir, f"model_{step:05d}.pt")
    checkpoint = {
        "model": raw_model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": precision.scaler.state_dict(),  # empty unless fp16
        "step": step,  # optimizer steps done; training resumes at this step index
        "config": asdict(raw_model.config),
        "train_config": asdict(cfg),
        "val_loss": val_loss,
        "loader": loader_states,  # per rank
        "rng": rng_states,  # per rank
        "run_id": run_id,  # tells this run's checkpoints from another's when nodes compare theirs
        "counts": counts or {},  # clipped and skipped steps so far
    }
    atomic_write(path, lambda f: torch.save(checkpoint, f))
    if cfg.keep_last:
        for old in list_checkpoints(cfg.log_dir)[cfg.keep_last:]:
            if checkpoint_step(old) < step:
                os.remove(old)
    return path


def rng_state(device):
    return {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


class RunLog:
    """log.txt with build-nanogpt's lines (`{step} train {loss}`, `... val ...`, `... hella ...`)
    and metrics.jsonl with everything else (samples too), each row also sent to the trackers
    (a gpt2lib.tracking.Tracking). Only the master process writes."""

    def __init__(self, log_dir, enabled, trackers=None):
        self.enabled = enabled
        self.text_path = os.path.join(log_dir, "log.txt")
        self.jsonl_path = os.path.join(log_dir, "metrics.jsonl")
        self.trackers = trackers

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
        self._append_row({"step": step, "kind": kind, "value": value, **metrics})

    def write_samples(self, step, prompt, texts):
        """Samples go to metrics.jsonl (kind `sample`) and the trackers; log.txt has numbers only."""
        if self.enabled:
            self._append_row({"step": step, "kind": "sample", "prompt": prompt, "texts": list(texts)})

    def _append_row(self, row):
        with open(self.jsonl_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.trackers is not None:
            self.trackers.log(row)

    def close(self, ok=True):
        """Finish the trackers' runs (ok False: the run failed)."""
        if self.trackers is not None:
            self.trackers.close(ok)


def prepare_run_dir(log_dir, resume_path, resume_step, logs=None):
    """On rank 0, once every input has been read (so a bad one moves nothing): set aside what other
    runs left in log_dir, take over the run's logs from the node that held the checkpoint (logs:
    {name: bytes}, when rank 0 moved to this node), then trim the logs to the resume point
    (resume_step None: a fresh start)."""
    move, copy = files_of_other_runs(log_dir, resume_path, resume_step)
    if move:
        aside = set_aside(log_dir, move, copy)
        print(f"{log_dir} held files this run does not continue: moved them to {aside} "
              f"({', '.join(sorted(os.listdir(aside)))})")
    os.makedirs(log_dir, exist_ok=True)
    for name, data in (logs or {}).items():
        atomic_write(os.path.join(log_dir, name), lambda f: f.write(data))
    RunLog.prepare(log_dir, resume_step)
