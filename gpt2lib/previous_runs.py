"""Before a run starts, what other runs left in its --log-dir is set aside into previous_N/ (nothing is
deleted), and its logs are trimmed to the resume point; when rank 0 moved to another node, the logs the
checkpoint's node sent are written here first."""

import os
import shutil

from gpt2lib import tracking
from gpt2lib.checkpoints import checkpoint_step, continues_in, list_checkpoints
from gpt2lib.common import UserError, atomic_write, disk_errors, one_line
from gpt2lib.rundir import check_held
from gpt2lib.runlog import LOG_FILES, RunLog


def files_of_other_runs(log_dir, resume_path, resume_step):
    """(files to move, files to copy) out of log_dir before this run starts. On a fresh start, or when
    resuming from a checkpoint kept elsewhere, everything in log_dir belongs to another run. Resuming
    from log_dir, checkpoints newer than the resume point (another branch of the run, or damaged ones
    that were skipped) are another run's; the logs stay, and that run gets a copy of them."""
    if not os.path.isdir(log_dir):
        return [], []
    checkpoints = list_checkpoints(log_dir)
    logs = [
        os.path.join(log_dir, name)
        for name in LOG_FILES
        if os.path.isfile(os.path.join(log_dir, name)) and os.path.getsize(os.path.join(log_dir, name))
    ]
    if not continues_in(log_dir, resume_path):  # W&B and TensorBoard files go too: this run starts its own
        trackers = [
            os.path.join(log_dir, name)
            for name in tracking.PATHS
            if os.path.exists(os.path.join(log_dir, name))
        ]
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
    check_held(log_dir)  # nothing is moved in a directory that another run may hold by now
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
        raise UserError(
            f"{log_dir}: cannot set earlier runs' files aside into {aside} ({one_line(e)}); "
            f"{where}: check free space and permissions"
        ) from None
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


def prepare_run_dir(log_dir, resume_path, resume_step, logs=None):
    """On rank 0, once every input has been read (so a bad one moves nothing): set aside what other
    runs left in log_dir, take over the run's logs and tracker files from the node that held the
    checkpoint (logs: {name: bytes}, when rank 0 moved to this node), then trim the logs to the resume point
    (resume_step None: a fresh start)."""
    move, copy = files_of_other_runs(log_dir, resume_path, resume_step)
    if move:
        aside = set_aside(log_dir, move, copy)
        print(
            f"{log_dir} held files this run does not continue: moved them to {aside} "
            f"({', '.join(sorted(os.listdir(aside)))})"
        )
    with disk_errors(log_dir, "create this log directory"):
        os.makedirs(log_dir, exist_ok=True)
    for name, data in (logs or {}).items():
        with disk_errors(log_dir, "create a directory in it"):
            os.makedirs(os.path.dirname(os.path.join(log_dir, name)), exist_ok=True)  # tensorboard/
        atomic_write(os.path.join(log_dir, name), lambda f: f.write(data))
    RunLog.prepare(log_dir, resume_step)
