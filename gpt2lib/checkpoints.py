"""Checkpoints and the run directory: one run per --log-dir.

A checkpoint is log_dir/model_{step:05d}.pt, a dict saved by torch.save and read with
weights_only=True: model (our state_dict), optimizer, scaler, step, config (the GPTConfig fields in
MODEL_CONFIG_KEYS), train_config, val_loss, every rank's loader and rng state, counts (clipped
and skipped steps), the run id, and a checksum of all of it (xxHash3-128 over every tensor's bytes and
every other value), verified on every load.

A --fsdp run writes sharded checkpoints instead: a directory log_dir/model_{step:05d}/ in which every
rank wrote its shards of the model and optimizer state with torch.distributed.checkpoint (DCP, keys
"model" and "optimizer", the optimizer's state keyed by parameter name), and rank 0 wrote the rest of
what a .pt holds, with its checksum, to train_state.pt. It is written as model_{step:05d}.partial/ and
renamed once COMPLETE is in it, so a directory named model_{step:05d} is complete; OWNER marks every
directory this project wrote (only those are ever deleted). Either kind resumes a run of either kind,
on any number of ranks.

This module writes and reads them, checks their structure, picks the one to resume, sets other runs'
files aside in previous_N/, and keeps the run log (log.txt, metrics.jsonl)."""

import json
import os
import re
import shutil
import warnings
from dataclasses import asdict

import torch

from gpt2lib import rundir, tracking
from gpt2lib.common import UserError, atomic_write, check_model_shape, disk_errors, one_line

# the model config a checkpoint stores: train_gpt2.GPTConfig's fields (a test keeps the two equal)
MODEL_CONFIG_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "vocab_multiple")
CHECKPOINT_PATTERN = re.compile(r"^model_(\d+)\.pt$")
SHARDED_PATTERN = re.compile(r"^model_(\d+)$")  # a directory
TRAIN_STATE = "train_state.pt"  # in a sharded checkpoint: everything but the model and optimizer
COMPLETE = "COMPLETE"  # written into a sharded checkpoint last, before the rename
OWNER = ".train_gpt2"  # in every directory this project writes, partial or complete
LOG_FILES = ("log.txt", "metrics.jsonl")
# the files a run writes into --log-dir, whose leftover temporary files a later run removes
RUN_FILE_NAMES = r"model_\d+\.pt|log\.txt|metrics\.jsonl|" + re.escape(tracking.WANDB_ID_FILE)
CHECKSUM_KEY, CHECKSUM_ALGORITHM = "checksum", "xxh3_128"
LOADER_KEYS = ("split", "epoch", "position", "shuffle_seed", "shards", "shard_lengths")


# -----------------------------------------------------------------------------
# checkpoints

def checksum(obj):
    """xxHash3-128 of a checkpoint's contents: every tensor's dtype, shape and bytes, every other
    value's type and repr, in the dicts' order (which torch.save keeps). xxHash3 hashes at memory
    speed, so a 124M checkpoint costs well under a second (README: measured numbers)."""
    import xxhash

    digest = xxhash.xxh3_128()
    feed(digest, obj)
    return digest.hexdigest()


def feed(digest, value):
    if isinstance(value, torch.Tensor):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):
        digest.update(f"dict {len(value)};".encode())
        for key, item in value.items():
            feed(digest, key)
            feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f"{type(value).__name__} {len(value)};".encode())
        for item in value:
            feed(digest, item)
    else:
        digest.update(f"{type(value).__name__} {value!r};".encode())


def read_checkpoint(path, layout=None, resume=False, weights=True):
    """A checkpoint dict, loaded with weights_only=True (opening a checkpoint never runs code), its
    checksum verified and its model shape checked before anything is allocated. With layout (a
    function of the config giving the model's {key: shape} and the optimizer's parameter shapes, in
    order), every weight is checked; with resume, the optimizer, loader and RNG state too. Any
    problem is a one-line UserError naming path. For a sharded checkpoint directory, "sharded" is its
    path and "model" the full weights gathered from its shards (not with weights=False: then every rank
    of a resumed run reads its own shards)."""
    if os.path.isdir(path):
        return read_sharded_checkpoint(path, layout, resume, weights)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    checkpoint = load_file(path)
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= checkpoint.keys():
        raise UserError(f"checkpoint {path} is not a train_gpt2.py checkpoint (no 'model' and 'config')")
    verify_checksum(path, checkpoint)
    return check_config(path, checkpoint, layout, resume)


