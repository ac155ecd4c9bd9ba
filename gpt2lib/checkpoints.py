"""Checkpoint files: writing them (whole or sharded), reading them back verified, listing a log dir's.

A checkpoint is log_dir/model_{step:05d}.pt, a dict saved by torch.save and read with
weights_only=True: model (our state_dict), optimizer, scaler, step, config (the GPTConfig fields in
MODEL_CONFIG_KEYS), train_config, val_loss, every rank's loader and rng state, counts (clipped
and skipped steps), the run id, and a checksum of all of it (xxHash3-128 over every tensor's bytes and
every other value), verified on every load.

A --fsdp run writes sharded checkpoints instead: a directory log_dir/model_{step:05d}/ in which every
rank wrote its shards of the model and optimizer state with torch.distributed.checkpoint (DCP, keys
"model" and "optimizer", the optimizer's state keyed by parameter name), and rank 0 wrote the rest of
what a .pt holds, with its checksum, to train_state.pt. Every rank digests the shard files it wrote
(rank 0 .metadata too), and train_state.pt records every file's size and digest (FILE_DIGESTS_KEY), so
its checksum covers them; every reader verifies them, then .metadata's structure, before DCP reads a
tensor. It is written as model_{step:05d}.partial/ and renamed once COMPLETE is in it, so a directory
named model_{step:05d} is complete; OWNER marks every directory this project wrote (only those are ever
deleted, and a .partial whose write failed is). Either kind resumes a run of either kind, on any number
of ranks.

Which checkpoint a run resumes is resume.py's; setting other runs' files aside is rundir.py's."""

import contextlib
import os
import re
import shutil
import warnings
from dataclasses import asdict

import torch

from gpt2lib import optimizers, rundir, tracking
from gpt2lib.common import UserError, atomic_write, check_model_shape, disk_errors, one_line, write_failure

# the model config a checkpoint stores: train_gpt2.GPTConfig's fields (a test keeps the two equal)
MODEL_CONFIG_KEYS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "vocab_multiple")
CHECKPOINT_PATTERN = re.compile(r"^model_(\d+)\.pt$")
SHARDED_PATTERN = re.compile(r"^model_(\d+)$")  # a directory
TRAIN_STATE = "train_state.pt"  # in a sharded checkpoint: everything but the model and optimizer
COMPLETE = "COMPLETE"  # written into a sharded checkpoint last, before the rename
OWNER = ".train_gpt2"  # in every directory this project writes, partial or complete
# the files a run writes into --log-dir, whose leftover temporary files a later run removes
RUN_FILE_NAMES = r"model_\d+\.pt|log\.txt|metrics\.jsonl|" + re.escape(tracking.WANDB_ID_FILE)
CHECKSUM_KEY, CHECKSUM_ALGORITHM = "checksum", "xxh3_128"
FILE_DIGESTS_KEY = "file_digests"
SHARD_SHAPES = (
    "shard_shapes"  # in a sharded checkpoint read without its weights: {key: shape} .metadata gives
)
LOADER_KEYS = ("split", "epoch", "position", "shuffle_seed", "shards", "shard_lengths")
MAX_PRUNED_WHILE_READ = 100  # checkpoints a read-only mode may see pruned by a live run before it gives up


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


def read_checkpoint(path, weights=True):
    """A checkpoint dict, loaded with weights_only=True (opening a checkpoint never runs code), its
    checksum verified and its model shape checked before anything is allocated. check_layout then
    checks every weight, and for a resume the optimizer, loader and RNG state, against the model the
    caller builds from checkpoint["config"]. Any problem is a one-line UserError naming path. For a
    sharded checkpoint directory, "sharded" is its path and "model" the full weights gathered from its
    shards (not with weights=False: then every rank of a resumed run reads its own shards)."""
    if os.path.isdir(path):
        return read_sharded_checkpoint(path, weights)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    checkpoint = load_file(path)
    if not isinstance(checkpoint, dict) or not {"model", "config"} <= checkpoint.keys():
        raise UserError(f"checkpoint {path} is not a train_gpt2.py checkpoint (no 'model' and 'config')")
    verify_checksum(path, checkpoint)
    return check_config(path, checkpoint)


