"""How a step travels to the server: three private transports behind one interface, and the rule.

    unary.py          UnaryStep      one Step call (gradients and reply in one message each)
    stream.py         StreamStep     one StepStream call (chunked both ways)
    shared_memory.py  SharedMemory   a segment the server maps; only names and offsets cross gRPC

The rule, applied by `choose` (Session.step; Worker.step without shared memory):
shared memory once the session enabled it (Session.enable_shared_memory: same host only), else
StepStream when the gradients or the expected reply exceed STREAM_ABOVE_BYTES, else Step.
A sparse step (step_sparse) is always one Step. RemoteOptimizer enables shared memory by
default for a group above STREAM_ABOVE_BYTES when the server is on this host.

Each transport's `send` makes ONE attempt; the retry loop around it (Session.step) sends the
same step number every time. The RPCs themselves go through optreg.client.transport.
"""
from __future__ import annotations

from typing import Mapping, Protocol, TypeVar

import numpy as np

# Above this many bytes of tensors a call goes over the streaming RPCs (unary
# messages stay well under gRPC's default 4 MiB limit).
STREAM_ABOVE_BYTES = 2 << 20

T = TypeVar("T")


class StepTransport(Protocol):
    def send(self, session, grads: Mapping[str, np.ndarray], fence: int, hyperparameters, metrics,
             timeout: float | None) -> tuple[bool, int, dict[str, np.ndarray]]:
        """One attempt at step `fence`: (replayed, the server's step, {name: the reply's array})."""
        ...


def nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return sum(np.asarray(a).nbytes for a in arrays.values())


def choose(grads: Mapping[str, np.ndarray], reply_bytes: int, unary: T, stream: T, shared_memory: T | None = None) -> T:
    """The transport for one step (the rule above). `reply_bytes`: the size of the reply expected."""
    if shared_memory is not None:
        return shared_memory
    if reply_bytes > STREAM_ABOVE_BYTES or nbytes(grads) > STREAM_ABOVE_BYTES:
        return stream
    return unary