def verify_checksum(path, checkpoint):
    """Pop the checksum written with a checkpoint and compare it with its contents."""
    stored = checkpoint.pop(CHECKSUM_KEY, None)
    if stored is None:
        print(f"note: checkpoint {path} has no checksum (written before checkpoints had one): its contents "
              "are checked for structure only")
    elif not isinstance(stored, dict) or stored.get(CHECKSUM_ALGORITHM) != checksum(checkpoint):
        raise UserError(f"checkpoint {path} is damaged: its contents do not match the checksum written with it")


def load_file(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle error, ...: torch raises many types
        raise UserError(f"checkpoint {path} is damaged or not a train_gpt2.py checkpoint ({one_line(e)})") from None


def check_config(path, checkpoint, layout=None, resume=False):
    if not isinstance(checkpoint["config"], dict) or not set(checkpoint["config"]) <= set(MODEL_CONFIG_KEYS):
        raise UserError(f"checkpoint {path} has an unreadable config: {checkpoint['config']!r:.200}")
    check_model_shape(checkpoint["config"], f"checkpoint {path}")
    if not isinstance(checkpoint["model"], dict):
        raise UserError(f"checkpoint {path}: 'model' is not a state_dict")
    # a compiled or DDP-wrapped model's state_dict (other projects save those) has prefixed keys
    checkpoint["model"] = {re.sub(r"^(_orig_mod\.|module\.)+", "", str(key)): value
                           for key, value in checkpoint["model"].items()}
    if layout is not None:
        weights, optimizer_shapes = layout(checkpoint["config"])
        check_weights(checkpoint["model"], weights, path)
        if resume:
            check_resume_state(checkpoint, optimizer_shapes, path)
    return checkpoint


def check_weights(state, expected, path):
    """Every weight of the model, with its shape, and nothing else."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise UserError(f"checkpoint {path}: the weights do not fit its config (missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}): the file is damaged or not of this model")
    for key, shape in expected.items():
        if not isinstance(state[key], torch.Tensor) or tuple(state[key].shape) != shape:
            got = list(state[key].shape) if isinstance(state[key], torch.Tensor) else type(state[key]).__name__
            raise UserError(f"checkpoint {path}: the weights do not fit its config ({key} is {got}, expected "
                            f"{list(shape)}): the file is damaged or not of this model")


def check_resume_state(checkpoint, parameter_shapes, path):
    """The step, the optimizer's state for each parameter (AdamW's moments, shaped like it), and every
    rank's loader position and RNG state: what a resume restores."""
    def damaged(what):
        return UserError(f"checkpoint {path} cannot be resumed: {what}")

    missing = [key for key in ("optimizer", "step", "loader", "rng") if key not in checkpoint]
    if missing:
        raise damaged(f"it has no {', '.join(missing)} state")
    if type(checkpoint["step"]) is not int or checkpoint["step"] < 0:
        raise damaged(f"step is {checkpoint['step']!r:.40}")
    optimizer = checkpoint["optimizer"]
    if not isinstance(optimizer, dict) or not isinstance(optimizer.get("state"), dict) \
            or not isinstance(optimizer.get("param_groups"), list):
        raise damaged("its optimizer state is not an optimizer's")
    ids = [i for group in optimizer["param_groups"] if isinstance(group, dict) for i in group.get("params", [])]
    if len(ids) != len(parameter_shapes):
        raise damaged(f"its optimizer holds {len(ids)} parameters, the model has {len(parameter_shapes)}")
    for i, shape in zip(ids, parameter_shapes):
        moments = optimizer["state"].get(i, {})  # a parameter never stepped (fp16 skips) has none
        for name in ("exp_avg", "exp_avg_sq"):
            if moments and (not isinstance(moments.get(name), torch.Tensor) or tuple(moments[name].shape) != shape):
                raise damaged(f"optimizer state {name} of parameter {i} is missing or not shaped {list(shape)}")
    for key, check in (("loader", lambda s: isinstance(s, dict) and set(LOADER_KEYS) <= s.keys()),
                       ("rng", lambda s: isinstance(s, dict) and isinstance(s.get("cpu"), torch.Tensor))):
        states = checkpoint[key]
        if not isinstance(states, list) or not states or not all(check(state) for state in states):
            raise damaged(f"its {key} state is incomplete")


def is_sharded_checkpoint(path):
    """Whether path is a sharded checkpoint directory (complete or not), not an HF model directory."""
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, name)) for name in (OWNER, TRAIN_STATE))


