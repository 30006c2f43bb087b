"""Several workers on one session (docs/workers.md): the worker handle `Client.join` returns.

    with Client() as client:
        s = client.create_session("adam", params, workers=4, mode="sync", min_workers=3, round_deadline=30.0)
    # in each worker process:
    with Client() as client, client.join(session_id, worker="w0") as w:
        for batch in data:
            w.step(grads_of(w.arrays, batch))     # w.arrays now hold the round's parameters

`step` sends the worker's contribution keyed by (worker, round): a retry after UNAVAILABLE is
applied once. In sync mode it returns when the round closes (every contributor gets the same
parameters); in async and SSP modes when the contribution is applied, with its staleness. A
contribution to a round that closed without it raises StepMismatch whose `server_step` is the
open round: call `refresh()` (fresh parameters and round) and compute again.
"""
from __future__ import annotations

import threading
from typing import Mapping, NamedTuple

import numpy as np

from optreg.client import sparse_rows
from optreg.client.errors import ReassemblyError, UsageError
from optreg.client._step_transport import STREAM_ABOVE_BYTES, choose
from optreg.client.session import _collect, apply_result
from optreg.v1 import names, session_pb2, tensors

MODES, COMBINES = names.WORKER_MODE, names.COMBINE


def worker_config(workers, mode, min_workers, round_deadline, lease, combine, staleness,
                  scale_lr=False) -> session_pb2.WorkerConfig:
    """create_session's worker arguments, checked before anything is sent."""
    if not isinstance(workers, int) or workers < 1:
        raise UsageError(f"workers={workers!r}: give the most workers at once (an int >= 1)")
    if mode not in MODES:
        raise UsageError(f"mode={mode!r}: use one of {', '.join(map(repr, MODES))}")
    if combine not in COMBINES:
        raise UsageError(f"combine={combine!r}: use 'mean' or 'sum'")
    if not isinstance(min_workers, int) or not 0 <= min_workers <= workers:
        raise UsageError(f"min_workers={min_workers!r}: give 0..workers (0: every member)")
    for what, v in (("round_deadline", round_deadline), ("lease", lease)):
        if v is not None and not (isinstance(v, (int, float)) and v > 0):
            raise UsageError(f"{what}={v!r}: give seconds > 0, or None for the server's default")
    if not isinstance(staleness, int) or staleness < 0:
        raise UsageError(f"staleness={staleness!r}: give an int >= 0")
    if scale_lr and mode == "sync":
        raise UsageError("scale_lr_by_staleness=True: sync rounds have no staleness; use mode='async' or 'ssp'")
    return session_pb2.WorkerConfig(workers=workers, mode=MODES[mode], min_workers=min_workers,
                                    round_deadline_seconds=round_deadline or 0.0, lease_seconds=lease or 0.0,
                                    combine=COMBINES[combine], staleness=staleness,
                                    scale_lr_by_staleness=bool(scale_lr))


class WorkerStepResult(NamedTuple):
    """One contribution's answer. `round`: the round it was applied in (sync) or the step its
    parameters were read at (async, ssp); `staleness`: steps applied between that and its own."""
    step: int
    replayed: bool
    arrays: Mapping[str, np.ndarray]
    round: int
    staleness: int
    contributors: tuple[str, ...]
    lr: float = 0.0  # the lr the step ran with (a schedule's value, the same for every worker at that step)


