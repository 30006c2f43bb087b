"""One server per data directory: an exclusive lock on DIR/lock while a server uses DIR.

Two servers over one directory would each load the sessions, step their own
copies and overwrite each other's files. `optreg serve` and the offline
`optreg sessions --data-dir` both take this lock; the second one to try gets
DataDirInUse naming the holder's pid. The lock is flock(2) on an open file, so
the kernel drops it when the holding process exits, however it exits: a stale
lock file left behind by a crash never blocks a restart.
"""
from __future__ import annotations

import os
import pathlib

try:
    import fcntl
except ImportError:  # not POSIX: no lock (the server still runs)
    fcntl = None

LOCK_NAME = "lock"


class DataDirInUse(OSError):
    """Another process holds the data directory's lock; `.directory`, `.holder` (its pid, as text)."""

    def __init__(self, message: str, directory: str, holder: str):
        super().__init__(message)
        self.directory, self.holder = directory, holder

    def __str__(self):
        return self.args[0]


class DataDirLock:
    """The held lock; release() (or the process's exit) lets the next server in."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if fcntl is None:
            return
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self._fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(self._fd)
            self._fd = None
            raise DataDirInUse(f"data directory {self.directory} is in use by another optreg server (pid {holder})",
                               str(self.directory), holder) from None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self):  # a server whose construction failed after taking the lock lets go of it
        self.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
