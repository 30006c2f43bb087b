"""StepStream with transfer and update overlapped, and never half-applied.

Each gradient chunk is validated (name, dtype, shape, offset order, finiteness),
widened to the master dtype, and applied as soon as it arrives, while the next
chunk is still on the wire; the updated chunk goes straight back to the client.

Atomicity by double buffering: the update is computed into a second set of
arrays (the session's "shadow": parameters and every state slot), slice by slice
(copy the live slice into the shadow, update the shadow in cache), and the step is
committed only when every element of every tensor has arrived and the call is
still wanted, by swapping the shadow and the live arrays under the session lock.
A stream that breaks, a chunk out of order or missing, a NaN, a plugin that
raises: the live arrays were never written, so the session is exactly as before.
Validate-and-stage (receive everything, then apply) was the alternative: it needs
a gradient staging buffer of the same size anyway and cannot overlap the update
with the upload. The price of the shadow is memory: a session stepped over the
stream keeps a second copy of its parameters and state (allocated on its first
streamed step, reused afterwards). The copy costs no extra memory traffic to speak
of: the slice is read once either way and updated while in cache.

Used for elementwise optimizers with STEP_REPLY_PARAMETERS or NONE; others (a
DELTA reply, whole-tensor optimizers) take the assemble-then-apply path.
"""
from __future__ import annotations

import itertools

import grpc
import numpy as np

from optreg.server import kernels
from optreg.server.errors import RequestError, invalid
from optreg.server.sessions import PluginError, Session, StepResult
from optreg.v1 import session_pb2, tensor_pb2, tensors

REPLY = session_pb2.StepReply


def overlappable(session: Session) -> bool:
    return session.optimizer.definition.elementwise and session.step_reply in (
        REPLY.STEP_REPLY_PARAMETERS, REPLY.STEP_REPLY_NONE)


class _Shadow:
    """A second set of the session's arrays, swapped with the live ones at commit."""

    def __init__(self, session: Session):
        self.params = {n: np.empty_like(p) for n, p in session.params.items()}
        self.state = {s: {n: np.empty_like(a) for n, a in arrs.items()} for s, arrs in session.state.items()}

    def fits(self, session: Session) -> bool:
        return all(n in self.params and self.params[n].shape == p.shape and self.params[n].dtype == p.dtype
                   for n, p in session.params.items()) and set(self.state) == set(session.state)


def _shadow(session: Session) -> _Shadow:
    sh = getattr(session, "_optreg_shadow", None)
    if sh is None or not sh.fits(session):
        sh = _Shadow(session)
        session._optreg_shadow = sh  # lives and dies with the session
    return sh


class _Tracker:
    """Checks chunk order per tensor without storing them (Assembler's rules)."""

    def __init__(self, session: Session):
        self.session = session
        self.filled: dict[str, int] = {}
        self.sizes = {n: int(np.prod(shape, dtype=np.int64)) for n, (shape, _) in session.gradient_spec().items()}

    def accept(self, t: tensor_pb2.Tensor) -> tuple[int, np.ndarray]:
        self.session.check_gradient(t)
        name = t.name
        dtype = tensors.numpy_dtype(t.dtype)
        data = t.data  # read once: each access of a bytes field copies
        if len(data) % dtype.itemsize:
            raise invalid(f"gradient {name!r}: chunk of {len(data)} bytes is not a whole number of elements")
        start = self.filled.get(name, 0)
        if t.offset != start:
            raise invalid(f"gradient {name!r}: chunk at offset {t.offset}, expected {start} "
                          "(chunks out of order, repeated or missing); the step was not applied")
        n = len(data) // dtype.itemsize
        if start + n > self.sizes[name]:
            raise invalid(f"gradient {name!r}: chunks run past the end ({start + n} of {self.sizes[name]} elements)")
        self.filled[name] = start + n
        return start, np.frombuffer(data, dtype=dtype)

    def finish(self) -> None:
        for name, size in self.sizes.items():
            got = self.filled.get(name, 0)
            if got != size:
                if name not in self.filled:
                    raise invalid(f"missing gradient for {name!r}: a step needs one for every parameter; "
                                  "the step was not applied")
                raise invalid(f"gradient {name!r}: stream ended after {got} of {size} elements; "
                              "the step was not applied")