class Worker:
    """A member of a shared session. `arrays`: the parameters it computes on (updated by each step).
    `round`: what its next contribution is keyed by. `heartbeat_every` (seconds): renew the lease
    from a background thread while the worker computes (None: only its calls renew it)."""

    def __init__(self, client, session_id: str, worker: str, arrays: dict, round_: int, info, heartbeat_every=None):
        self.client, self.session_id, self.worker = client, session_id, worker
        self.arrays, self.round, self.info = arrays, round_, info
        self.compression = None  # compression.ErrorFeedback: contributions sent compressed (compress())
        self._stop = threading.Event()
        self._beat = None
        if heartbeat_every:
            self._beat = threading.Thread(target=self._beats, args=(float(heartbeat_every),), daemon=True,
                                          name=f"optreg-heartbeat-{worker}")
            self._beat.start()

    def __repr__(self):
        return f"<Worker {self.worker!r} of session {self.session_id!r} round {self.round}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.leave()

    def _beats(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.heartbeat()
            except Exception:  # the next step reports what is wrong
                pass

    def heartbeat(self) -> int:
        reply = self.client._unary("Heartbeat", session_pb2.HeartbeatRequest(session_id=self.session_id,
                                                                             worker=self.worker))
        return reply.round

    def leave(self) -> None:
        """End this worker's membership: no round waits for it."""
        self._stop.set()
        self.client._unary("LeaveSession", session_pb2.LeaveSessionRequest(session_id=self.session_id,
                                                                           worker=self.worker))

    def set_hyperparameters(self, **values: float) -> None:
        """Change the shared session's hyperparameters from its next step on (UpdateHyperparameters: a
        contribution cannot carry them, since workers could disagree; send the same from each)."""
        self.client._unary("UpdateHyperparameters", session_pb2.UpdateHyperparametersRequest(
            session_id=self.session_id, hyperparameters=values))

    def refresh(self) -> int:
        """Read the current parameters into `arrays` and key the next contribution by their step."""
        if self.info.parameter_bytes > STREAM_ABOVE_BYTES:  # a unary reply could exceed the message limit
            def attempt(n, remaining):
                return _collect(self.client.transport.stream_out(
                    "ReadParametersStream", session_pb2.ReadParametersStreamRequest(session_id=self.session_id),
                    timeout=self.client.timeout))
            first, params, _ = self.client._retrying(attempt)
            step = first.step
        else:
            reply = self.client._unary("ReadParameters", session_pb2.ReadParametersRequest(session_id=self.session_id))
            params, step = {t.name: tensors.to_numpy(t) for t in reply.parameters}, reply.step
        apply_result(self.arrays, "parameters", params)
        self.round = step
        return self.round

    def step(self, grads: Mapping[str, np.ndarray], *, metrics: Mapping[str, float] | None = None) -> WorkerStepResult:
        if not isinstance(grads, Mapping):
            raise UsageError(f"step() takes a mapping of parameter name -> gradient array, not {type(grads).__name__}")
        number = self.round
        if self.compression is not None:  # compressed, or dense with the residual (compression.WherePays)
            grads = self.compression.begin(grads)
        send = self._unary if self.compression is not None and self.compression.now else choose(
            grads, self.info.parameter_bytes, self._unary, self._stream)
        reply, result = self.client._retrying(lambda n, remaining: send(grads, number, metrics))
        if self.compression is not None:  # keyed by (worker, round): applied once, whichever attempt landed
            self.compression.applied()
        apply_result(self.arrays, self.info.step_reply, result)
        self.round = reply.step
        return WorkerStepResult(reply.step, reply.replayed, self.arrays, reply.round, reply.staleness,
                                tuple(reply.contributors), reply.lr)

    def step_sparse(self, name: str, rows, values, *, grads: Mapping[str, np.ndarray] | None = None,
                    metrics: Mapping[str, float] | None = None) -> WorkerStepResult:
        """A contribution whose gradient for the 2-D parameter `name` is `values` at `rows` and zero
        elsewhere (as Session.step_sparse; in sync mode the round sums the workers' rows). The rows the
        step answers with are written into `arrays`; `WorkerStepResult.arrays` holds them."""
        msg = sparse_rows.message(name, rows, values)
        number = self.round
        dense = [tensors.from_numpy(k, g) for k, g in (grads or {}).items()]

        def attempt(n, remaining):
            request = session_pb2.StepRequest(session_id=self.session_id, worker=self.worker, round=number,
                                              gradients=dense, sparse=[msg])
            if metrics:
                request.metrics.update(metrics)
            return self.client.transport.unary("Step", request, timeout=self.client.timeout)

        reply = self.client._retrying(attempt)
        apply_result(self.arrays, self.info.step_reply, {t.name: tensors.to_numpy(t) for t in reply.tensors})
        sparse_rows.apply_rows(self.arrays, self.info.step_reply, sparse_rows.decode(reply.sparse))
        self.round = reply.step
        return WorkerStepResult(reply.step, reply.replayed, self.arrays, reply.round, reply.staleness,
                                tuple(reply.contributors), reply.lr)

    def compress(self, encoding) -> None:
        """Contributions sent compressed from the next on, with error feedback (as Session.compress)."""
        from optreg.client.compression import ErrorFeedback
        self.compression = None if encoding is None else ErrorFeedback(encoding)

    def _unary(self, grads, number, metrics):
        if self.compression is not None and self.compression.now:
            msgs, self.compression.pending = self.compression.encode(grads)
            request = session_pb2.StepRequest(session_id=self.session_id, worker=self.worker, round=number,
                                              compressed=msgs)
        else:
            request = session_pb2.StepRequest(session_id=self.session_id, worker=self.worker, round=number,
                                              gradients=[tensors.from_numpy(k, g) for k, g in grads.items()])
        if metrics:
            request.metrics.update(metrics)
        reply = self.client.transport.unary("Step", request, timeout=self.client.timeout)
        return reply, {t.name: tensors.to_numpy(t) for t in reply.tensors}

    def _stream(self, grads, number, metrics):
        def messages():
            yield session_pb2.StepStreamRequest(session_id=self.session_id, worker=self.worker, round=number,
                                                metrics=metrics or {})
            chunks = (c for k, g in grads.items() for c in tensors.chunk_views(k, g))
            for batch in tensors.pack_views(chunks):
                yield tensors.encode_stream_message(b"", batch)

        last, asm = None, tensors.Assembler()
        try:
            for msg in self.client.transport.stream_both("StepStream", messages(), timeout=self.client.timeout):
                last = msg
                for t in msg.chunks:
                    asm.add(t)
            out = asm.finish()
        except ValueError as e:
            raise ReassemblyError(f"a contribution's streamed reply did not fit together: {e}; it was applied: "
                                  "refresh() reads the parameters") from None
        if last is None:
            raise ReassemblyError("the contribution's reply stream was empty: refresh() reads the parameters")
        return last, out