def verify_checksum(path, checkpoint):
    """Pop the checksum written with a checkpoint and compare it with its contents."""
    stored = checkpoint.pop(CHECKSUM_KEY, None)
    if stored is None:
        print(
            f"note: checkpoint {path} has no checksum (written before checkpoints had one): its contents "
            "are checked for structure only"
        )
    elif not isinstance(stored, dict) or stored.get(CHECKSUM_ALGORITHM) != checksum(checkpoint):
        raise UserError(
            f"checkpoint {path} is damaged: its contents do not match the checksum written with it"
        )


def load_file(path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle error, ...: torch raises many types
        raise UserError(
            f"checkpoint {path} is damaged or not a train_gpt2.py checkpoint ({one_line(e)})"
        ) from None


def check_config(path, checkpoint):
    if not isinstance(checkpoint["config"], dict) or not set(checkpoint["config"]) <= set(MODEL_CONFIG_KEYS):
        raise UserError(f"checkpoint {path} has an unreadable config: {checkpoint['config']!r:.200}")
    check_model_shape(checkpoint["config"], f"checkpoint {path}")
    if not isinstance(checkpoint["model"], dict):
        raise UserError(f"checkpoint {path}: 'model' is not a state_dict")
    # a compiled or DDP-wrapped model's state_dict (other projects save those) has prefixed keys
    checkpoint["model"] = {
        re.sub(r"^(_orig_mod\.|module\.)+", "", str(key)): value for key, value in checkpoint["model"].items()
    }
    return checkpoint


def check_layout(path, checkpoint, weights, optimizer_layout=None):
    """Check a checkpoint read by read_checkpoint against the model its config builds: weights is that
    model's {key: shape}; optimizer_layout, for a resume, its optimizer's parameters in order, each as
    (shape, state names) (see check_resume_state). A sharded checkpoint read without its weights is
    checked against the shapes its .metadata gives."""
    if "sharded" in checkpoint and not checkpoint["model"]:
        check_shard_shapes(path, checkpoint[SHARD_SHAPES], weights, optimizer_layout)
        return
    check_weights(checkpoint["model"], weights, path)
    if optimizer_layout is not None:
        check_resume_state(checkpoint, optimizer_layout, path)


def check_weights(state, expected, path):
    """Every weight of the model, with its shape, and nothing else."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    if missing or unexpected:
        raise UserError(
            f"checkpoint {path}: the weights do not fit its config (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}): the file is damaged or not of this model"
        )
    for key, shape in expected.items():
        if not isinstance(state[key], torch.Tensor) or tuple(state[key].shape) != shape:
            got = (
                list(state[key].shape) if isinstance(state[key], torch.Tensor) else type(state[key]).__name__
            )
            raise UserError(
                f"checkpoint {path}: the weights do not fit its config ({key} is {got}, expected "
                f"{list(shape)}): the file is damaged or not of this model"
            )


def trained_with(checkpoint):
    """The --optimizer a checkpoint was trained with (checkpoints from before --optimizer: adamw)."""
    return (checkpoint.get("train_config") or {}).get("optimizer", "adamw")


def check_resume_state(checkpoint, parameter_layout, path):
    """The step, the optimizer's state for each parameter (parameter_layout: its shape and state names
    in the optimizer's order: AdamW's moments or Muon's momentum buffer, shaped like it), and every
    rank's loader position and RNG state: what a resume restores."""

    def damaged(what):
        return UserError(f"checkpoint {path} cannot be resumed: {what}")

    missing = [key for key in ("optimizer", "step", "loader", "rng") if key not in checkpoint]
    if missing:
        raise damaged(f"it has no {', '.join(missing)} state")
    if type(checkpoint["step"]) is not int or checkpoint["step"] < 0:
        raise damaged(f"step is {checkpoint['step']!r:.40}")
    optimizer = checkpoint["optimizer"]
    if (
        not isinstance(optimizer, dict)
        or not isinstance(optimizer.get("state"), dict)
        or not isinstance(optimizer.get("param_groups"), list)
    ):
        raise damaged("its optimizer state is not an optimizer's")
    ids = [
        i for group in optimizer["param_groups"] if isinstance(group, dict) for i in group.get("params", [])
    ]
    if len(ids) != len(parameter_layout):
        raise damaged(f"its optimizer holds {len(ids)} parameters, the model has {len(parameter_layout)}")
    for i, (shape, names) in zip(ids, parameter_layout):
        moments = optimizer["state"].get(i, {})  # a parameter never stepped (fp16 skips) has none
        for name in names:
            if moments and (
                not isinstance(moments.get(name), torch.Tensor) or tuple(moments[name].shape) != shape
            ):
                raise damaged(
                    f"optimizer state {name} of parameter {i} is missing or not shaped {list(shape)}"
                )
    for key, check in (
        ("loader", lambda s: isinstance(s, dict) and set(LOADER_KEYS) <= s.keys()),
        ("rng", lambda s: isinstance(s, dict) and isinstance(s.get("cpu"), torch.Tensor)),
    ):
        states = checkpoint[key]
        if not isinstance(states, list) or not states or not all(check(state) for state in states):
            raise damaged(f"its {key} state is incomplete")


def digest_file(path):
    """xxHash3-128 of a file's bytes, read in 16 MiB pieces."""
    import xxhash

    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while piece := f.read(1 << 24):
            digest.update(piece)
    return digest.hexdigest()


def is_sharded_checkpoint(path):
    """Whether path is a sharded checkpoint directory (complete or not), not an HF model directory."""
    return os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, name)) for name in (OWNER, TRAIN_STATE)
    )