def step_stream(session: Session, fence, first, rest, context, chunk_bytes: int):
    """Generator of StepStreamResponse chunks; returns the StepResult once committed.

    The caller holds the session's lock, has checked overlappable(session), and sends
    the final commit message (after its durability policy has run).
    """
    messages = itertools.chain([first], rest)
    if session.check_fence(fence):  # a retry of the applied step: answer it again
        for _ in messages:
            pass
        result = session.reply(True)
        yield from _reply_batches(result.step, True, result.tensors, chunk_bytes)
        return result
    defn, hp, t = session.optimizer.definition, session.hyperparameters, session.step + 1
    dtype = session.dtype
    send = session.step_reply == REPLY.STEP_REPLY_PARAMETERS
    shadow = _shadow(session)
    head = tensors.response_head(t)
    tracker = _Tracker(session)
    live_p = {n: p.reshape(-1) for n, p in session.params.items()}
    live_s = {s: {n: a.reshape(-1) for n, a in arrs.items()} for s, arrs in session.state.items()}
    sh_p = {n: p.reshape(-1) for n, p in shadow.params.items()}
    sh_s = {s: {n: a.reshape(-1) for n, a in arrs.items()} for s, arrs in shadow.state.items()}
    for i, msg in enumerate(messages):
        if i and msg.session_id and msg.session_id != session.id:
            raise invalid("session_id changed mid-stream")
        out = []
        for chunk in msg.chunks:
            start, g = tracker.accept(chunk)
            name, end = chunk.name, start + g.size
            if g.dtype != dtype:
                g = _widen(g, dtype)
            if not np.isfinite(g).all():  # after widening: numpy's float16 isfinite is slow
                raise invalid(f"gradient {name!r} has NaN or Inf value(s) in elements {start}..{end}; "
                              "the step was not applied")
            p = sh_p[name][start:end]
            np.copyto(p, live_p[name][start:end])
            st = {}
            for s in sh_s:
                st[s] = sh_s[s][name][start:end]
                np.copyto(st[s], live_s[s][name][start:end])
            try:
                kernels.apply(defn, p, g, st, t, hp, parallel=False)
            except Exception as e:
                raise PluginError(f"optimizer {defn.name} (plugin {session.optimizer.plugin}) raised in "
                                  f"update: {type(e).__name__}: {e}") from e
            if send:
                # A reply chunk can be wider than the gradient chunk (bf16 in, fp32 out): split it.
                per = max(1, chunk_bytes // p.itemsize)
                shape = tuple(chunk.shape)
                for a in range(0, max(p.size, 1), per):
                    out.append((name, session.master_code, shape, start + a, p[a:a + per]))
        # Encoded here, before the next chunk: one copy of each updated slice, straight into the message.
        for batch in tensors.pack_views(out, chunk_bytes):
            yield tensors.encode_stream_message(head, batch)  # a StepStreamResponse(step=t, chunks=batch)
    tracker.finish()
    if not context.is_active():
        raise RequestError(grpc.StatusCode.CANCELLED, "the call ended before the step was committed")
    # Commit: swap live and shadow arrays. Nothing above wrote a live array.
    for n in session.params:
        session.params[n], shadow.params[n] = shadow.params[n], session.params[n]
    for s in session.state:
        for n in session.state[s]:
            session.state[s][n], shadow.state[s][n] = shadow.state[s][n], session.state[s][n]
    session.step = t
    session.dirty = True
    return StepResult(t, False, {})


_BF16 = tensors.DTYPES[tensor_pb2.DataType.DATA_TYPE_BFLOAT16]


def _widen(g: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Exact widening; bfloat16 by bit shift (it is the top half of a float32), ~10x faster than astype."""
    if g.dtype == _BF16:
        w = np.empty(g.size, np.float32)
        bits = w.view(np.uint32)
        bits[...] = g.view(np.uint16)
        bits <<= 16
        return w if dtype == np.float32 else w.astype(dtype)
    return g.astype(dtype)


def _reply_batches(step, replayed, arrays, chunk_bytes):
    chunks = (c for n, a in arrays.items() for c in tensors.chunk(n, a, chunk_bytes))
    sent = False
    for batch in tensors.pack(chunks, chunk_bytes):
        sent = True
        yield session_pb2.StepStreamResponse(step=step, replayed=replayed, chunks=batch)
    if not sent:
        yield session_pb2.StepStreamResponse(step=step, replayed=replayed)
