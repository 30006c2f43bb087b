"""Compressed gradients with error feedback (docs/slow-links.md): what a session sends instead of dense ones.

    session.compress(TopK(0.01))        # 1% of each gradient's elements, the largest (values + int32 indices)
    session.compress(Int8Blocks(256))   # int8 with a float32 scale per 256 elements
    session.compress(None)              # dense again (the residual is dropped)

The residual (what compression left out) is kept here, on the client, and added to the next
gradient: without it a compressed run does not converge to the same loss. It is exactly the
gradient minus what the server applied (optreg.v1.compressed returns the decoded tensor the server
steps), and it moves only once a step is answered, so a retried step sends the same bytes.
"""
from __future__ import annotations

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


class ErrorFeedback:
    """One session's encoding and its residuals (name -> float32 array)."""

    def __init__(self, encoding):
        if not hasattr(encoding, "encode"):
            raise UsageError(f"compress({encoding!r}): give TopK(ratio), Int8Blocks(block) or None")
        self.encoding = encoding
        self.residual: dict[str, np.ndarray] = {}
        self.pending: dict[str, np.ndarray] | None = None  # the residuals of the step in flight

    def applied(self) -> None:
        """The step in flight was applied: its residuals are the ones the next step adds."""
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
