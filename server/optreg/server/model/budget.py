"""The memory budget: every copy of tensor data the server holds is counted here, before it
is allocated — live sets, spare and staging sets, gradient buffers, assembled uploads.

A reservation is tied to the object that holds the memory (`hold`): its bytes leave the
budget when that object is garbage collected, so an error path cannot leak budget.
"""
from __future__ import annotations

import os
import threading
import weakref

from optreg.server.model.errors import ResourceExhausted

MIB = 1 << 20
# The default budget: this share of physical memory (the rest is the OS's, gRPC's, Python's).
DEFAULT_SHARE = 0.5


def physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        return 8 << 30


def default_budget() -> int:
    return int(physical_memory() * DEFAULT_SHARE)


class MemoryBudget:
    """`total` bytes; 0 means unlimited. `make_room(nbytes)` is called when a reservation does not
    fit (the store unloads idle durable sessions there) and returns True when it freed something."""

    def __init__(self, total: int, make_room=None):
        self.total = total
        self.held = 0
        self.make_room = make_room
        self._lock = threading.Lock()

    def reserve(self, nbytes: int, what: str) -> None:
        """Count `nbytes` or raise RESOURCE_EXHAUSTED naming the size and the budget."""
        while True:
            with self._lock:
                if not self.total or self.held + nbytes <= self.total:
                    self.held += nbytes
                    return
                held = self.held
            if nbytes > self.total or self.make_room is None or not self.make_room(nbytes):
                raise ResourceExhausted(
                    f"{what} needs {nbytes / MIB:.1f} MiB, but the server's memory budget of "
                    f"{self.total / MIB:.1f} MiB (--memory-budget-mb) has {max(0, self.total - held) / MIB:.1f} "
                    "MiB free: delete or unload sessions, or start the server with a larger budget")

    def charge(self, nbytes: int) -> None:
        """Count `nbytes` already in use that cannot be refused (a memory log's records, acknowledged)."""
        with self._lock:
            self.held += nbytes

    @property
    def over(self) -> bool:
        return bool(self.total) and self.held > self.total

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.held -= nbytes

    def hold(self, owner, nbytes: int) -> None:
        """Release a reservation of `nbytes` (already made) when `owner` is collected."""
        weakref.finalize(owner, self.release, nbytes)

    def allocate(self, what: str, nbytes: int, build):
        """Reserve, then `build()` the holder of the memory; the reservation lives as long as it does."""
        self.reserve(nbytes, what)
        try:
            obj = build()
        except BaseException:
            self.release(nbytes)
            raise
        self.hold(obj, nbytes)
        return obj
