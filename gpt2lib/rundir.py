"""One writer per directory: train_gpt2.py's --log-dir and fineweb.py's --out are claimed with an
exclusive OS lock before anything in them is read, moved or written, and what a killed writer left
behind (its temporary files) is removed only while the lock is held. Before a run starts, what other
runs left in its log dir is set aside into previous_N/ (nothing is deleted)."""

import contextlib
import fcntl
import os
import shutil
import socket

from gpt2lib import tracking
from gpt2lib.checkpoints import checkpoint_step, continues_in, list_checkpoints
from gpt2lib.common import UserError, atomic_write, disk_errors, one_line, temp_pattern
from gpt2lib.distributed import FollowerStop
from gpt2lib.runlog import LOG_FILES, RunLog

LOCK_NAME = ".lock"


def make_directory(directory, flag):
    """Create directory (and its parents); a file in its place or a failure is a one-line UserError."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UserError(f"{flag} {directory} is a file, not a directory: choose another {flag}")
    with disk_errors(f"{flag} {directory}", "create this output directory"):
        os.makedirs(directory, exist_ok=True)


class DirectoryLock:
    """An exclusive flock on directory/.lock. The kernel drops it when the holder exits, however it
    dies, so a killed run never blocks the next one. The file names the holder (host and PID) for
    the message a second writer gets."""

    def __init__(self, directory, flag):
        self.directory, self.flag = directory, flag
        self.fd = None
        self.created = False  # the directory did not exist: release() removes it if nothing else came

    def acquire(self):
        """Take the lock or raise a one-line UserError naming its holder; the directory is created
        first when missing, and nothing else in it is touched."""
        self.created = not os.path.isdir(self.directory)
        make_directory(self.directory, self.flag)
        path = os.path.join(self.directory, LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(f"{self.flag} {self.directory}: cannot create its lock file {LOCK_NAME} "
                            f"({one_line(e)}): check free space and permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            held = isinstance(e, BlockingIOError)
            holder = os.pread(fd, 256, 0).decode(errors="replace").split() if held else []
            os.close(fd)
            if not held:
                raise UserError(f"{self.flag} {self.directory}: cannot lock it ({one_line(e)})") from None
            host, pid = (holder + ["unknown", "unknown"])[:2]
            raise UserError(f"{self.flag} {self.directory} is in use by another run (host {host}, pid {pid}): "
                            f"wait for it to end, or choose another {self.flag}") from None
        self.fd = fd
        try:
            text = f"{socket.gethostname()} {os.getpid()}\n".encode()
            os.pwrite(fd, text, 0)
            os.ftruncate(fd, len(text))
        except OSError as e:
            self.release()
            raise UserError(f"{self.flag} {self.directory}: cannot write its lock file ({one_line(e)}): "
                            "check free space and permissions") from None
        return self

    def release(self):
        """Drop the lock. A directory that acquire() created and that holds nothing but the lock file
        (the run stopped before writing anything) is removed: a refused run leaves no trace."""
        if self.fd is None:
            return
        if self.created and os.listdir(self.directory) == [LOCK_NAME]:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(self.directory, LOCK_NAME))
                os.rmdir(self.directory)
        os.close(self.fd)  # closing the descriptor drops the flock
        self.fd = None


def remove_leftovers(directory, name_pattern):
    """Delete the temporary files (common.temp_name's names) of the files whose names match
    name_pattern (a regex) in directory: only a killed writer leaves them. Call while holding the
    directory's lock, so that no live writer's file is taken. Returns the names removed."""
    pattern = temp_pattern(name_pattern)
    removed = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if pattern.match(name) and os.path.isfile(path) and not os.path.islink(path):
            try:
                os.remove(path)
            except OSError as e:
                raise UserError(f"{path}: cannot remove this temporary file of an earlier run ({one_line(e)})") from None
            removed.append(name)
    if removed:
        print(f"note: removed temporary files that a killed run left in {directory}: {', '.join(removed)}")
    return removed


@contextlib.contextmanager
def held(directory, flag, name_pattern, decide=lambda fn: fn()):
    """Hold directory's lock for the block, leftovers removed first. decide runs the claim (on rank 0
    only, under torchrun: DistContext.decide, so a refusal stops every rank)."""
    lock = DirectoryLock(directory, flag)

    def claim():
        lock.acquire()
        remove_leftovers(directory, name_pattern)

    try:
        decide(claim)
        yield lock
    finally:
        lock.release()


def holds_files(directory):
    """Whether directory holds anything but a lock file."""
    return os.path.isdir(directory) and bool(set(os.listdir(directory)) - {LOCK_NAME})


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


def check_shared_log_dir(log_dir, dist_ctx):
    """Every rank writes its shards of a --fsdp checkpoint into log_dir: all ranks must see the same
    directory. Said at start, on every rank, rather than found out at the first resume."""
    probe = dist_ctx.decide(lambda: write_probe(log_dir))
    blind = [rank for rank, seen in enumerate(dist_ctx.gather_objects(os.path.exists(probe))) if not seen]
    dist_ctx.decide(lambda: remove_probe(probe))
    if blind:
        message = (f"--fsdp: rank(s) {', '.join(map(str, blind))} do not see --log-dir {log_dir} as rank 0 does: "
                   "sharded checkpoints need a log dir on a filesystem every node shares (or train without --fsdp)")
        raise UserError(message) if dist_ctx.master_process else FollowerStop(message)
