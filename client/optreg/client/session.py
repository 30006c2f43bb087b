"""Session: one training run's optimizer on the server, stepping the caller's arrays in place."""
from __future__ import annotations

import dataclasses
import sys
import weakref
from typing import Mapping

import numpy as np

from optreg.client.errors import OptregError, ReassemblyError, StepMismatch, UsageError
from optreg.client.results import SessionInfo, SessionState, StepResult
from optreg.client import sparse_rows
from optreg.client._step_transport import STREAM_ABOVE_BYTES, choose
from optreg.client._step_transport.shared_memory import SharedMemory
from optreg.client._step_transport.stream import StreamStep
from optreg.client._step_transport.unary import UnaryStep
from optreg.client.sparse_rows import SparseStepResult
from optreg.v1 import session_pb2, tensors

KEEP_CHOICES = (True, False, "on-error")
BF16 = tensors.DTYPES[tensors.DataType.DATA_TYPE_BFLOAT16]


def check_keep(keep) -> None:
    if keep not in KEEP_CHOICES:
        raise UsageError(f"keep={keep!r}: use True (leave the session on the server), False (delete it) or "
                         "'on-error' (delete it unless the with-block raised)")


def _end_unattended(client, session_id: str, keep, error: bool | None = None) -> None:
    """A Session with keep=False or "on-error" was dropped, its Client closed (`error`: by an exception), or
    the program is exiting, without a with-block or delete(): delete the session unless keep="on-error"
    and it ends with an exception (Ctrl-C, a crash: kept, so a rerun resumes). One attempt, errors
    ignored: nothing waits for a server that is gone."""
    if error is None:  # at exit or when dropped: set for an uncaught exception
        error = (getattr(sys, "last_exc", None) or getattr(sys, "last_value", None)) is not None
    if keep == "on-error" and error:
        return
    try:
        client.transport.unary("DeleteSession", session_pb2.DeleteSessionRequest(session_id=session_id), timeout=5.0)
    except OptregError:
        pass


def apply_result(arrays: dict, mode: str, result: Mapping[str, np.ndarray]) -> None:
    """Write a step's reply into the caller's arrays: parameters are copied, deltas added (a "bf16_delta"
    session's bfloat16 ones widened first, exactly as the server adds them to its record of these arrays;
    its answers in the master dtype are the parameters)."""
    for name, value in result.items():
        target = arrays.get(name)
        if target is None:
            arrays[name] = np.array(value)
        elif mode == "delta":
            target += value
        elif mode == "bf16_delta" and value.dtype == BF16:
            target += value.astype(target.dtype)
        else:
            np.copyto(target, value, casting="unsafe")


def _collect(messages) -> tuple[object, dict[str, np.ndarray], dict[str, dict]]:
    """Reassemble a stream of chunked replies: (first message, parameters, slots)."""
    first, assemblers = None, {}
    try:
        for msg in messages:
            first = first or msg
            asm = assemblers.setdefault(getattr(msg, "slot", ""), tensors.Assembler())
            for t in msg.chunks:
                asm.add(t)
        params = assemblers.pop("", tensors.Assembler()).finish()
        return first, params, {slot: asm.finish() for slot, asm in assemblers.items()}
    except ValueError as e:
        raise ReassemblyError(f"a streamed reply did not fit together: {e}") from None


