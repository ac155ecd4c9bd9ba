"""One writer per directory: train_gpt2.py's --log-dir and fineweb.py's --out are claimed with an
exclusive OS lock before anything in them is read, moved or written, and what a killed writer left
behind (its temporary files) is removed only while the lock is held."""

import contextlib
import fcntl
import os
import socket

from gpt2lib.common import UserError, disk_errors, one_line, temp_pattern

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
