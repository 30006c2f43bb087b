"""gRPC adapters for shared sessions: the contract's worker fields to and from the domain
(steps/rounds.py, model/workers.py). Step and StepStream hand a call here when its session has workers."""
from __future__ import annotations

import contextlib
import itertools
import threading
from concurrent.futures import Future

import numpy as np

from optreg.server.rpc import admission
from optreg.server.steps import sparse_rows
from optreg.server.model.errors import Cancelled, FailedPrecondition, InvalidArgument, ResourceExhausted, shown
from optreg.server.model.workers import (CALLS_PER_WORKER, DEFAULT_DEADLINE, DEFAULT_LEASE, LR_SCALED, WorkerConfig,
                                         staleness_scaled)
from optreg.server.steps.run import StepRun, check_metrics, gradients
from optreg.server.steps.rounds import Contribution, Hubs, Outcome
from optreg.v1 import names, session_pb2, tensors
from optreg.v1.names import name_of


def worker_config_from(msg: session_pb2.SessionConfig) -> WorkerConfig | None:
    if not msg.HasField("workers") or msg.workers.workers == 0:
        return None
    w = msg.workers
    if name_of(names.WORKER_MODE, w.mode, "sync") is None:
        raise InvalidArgument(f"config.workers.mode {w.mode} is not a WorkerMode value")
    if name_of(names.COMBINE, w.combine, "mean") is None:
        raise InvalidArgument(f"config.workers.combine {w.combine} is not a Combine value")
    return WorkerConfig(workers=w.workers, mode=name_of(names.WORKER_MODE, w.mode, "sync"), min_workers=w.min_workers,
                        round_deadline=w.round_deadline_seconds or DEFAULT_DEADLINE,
                        lease_seconds=w.lease_seconds or DEFAULT_LEASE, combine=name_of(names.COMBINE, w.combine, "mean"),
                        staleness=w.staleness, scale_lr=w.scale_lr_by_staleness).checked()


def add_worker_info(info: session_pb2.SessionInfo, s) -> None:
    cfg = s.workers
    if cfg is None:
        return
    info.workers.CopyFrom(session_pb2.WorkerConfig(
        workers=cfg.workers, mode=names.WORKER_MODE[cfg.mode], min_workers=cfg.min_workers,
        round_deadline_seconds=cfg.round_deadline, lease_seconds=cfg.lease_seconds,
        combine=names.COMBINE[cfg.combine], staleness=cfg.staleness, scale_lr_by_staleness=cfg.scale_lr))
    info.open_round = s.step
    hub = s.hub
    if hub is None:
        return
    with hub.cond:
        hub.members.expire()
        members = list(hub.members.by_name.values())
        info.open_round = hub.round.number
        last = hub.last
    for m in sorted(members, key=lambda m: m.worker):
        pm = info.members.add(worker=m.worker, contributions=m.contributions, last_round=m.last_round)
        pm.last_contact.FromNanoseconds(int(m.last_contact * 1e9))
        pm.joined_at.FromNanoseconds(int(m.joined_at * 1e9))
    if last is not None:
        info.last_round.CopyFrom(session_pb2.RoundInfo(round=last.round, contributors=last.contributors,
                                                       stragglers=last.stragglers, seconds=last.seconds,
                                                       noise_scale=last.noise_scale))


class ContributionRun(StepRun):
    """An async/SSP contribution: one unfenced step, so it runs at whichever step is current when it commits
    (StepRun resolves its hyperparameters then, under the session's lock). With config.scale_lr its lr is
    lr / (1 + staleness) for this step only: the record logs the lr it ran with and is marked LR_SCALED, so
    recovery replays it exactly and keeps the session's own lr."""
    read_step = 0

    def _resolve(self, s):
        hp = super()._resolve(s)
        return staleness_scaled(hp, s.step - self.read_step) if s.workers.scale_lr else hp


