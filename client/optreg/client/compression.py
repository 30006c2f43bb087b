"""Compressed gradients with error feedback (docs/slow-links.md): what a session sends instead of dense ones.

    session.compress(TopK(0.01))        # 1% of each gradient's elements, the largest (values + int32 indices)
    session.compress(Int8Blocks(256))   # int8 with a float32 scale per 256 elements
    session.compress(None)              # dense again (the residual is dropped)
    session.compress(WherePays(TopK(0.01)))  # compressed only while that is the faster step on this link

The residual (what compression left out) is kept here, on the client, and added to the next
gradient: without it a compressed run does not converge to the same loss. It is exactly the
gradient minus what the server applied (optreg.v1.compressed returns the decoded tensor the server
steps), and it moves only once a step is answered, so a retried step sends the same bytes.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from optreg.client.errors import UsageError
from optreg.v1 import compressed


@dataclass(frozen=True)
class TopK:
    """The `ratio` (0 < ratio <= 1) of each tensor's elements largest in magnitude, at least one."""
    ratio: float

    def __post_init__(self):
        if not 0 < self.ratio <= 1:
            raise UsageError(f"TopK(ratio={self.ratio!r}): give the fraction of elements sent, in (0, 1]")

    def encode(self, name: str, g: np.ndarray):
        return compressed.top_k(name, g, max(1, int(round(self.ratio * g.size))))


@dataclass(frozen=True)
class Int8Blocks:
    """int8 values with a float32 scale (max |g| / 127) per `block` consecutive elements."""
    block: int = 256

    def __post_init__(self):
        if self.block < 1:
            raise UsageError(f"Int8Blocks(block={self.block!r}): give the elements per scale, at least 1")

    def encode(self, name: str, g: np.ndarray):
        return compressed.int8_blocks(name, g, self.block)


@dataclass(frozen=True)
class WherePays:
    """`encoding` only while a step with it takes less time than a dense one on this link (Switch)."""
    encoding: object
    probe_every: int = 50


class Switch:
    """Whether compression pays where this client is: the seconds of a whole step (encoding, the call and its
    answer) with and without it, the median of the last 5 steps that measured each. Over loopback a compressed
    step costs more than the bytes it saves (top-k 1% of 1e6: 2.6x a dense step), over 100 Mbit/s less
    (0.46x; docs/slow-links.md). The first step is not timed (a first answer and warm-up are slower); then
    each way is measured once, the faster is used, and the other tried again every `probe_every` steps, so a
    link or a load that changes is followed."""

    def __init__(self, probe_every: int = 50):
        if not isinstance(probe_every, int) or probe_every < 2:
            raise UsageError(f"WherePays(probe_every={probe_every!r}): give the steps between tries, an int >= 2")
        self.probe_every = probe_every
        self.seconds: dict[bool, deque] = {}  # compressed? -> the seconds of its last steps
        self.steps = 0

    def decide(self) -> bool:
        """Whether the next step goes compressed."""
        self.steps += 1
        untried = [way for way in (True, False) if way not in self.seconds]
        if self.steps == 1 or untried:
            return untried[0] if self.steps > 1 else True
        best = bool(np.median(self.seconds[True]) <= np.median(self.seconds[False]))
        return (not best) if self.steps % self.probe_every == 0 else best

    def timed(self, compressed: bool, seconds: float) -> None:
        if self.steps > 1:  # a median: one step slowed by the machine does not turn the choice
            self.seconds.setdefault(compressed, deque(maxlen=5)).append(seconds)


class ErrorFeedback:
    """One session's encoding and its residuals (name -> float32 array). With WherePays, a Switch decides each
    step whether it goes compressed (`now`); a dense one carries the residual with it, and empties it."""

    def __init__(self, encoding):
        self.switch = Switch(encoding.probe_every) if isinstance(encoding, WherePays) else None
        encoding = encoding.encoding if isinstance(encoding, WherePays) else encoding
        if not hasattr(encoding, "encode"):
            raise UsageError(f"compress({encoding!r}): give TopK(ratio), Int8Blocks(block), WherePays(either) "
                             "or None")
        self.encoding = encoding
        self.residual: dict[str, np.ndarray] = {}
        self.pending: dict[str, np.ndarray] | None = None  # the residuals of the step in flight
        self.now = True  # this step goes compressed
        self.t0 = 0.0

    def begin(self, grads: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """Before a step: decide how it goes; the gradients to send dense (with the residual) if not compressed."""
        self.t0 = time.perf_counter()
        self.now = self.switch is None or self.switch.decide()
        if self.now or not self.residual:
            return grads
        self.pending = {n: np.zeros_like(r) for n, r in self.residual.items()}  # all of it goes now
        return {n: g + self.residual[n] if n in self.residual else g for n, g in grads.items()}

    def applied(self) -> None:
        """The step in flight was applied: its residuals are the ones the next step adds."""
        if self.switch is not None:
            self.switch.timed(self.now, time.perf_counter() - self.t0)
        if self.pending is not None:
            self.residual.update(self.pending)
            self.pending = None

    def encode(self, grads: Mapping[str, np.ndarray]) -> tuple[list, dict[str, np.ndarray]]:
        """(the CompressedTensor messages, the residuals once they are applied)."""
        msgs, after = [], {}
        for name, g in grads.items():
            acc = np.asarray(g, dtype=np.float32)
            r = self.residual.get(name)
            acc = acc + r if r is not None else acc
            msg, decoded = self.encoding.encode(name, acc)
            msgs.append(msg)
            after[name] = acc - decoded
        return msgs, after