def read_sharded_checkpoint(path, layout, resume, weights):
    """See read_checkpoint. The shards carry no checksum of ours (DCP reads them by its metadata);
    train_state.pt does."""
    if not os.path.isfile(os.path.join(path, COMPLETE)) or not os.path.isfile(os.path.join(path, ".metadata")):
        raise UserError(f"checkpoint {path} is incomplete (its write was cut off) or not a sharded "
                        f"train_gpt2.py checkpoint (no {COMPLETE} or .metadata)")
    checkpoint = load_file(os.path.join(path, TRAIN_STATE))
    if not isinstance(checkpoint, dict) or "config" not in checkpoint:
        raise UserError(f"checkpoint {path} is not a train_gpt2.py checkpoint (no config in {TRAIN_STATE})")
    verify_checksum(path, checkpoint)
    checkpoint["sharded"] = path
    checkpoint["model"] = gather_sharded_model(path) if weights else {}
    return check_config(path, checkpoint, layout if weights else None, resume)


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


def find_resume_checkpoint(resume, log_dir, layout=None, training=True):
    """(path, checkpoint already read and verified) to resume from, or (None, None) to start fresh.
    resume is --resume: auto (the newest good checkpoint in log_dir; damaged ones are skipped with a
    warning, and set aside by prepare_run_dir), none, or a path (a damaged one is an error).
    training False: for a mode that only reads the model (--export-hf, --generate), which needs no
    optimizer, loader or RNG state."""
    if resume == "none":
        return None, None
    if resume != "auto":
        return resume, read_checkpoint(resume, layout, resume=training, weights=False)
    damaged = []
    for path in list_checkpoints(log_dir):
        try:
            return path, read_checkpoint(path, layout, resume=training, weights=False)
        except UserError as e:
            print(f"warning: skipping {path}: {e}")
            damaged.append(os.path.basename(path))
    if damaged:
        raise UserError(f"every checkpoint in {log_dir} is damaged ({', '.join(damaged)}): restore a good one, "
                        "or pass --resume none to start over (the damaged ones are then set aside)")
    return None, None


def continues_in(log_dir, resume_path):
    """Whether resuming resume_path (None: a fresh start) continues the run whose logs are in log_dir:
    the checkpoint lies in that directory."""
    return resume_path is not None and os.path.isdir(log_dir) and \
        os.path.samefile(os.path.dirname(os.path.abspath(resume_path)), log_dir)


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
    if not continues_in(log_dir, resume_path):  # W&B and TensorBoard files go too: this run starts its own
        trackers = [os.path.join(log_dir, name) for name in tracking.PATHS if os.path.exists(os.path.join(log_dir, name))]
        return checkpoints + logs + trackers, []
    newer = [path for path in checkpoints if checkpoint_step(path) > resume_step]
    return (newer, logs) if newer else ([], [])


def set_aside(log_dir, move, copy):
    """Move (or copy) files into a new log_dir/previous_N/: nothing of an earlier run is deleted or
    overwritten. Returns that directory. A failure (a full disk stops a copy) puts back what was
    moved, removes the copies and the new directory, and is one line."""
    n = 1
    while os.path.exists(os.path.join(log_dir, f"previous_{n}")):
        n += 1
    aside = os.path.join(log_dir, f"previous_{n}")
    rundir.check_held(log_dir)  # nothing is moved in a directory that another run may hold by now
    copied, moved = [], []
    try:
        os.makedirs(aside)  # new: so everything in it is this call's to remove
        for path in copy:
            copied.append(os.path.join(aside, os.path.basename(path)))
            shutil.copy2(path, copied[-1])
        for path in move:
            os.replace(path, os.path.join(aside, os.path.basename(path)))
            moved.append(path)
    except OSError as e:
        undone = undo_set_aside(aside, copied, moved)
        where = "nothing was moved" if undone else f"what was moved is in {aside}, the rest in {log_dir}"
        raise UserError(f"{log_dir}: cannot set earlier runs' files aside into {aside} ({one_line(e)}); "
                        f"{where}: check free space and permissions") from None
    return aside


def undo_set_aside(aside, copied, moved):
    """Put moved files back and remove the copies and aside itself; True when that all worked."""
    try:
        for path in moved:
            os.replace(os.path.join(aside, os.path.basename(path)), path)
        for path in copied:
            if os.path.exists(path):
                os.remove(path)
        if os.path.isdir(aside):
            os.rmdir(aside)
        return True
    except OSError:
        return False