def read_sharded_checkpoint(path, weights):
    """See read_checkpoint. train_state.pt's checksum is verified, then every shard file against the
    digest recorded in it, then .metadata's structure, all before a tensor is read: so --resume auto,
    which reads no tensor when it chooses, skips a checkpoint with damaged shards. Read without its
    weights, the checkpoint keeps the shapes .metadata gives (SHARD_SHAPES) for check_layout."""
    if not os.path.isfile(os.path.join(path, COMPLETE)) or not os.path.isfile(
        os.path.join(path, ".metadata")
    ):
        raise UserError(
            f"checkpoint {path} is incomplete (its write was cut off) or not a sharded "
            f"train_gpt2.py checkpoint (no {COMPLETE} or .metadata)"
        )
    checkpoint = load_file(os.path.join(path, TRAIN_STATE))
    if not isinstance(checkpoint, dict) or "config" not in checkpoint:
        raise UserError(f"checkpoint {path} is not a train_gpt2.py checkpoint (no config in {TRAIN_STATE})")
    verify_checksum(path, checkpoint)
    digests = checkpoint.pop(FILE_DIGESTS_KEY, None)
    checkpoint.update(sharded=path, model={})
    check_config(path, checkpoint)  # a usable model shape before its layout is built
    shapes = check_shard_files(path, digests)
    if weights:
        checkpoint["model"] = gather_sharded_model(path)
    else:
        checkpoint[SHARD_SHAPES] = shapes
    return check_config(path, checkpoint)


def check_shard_files(path, digests):
    """A sharded checkpoint's files as they were written: each file's size and digest as recorded
    (digests None: a checkpoint written before they were, said in a note), then .metadata readable,
    naming only files that are there and as long as it says. Returns {key: shape} of its tensors."""
    if digests is None:
        print(
            f"note: checkpoint {path} has no digests of its shard files (written before they had them): "
            "they are checked for structure only"
        )
    else:
        verify_file_digests(path, digests)
    files, shapes = read_shard_metadata(path)
    for name, end in files:
        if os.path.basename(name) != name or (digests is not None and name not in digests):
            raise UserError(
                f"checkpoint {path} is damaged: its .metadata names {name!r:.80}, a file not written with it"
            )
        if not os.path.isfile(os.path.join(path, name)) or os.path.getsize(os.path.join(path, name)) < end:
            raise UserError(
                f"checkpoint {path} is damaged: {name} is missing or shorter than its .metadata says"
            )
    return shapes


def verify_file_digests(path, digests):
    """Each file recorded in digests ({name: {"size", CHECKSUM_ALGORITHM}}) is there, of that size and
    digest."""
    if not isinstance(digests, dict) or not all(isinstance(d, dict) for d in digests.values()):
        raise UserError(f"checkpoint {path} is damaged: the digests of its files are unreadable")
    for name, recorded in digests.items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise UserError(f"checkpoint {path} is damaged: {name} is missing")
        if os.path.getsize(file) != recorded.get("size"):
            raise UserError(
                f"checkpoint {path} is damaged: {name} is {os.path.getsize(file)} bytes, "
                f"{recorded.get('size')} were written"
            )
        try:
            digest = digest_file(file)
        except OSError as e:
            raise UserError(f"checkpoint {path}: cannot read {name} ({one_line(e)})") from None
        if digest != recorded.get(CHECKSUM_ALGORITHM):
            raise UserError(f"checkpoint {path} is damaged: {name} does not match the digest written with it")


