"""Admission limits: at most so many calls (or members) of one kind at once, the rest refused at once.

Every kind of waiting (streams, watchers, members of shared sessions, shared-memory registrations) is
admitted up to a documented limit with a flag, and refused beyond it with RESOURCE_EXHAUSTED naming
the limit, its flag and what to do. On the asyncio server (rpc/aio.py) a waiting call holds no
thread, only its memory, so the limits are sized by memory (1,000s), not by threads.
"""
from __future__ import annotations

import threading

from optreg.server.model.errors import ResourceExhausted


class Limit:
    """`size` slots; take() returns a Slot or raises ResourceExhausted(refusal) without waiting."""

    def __init__(self, size: int, refusal: str):
        self.size, self.refusal = size, refusal
        self._free = threading.BoundedSemaphore(size)

    def take(self) -> "Slot":
        if not self._free.acquire(blocking=False):
            raise ResourceExhausted(self.refusal)
        return Slot(self._free)


class Slot:
    """One taken slot; release() gives it back once, however often it is called (also as a context)."""

    def __init__(self, free: threading.BoundedSemaphore):
        self._free = free
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            free, self._free = self._free, None
        if free is not None:
            free.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
