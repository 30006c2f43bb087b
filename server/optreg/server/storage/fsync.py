"""Group commit: one syncer thread makes many logs durable together.

A log that needs its appended bytes on disk registers its file descriptor here, either
urgently (`sync(fd)`: the caller blocks until a sync that started after its request has
finished: every-step mode) or lazily (`dirty(fd)`: synced within `interval` seconds: the
default "os" mode). The thread takes every waiting descriptor as one batch and syncs them
together while new requests gather for the next batch, so N sessions stepping at once pay
for about one sync, not N.

How a batch is synced (`method`); bench/wal.py measures each on the disk at hand (figures
for the project's ext4 VM in docs/durability.md):
    "threads"    (default) the batch's fdatasyncs issued concurrently from a small pool:
                 ext4 merges them into one or two journal commits
    "fdatasync"  one fdatasync per file, in turn: shares little
    "syncfs"     one syncfs(2) per file system: as fast as "threads" when the disk is quiet,
                 but it also flushes every other dirty file there (a snapshot being written),
                 so its latency follows unrelated writes: 1.8x "threads" with 120 MB
                 snapshots written meanwhile. Errors: reported since Linux 5.8.
A failed sync's error is given to every log of the batch it hit (their data may be lost:
"fsyncgate"), and they keep it (see wal.Log).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

METHODS = ("threads", "fdatasync", "syncfs")
_libc = None


def fsync_dir(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(fd: int) -> None:
    """syncfs(2) of the file system holding `fd` (Linux)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    if _libc.syncfs(ctypes.c_int(fd)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"syncfs: {os.strerror(e)}")


class GroupSyncer:
    def __init__(self, method: str = "threads", interval: float = 1.0, pool: int = 16):
        if method not in METHODS:
            raise ValueError(f"method {method!r}: choose one of {METHODS}")
        self.method, self.interval, self.pool_size = method, interval, pool
        # One lock, two conditions: callers wake only the syncer thread (`_work`), the syncer wakes
        # the callers when a batch ends (`_done`). With one condition every caller's notify_all woke
        # every other blocked caller too: 16 sessions stepping at once made 16 wake-ups (and GIL
        # hand-offs) per request, measured as the server's largest single cost under that load.
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._done = threading.Condition(self._lock)
        self._urgent: set[int] = set()      # fds a caller is blocked on
        self._dirty: dict[int, float] = {}  # fd -> time it first became dirty
        self._inflight: set[int] = set()
        self._started = 0                   # batches started / finished
        self._finished = 0
        self._errors: dict[int, tuple[int, OSError]] = {}  # fd -> (batch number, error)
        self._thread: threading.Thread | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._stop = False
        self.batches = 0    # counters for benches and tests
        self.synced = 0

    # -- what logs call ---------------------------------------------------------------
    def sync(self, fd: int) -> None:
        """Block until `fd`'s data written before this call is durable; raise the batch's
        OSError if its sync failed."""
        with self._lock:
            self._start()
            self._urgent.add(fd)
            self._dirty.pop(fd, None)
            target = self._started + 1  # a batch that starts after this request
            self._work.notify()
            while self._finished < target:
                self._done.wait()
            err = self._errors.get(fd)
            if err is not None and err[0] >= target:
                raise err[1]

    def dirty(self, fd: int) -> None:
        """`fd` has data to make durable within `interval` seconds; returns at once."""
        with self._lock:
            self._start()
            if fd not in self._dirty:
                self._dirty[fd] = time.monotonic()
                self._work.notify()

    def error(self, fd: int) -> OSError | None:
        """The last background sync error of `fd`, if any (cleared by forget). Without the lock:
        every append asks, and a dict read is atomic; an error recorded a moment later is seen by
        the next append or by the commit's own sync."""
        e = self._errors.get(fd)
        return e[1] if e else None

    def forget(self, fd: int) -> None:
        """Drop `fd` from every queue and wait until no batch in flight uses it (call
        before closing it, so the thread never syncs a reused descriptor)."""
        with self._lock:
            self._urgent.discard(fd)
            self._dirty.pop(fd, None)
            while fd in self._inflight:
                self._done.wait()
            self._errors.pop(fd, None)

    def release(self, fd: int) -> OSError | None:
        """Before closing `fd` while it may have a sync owed (dirty() not yet synced): that sync now,
        then forget(fd). The error of its last sync, if one failed (its data may be lost)."""
        with self._lock:
            owed = fd in self._dirty or fd in self._urgent
        err = None
        if owed:
            try:
                self.sync(fd)
            except OSError as e:
                err = e
        with self._lock:
            while fd in self._inflight:
                self._done.wait()
            failed = self._errors.pop(fd, None)
            self._urgent.discard(fd)
            self._dirty.pop(fd, None)
        return err or (failed[1] if failed else None)

    def close(self) -> None:
        with self._lock:
            self._stop = True
            self._work.notify_all()
        if self._thread:
            self._thread.join()
        if self._pool:
            self._pool.shutdown()

    # -- the thread ---------------------------------------------------------------------
    def _start(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="optreg-log-syncer", daemon=True)
            self._thread.start()

    def _run(self):
        while True:
            with self._lock:
                while not self._stop:
                    if self._urgent:
                        break
                    now = time.monotonic()
                    due = [t + self.interval for t in self._dirty.values()]
                    if due and min(due) <= now:
                        break
                    self._work.wait(timeout=(min(due) - now) if due else None)
                if self._stop and not self._urgent and not self._dirty:
                    return
                batch = self._urgent | set(self._dirty)  # lazy ones ride along for free
                self._urgent.clear()
                self._dirty.clear()
                self._inflight = batch
                self._started += 1
                number = self._started
            errors = self._sync_batch(sorted(batch))
            with self._lock:
                for fd, e in errors.items():
                    self._errors[fd] = (number, e)
                self._inflight = set()
                self._finished = number
                self.batches += 1
                self.synced += len(batch)
                self._done.notify_all()

    def _sync_batch(self, fds: list[int]) -> dict[int, OSError]:
        errors: dict[int, OSError] = {}
        method = self.method
        if method == "syncfs":
            by_dev: dict[int, list[int]] = {}
            for fd in fds:
                try:
                    by_dev.setdefault(os.fstat(fd).st_dev, []).append(fd)
                except OSError as e:
                    errors[fd] = e
            for group in by_dev.values():
                try:
                    syncfs(group[0])
                except OSError as e:
                    errors.update((fd, e) for fd in group)
        elif method == "threads" and len(fds) > 1:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.pool_size, thread_name_prefix="optreg-fdatasync")
            for fd, e in zip(fds, self._pool.map(_fdatasync, fds)):
                if e is not None:
                    errors[fd] = e
        else:
            for fd in fds:
                e = _fdatasync(fd)
                if e is not None:
                    errors[fd] = e
        return errors


def _fdatasync(fd: int) -> OSError | None:
    try:
        os.fdatasync(fd)
    except OSError as e:
        return e
    return None


_default: GroupSyncer | None = None
_default_lock = threading.Lock()


def default_syncer() -> GroupSyncer:
    """The process-wide syncer every log uses unless given its own."""
    global _default
    with _default_lock:
        if _default is None:
            _default = GroupSyncer()
        return _default