def dcp_error(error):
    """One line for an error out of torch.distributed.checkpoint. Its CheckpointException (a
    BaseException, which `except Exception` misses) gathers every rank's failure: the first one's,
    with the OSError behind it when there is one."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(error, CheckpointException) and error.failures:
        rank, (failure, _) = min(error.failures.items())
        return f"on rank {rank}: {one_line(write_failure(failure) or failure)}"
    return one_line(write_failure(error) or error)


def dcp_errors():
    """The exception types torch.distributed.checkpoint raises: CheckpointException and any Exception."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (CheckpointException, Exception)


def read_shard_metadata(path):
    """What a sharded checkpoint's .metadata says: [(file name, the end of a tensor's bytes in it)] and
    {key: shape} of its tensors."""
    import torch.distributed.checkpoint as dcp

    try:
        metadata = dcp.FileSystemReader(path).read_metadata()
    except dcp_errors() as e:
        raise UserError(
            f"checkpoint {path} is damaged: its .metadata is unreadable ({dcp_error(e)})"
        ) from None
    try:  # an older checkpoint's .metadata has no digest: it may hold anything
        files = [(info.relative_path, info.offset + info.length) for info in metadata.storage_data.values()]
        shapes = {
            key: tuple(meta.size)
            for key, meta in metadata.state_dict_metadata.items()
            if hasattr(meta, "size")
        }
    except (AttributeError, TypeError):
        files = None
    if files is None or not all(isinstance(name, str) and isinstance(end, int) for name, end in files):
        raise UserError(f"checkpoint {path} is damaged: its .metadata is not DCP's")
    return files, shapes


def check_shard_shapes(path, shapes, weights, parameter_layout=None):
    """The weights .metadata lists ({key: shape}) fit the model's; with parameter_layout (a resume:
    see check_resume_state), each optimizer state tensor is shaped like its weight."""
    check_weights(
        {
            key.removeprefix("model."): torch.empty(shape, device="meta")
            for key, shape in shapes.items()
            if key.startswith("model.")
        },
        weights,
        path,
    )
    if parameter_layout is None:
        return
    names = tuple({f".{name}" for _, state_names in parameter_layout for name in state_names})
    moments = {
        key: shape
        for key, shape in shapes.items()
        if key.startswith("optimizer.state.") and key.endswith(names)
    }
    for key, shape in moments.items():
        if weights.get(key.removeprefix("optimizer.state.").rsplit(".", 1)[0]) != shape:
            raise UserError(
                f"checkpoint {path} cannot be resumed: optimizer state {key} does not fit the model"
            )
    stepped = {key.removeprefix("optimizer.state.").rsplit(".", 1)[0] for key in moments}
    if len(stepped) != len(parameter_layout):  # every parameter has its state after the first step
        raise UserError(
            f"checkpoint {path} cannot be resumed: its optimizer holds state for {len(stepped)} "
            f"parameters, the model has {len(parameter_layout)}"
        )


def gather_sharded_model(path):
    """The full weights of a sharded checkpoint, read by this process alone (no process group)."""
    import torch.distributed.checkpoint as dcp

    try:
        metadata = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        model = {
            key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
            for key, meta in metadata.items()
            if key.startswith("model.")
        }
        with warnings.catch_warnings():  # DCP warns that it loads in a single process: that is the point
            warnings.simplefilter("ignore")
            dcp.load({"model": model}, checkpoint_id=path, no_dist=True)
    except dcp_errors() as e:  # a shard file changed since it was verified
        raise UserError(f"checkpoint {path}: cannot read its shards ({dcp_error(e)})") from None
    return model