def train_state(step, config, precision, cfg, val_loss, loader_states, rng_states, run_id, counts):
    """What a checkpoint holds beside the model and optimizer."""
    return {
        "scaler": precision.scaler.state_dict(),  # empty unless fp16
        "step": step,  # optimizer steps done; training resumes at this step index
        "config": asdict(config),
        "train_config": asdict(cfg),
        "val_loss": val_loss,
        "loader": loader_states,  # per rank
        "rng": rng_states,  # per rank
        "run_id": run_id,  # tells this run's checkpoints from another's when nodes compare theirs
        "counts": counts or {},  # clipped and skipped steps so far
    }


def write_checkpoint(step, raw_model, optimizer, precision, cfg, val_loss, loader_states, rng_states, run_id,
                     counts=None):
    """Write log_dir/model_{step}.pt atomically, with its checksum; then, with --keep-last, delete this
    run's oldest checkpoints (log_dir holds only this run's: others were set aside at start)."""
    path = os.path.join(cfg.log_dir, f"model_{step:05d}.pt")
    checkpoint = {"model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
                  **train_state(step, raw_model.config, precision, cfg, val_loss, loader_states, rng_states, run_id,
                                counts)}
    checkpoint[CHECKSUM_KEY] = {CHECKSUM_ALGORITHM: checksum(checkpoint)}
    rundir.check_held(cfg.log_dir)  # never written into a directory that another run may hold by now
    atomic_write(path, lambda f: torch.save(checkpoint, f))
    remove_old_checkpoints(cfg, step)
    return path


def remove_old_checkpoints(cfg, step):
    """With --keep-last, this run's checkpoints beyond the newest keep_last."""
    if not cfg.keep_last:
        return
    for old in list_checkpoints(cfg.log_dir)[cfg.keep_last:]:
        if checkpoint_step(old) < step:
            try:
                if os.path.isfile(old):
                    os.remove(old)
                elif os.path.isfile(os.path.join(old, OWNER)):
                    shutil.rmtree(old)
            except OSError as e:
                raise UserError(f"{old}: cannot delete it for --keep-last ({one_line(e)}): check permissions") from None


def begin_sharded_checkpoint(log_dir, step):
    """On rank 0: the empty directory model_{step:05d}.partial/ that every rank writes its shards into.
    One left by a write that was cut off (marked OWNER) is deleted first."""
    partial = os.path.join(log_dir, f"model_{step:05d}.partial")
    rundir.check_held(log_dir)
    if os.path.exists(partial):
        if not os.path.isfile(os.path.join(partial, OWNER)):
            raise UserError(f"{partial} is in the way and was not written by train_gpt2.py: move it elsewhere")
    with disk_errors(partial, "create the checkpoint directory"):
        if os.path.exists(partial):
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