class Session:
    """One training run's optimizer on the server.

    `step(grads)` sends gradients and writes the result into `self.arrays` (the arrays the
    session was created or attached with). As a context manager, what leaving the block does
    is `keep`: True (the default for sessions) leaves the session on the server, only releasing
    this object's shared memory; False deletes it; "on-error" deletes it when the block ends
    normally and keeps it when an exception ends it (so a rerun with the same session_id resumes).
    Without a with-block, the same happens when the object is dropped or the program exits (an
    uncaught exception, Ctrl-C included, counting as the error).

    `step_count` is the step number the next step is fenced with (the server's step as this
    object last saw it). `resumed` is True when create_session(..., resume=True) found the
    session existing and attached to it.
    """

    def __init__(self, client, info: SessionInfo, arrays: Mapping[str, np.ndarray], *, keep=True):
        check_keep(keep)
        self.client = client
        self._info = info
        self._reply_bytes = 0 if info.step_reply == "none" else info.parameter_bytes
        self.id = info.session_id
        self.step_count = self._info_fence = info.step
        self.arrays = dict(arrays)
        self.keep = keep
        self.lr = 0.0  # the lr the last step ran with (StepResponse.lr: a schedule's value); 0: none yet
        self.resumed = False  # True when create_session(resume=True) attached to an existing session
        self._shm: SharedMemory | None = None
        self._stream = StreamStep()
        self._unary = UnaryStep()
        self.compression = None  # compression.ErrorFeedback: gradients sent compressed (compress())
        self._sparse_stepped = False  # rows may be lazy on the server (see set_hyperparameters)
        self.take_over = False  # True: the next step takes the writer lease from another process (attach's take_over)
        # keep=False or "on-error" without a with-block (the book's loop has none): the same decision when
        # this object is dropped or the program exits, so a session nobody will resume is not left behind.
        self._unattended = weakref.finalize(self, _end_unattended, client, self.id, keep) if keep is not True \
            else None
        if self._unattended is not None:  # Client.close() decides them while it can still call the server
            if len(client.unattended) >= 64:
                client.unattended[:] = [f for f in client.unattended if f.alive]
            client.unattended.append(self._unattended)

    @property
    def info(self) -> SessionInfo:
        """The session as last described by the server, with the step this object last saw."""
        if self._info_fence != self.step_count:  # stepped since: rebuilt when read, not on every step
            self._info = dataclasses.replace(self._info, step=self.step_count)
            self._info_fence = self.step_count
        return self._info

    @info.setter
    def info(self, value: SessionInfo) -> None:
        self._info, self._info_fence = value, self.step_count

    def __repr__(self):
        return f"<Session {self.id!r} {self.info.optimizer} step {self.step_count}>"

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        self.end(self.keep is False or (self.keep == "on-error" and exc_type is None))

    def end(self, delete: bool) -> None:
        """What leaving a with-block does, decided by the caller: delete the session, or leave it on the
        server and release this object's shared memory. Either way `keep` has no more say."""
        if delete:
            self.delete()
        else:
            self.disable_shared_memory()
            if self._unattended is not None:
                self._unattended.detach()

    # -- steps -------------------------------------------------------------------------------

    def step_headers(self) -> dict:
        """Extra call headers of a step: the deliberate take-over of the writer lease, until a step lands."""
        return {"metadata": (("optreg-take-over", "1"),)} if self.take_over else {}

    def _sender(self, grads):
        if self.compression is not None and self.compression.now:  # compressed gradients are small: one Step call
            return self._unary
        return choose(grads, self._reply_bytes, self._unary, self._stream, self._shm)

    def compress(self, encoding) -> None:
        """Send this session's gradients compressed from the next step on: `TopK(ratio)` or
        `Int8Blocks(block)` (optreg.client.compression), with error feedback: what an encoding leaves
        out is kept here and added to the next gradient. None: dense again, the residual dropped."""
        from optreg.client.compression import ErrorFeedback
        self.compression = None if encoding is None else ErrorFeedback(encoding)

    def step(self, grads: Mapping[str, np.ndarray], *, hyperparameters: Mapping[str, float] | None = None,
             metrics: Mapping[str, float] | None = None) -> StepResult:
        """Send one step of gradients (name -> array); write the result into the session's arrays.

        `hyperparameters` change from this step on, applied with the step; `metrics` (loss,
        accuracy...) are recorded with it. A step that fails with UNAVAILABLE is sent again with the
        same step number within the client's retry policy; the server applies it once.
        """
        if not isinstance(grads, Mapping):
            raise UsageError(f"step() takes a mapping of parameter name -> gradient array, not {type(grads).__name__}")
        if self.compression is not None:  # compressed, or dense with the residual (compression.WherePays)
            grads = self.compression.begin(grads)
        sender = self._sender(grads)
        fence = self.step_count
        hp, mx = hyperparameters or None, metrics or None
        attempts = []

        def attempt(n, remaining):
            attempts.append(n)
            return sender.send(self, grads, fence, hp, mx, self.client.timeout)

        replayed, step, result = self.client._retrying(attempt)
        self.take_over = False
        self.step_count = step
        apply_result(self.arrays, self._info.step_reply, result)
        if self.compression is not None and not (replayed and len(attempts) == 1):  # these gradients were applied
            self.compression.applied()
        if replayed and len(attempts) == 1:
            # This call's own first send was answered as a repeat: an earlier call that raised
            # (a deadline, say) had been applied after all. Its result is now in the arrays;
            # these gradients were not applied, and silently dropping them would be worse.
            raise StepMismatch(f"step {step} had already been applied by an earlier call that failed; its result "
                               "is now in the arrays and these gradients were NOT applied: send them again",
                               server_step=step)
        return StepResult(step, replayed, self.arrays)

    def step_sparse(self, name: str, rows, values, *, grads: Mapping[str, np.ndarray] | None = None,
                    hyperparameters: Mapping[str, float] | None = None,
                    metrics: Mapping[str, float] | None = None) -> SparseStepResult:
        """One step whose gradient for the 2-D parameter `name` is `values` (k x columns) at `rows` (k
        indices; a repeated row's values are summed) and zero elsewhere. `grads`: dense gradients of
        other parameters; parameters named nowhere get a zero gradient (see docs/workers.md, "Sparse
        rows"). The stepped rows are written into `self.arrays[name]` and returned. Fenced and retried
        like step(): the server applies it once."""
        msg = sparse_rows.message(name, rows, values)
        fence = self.step_count
        dense = [tensors.from_numpy(n, g) for n, g in (grads or {}).items()]
        attempts = []

        def attempt(n, remaining):
            attempts.append(n)
            request = session_pb2.StepRequest(session_id=self.id, step=fence, gradients=dense, sparse=[msg])
            if hyperparameters:
                request.hyperparameters.update(hyperparameters)
            if metrics:
                request.metrics.update(metrics)
            return self.client.transport.unary("Step", request, timeout=self.client.timeout, **self.step_headers())

        reply = self.client._retrying(attempt)
        self.take_over = False
        self._sparse_stepped = True
        self.step_count = reply.step
        mode = self._info.step_reply
        apply_result(self.arrays, mode, {t.name: tensors.to_numpy(t) for t in reply.tensors})
        got = sparse_rows.decode(reply.sparse)
        sparse_rows.apply_rows(self.arrays, mode, got)
        if reply.replayed and len(attempts) == 1:
            raise StepMismatch(f"step {reply.step} had already been applied by an earlier call that failed; these "
                               "gradients were NOT applied: read the parameters, then send them again",
                               server_step=reply.step)
        return SparseStepResult(reply.step, reply.replayed, got, self.arrays)

    # -- reads and changes -------------------------------------------------------------------

    def read_parameters(self, names=()) -> dict[str, np.ndarray]:
        """A fresh copy of the server's parameters (in the master dtype), all or the ones named."""
        names = list(names)
        if self.info.parameter_bytes > STREAM_ABOVE_BYTES:
            def attempt(n, remaining):
                return _collect(self.client.transport.stream_out("ReadParametersStream",
                                session_pb2.ReadParametersStreamRequest(session_id=self.id, names=names),
                                timeout=self.client.timeout))[1]
            return self.client._retrying(attempt)
        reply = self.client._unary("ReadParameters", session_pb2.ReadParametersRequest(session_id=self.id, names=names))
        return {t.name: tensors.to_numpy(t).copy() for t in reply.parameters}

    def read_state(self) -> SessionState:
        """(info, parameters, {slot: {name: array}}): everything needed to recreate the session."""
        if self.info.size_bytes > STREAM_ABOVE_BYTES:
            def attempt(n, remaining):
                return _collect(self.client.transport.stream_out(
                    "ReadStateStream", session_pb2.ReadStateStreamRequest(session_id=self.id),
                    timeout=self.client.timeout))
            first, params, slots = self.client._retrying(attempt)
            info = SessionInfo.from_proto(first.session)
        else:
            reply = self.client._unary("ReadState", session_pb2.ReadStateRequest(session_id=self.id))
            info = SessionInfo.from_proto(reply.session)
            params = {t.name: tensors.to_numpy(t).copy() for t in reply.parameters}
            slots = {st.slot: {t.name: tensors.to_numpy(t).copy() for t in st.tensors} for st in reply.state}
        self.info = info
        return SessionState(info, params, slots)

    def refresh(self) -> SessionInfo:
        """Ask the server for the session's info; the next step is fenced with its step."""
        info = self.client.get_session(self.id)
        self.step_count = info.step
        self.info = info
        return info

    def set_hyperparameters(self, **values: float) -> SessionInfo:
        """Change hyperparameters from the next step on (all validated first; a bad one changes nothing)."""
        reply = self.client._unary("UpdateHyperparameters", session_pb2.UpdateHyperparametersRequest(
            session_id=self.id, hyperparameters=values))
        self.info = SessionInfo.from_proto(reply.session)
        if self._sparse_stepped and self._info.step_reply == "delta":
            # Rows that owed steps were just caught up on the server, unanswered: a later delta is taken from
            # those values, so the arrays must hold them (docs/workers.md, "Sparse rows").
            apply_result(self.arrays, "parameters", self.read_parameters())
        return self.info

    def delete(self) -> None:
        """Delete the session on the server (and release its shared memory)."""
        if self._unattended is not None:
            self._unattended.detach()
        self.client.delete_session(self.id)  # the server releases the segment too
        if self._shm is not None:
            self._shm.close(unregister=False)
            self._shm = None

    # -- shared memory -----------------------------------------------------------------------

    def enable_shared_memory(self, resident: bool = False) -> dict[str, np.ndarray]:
        """Move `self.arrays` into a shared-memory segment the server maps too (same host only).

        Returns the new `self.arrays`: views into the segment, holding the current parameters,
        which every later `step` updates in place with nothing but names and offsets on the
        wire. Gradients are read from the segment too: write them into `self.gradients[name]`
        (views as well) and pass those to `step`, or pass other arrays (the parameter's shape; its dtype
        or a narrower float, as over gRPC) and they are copied there.
        The segment lives as long as this session object keeps its registration open: it is
        released by `disable_shared_memory()`, `delete()`, leaving a `with` block, or the client
        process ending.

        `resident=True`: the segment becomes the server's master copy of the parameters (the
        server moves them there and updates them in place: a step copies nothing). Do not write
        `self.arrays` then. Called again after the server restarted (the registration ended),
        it registers the same segment again and the server refills it from the recovered session
        (`self.arrays` stay the same arrays).
        """
        if self._shm is not None and not self._shm.alive:
            if self._shm.register_again():
                return self.arrays
            self._shm.close(unregister=False)
            self._shm = None
        if self._shm is None:
            if not self.client.transport.is_local():
                raise UsageError(f"shared memory needs a server on this host; {self.client.address} is not a "
                                 "loopback address (steps go over gRPC without it)")
            self._shm = SharedMemory.create(self, resident=resident)
        elif self._shm.resident != resident:
            raise UsageError(f"shared memory is already enabled with resident={self._shm.resident}; "
                             "disable_shared_memory() first")
        return self.arrays

    @property
    def gradients(self) -> dict[str, np.ndarray]:
        """Gradient buffers in the shared segment (after enable_shared_memory)."""
        if self._shm is None:
            raise UsageError("session.gradients exists only after enable_shared_memory()")
        return self._shm.grads

    def disable_shared_memory(self) -> None:
        """Back to steps over gRPC; `self.arrays` become ordinary arrays again (copies of the segment's)."""
        if self._shm is not None:
            self.arrays = {n: np.array(a) for n, a in self.arrays.items()}
            self._shm.close(unregister=True)
            self._shm = None