def load_sharded(path, model, optimizer):
    """Every rank of a run loads a sharded checkpoint directory into its model (sharded by --fsdp or
    not: DCP reads each rank's part, whatever the world size that wrote it) and, unless None, optimizer.
    The checkpoint was verified when it was chosen; a read that fails now is a UserError on every rank
    (DCP gathers every rank's failure)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_state, optimizer_state = get_state_dict(model, optimizers.parts(optimizer))
        state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=path)
    except dcp_errors() as e:
        raise UserError(f"checkpoint {path}: cannot read its shards ({dcp_error(e)})") from None
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(
            model,
            optimizers.parts(optimizer),
            model_state_dict=state["model"],
            optim_state_dict=state["optimizer"],
        )


def list_checkpoints(log_dir):
    """Checkpoint paths in log_dir (.pt files and sharded directories), newest (highest step) first."""
    if not os.path.isdir(log_dir):
        return []
    found = [
        (checkpoint_step(name), name)
        for name in os.listdir(log_dir)
        if CHECKPOINT_PATTERN.match(name)
        or (SHARDED_PATTERN.match(name) and os.path.isdir(os.path.join(log_dir, name)))
    ]
    return [os.path.join(log_dir, name) for _, name in sorted(found, reverse=True)]


def checkpoint_step(path):
    name = os.path.basename(os.path.normpath(path))
    return int((CHECKPOINT_PATTERN.match(name) or SHARDED_PATTERN.match(name)).group(1))


def all_damaged(log_dir, damaged):
    """The error when every checkpoint in log_dir (their names: damaged) failed to read."""
    return UserError(
        f"every checkpoint in {log_dir} is damaged ({', '.join(damaged)}): restore a good one, "
        "or pass --resume none to start over (the damaged ones are then set aside)"
    )


def continues_in(log_dir, resume_path):
    """Whether resuming resume_path (None: a fresh start) continues the run whose logs are in log_dir:
    the checkpoint lies in that directory."""
    return (
        resume_path is not None
        and os.path.isdir(log_dir)
        and os.path.samefile(os.path.dirname(os.path.abspath(resume_path)), log_dir)
    )


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


def write_checkpoint(
    step, raw_model, optimizer, precision, cfg, val_loss, loader_states, rng_states, run_id, counts=None
):
    """Write log_dir/model_{step}.pt atomically, with its checksum; then, with --keep-last, delete this
    run's oldest checkpoints (log_dir holds only this run's: others were set aside at start)."""
    path = os.path.join(cfg.log_dir, f"model_{step:05d}.pt")
    checkpoint = {
        "model": raw_model.state_dict(),
        "optimizer": optimizer.state_dict(),
        **train_state(
            step, raw_model.config, precision, cfg, val_loss, loader_states, rng_states, run_id, counts
        ),
    }
    checkpoint[CHECKSUM_KEY] = {CHECKSUM_ALGORITHM: checksum(checkpoint)}
    rundir.check_held(cfg.log_dir)  # never written into a directory that another run may hold by now
    atomic_write(path, lambda f: torch.save(checkpoint, f))
    remove_old_checkpoints(cfg, step)
    return path


def remove_old_checkpoints(cfg, step):
    """With --keep-last, this run's checkpoints beyond the newest keep_last."""
    if not cfg.keep_last:
        return
    for old in list_checkpoints(cfg.log_dir)[cfg.keep_last :]:
        if checkpoint_step(old) < step:
            try:
                if os.path.isfile(old):
                    os.remove(old)
                elif os.path.isfile(os.path.join(old, OWNER)):
                    shutil.rmtree(old)
            except OSError as e:
                raise UserError(
                    f"{old}: cannot delete it for --keep-last ({one_line(e)}): check permissions"
                ) from None


def begin_sharded_checkpoint(log_dir, step):
    """On rank 0: the empty directory model_{step:05d}.partial/ that every rank writes its shards into.
    One left by a write that was cut off (marked OWNER) is deleted first."""
    partial = os.path.join(log_dir, f"model_{step:05d}.partial")
    rundir.check_held(log_dir)
    if os.path.exists(partial):
        if not os.path.isfile(os.path.join(partial, OWNER)):
            raise UserError(
                f"{partial} is in the way and was not written by train_gpt2.py: move it elsewhere"
            )
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

    model_state, optimizer_state = get_state_dict(model, optimizers.parts(optimizer))
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        if background_group is not None:
            return dcp.async_save(state, checkpoint_id=directory, process_group=background_group)
        dcp.save(state, checkpoint_id=directory)
    except dcp_errors() as e:  # DCP gathers every rank's failure (a full disk, ...) and raises on all ranks
        raise shard_write_error(directory, e) from None
    return None


def shard_write_error(directory, error):
    reason = dcp_error(error)
    if "No space left" not in reason and free_bytes(directory) == 0:
        # DCP passes on torch.save's RuntimeError ("unexpected pos ...") without the OSError behind it
        reason = "No space left on device: its filesystem is full"
    return UserError(
        f"{directory}: cannot write the checkpoint shards ({reason}): check free space and permissions"
    )


