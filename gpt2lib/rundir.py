"""One writer per directory: train_gpt2.py's --log-dir and fineweb.py's --out are claimed with an
exclusive OS lock before anything in them is read, moved or written, and what a killed writer left
behind (its temporary files) is removed only while the lock is held."""

import contextlib
import fcntl
import os
import socket
import time

from gpt2lib.common import UserError, disk_errors, one_line, temp_pattern
from gpt2lib.distributed import FollowerStop

LOCK_NAME = ".lock"


def make_directory(directory, flag):
    """Create directory (and its parents); a file in its place or a failure is a one-line UserError."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UserError(f"{flag} {directory} is a file, not a directory: choose another {flag}")
    with disk_errors(f"{flag} {directory}", "create this output directory"):
        os.makedirs(directory, exist_ok=True)


class DirectoryLock:
    """An exclusive flock on the directory itself and on directory/.lock. The kernel drops both when
    the holder exits, however it dies, so a killed run never blocks the next one. The directory's
    own lock holds when .lock is deleted or replaced; .lock's carries it where directories cannot be
    locked (NFS) and keeps out runs of earlier versions, which lock only the file. A refused run names
    the holder (host and PID): from the kernel's lock table where it lists the directory's lock, else
    from the file, which the holder writes once it holds both locks."""

    def __init__(self, directory, flag):
        self.directory, self.flag = directory, flag
        self.fd = self.dir_fd = None
        self.dir_locked = False  # False where the filesystem cannot lock a directory
        self.created = False  # the directory did not exist: release() removes it if nothing else came

    def acquire(self):
        """Take the locks or raise a one-line UserError naming their holder; the directory is created
        first when missing, and nothing else in it is touched."""
        self.created = not os.path.isdir(self.directory)
        make_directory(self.directory, self.flag)
        try:
            self.dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            self.dir_locked = self._flock(self.dir_fd, directory=True)
            self.fd = self._lock_file()
        except BaseException:
            self.release()
            raise
        _HELD[os.path.abspath(self.directory)] = self
        return self

    def _flock(self, fd, directory=False):
        """True once fd is locked; False where the filesystem cannot lock it (the directory's only)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            host, pid = self._holder(from_table=directory)
            raise UserError(
                f"{self.flag} {self.directory} is in use by another run (host {host}, pid {pid}): "
                f"wait for it to end, or choose another {self.flag}"
            ) from None
        except OSError as e:
            if directory:
                return False
            raise UserError(f"{self.flag} {self.directory}: cannot lock it ({one_line(e)})") from None

    def _lock_file(self):
        """Create (or open) .lock, lock it and write this process's host and PID into it."""
        path = os.path.join(self.directory, LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise UserError(
                f"{self.flag} {self.directory}: cannot create its lock file {LOCK_NAME} "
                f"({one_line(e)}): check free space and permissions"
            ) from None
        try:
            self._flock(fd)
            text = f"{socket.gethostname()} {os.getpid()}\n".encode()
            os.ftruncate(fd, 0)  # a refused run reads a whole line or nothing, and waits for a whole one
            os.pwrite(fd, text, 0)
        except OSError as e:
            os.close(fd)
            raise UserError(
                f"{self.flag} {self.directory}: cannot write its lock file ({one_line(e)}): "
                "check free space and permissions"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _holder(self, from_table, wait_s=2.0):
        """(host, pid) of the run that holds the lock: the kernel lists a directory's flock with the
        holder's PID (on this host: a local filesystem's lock has no other); else .lock's line, which
        the holder writes just after taking the lock, so a refused run waits a moment for it."""
        pid = flock_holder(self.directory) if from_table else None
        if pid is not None:
            return socket.gethostname(), pid
        deadline = time.monotonic() + wait_s
        while True:
            with contextlib.suppress(OSError), open(os.path.join(self.directory, LOCK_NAME), "rb") as f:
                text = f.read(256).decode(errors="replace")
                if text.endswith("\n") and len(text.split()) == 2:
                    return tuple(text.split())
            if time.monotonic() > deadline:
                return "unknown", "unknown"
            time.sleep(0.02)

    def check(self):
        """Before a checkpoint or a set-aside: the directory at its path must still be the one locked
        (moved or deleted: this run stops, so that it never writes into another run's directory).
        A .lock deleted or replaced is written again while the directory's own lock holds; where there
        is none it was the only lock, and this run stops: another run may have come in."""
        try:
            here = os.stat(self.directory)
        except OSError:
            here = None
        if here is None or not same_file(here, os.fstat(self.dir_fd)):
            raise UserError(
                f"{self.flag} {self.directory} was moved or deleted while this run was using it: "
                f"stopped without writing more into it; resume from the directory that holds its checkpoints"
            )
        try:
            intact = same_file(os.stat(os.path.join(self.directory, LOCK_NAME)), os.fstat(self.fd))
        except OSError:
            intact = False
        if intact:
            return
        if not self.dir_locked:
            raise UserError(
                f"{self.flag} {self.directory}: its lock file {LOCK_NAME} was deleted or replaced while "
                f"this run held it, so another run may have started in it: stopped without writing more"
            )
        os.close(self.fd)
        self.fd = None
        self.fd = self._lock_file()

    def release(self):
        """Drop the locks. A directory that acquire() created and that holds nothing but the lock file
        (the run stopped before writing anything) is removed: a refused run leaves no trace. A directory
        moved or deleted meanwhile is left as it is."""
        _HELD.pop(os.path.abspath(self.directory), None)
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, 0)  # the name of a run that ended is nobody's
                if (
                    self.created
                    and os.listdir(self.directory) == [LOCK_NAME]
                    and same_file(os.stat(self.directory), os.fstat(self.dir_fd))
                ):
                    os.remove(os.path.join(self.directory, LOCK_NAME))
                    os.rmdir(self.directory)
            os.close(self.fd)  # closing the descriptors drops the flocks
        if self.dir_fd is not None:
            os.close(self.dir_fd)
        self.fd = self.dir_fd = None


_HELD = {}  # absolute directory path -> its DirectoryLock, while this process holds it


def check_held(directory):
    """DirectoryLock.check for directory, when this process holds its lock (rank 0 of a run)."""
    lock = _HELD.get(os.path.abspath(directory))
    if lock is not None:
        lock.check()


def same_file(a, b):
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def flock_holder(directory):
    """The PID holding an exclusive flock on directory, from Linux's /proc/locks; None where that
    cannot be read or lists none."""
    try:
        st = os.stat(directory)
        with open("/proc/locks") as f:
            table = f.read()
    except OSError:
        return None
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in table.splitlines():
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 9136 fe:00:2146501 0 EOF"; a waiter's line starts "1: ->"
        if fields[1:4] == ["FLOCK", "ADVISORY", "WRITE"] and fields[5] == inode:
            return fields[4]
    return None


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
                raise UserError(
                    f"{path}: cannot remove this temporary file of an earlier run ({one_line(e)})"
                ) from None
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


@contextlib.contextmanager
def claim(directory, flag, name_pattern, dist_ctx, read_only=False):
    """Yields whether this run writes into directory. A run holds its lock throughout (on rank 0, see
    held), so a second run into it stops before touching anything. A read_only run (--eval-only) never
    changes what a directory holds: into a new or empty one it writes as a run does (a baseline for
    play.ipynb); into any other it takes no lock, sets nothing aside, trims no log and writes nothing."""
    if read_only and dist_ctx.decide(lambda: holds_files(directory)):
        if dist_ctx.master_process:
            print(
                f"note: --eval-only writes nothing into {flag} {directory}, which holds files already: "
                f"its results are only printed (a new or empty {flag} logs them)"
            )
        yield False
        return
    with held(directory, flag, name_pattern, dist_ctx.decide):
        yield True


def holds_files(directory):
    """Whether directory holds anything but a lock file."""
    return os.path.isdir(directory) and bool(set(os.listdir(directory)) - {LOCK_NAME})


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
        message = (
            f"--fsdp: rank(s) {', '.join(map(str, blind))} do not see --log-dir {log_dir} as rank 0 does: "
            "sharded checkpoints need a log dir on a filesystem every node shares (or train without --fsdp)"
        )
        raise UserError(message) if dist_ctx.master_process else FollowerStop(message)