def finish_sharded_checkpoint(directory, step, config, precision, cfg, val_loss, loader_states, rng_states, run_id,
                              counts=None):
    """On rank 0, once every rank has written its shards: train_state.pt (with its checksum), then
    COMPLETE, then the rename to model_{step:05d}/ that makes the checkpoint visible. Returns its path."""
    state = train_state(step, config, precision, cfg, val_loss, loader_states, rng_states, run_id, counts)
    state[CHECKSUM_KEY] = {CHECKSUM_ALGORITHM: checksum(state)}
    atomic_write(os.path.join(directory, TRAIN_STATE), lambda f: torch.save(state, f))
    atomic_write(os.path.join(directory, COMPLETE), lambda f: f.write(b"complete\n"))
    path = os.path.join(cfg.log_dir, f"model_{step:05d}")
    rundir.check_held(cfg.log_dir)
    with disk_errors(path, "rename the written checkpoint into place"):
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
    and metrics.jsonl with everything else (samples too), each row also sent to the trackers
    (a gpt2lib.tracking.Tracking). Only the master process writes."""

    def __init__(self, log_dir, enabled, trackers=None):
        self.enabled = enabled
        self.failure = None  # why an append failed (a full disk): the loop stops every rank with it
        self.text_path = os.path.join(log_dir, "log.txt")
        self.jsonl_path = os.path.join(log_dir, "metrics.jsonl")
        self.trackers = trackers

    @staticmethod
    def prepare(log_dir, resume_step):
        """Keep the lines of steps before resume_step (a crashed run's later lines will be redone)
        and drop a line torn by a kill in mid-append, with a warning. A fresh run (resume_step None)
        starts with empty files; earlier runs' files were set aside before."""
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
        """Append one line to each file. A failed append is kept in self.failure, not raised: the
        other ranks are not writing, so the next collective stops them all together."""
        if not self.enabled or self.failure:
            return
        self._append(self.text_path, f"{step} {kind} {value:.6f}\n" if kind == "train" else f"{step} {kind} {value:.4f}\n")
        self._append_row({"step": step, "kind": kind, "value": value, **metrics})

    def write_samples(self, step, prompt, texts):
        """Samples go to metrics.jsonl (kind `sample`) and the trackers; log.txt has numbers only."""
        if self.enabled and not self.failure:
            self._append_row({"step": step, "kind": "sample", "prompt": prompt, "texts": list(texts)})

    def _append_row(self, row):
        self._append(self.jsonl_path, json.dumps(row) + "\n")
        if self.trackers is not None and not self.failure:
            self.trackers.log(row)

    def _append(self, path, line):
        if self.failure:
            return
        try:
            rundir.check_held(os.path.dirname(path))  # the directory is still this run's (a stat or two)
            with open(path, "a") as f:
                f.write(line)
        except OSError as e:
            self.failure = f"{path}: cannot append ({one_line(e)}): check free space and permissions"
        except UserError as e:
            self.failure = str(e)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        """Finish the trackers' runs, as failed when training raised."""
        if self.trackers is not None:
            self.trackers.close(ok=exc_type is None)


def prepare_run_dir(log_dir, resume_path, resume_step, logs=None):
    """On rank 0, once every input has been read (so a bad one moves nothing): set aside what other
    runs left in log_dir, take over the run's logs and tracker files from the node that held the
    checkpoint (logs: {name: bytes}, when rank 0 moved to this node), then trim the logs to the resume point
    (resume_step None: a fresh start)."""
    move, copy = files_of_other_runs(log_dir, resume_path, resume_step)
    if move:
        aside = set_aside(log_dir, move, copy)
        print(f"{log_dir} held files this run does not continue: moved them to {aside} "
              f"({', '.join(sorted(os.listdir(aside)))})")
    with disk_errors(log_dir, "create this log directory"):
        os.makedirs(log_dir, exist_ok=True)
    for name, data in (logs or {}).items():
        with disk_errors(log_dir, "create a directory in it"):
            os.makedirs(os.path.dirname(os.path.join(log_dir, name)), exist_ok=True)  # tensorboard/
        atomic_write(os.path.join(log_dir, name), lambda f: f.write(data))
    RunLog.prepare(log_dir, resume_step)


def write_probe(log_dir):
    """On rank 0: an empty file in log_dir with a name no other run uses; the other ranks look for it."""
    path = os.path.join(log_dir, f".shared_probe_{os.getpid()}_{os.urandom(4).hex()}")
    with disk_errors(path, "write"), open(path, "w"):
        pass
    return path


def remove_probe(path):
    with disk_errors(path, "remove"):
        os.remove(path)


def save(step, run):
    """Gather every rank's data position and RNG state; rank 0 writes the checkpoint (with --fsdp every
    rank writes its shards, rank 0 the rest), and every rank learns whether it could (a full disk stops
    all ranks, not just rank 0)."""
    ctx, cfg = run.dist_ctx, run.cfg
    loader_states = ctx.gather_objects(run.train_loader.state_dict())
    rng_states = ctx.gather_objects(rng_state(ctx.device))
    if cfg.fsdp:
        finish_save(run)  # one in flight (--async-checkpoint) completes first
        partial = ctx.decide(lambda: begin_sharded_checkpoint(cfg.log_dir, step))
        written = ctx.on_every_rank(lambda: write_shards(partial, run.raw_model, run.optimizer,
                                                                      run.save_group))
        val_loss = run.val_loss
        run.pending_save = (partial, written, lambda: finish_sharded_checkpoint(
            partial, step, run.raw_model.config, run.precision, cfg, val_loss, loader_states, rng_states, run.run_id,
            dict(run.counts)))
        if not cfg.async_checkpoint:
            finish_save(run)
        return
    path = ctx.decide(lambda: write_checkpoint(
        step, run.raw_model, run.optimizer, run.precision, cfg, run.val_loss, loader_states, rng_states,
        run.run_id, run.counts))
    if ctx.master_process:
        print(f"step {step:5d} | saved {path}")


def finish_save(run):
    """Complete the sharded checkpoint being written, if any: every rank's shards written, then rank 0
    adds the rest and renames it into place."""
    if run.pending_save is None:
        return
    (partial, written, complete), run.pending_save = run.pending_save, None
    run.dist_ctx.on_every_rank(lambda: wait_for_shards(written, partial))
    path = run.dist_ctx.decide(complete)
    if run.dist_ctx.master_process:
        print(f"step {checkpoint_step(path):5d} | saved {path}")
