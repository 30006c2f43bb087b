"""The retry policy: which failures are retried, and for how long at most."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from optreg.client.errors import Unavailable

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Retry a call that failed with UNAVAILABLE, with exponential backoff, for at most
    `total_seconds` from the call's start; then raise Unavailable.

    UNAVAILABLE means the server could not be reached (stopped, restarting, network down) or
    asked for a retry (a checkpoint it could not write). Every call the client retries is safe
    to repeat: reads and hyperparameter updates are idempotent, a step is sent again with the
    same step number (the server applies it once and answers a repeat with the same reply), a
    create is retried only when it names its session id (a repeat finds it existing). Other
    failures are never retried: DEADLINE_EXCEEDED (the server may still be working on it) and
    every refusal.

    `RetryPolicy(total_seconds=0)` never retries. `Client(wait_for_ready=True)` instead waits
    for the server to come up, for up to the call's timeout.
    """
    total_seconds: float = 5.0
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    multiplier: float = 2.0

    def __post_init__(self):
        if not self.total_seconds >= 0 or not self.initial_backoff >= 0 or not self.max_backoff >= 0 \
                or not self.multiplier >= 1:
            raise ValueError(f"{self}: times must be >= 0 and multiplier >= 1")

    def run(self, attempt: Callable[[int, float | None], T], *, wait: Callable[[float], bool] | None = None,
            clock=time.monotonic, sleep=time.sleep) -> T:
        """Call `attempt(n, remaining)` (n = 0, 1, ...; remaining = seconds left in the retry
        window) until it returns or raises something other than Unavailable, or the window ends.

        `wait(seconds)`, if given, replaces the backoff sleep: it blocks until the server can be
        reached (True) or the seconds pass (False).
        """
        start = clock()
        backoff, n = self.initial_backoff, 0
        while True:
            try:
                return attempt(n, max(0.0, self.total_seconds - (clock() - start)))
            except Unavailable as e:
                elapsed = clock() - start
                left = self.total_seconds - elapsed
                if e.permanent and wait is None:  # waiting for the server (wait_for_ready) may outlast DNS
                    raise
                if left <= 0:
                    if n:
                        e.details = f"{e.details} (after {n + 1} attempts in {elapsed:.1f} s)"
                    raise
                if wait is not None:
                    wait(left)  # returns as soon as the server can be reached
                    left = self.total_seconds - (clock() - start)
                # Backoff also after a wait: a reachable server that answers UNAVAILABLE (a
                # checkpoint it could not write) must not be called in a tight loop.
                sleep(max(0.0, min(backoff, left)))
                backoff = min(backoff * self.multiplier, self.max_backoff)
                n += 1