class WorkerSteps:
    """`max_members`: sync and SSP members on the whole server; worker calls in flight at once are bounded by
    CALLS_PER_WORKER for each (every member may wait in one for the others, and retry it), so one worker's
    flood of calls cannot take other members' slots. On the asyncio server a waiting call holds no thread
    (rpc/aio.py): these are admission limits only."""

    def __init__(self, store, chunk_bytes: int, max_message_bytes: int, max_members: int = 64):
        self.store = store
        self.hubs = Hubs(store, seats=admission.Limit(max_members, (
            f"this server holds {max_members} members of sync and SSP sessions, its limit (--max-members): wait for "
            "a member to leave (or its lease to run out), or start the server with a larger --max-members")))
        calls = CALLS_PER_WORKER * max_members
        self.calls = admission.Limit(calls, (
            f"this server has {calls} calls of shared-session workers in flight, its limit ({CALLS_PER_WORKER} "
            "a member of --max-members); nothing was applied: retry shortly, or start the server with a larger "
            "--max-members"))
        self._lock = threading.Lock()
        self._in_flight: dict[tuple[str, str], int] = {}  # (session, worker) -> its calls now
        self.chunk_bytes = chunk_bytes
        self.max_message_bytes = max_message_bytes

    @contextlib.contextmanager
    def call(self, session, worker: str):
        """One of the worker's CALLS_PER_WORKER calls, and one of the server's worker-call slots."""
        key = (session.id, worker)
        with self._lock:
            n = self._in_flight.get(key, 0)
            if n >= CALLS_PER_WORKER:
                raise ResourceExhausted(
                    f"worker {shown(worker)} has {n} calls in flight on session {session.id}, the most a worker may "
                    "(a call and its retry); nothing was applied: wait for its answer, or cancel the call")
            self._in_flight[key] = n + 1
        try:
            with self.calls.take():
                yield
        finally:
            with self._lock:
                n = self._in_flight.pop(key) - 1
                if n:
                    self._in_flight[key] = n

    # -- membership -------------------------------------------------------------------
    def join(self, session, worker: str) -> int:
        return self.hubs.get(session).join(worker)

    def leave(self, session, worker: str) -> None:
        self.hubs.get(session).leave(worker)

    def heartbeat(self, session, worker: str) -> int:
        return self.hubs.get(session).heartbeat(worker)

    # -- contributions ----------------------------------------------------------------
    def _contribute(self, session, worker, number, hyperparameters, metrics, chunks, context, sparse=(),
                    wait=True) -> Outcome | Future:
        """The contribution's outcome; wait=False: a sync contribution is committed to its round and the
        round's outcome future returned (the asyncio server awaits it holding no thread)."""
        if not worker:
            raise FailedPrecondition(f"session {session.id} is shared by workers: send worker (the name it joined "
                                     "under) and round with every step")
        if number < 0:
            raise InvalidArgument(f"round {number} must be >= 0: the step the contribution's parameters were read at "
                                  "(JoinSession's reply gives it)")
        if hyperparameters:
            raise InvalidArgument("hyperparameters: a shared session's contributions cannot change them (they would "
                                  "differ between workers); call UpdateHyperparameters")
        hub = self.hubs.get(session)
        if session.workers.mode == "sync":
            early = hub.precheck(worker, number)
            if early is not None:
                for _ in chunks:  # a retry: the stream is read to its end, nothing is applied
                    pass
                return early
            c = Contribution(self.store, session, sparse)
            for t in chunks:
                c.feed(t)
            grads = c.finish()
            if not context.is_active():
                raise Cancelled("the call ended before the contribution was committed; it was not")
            return (hub.contribute if wait else hub.submit)(worker, number, grads, context, check_metrics(metrics))
        member, early, clocks = hub.begin_async(worker, number, context)
        applied = None
        try:
            if early is not None:
                for _ in chunks:
                    pass
                return early
            record = {"worker": worker, "round": number, "clocks": clocks}
            if session.workers.scale_lr:
                record[LR_SCALED] = True
            run = ContributionRun(self.store, session, None, None, metrics, context.is_active, extras=record,
                                  sparse=bool(sparse))
            run.read_step = number
            try:
                run.open()
                for i, sr in enumerate(sparse):
                    run.feed_sparse(sr, f"sparse[{i}]")
                for t in chunks:
                    run.feed(t)
                result = run.finish()
                applied = result.step
                out = {n: np.array(a) for n, a in result.tensors.items()}
            finally:
                run.close()
            staleness = result.step - 1 - number
            if self.store.metrics is not None and hasattr(self.store.metrics, "staleness"):
                self.store.metrics.staleness(staleness)
            return Outcome(result.step, out, number, staleness=staleness, rows=dict(getattr(result, "sparse", {})),
                           lr=result.lr)
        finally:
            hub.end_async(member, number, applied)

    def step(self, session, request, context) -> session_pb2.StepResponse:
        with self.call(session, request.worker):
            return self.reply(self.contribution(session, request, context).to(request.worker))

    def contribution(self, session, request, context, wait=True) -> Outcome | Future:
        """A Step call's contribution (caller holds its call()): its outcome, or its round's future (wait=False)."""
        if session.reply != "none" and not request.sparse:  # a sparse step answers with its rows
            reply_bytes = session.elements * session.dtype.itemsize
            if reply_bytes > self.max_message_bytes - (64 << 10):
                raise FailedPrecondition(
                    f"the reply to this step ({reply_bytes} bytes) exceeds the server's message limit "
                    f"({self.max_message_bytes} bytes): use StepStream; nothing was applied")
        if request.sparse and sparse_rows.contribution_reply_bytes(
                session, {t.name for t in request.gradients}, request.sparse) > self.max_message_bytes - (64 << 10):
            raise FailedPrecondition(
                "the reply to this sparse contribution (its rows, and the parameters stepped densely) could exceed "
                f"the server's message limit ({self.max_message_bytes} bytes): use StepStream, or a session with "
                "step_reply STEP_REPLY_NONE; nothing was applied")
        return self._contribute(session, request.worker, request.round, request.hyperparameters, request.metrics,
                                gradients(session, request), context, request.sparse, wait)

    @staticmethod
    def reply(o: Outcome) -> session_pb2.StepResponse:
        return session_pb2.StepResponse(step=o.step, replayed=o.replayed, round=o.round, staleness=o.staleness,
                                        contributors=o.contributors, lr=o.lr,
                                        tensors=[tensors.from_numpy(n, a) for n, a in o.tensors.items()],
                                        sparse=sparse_rows.to_messages(o))

    def step_stream(self, session, first, rest, requests, context):
        with self.call(session, first.worker):
            yield from self._step_stream(session, first, rest, requests, context)

    def _step_stream(self, session, first, rest, requests, context):
        yield from self.stream_replies(self.stream_contribution(session, first, rest, requests, context).to(first.worker))

    def stream_contribution(self, session, first, rest, requests, context, wait=True) -> Outcome | Future:
        """A StepStream call's contribution (caller holds its call()): `rest` the messages after `first`,
        `requests` the paced stream (progress(), received())."""
        def chunks():
            for i, msg in enumerate(itertools.chain([first], rest)):
                if i and msg.session_id and msg.session_id != session.id:
                    raise InvalidArgument("session_id changed mid-stream")
                if i and msg.sparse:
                    raise InvalidArgument("sparse rows came after the stream's first message: send every "
                                          "SparseRows in the first message (each whole)")
                if i and (msg.worker or msg.round) and (msg.worker, msg.round) != (first.worker, first.round):
                    raise InvalidArgument(f"worker/round changed mid-stream (first {shown(first.worker)} round "
                                          f"{first.round}): send them in the first message only")
                yield from msg.chunks
                if any(len(t.data) for t in msg.chunks):  # the idle timer resets on data only, as for one writer
                    requests.progress()
            requests.received()  # its stream slot is free while the call waits (under its --max-members slot)

        return self._contribute(session, first.worker, first.round, first.hyperparameters, first.metrics, chunks(),
                                context, first.sparse, wait)

    def stream_replies(self, o: Outcome):
        extra = dict(step=o.step, replayed=o.replayed, round=o.round, staleness=o.staleness,
                     contributors=o.contributors, lr=o.lr)
        sent = False
        for batch in tensors.pack((c for n, a in o.tensors.items() for c in tensors.chunk(n, a, self.chunk_bytes)),
                                  self.chunk_bytes):
            sent = True
            yield session_pb2.StepStreamResponse(chunks=batch, **extra)
        if not sent or o.rows:
            yield session_pb2.StepStreamResponse(sparse=sparse_rows.to_messages(o), **extra)
