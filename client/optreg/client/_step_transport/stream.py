"""The streaming transport: one StepStream call, for steps too large for one message.

The gradients go out as chunk messages encoded ahead (one copy each); the reply's chunks are
written into receive buffers kept from step to step. See this package's docstring for when
it is chosen.
"""
from __future__ import annotations

import numpy as np

from optreg.client.errors import ReassemblyError
from optreg.v1 import session_pb2, tensors


class StreamStep:
    """A StepStream call: gradients out in pre-encoded chunk messages, the reply's chunks into
    receive buffers kept across steps (no fresh 40 MB arrays each step)."""

    def __init__(self):
        self.rx: dict[str, np.ndarray] = {}

    def send(self, session, grads, fence: int, hyperparameters, metrics, timeout):
        replies = session.client.transport.stream_both(
            "StepStream", self._messages(session.id, grads, fence, hyperparameters, metrics), timeout=timeout,
            **session.step_headers())
        return self._receive(session, replies)

    @staticmethod
    def _messages(session_id, grads, fence, hyperparameters, metrics):
        yield session_pb2.StepStreamRequest(session_id=session_id, step=fence, hyperparameters=hyperparameters,
                                            metrics=metrics)
        chunks = (c for n, g in grads.items() for c in tensors.chunk_views(n, g))
        for batch in tensors.pack_views(chunks):
            yield tensors.encode_stream_message(b"", batch)  # a StepStreamRequest(chunks=batch)

    def _receive(self, session, replies):
        """The result, returned only when the stream ended OK, i.e. after the server committed the
        step (a broken stream raises, and nothing was applied). A stream that ended OK but whose
        chunks do not fit raises ReassemblyError: the step WAS applied. Chunks marked provisional
        (sent before the commit) are the result only if no later message carries chunks: those of a
        lost race's answer (the committed step's reply, replayed) replace them."""
        rx, filled, last = self.rx, {}, None
        for msg in replies:
            if last is not None and last.provisional and not msg.provisional and msg.chunks:
                filled = {}  # the answer starts over
            last = msg
            for t in msg.chunks:
                dtype = tensors.numpy_dtype(t.dtype)
                buf = rx.get(t.name)
                shape = tuple(t.shape)
                if buf is None or buf.shape != shape or buf.dtype != dtype:
                    buf = rx[t.name] = np.empty(shape, dtype)
                data = t.data  # a view of the received message
                n = len(data) // dtype.itemsize
                start = filled.get(t.name, 0)
                if t.offset != start or start + n > buf.size:
                    raise ReassemblyError(f"step reply chunk for {t.name!r} at offset {t.offset}, expected {start}; "
                                          "the step was applied: read_parameters() gives its result")
                buf.reshape(-1)[start:start + n] = np.frombuffer(data, dtype)
                filled[t.name] = start + n
        if last is None:
            raise ReassemblyError("the step's reply stream was empty; the step may have been applied: "
                                  "refresh() and read_parameters() tell")
        expected = [] if session.info.step_reply == "none" else list(session.info.parameters)
        for name in expected:
            got, size = filled.get(name, 0), rx[name].size if name in rx else -1
            if got != size:
                raise ReassemblyError(f"the step's reply for {name!r} ended after {got} elements; the step was "
                                      "applied: refresh() and read_parameters() give its result")
        session.lr = last.lr
        return last.replayed, last.step, {n: rx[n] for n in filled}