def free_bytes(directory):
    """Bytes free to this user on directory's filesystem, or None when that cannot be told."""
    try:
        stat = os.statvfs(directory)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def wait_for_shards(future, directory):
    """Wait for a background write_shards (future None: there is none), then digest this rank's
    files: {name: {"size", CHECKSUM_ALGORITHM}}."""
    if future is not None:
        try:
            future.result()
        except dcp_errors() as e:
            raise shard_write_error(directory, e) from None
    return digest_own_files(directory)


def digest_own_files(directory):
    """The size and digest of each file this rank wrote into a sharded checkpoint: DCP's writer names
    them __{rank}_{n}.distcp, and the coordinator (rank 0) writes .metadata."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    names = [
        name for name in os.listdir(directory) if name.startswith(f"__{rank}_") and name.endswith(".distcp")
    ]
    if rank == 0:
        names.append(".metadata")
    with disk_errors(directory, "read back the checkpoint shards just written"):
        return {
            name: {
                "size": os.path.getsize(os.path.join(directory, name)),
                CHECKSUM_ALGORITHM: digest_file(os.path.join(directory, name)),
            }
            for name in sorted(names)
        }


def discard_partial(partial):
    """Remove a sharded checkpoint whose write failed (the OWNER marker proves it ours): a full disk
    is freed of it. Once its failure is known on every rank, no rank still writes into it."""
    if os.path.isfile(os.path.join(partial, OWNER)):
        shutil.rmtree(
            partial, ignore_errors=True
        )  # what stays is removed by the next begin_sharded_checkpoint


@contextlib.contextmanager
def discarded_on_failure(dist_ctx, partial):
    """A UserError inside (agreed by every rank, as DistContext's collectives raise it) leaves no
    partial checkpoint behind: rank 0 removes it."""
    try:
        yield
    except UserError:
        if dist_ctx.master_process:
            discard_partial(partial)
        raise


def finish_sharded_checkpoint(
    directory, step, config, precision, cfg, val_loss, loader_states, rng_states, run_id, counts, file_digests
):
    """On rank 0, once every rank has written and digested its shards: train_state.pt (with the files'
    digests, and its checksum over all of it), then COMPLETE, then the rename to model_{step:05d}/ that
    makes the checkpoint visible. Returns its path."""
    state = train_state(step, config, precision, cfg, val_loss, loader_states, rng_states, run_id, counts)
    state[FILE_DIGESTS_KEY] = file_digests
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
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
    }


def set_rng_state(state, device):
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


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
        with discarded_on_failure(ctx, partial):
            written = ctx.on_every_rank(
                lambda: write_shards(partial, run.raw_model, run.optimizer, run.save_group)
            )
        val_loss, counts = (
            run.val_loss,
            dict(run.counts),
        )  # this step's: a background write completes steps later
        run.pending_save = (
            partial,
            written,
            lambda file_digests: finish_sharded_checkpoint(
                partial,
                step,
                run.raw_model.config,
                run.precision,
                cfg,
                val_loss,
                loader_states,
                rng_states,
                run.run_id,
                counts,
                file_digests,
            ),
        )
        if not cfg.async_checkpoint:
            finish_save(run)
        return
    path = ctx.decide(
        lambda: write_checkpoint(
            step,
            run.raw_model,
            run.optimizer,
            run.precision,
            cfg,
            run.val_loss,
            loader_states,
            rng_states,
            run.run_id,
            run.counts,
        )
    )
    if ctx.master_process:
        print(f"step {step:5d} | saved {path}")


def finish_save(run):
    """Complete the sharded checkpoint being written, if any: every rank's shards written and digested,
    then rank 0 adds the rest, with the digests, and renames it into place. A failure anywhere removes it."""
    if run.pending_save is None:
        return
    (partial, written, complete), run.pending_save = run.pending_save, None
    ctx = run.dist_ctx
    with discarded_on_failure(ctx, partial):
        mine = ctx.on_every_rank(lambda: wait_for_shards(written, partial))
        file_digests = {
            name: digest for digests in ctx.gather_objects(mine) for name, digest in digests.items()
        }
        path = ctx.decide(lambda: complete(file_digests))
    if ctx.master_process:
        print(f"step {checkpoint_step(path):5d} | saved {path}")
