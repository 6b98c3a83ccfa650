"""One training run per log directory: an exclusive lock on `log_dir/.lock`.

The lock is an `fcntl.flock` on the file, which the kernel releases when the process ends however it
ends (exit, exception, kill -9), so a crashed run never leaves a lock behind. The file also records
the holder (pid, host, start time) for the message a second run prints. Where flock is not available
(some network filesystems refuse it) the record alone decides: a holder on this host whose pid is
gone is stale and taken over; a holder on another host is respected until its record is deleted.
The file is left in place at release (emptied): unlinking it could let two runs lock two files.
"""
from __future__ import annotations

import errno
import os
import socket
import time
from pathlib import Path

try:
    import fcntl
except ImportError:  # not POSIX: the pid/host record alone
    fcntl = None

LOCK_NAME = ".lock"


class LockError(RuntimeError):
    """The log directory is in use, or cannot be written."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _parse(record: str) -> dict:
    out = {}
    for part in record.split():
        k, _, v = part.partition("=")
        out[k] = v
    return out


class RunLock:
    def __init__(self, log_dir: str | Path):
        self.log_dir = Path(log_dir)
        self.path = self.log_dir / LOCK_NAME
        self.fd: int | None = None
        self.took_over: str | None = None  # the record of a crashed holder we replaced

    def acquire(self) -> "RunLock":
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise LockError(f"--log_dir {self.log_dir} is not a writable directory "
                            f"({e.strerror or e}{': ' + str(e.filename) if e.filename else ''})") from None
        try:
            previous = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            if fcntl is not None and self._flock(fd):
                pass  # we hold it: whatever the record says is a run that ended without releasing
            elif not self._stale(previous):
                raise LockError(self._busy(previous))
            if previous:
                self.took_over = previous
            me = f"pid={os.getpid()} host={socket.gethostname()} started={time.strftime('%Y-%m-%dT%H:%M:%S')}\n"
            os.ftruncate(fd, 0)
            os.pwrite(fd, me.encode(), 0)
            os.fsync(fd)
        except LockError:
            os.close(fd)
            raise
        except OSError as e:
            os.close(fd)
            raise LockError(f"--log_dir {self.log_dir} is not writable ({e.strerror or e})") from None
        self.fd = fd
        return self

    def _flock(self, fd: int) -> bool:
        """True if we got the lock, False if another process holds it; raise-free where flock is unsupported
        (then the record decides, see _stale)."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            return False  # ENOLCK/EOPNOTSUPP: fall through to the record

    @staticmethod
    def _stale(record: str) -> bool:
        if not record:
            return True
        info = _parse(record)
        if info.get("host") == socket.gethostname() and info.get("pid", "").isdigit():
            # flock said busy (or is unsupported): trust it unless the recorded pid is gone on this host
            return not _alive(int(info["pid"]))
        return False

    def _busy(self, record: str) -> str:
        info = _parse(record)
        who = f"pid {info.get('pid', '?')} on host {info.get('host', '?')}, started {info.get('started', '?')}"
        return (f"--log_dir {self.log_dir} is in use by another training run ({who}). Two runs in one directory "
                f"would overwrite each other's checkpoints and log lines: wait for it to finish, stop it (Ctrl+C "
                f"saves a checkpoint), or pass another --log_dir. If that process is gone (on another host), "
                f"delete {self.path}.")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
