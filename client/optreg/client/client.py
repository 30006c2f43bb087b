"""Client: a connection to an optreg server; opens, finds and deletes sessions."""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Iterator, Mapping

import numpy as np

from optreg.client._step_transport import STREAM_ABOVE_BYTES, nbytes
from optreg.client.checks import dtype_name, load_into, resume_mismatches, session_config, shape_mismatches
from optreg.client.errors import AlreadyExists, NotFound, OptregError, UsageError
from optreg.client.results import OptimizerInfo, PluginFailure, ScheduleInfo, SessionInfo
from optreg.client.retry import RetryPolicy
from optreg.client.session import Session, check_keep
from optreg.client.transport import GrpcTransport, Transport, normalize_address
from optreg.client.workers import Worker, worker_config
from optreg.v1 import registry_pb2, session_pb2, telemetry_pb2, tensor_pb2, tensors

DEFAULT_ADDRESS = "127.0.0.1:50051"


class Client:
    """A connection to an optreg server.

    >>> with Client() as client:                      # $OPTREG_ADDRESS, else 127.0.0.1:50051
    ...     session = client.create_session("adam", {"W": W}, lr=0.01)
    ...     session.step({"W": dW})                    # W now holds the updated values

    `address`: host:port (None: $OPTREG_ADDRESS, else 127.0.0.1:50051; without a port, 50051). `token`: a bearer token
    sent with every call (None: $OPTREG_TOKEN when set). `root_certificates` (PEM bytes) or
    `tls=True` (the system's roots) connect over TLS; `tls_server_name` overrides the name checked
    against the server's certificate.

    `timeout`: seconds one attempt of a call may take (None: no limit); past it the call raises
    DeadlineExceeded. `retry`: how long a call that fails with UNAVAILABLE is retried (RetryPolicy;
    by default for 5 s in all, so a stopped server gives Unavailable after about 5 s).
    `wait_for_ready=True`: a call to a server that cannot be reached waits for it to come up, for
    up to `timeout` (or the retry window, whichever is longer), instead of backing off.
    `transport`: what carries the calls (a GrpcTransport by default; tests pass a fake).
    Closing the client (or leaving its with-block) closes the connection; sessions stay on the server.
    """

    def __init__(self, address: str | None = None, *, token: str | None = None,
                 root_certificates: bytes | None = None, tls: bool = False, tls_server_name: str | None = None,
                 timeout: float | None = 60.0, retry: RetryPolicy = RetryPolicy(), wait_for_ready: bool = False,
                 transport: Transport | None = None, max_message_mb: int = 64):
        if timeout is not None and not timeout > 0:
            raise UsageError(f"timeout={timeout!r}: give seconds > 0, or None for no limit")
        if not isinstance(retry, RetryPolicy):
            raise UsageError(f"retry={retry!r}: give an optreg.client.RetryPolicy")
        if transport is not None:
            self.address = transport.address
        else:
            self.address = normalize_address(address or os.environ.get("OPTREG_ADDRESS") or DEFAULT_ADDRESS)
            if token is None:
                token = os.environ.get("OPTREG_TOKEN") or None
            transport = GrpcTransport(self.address, token=token, root_certificates=root_certificates, tls=tls,
                                      tls_server_name=tls_server_name, max_message_mb=max_message_mb)
        self.transport = transport
        self.timeout = timeout
        self.retry = retry
        self.wait_for_ready = wait_for_ready
        self.unattended: list = []  # weakref.finalize of sessions that end on their own (session.py)

    def __repr__(self):
        return f"<Client {self.address}>"

    @property
    def channel(self):
        """The gRPC channel under the default transport (for calling the service's RPCs directly)."""
        return self.transport.channel

    def close(self, error: bool = False) -> None:
        """Close the connection; first end this client's keep=False / "on-error" sessions that no with-block
        or delete() ended (as leaving a with-block would: `error` keeps the "on-error" ones)."""
        for pending in self.unattended:
            held = pending.detach()  # None once it ran or was detached
            if held is not None:
                _, end, args, _ = held
                end(*args, error=error)
        self.unattended.clear()
        self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(error=exc_type is not None)

    # -- calls, retried as the policy says ---------------------------------------------------

    def _retrying(self, attempt):
        """Run attempt(n, remaining) under the retry policy (see RetryPolicy)."""
        if self.wait_for_ready:
            window = max(self.retry.total_seconds, self.timeout or 0.0) if self.timeout is not None else float("inf")
            return dataclasses.replace(self.retry, total_seconds=window).run(
                attempt, wait=self.transport.wait_until_ready)
        return self.retry.run(attempt)

    def _unary(self, method: str, request):
        return self._retrying(lambda n, remaining: self.transport.unary(method, request, timeout=self.timeout))

    # -- optimizers --------------------------------------------------------------------------

    def optimizers(self) -> list[OptimizerInfo]:
        """The optimizers the server has loaded, by name."""
        reply = self._unary("ListOptimizers", registry_pb2.ListOptimizersRequest())
        return [OptimizerInfo.from_proto(o) for o in reply.optimizers]

    def schedules(self) -> list[ScheduleInfo]:
        """The learning-rate schedules the server has loaded (create_session's `schedule`)."""
        reply = self._unary("ListOptimizers", registry_pb2.ListOptimizersRequest())
        return [ScheduleInfo.from_proto(o) for o in reply.schedules]

    def plugin_failures(self) -> list[PluginFailure]:
        """Plugins the server could not load, and why."""
        reply = self._unary("ListOptimizers", registry_pb2.ListOptimizersRequest())
        return [PluginFailure(f.plugin, f.reason) for f in reply.failures]

    # -- sessions ----------------------------------------------------------------------------

    def create_session(self, optimizer: str, params: Mapping[str, np.ndarray], *, session_id: str | None = None,
                       resume: bool = False, master_dtype: str | None = None, step_reply: str | None = None,
                       durability: str | None = None, periodic_steps: int | None = None,
                       periodic_seconds: float | None = None, state: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                       initial_step: int = 0, keep=True, workers: int | None = None, mode: str = "sync",
                       min_workers: int = 0, round_deadline: float | None = None, lease: float | None = None,
                       combine: str = "mean", staleness: int = 0, scale_lr_by_staleness: bool = False,
                       take_over: bool = False, schedule: str | None = None,
                       schedule_parameters: Mapping[str, float] | None = None, shards: int = 0,
                       **hyperparameters: float) -> Session:
        """Open a session; `params` (name -> array) are the initial values, copied to the server, and
        the arrays later steps write into.

        `master_dtype`: "float32" or "float64" (None: that of the arrays). `step_reply`: what a step
        answers with, "parameters" (default), "delta", "none" or "bf16_delta" (slow links: half the
        bytes, the rounding fed back by the server; docs/slow-links.md). `durability`: "every-step",
        "log", "periodic" (window: periodic_steps / periodic_seconds), "none", or None for the
        server's default ("log" with a data directory). `state` (slot -> name -> array) and `initial_step` restore a session read with
        `read_state`. Hyperparameters not given take the optimizer's defaults.

        `session_id`: the id to create (None: the server picks one). With `resume=True` and a
        session of that id already there, attach to it instead: its optimizer, parameter names,
        shapes and master dtype must match (UsageError naming what differs); the server's
        parameters are then copied into `params`, and its hyperparameters and step are kept.
        `keep`: what leaving a with-block does (see Session). `take_over=True` (with resume): this
        process becomes the session's writer even if another one is stepping it (see `session`).

        `workers`: share the session among up to this many workers (`join`), combined as `mode`
        says: "sync" rounds (a round closes when every live member contributed, or when
        `min_workers` have and `round_deadline` seconds passed since its first contribution; its
        gradients are combined by `combine`, "mean" or "sum"), "async" (each contribution applied
        on arrival; `staleness` > 0 refuses staler ones) or "ssp" (bound `staleness`). `lease`:
        seconds a worker stays a member without a call. `scale_lr_by_staleness` (async, ssp): each
        contribution runs at lr / (1 + its staleness). See docs/workers.md.

        `schedule`: a learning-rate schedule the server applies (`schedules()` lists them), with its
        `schedule_parameters` (`{"total_steps": 1000, "warmup_steps": 100}`): step t runs with
        lr = the session's lr * factor(t - 1), as torch.optim.lr_scheduler steps; a step then may not
        set lr itself. `Session.lr` is the lr the last step ran with (docs/plugins.md, "Schedules").

        `shards`: on a Ray cluster (`optreg serve --ray`), split the session's tensors over this many
        session hosts, each step atomic across them (docs/scale-out.md, "Sharded sessions").
        """
        if "reply" in hyperparameters and step_reply is None:
            warnings.warn("create_session(reply=...) is now step_reply=...", DeprecationWarning, stacklevel=2)
            step_reply = hyperparameters.pop("reply")
        config, params, state = session_config(optimizer, params, session_id, resume, master_dtype, step_reply,
                                             durability, periodic_steps, periodic_seconds, state, initial_step,
                                             hyperparameters)
        check_keep(keep)
        config.shards = shards
        if schedule:
            config.schedule = schedule
            try:
                config.schedule_parameters.update({k: float(v) for k, v in (schedule_parameters or {}).items()})
            except (TypeError, ValueError):
                raise UsageError(f"schedule_parameters={schedule_parameters!r}: give a mapping of name -> number") \
                    from None
        elif schedule_parameters:
            raise UsageError("schedule_parameters without schedule: name the schedule they are for")
        if workers is not None:
            config.workers.CopyFrom(worker_config(workers, mode, min_workers, round_deadline, lease, combine,
                                                  staleness, scale_lr_by_staleness))
        if resume:
            try:
                return self._resume(session_id, optimizer, params, master_dtype, keep, take_over)
            except NotFound:
                pass
        attempts = []

        def attempt(n, remaining):
            attempts.append(n)
            if len(params) and nbytes(params) + sum(nbytes(s) for s in state.values()) > STREAM_ABOVE_BYTES:
                return self.transport.stream_in("CreateSessionStream",
                                                self._create_messages(config, params, state, initial_step),
                                                timeout=self.timeout).session
            return self.transport.unary("CreateSession", session_pb2.CreateSessionRequest(
                config=config, parameters=[tensors.from_numpy(n, a) for n, a in params.items()],
                state=[tensor_pb2.SlotTensors(slot=s, tensors=[tensors.from_numpy(n, a) for n, a in arrs.items()])
                       for s, arrs in state.items()],
                initial_step=initial_step), timeout=self.timeout).session

        try:
            if session_id:  # a repeat finds the session existing: safe to retry
                info = self._retrying(attempt)
            else:
                if self.wait_for_ready:
                    self.transport.wait_until_ready(self.timeout or 3600.0)
                info = attempt(0, 0.0)
        except AlreadyExists:
            if not resume and len(attempts) < 2:
                raise
            # Created by this call's earlier attempt (its reply was lost), or by a racing resume.
            return self._resume(session_id, optimizer, params, master_dtype, keep, take_over)
        return Session(self, SessionInfo.from_proto(info), params, keep=keep)

    def _resume(self, session_id, optimizer, params, master_dtype, keep, take_over=False) -> Session:
        info = self.get_session(session_id)
        problems = resume_mismatches(info, optimizer, params, dtype_name(master_dtype))
        if problems:
            raise UsageError(f"cannot resume session {session_id!r}: " + "; ".join(problems)
                             + " (use another session_id, or delete that session)")
        session = Session(self, info, params, keep=keep)
        session.resumed, session.take_over = True, take_over
        load_into(params, session.read_parameters())
        return session

    @staticmethod
    def _create_messages(config, params, state, initial_step):
        yield session_pb2.CreateSessionStreamRequest(config=config, initial_step=initial_step)
        for slot, arrays in [("", params), *state.items()]:
            chunks = (c for n, a in arrays.items() for c in tensors.chunk(n, a))
            for batch in tensors.pack(chunks):
                yield session_pb2.CreateSessionStreamRequest(slot=slot, chunks=batch)

    def session(self, session_id: str, params: Mapping[str, np.ndarray] | None = None, *, keep=True,
                take_over: bool = False) -> Session:
        """Attach to an existing session. `params`: the arrays steps write into (some or all of the
        session's parameters, shapes as the session's), filled with the server's values; None: new
        arrays read from the server; {}: none (nothing is read; for read_state or set_hyperparameters).

        One process steps a single-writer session at a time (the server's writer lease): while
        another is stepping it, this one's steps are refused (WriterConflict, naming it). The lease
        passes when that process is gone or quiet; `take_over=True` takes it at the next step."""
        check_keep(keep)
        info = self.get_session(session_id)
        if params is None:
            s = Session(self, info, {}, keep=keep)
            s.take_over = take_over
            s.arrays = s.read_parameters()
            return s
        problems = [p for p in shape_mismatches(info, params, require_all=False)]
        if problems:
            raise UsageError(f"cannot attach to session {session_id!r}: " + "; ".join(problems))
        s = Session(self, info, params, keep=keep)
        s.take_over = take_over
        if len(params):
            load_into(params, s.read_parameters(list(params)))
        return s

    def join(self, session_id: str, worker: str, params: Mapping[str, np.ndarray] | None = None, *,
             heartbeat_every: float | None = None) -> Worker:
        """Join a shared session as `worker` (a name unique among its members; joining again keeps the
        place). `params`: the arrays steps write into (None: new arrays), filled with the server's
        parameters. Returns a Worker: `step(grads)`, `leave()`, `refresh()`, and a context manager
        that leaves at its end."""
        if not isinstance(worker, str) or not worker:
            raise UsageError(f"worker={worker!r}: give the worker's name")
        reply = self._unary("JoinSession", session_pb2.JoinSessionRequest(session_id=session_id, worker=worker))
        info = SessionInfo.from_proto(reply.session)
        arrays = dict(params) if params is not None else {}
        w = Worker(self, session_id, worker, arrays, reply.round, info, heartbeat_every)
        w.refresh()
        return w

    def export_telemetry(self, session_id: str) -> bytes:
        """The session's telemetry ring as one opaque blob (b"": none yet), for `import_telemetry`."""
        return self._unary("ExportTelemetry", telemetry_pb2.ExportTelemetryRequest(session_id=session_id)).data

    def import_telemetry(self, session_id: str, data: bytes) -> int:
        """Replace the session's telemetry with a blob `export_telemetry` returned; the newest step it holds."""
        return self._unary("ImportTelemetry", telemetry_pb2.ImportTelemetryRequest(session_id=session_id,
                                                                                  data=data)).last_step

    def get_session(self, session_id: str) -> SessionInfo:
        reply = self._unary("GetSession", session_pb2.GetSessionRequest(session_id=session_id))
        return SessionInfo.from_proto(reply.session)

    def list_sessions(self) -> list[SessionInfo]:
        """Every session the caller may see, in id order (walks the pages: iter_sessions)."""
        return list(self.iter_sessions())

    def iter_sessions(self, page_size: int = 100) -> Iterator[SessionInfo]:
        """The sessions page by page (ListSessions' page_size, 1-1000), one call per page. A session
        that exists throughout is yielded once; a server from before paging sends all in one reply."""
        token = ""
        while True:
            request = session_pb2.ListSessionsRequest(page_size=page_size, page_token=token)
            reply = self._unary("ListSessions", request)
            for s in reply.sessions:
                yield SessionInfo.from_proto(s)
            token = reply.next_page_token
            if not token:
                return

    def delete_session(self, session_id: str) -> None:
        """Delete a session (its files too). NotFound if there is none of that id."""
        request, attempts = session_pb2.DeleteSessionRequest(session_id=session_id), []

        def attempt(n, remaining):
            attempts.append(n)
            return self.transport.unary("DeleteSession", request, timeout=self.timeout)

        try:
            self._retrying(attempt)
        except NotFound:
            if len(attempts) < 2:
                raise
            # An earlier attempt deleted it and its reply was lost.


__all__ = ["Client", "DEFAULT_ADDRESS", "OptregError"]
