"""Shared sessions' steps: sync rounds, async and SSP contributions (docs/workers.md).

One Hub per shared session holds its members (model/workers.py) and, in sync mode, its open
round. Round r collects contributions keyed by worker; it is applied as step r + 1, so the
open round is always the session's step and survives a restart with it (a round's
contributions are acknowledged only when it closes, so a crash loses none that was
acknowledged: the workers' retries find the same round open).

A sync contribution is validated and staged into a gradient buffer of its own (counted
against the memory budget) outside every lock; it is committed to its round only when all
of it has arrived. A round closes when every live member has contributed, or when at
least min_workers have and its deadline has passed; the close runs ONE ordinary StepRun
with the mean (or sum) of exactly the committed contributions, so fencing, the log,
telemetry and the commit are the single-writer path's. Waiting for a close holds no lock
but the hub's condition (released while waiting) and ends at the call's deadline; or, for the
asyncio server, no thread at all: `submit` commits the contribution and returns the round's
`outcome` future, which its close resolves (the background tick closes rounds at their deadline
and keeps the waiting members' leases).

Async and SSP contributions are each one unfenced StepRun: computed under the session's
lock on the current step, so concurrent contributions serialize and none is lost.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

import ml_dtypes
import numpy as np

from optreg.server.steps import sparse_rows
from optreg.server.model.errors import DeadlineExceeded, FailedPrecondition, InvalidArgument, shown
from optreg.server.model.workers import Member, Members, ssp_may_apply
from optreg.server.kernels.finite import check_finite
from optreg.server.kernels.widen import widen
from optreg.server.model.session import Buffers
from optreg.server.steps.run import StepRun, reply
from optreg.v1 import tensors

log = logging.getLogger("optreg.server.steps.rounds")
WAIT_SLICE = 0.25  # waiters re-check leases and deadlines at least this often
MISSED_ROUNDS_ALERT = 3  # sync: a live member that misses this many rounds in a row raises "worker_stopped"


@dataclass
class Outcome:
    """What a contribution's call answers (the same for every contributor of a sync round)."""
    step: int
    tensors: dict[str, np.ndarray]
    round: int
    contributors: tuple[str, ...] = ()
    stragglers: tuple[str, ...] = ()
    seconds: float = 0.0
    staleness: int = 0
    replayed: bool = False
    noise_scale: float = 0.0
    rows: dict = field(default_factory=dict)  # a sparse step's answered rows: name -> (rows, values)
    lr: float = 0.0  # the lr the step ran with (StepResponse.lr)
    # step_reply "bf16_delta" (sync): `tensors` are bf16 deltas from the members' shared copy, answered to
    # `delta_to`, the contributors that hold it; the others get `full`, the copy itself in the master dtype.
    full: "Outcome | None" = None
    delta_to: frozenset = frozenset()

    def to(self, worker: str) -> "Outcome":
        """What this outcome answers `worker`."""
        return self if self.full is None or worker in self.delta_to else self.full


@dataclass(eq=False)
class Round:
    number: int
    contribs: dict[str, Buffers] = field(default_factory=dict)
    metrics: dict[str, dict] = field(default_factory=dict)  # worker -> the scalars it sent (loss, ...)
    opened: float | None = None  # monotonic time of its first contribution
    closing: bool = False
    result: Outcome | None = None
    failures: int = 0  # closes that failed (a failed write): waiters of that attempt get the error
    error: Exception | None = None
    # Waiters without a thread (submit): the close attempt's outcome, and worker -> its call's is_active
    outcome: Future = field(default_factory=Future)
    waiting: dict = field(default_factory=dict)


class _Whole:
    """A whole master-dtype tensor in the shape StepRun.feed takes (as a decoded Tensor)."""
    __slots__ = ("name", "dtype", "shape", "offset", "data")

    def __init__(self, name, code, shape, array):
        self.name, self.dtype, self.shape, self.offset = name, code, shape, 0
        self.data = memoryview(np.ascontiguousarray(array).reshape(-1)).cast("B")


class Contribution:
    """One sync contribution being received: validated chunk by chunk into its own buffer."""

    def __init__(self, store, session, sparse_msgs=()):
        self.session, self.store = session, store
        self.tracker = tensors.ChunkTracker(session.spec, "gradient")
        s = session
        # Sparse rows (sparse_rows.py): validated now; the parameters sent densely get buffers as they come.
        self.sparse = sparse_rows.parse_all(s, sparse_msgs)
        self.grads = Buffers() if self.sparse else store.budget.allocate(
            f"a worker's contribution to session {s.id}", s.elements * s.dtype.itemsize,
            lambda: Buffers({n: np.empty(shape, s.dtype) for n, shape in s.shapes.items()}))

    def feed(self, t) -> None:
        try:
            start, data = self.tracker.accept(t)
        except ValueError as e:
            raise InvalidArgument(f"{e}; the contribution was not committed") from None
        g = widen(data, self.session.dtype)
        check_finite(t.name, g, start)
        if self.sparse:
            sparse_rows.dense_buffer(self.store, self.session, self.grads, self.sparse, t.name)
        self.grads[t.name].reshape(-1)[start:start + g.size] = g

    def finish(self) -> Buffers:
        try:
            if self.sparse:  # parameters not named have a zero gradient; those sent must be whole
                sparse_rows.check_whole(self.tracker)
                self.grads.sparse = self.sparse
            else:
                self.tracker.finish()
        except ValueError as e:
            raise InvalidArgument(f"{e}; the contribution was not committed") from None
        return self.grads


def combine(contribs: dict[str, Buffers], how: str, dtype) -> dict[str, np.ndarray]:
    """The round's gradient: contributions summed in worker-name order (so it is reproducible bit for
    bit), then divided by their count for the mean, in the master dtype."""
    names = sorted(contribs)
    if any(getattr(c, "sparse", None) for c in contribs.values()):  # sparse rows merged, duplicates summed
        return sparse_rows.combine(contribs, names, how, dtype)
    out = {}
    for p in contribs[names[0]]:
        acc = contribs[names[0]][p].copy()
        for w in names[1:]:
            acc += contribs[w][p]
        if how == "mean" and len(names) > 1:
            acc /= dtype.type(len(names))
        out[p] = acc
    return Buffers(out)


def noise_scale(contribs: dict[str, Buffers], mean: dict[str, np.ndarray]) -> float:
    """B_simple = tr(Sigma)/|G|^2 (McCandlish et al. 2018, A.1) from n equal-batch contributions, in units
    of one contribution's batch: with B_small = 1 and B_big = n batches, |G_small|^2 the contributions'
    mean squared norm and |G_big|^2 the mean's, |G|^2 ~ (n|G_big|^2 - |G_small|^2)/(n - 1) and
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2)/(1 - 1/n). 0 when n < 2 or the |G|^2 estimate is not positive."""
    n = len(contribs)
    if n < 2:
        return 0.0
    small = sum(sparse_rows.squared_norm(g) for g in contribs.values()) / n
    big = sparse_rows.squared_norm(mean)
    g2 = (n * big - small) / (n - 1)
    trace = (small - big) / (1 - 1 / n)
    return trace / g2 if g2 > 0 else 0.0


def _remaining(context) -> float:
    r = context.time_remaining() if context is not None else None
    return float("inf") if r is None else r


class Hub:
    """The members and open round of one shared session."""

    def __init__(self, store, session, seats=None):
        self.store, self.session, self.config = store, session, session.workers
        self.cond = threading.Condition()
        self.members = Members(self.config, session.id, seats)
        self.members.on_expired = self._lease_ran_out
        self.round = Round(session.step)
        self.last: Outcome | None = None
        self.history: deque = deque(maxlen=64)  # (round, contributors) of closed rounds
        self.deleted = False
        # step_reply "bf16_delta": the members whose arrays are the session's copy (s.reply_copy), as the
        # last round's answers left them; the others are answered the copy whole (_copy_for).
        self.holders: set[str] = set()
        # async/ssp: a worker's contributions apply one at a time, by name (not by Member: a member dropped
        # at its lease and joined again mid-call must not let a retry overtake its original).
        self.turns: dict[str, threading.Lock] = {}
        rec = session.round_record  # after a restart: the last round applied, from the log or snapshot
        if rec and rec.get("round") == session.step - 1:
            who = tuple(sorted(rec.get("contributors", ())))
            self.history.append((rec["round"], frozenset(who)))
            self.last = Outcome(session.step, None, rec["round"], who)  # tensors None: the current parameters
            # Its members (contributors and stragglers) are members again with a fresh lease, so the round
            # open at the crash waits for them as it did before, not only for whoever comes back first.
            for w in sorted(set(who) | set(rec.get("members", ()))):
                try:
                    self.members.join(w)
                except Exception:  # the config shrank or the name is not valid any more: it joins again itself
                    pass
        # The members at the last step, with their clocks (every mode): SSP's bound holds across a restart, and
        # a worker that does not come back is dropped when its fresh lease runs out.
        for w, clock in sorted(session.worker_clocks.items()):
            try:
                self.members.join(w).contributions = int(clock)
            except Exception:
                pass

    # -- membership ----------------------------------------------------------------------
    def _worker_stopped(self, worker: str, message: str) -> None:
        """Tell the store's observers (telemetry: the dashboard's alert). Caller may hold the condition:
        observers only queue the event."""
        for o in self.store.observers:
            fn = getattr(o, "on_worker_stopped", None)
            if fn is not None:
                try:
                    fn(self.session, worker, message)
                except Exception:  # telemetry never fails a round
                    log.exception("session %s: worker_stopped observer failed", self.session.id)

    def _lease_ran_out(self, m: Member) -> None:
        last = f"its last contribution was to round {m.last_round}" if m.last_round >= 0 else "it never contributed"
        self._worker_stopped(m.worker, f"worker {m.worker} stopped contributing: no call or heartbeat for "
                                       f"{self.config.lease_seconds:g} s, so its lease ran out and it was dropped "
                                       f"({last}; {m.contributions} applied)")

    def join(self, worker: str) -> int:
        with self.cond:
            self.members.join(worker)
            self.cond.notify_all()
            return self.session.step

    def leave(self, worker: str) -> None:
        with self.cond:
            self.members.leave(worker)
            self.cond.notify_all()  # a round may now have every live member's contribution

    def heartbeat(self, worker: str) -> int:
        with self.cond:
            self.members.get(worker)
            return self.session.step

    def tick(self) -> None:
        """Background: drop expired leases; close a round nobody is waiting on when it may close."""
        close = None
        with self.cond:
            for w, active in list(self.round.waiting.items()):  # waiting in a live call: in contact
                m = self.members.by_name.get(w)
                if m is not None and active():
                    self.members.renew(m)
            if self.members.expire():
                self.cond.notify_all()
            r = self.round
            if self.config.mode == "sync" and not r.closing and r.result is None and self._closable(r):
                r.closing = True
                close = r
        if close is not None:
            self._close(close)

    # -- sync ----------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.deleted:
            raise self.store.missing(self.session.id)

    def _closed_answer(self, worker: str, number: int) -> Outcome:
        """A contribution to a round that is no longer open: a retry of one it applied, or stale."""
        if self.last is not None and self.last.round == number and worker in self.last.contributors:
            if self.last.tensors is None:  # restored after a restart: answered from the session at that step
                # ... while it is still there: the next round may have committed without updating self.last yet
                answer = self._current(number, self.last.contributors)
                if answer.step == number + 1:
                    return answer
            else:
                full = self.last.full and replace(self.last.full, replayed=True)
                return replace(self.last, replayed=True, full=full)
        for rnd, who in self.history:
            if rnd == number and worker in who:
                raise FailedPrecondition(
                    f"round {number} closed with worker {shown(worker)}'s contribution applied (step {number + 1}); "
                    f"its reply is no longer kept: read the parameters; the open round is {self.round.number}",
                    metadata=(("optreg-server-step", str(self.round.number)),))
        raise FailedPrecondition(
            f"stale contribution: round {number} of session {self.session.id} has closed without it and nothing "
            f"was applied; the open round is {self.round.number}: read the parameters and contribute to round "
            f"{self.round.number}", metadata=(("optreg-server-step", str(self.round.number)),))

    def precheck(self, worker: str, number: int) -> Outcome | None:
        """Before receiving a contribution: its answer if it is a retry of an applied one; refuse it if stale."""
        with self.cond:
            self._check_open()
            self.members.join(worker)
            open_no = self.round.number
            if number < open_no:
                return self._closed_answer(worker, number)
            if number > open_no:
                raise FailedPrecondition(
                    f"round {number} is not open yet: session {self.session.id}'s open round is {open_no}",
                    metadata=(("optreg-server-step", str(open_no)),))
            return None

    def contribute(self, worker: str, number: int, grads: Buffers, context=None, metrics=None) -> Outcome:
        """Commit a whole contribution to its round, and wait for the round's close."""
        end = time.monotonic() + _remaining(context)
        with self.cond:
            r = self._commit(worker, number, grads, metrics, end)
            if isinstance(r, Outcome):
                return r
            return self._await(r, worker, end, context)

    def submit(self, worker: str, number: int, grads: Buffers, context=None, metrics=None) -> Outcome | Future:
        """Commit a whole contribution to its round without waiting for the close: the answer, or the
        round's outcome future (closed here when this contribution completes the round). The caller
        waits on it up to its deadline, then calls done_waiting."""
        end = time.monotonic() + _remaining(context)
        with self.cond:
            r = self._commit(worker, number, grads, metrics, end)
            if isinstance(r, Outcome):
                return r
            r.waiting[worker] = context.is_active if context is not None else (lambda: True)
            outcome = r.outcome
            close = not r.closing and r.result is None and self._closable(r)
            if close:
                r.closing = True
        if close:
            self._close(r)
        return outcome

    def done_waiting(self, number: int, worker: str) -> None:
        with self.cond:
            if self.round.number == number:
                self.round.waiting.pop(worker, None)

    def _commit(self, worker: str, number: int, grads: Buffers, metrics, end: float) -> Outcome | Round:
        """Caller holds the condition: the contribution in its round (the round), or the answer of a closed one."""
        while True:
            self._check_open()
            r = self.round
            if r.number != number:  # the round closed while this contribution arrived
                return self._closed_answer(worker, number)
            if not r.closing or worker in r.contribs:
                break
            # The round's gradient is being computed without this contribution: once the close lands it
            # is stale (answered as such); if the close fails, the round takes it after all.
            now = time.monotonic()
            if now >= end:
                raise DeadlineExceeded(f"round {number} was closing without worker {shown(worker)}'s "
                                       "contribution when this call's deadline passed; nothing was applied")
            self.cond.wait(min(end - now, WAIT_SLICE))
        m = self.members.join(worker)
        if worker not in r.contribs:  # else: a retry of a committed contribution waits for the same close
            r.contribs[worker] = grads
            if metrics:
                r.metrics[worker] = dict(metrics)
            if r.opened is None:
                r.opened = time.monotonic()
            m.last_round = number
        self.cond.notify_all()
        return r

    def _copy_for(self, result, contributors: set) -> dict | None:
        """A bf16-delta round (run.bf16_delta): the copy the deltas were added to, whole, for the contributors
        that missed an answer before (joined late, a straggler, a restart) and so do not hold it; None when
        every contributor holds it, or the answer is the parameters (then they are the copy)."""
        s = self.session
        if s.reply != "bf16_delta" or contributors <= self.holders:
            return None
        if not any(a.dtype == ml_dtypes.bfloat16 for a in result.tensors.values()):
            return None
        with s.lock:  # (an idle unload may drop the copy)
            copy = s.reply_copy
            return None if copy is None else {n: np.array(a) for n, a in copy.items()}

    def _closable(self, r: Round) -> bool:
        if not r.contribs:
            return False
        self.members.expire()
        live = self.members.by_name
        # The count first: the full check (O(members)) then runs about once a round, not per contribution.
        if len(r.contribs) >= len(live) and all(w in r.contribs for w in live):
            return True
        return (time.monotonic() >= r.opened + self.config.round_deadline
                and len(r.contribs) >= self.config.quorum)

    def _await(self, r: Round, worker: str, end: float, context) -> Outcome:
        """Caller holds the condition. Returns the round's outcome (closing it when this call may)."""
        failures = r.failures
        while True:
            m = self.members.by_name.get(worker)
            if m is not None:  # a worker waiting in a live call is in contact
                self.members.renew(m)
            if r.result is not None:
                return r.result
            if r.failures != failures:
                raise r.error
            if self.deleted:
                raise self.store.missing(self.session.id)
            if not r.closing and self._closable(r):
                r.closing = True
                self.cond.release()
                try:
                    self._close(r)
                finally:
                    self.cond.acquire()
                continue
            now = time.monotonic()
            if now >= end or (context is not None and not context.is_active()):
                raise DeadlineExceeded(
                    f"round {r.number} did not close within this call's deadline; worker {shown(worker)}'s "
                    f"contribution is committed to it: send the same (worker, round) again to receive the round's "
                    "reply (it is applied once)")
            wait = min(end - now, WAIT_SLICE)
            if r.opened is not None:
                wait = min(wait, max(0.0, r.opened + self.config.round_deadline - now) + 1e-3)
            self.cond.wait(wait)

    def _close(self, r: Round) -> None:
        """Apply the round as one ordinary step (not holding the condition), then open the next."""
        t0 = r.opened or time.monotonic()
        with self.cond:
            contribs = dict(r.contribs)
            live = self.members.names()
            clocks = {w: m.contributions + (w in contribs) for w, m in self.members.by_name.items()}
            sent = [m for w, m in r.metrics.items() if w in contribs]
        # The round's step records the mean of each scalar over the contributors that sent it.
        names = sorted({k for m in sent for k in m})
        step_metrics = {k: float(np.mean([m[k] for m in sent if k in m])) for k in names}
        s = self.session
        try:
            combined = self.store.budget.allocate(
                f"a round's combined gradient of session {s.id}", s.elements * s.dtype.itemsize,
                lambda: combine(contribs, self.config.combine, s.dtype))
            # Logged with the step, and kept on the session by its commit, live or replayed (commit.py), so
            # retries after a restart are answered.
            record = {"round": r.number, "contributors": sorted(contribs), "members": sorted(live), "clocks": clocks}
            merged = getattr(combined, "sparse", None) or {}
            run = StepRun(self.store, s, r.number, metrics=step_metrics, extras=record, sparse=bool(merged))
            try:
                result = run.open()
                if result is None:
                    for name, g in combined.items():
                        run.feed(_Whole(name, s.master_code, s.shapes[name], g))
                    for name, (rows, values) in merged.items():
                        run.add_sparse(name, rows, values)
                    result = run.finish()
                out = {n: np.array(a) for n, a in result.tensors.items()}  # kept: every contributor's reply
                full = self._copy_for(result, set(contribs))
            finally:
                run.close()
        except Exception as e:
            with self.cond:
                r.closing = False
                r.failures += 1
                r.error = e
                failed, r.outcome = r.outcome, Future()
                failed.set_exception(e)
                self.cond.notify_all()
            log.error("session %s: round %d could not be applied: %s", s.id, r.number, e,
                      extra={"session_id": s.id})
            return
        who = tuple(sorted(contribs))
        mean = combined if self.config.combine == "mean" else sparse_rows.scaled(combined, 1 / len(who))
        outcome = Outcome(result.step, out, r.number, who, tuple(sorted(live - set(who))), time.monotonic() - t0,
                          noise_scale=noise_scale(contribs, mean), rows=dict(getattr(result, "sparse", {})),
                          lr=result.lr)
        if full is not None:
            outcome.delta_to = frozenset(self.holders & set(who))
            outcome.full = replace(outcome, tensors=full)
        self.holders = set(who)  # every contributor now holds the copy (as bf16 deltas or whole)
        metrics = self.store.metrics
        if metrics is not None and hasattr(metrics, "round"):
            metrics.round(s.id, outcome.seconds, len(outcome.stragglers), outcome.noise_scale)
        with self.cond:
            for w in who:
                m = self.members.by_name.get(w)
                if m is not None:
                    m.contributions += 1
                    m.missed = 0
            for w in outcome.stragglers:  # alive (its lease renewed) but not contributing
                m = self.members.by_name.get(w)
                if m is not None:
                    m.missed += 1
                    if m.missed == MISSED_ROUNDS_ALERT:
                        self._worker_stopped(w, f"worker {w} stopped contributing: a member (its lease still "
                                                f"renewed) whose contribution none of the last {m.missed} rounds "
                                                f"had (rounds {r.number - m.missed + 1}-{r.number} closed without it)")
            r.result = outcome
            r.outcome.set_result(outcome)
            r.contribs.clear()  # their buffers leave the memory budget
            r.metrics.clear()
            self.last = outcome
            self.history.append((r.number, frozenset(who)))
            self.round = Round(result.step)
            self.cond.notify_all()

    # -- async and ssp ---------------------------------------------------------------------
    def begin_async(self, worker: str, number: int, context=None) -> tuple[Member, Outcome | None, dict]:
        """Take the worker's turn (its contributions apply one at a time). Returns (member, the answer when
        this is a retry of its last applied contribution, the members' clocks once it applies: logged with
        it). SSP: waits while the worker is too far ahead."""
        end = time.monotonic() + _remaining(context)
        with self.cond:
            self._check_open()
            m = self.members.join(worker)
            turn = self.turns.setdefault(worker, threading.Lock())
        if not turn.acquire(timeout=max(0.0, min(end - time.monotonic(), 86400.0))):
            raise DeadlineExceeded(f"worker {shown(worker)} has another contribution in flight that did not finish "
                                   "within this call's deadline; nothing was applied")
        try:
            with self.cond:
                step = self.session.step
                last = self.session.worker_rounds.get(worker, -1)  # survives restarts (logged with each step)
                if number == last:
                    return m, self._async_replay(m, number), {}
                if number < last:
                    raise FailedPrecondition(
                        f"worker {shown(worker)} already contributed gradients read at step {last}; this "
                        f"one was read at step {number}: rounds of a worker must increase (a repeated round is a "
                        f"retry); the session is at step {step}", metadata=(("optreg-server-step", str(step)),))
                if number > step:
                    raise FailedPrecondition(
                        f"round {number} is ahead of session {self.session.id}'s step {step}: send the step the "
                        "contribution's parameters were read at", metadata=(("optreg-server-step", str(step)),))
                bound = self.config.staleness
                if self.config.mode == "async" and bound and step - number > bound:
                    raise FailedPrecondition(
                        f"contribution too stale: read at step {number}, the session is at step {step}, more than "
                        f"config.workers.staleness = {bound} behind; nothing was applied: read the parameters",
                        metadata=(("optreg-server-step", str(step)),))
                if self.config.mode == "ssp":
                    while not ssp_may_apply(m.contributions, self.members.clocks(), bound):
                        now = time.monotonic()
                        if now >= end or (context is not None and not context.is_active()):
                            raise DeadlineExceeded(
                                f"worker {shown(worker)} is {m.contributions - min(self.members.clocks())} "
                                f"contributions ahead of the slowest member, more than the bound {bound}; it waited "
                                "until this call's deadline and nothing was applied: send it again")
                        self._check_open()
                        self.cond.wait(min(end - now, WAIT_SLICE))
                        self.members.renew(m)
                        self.members.expire()
                        if m.worker not in self.members.by_name:  # dropped while waiting: back in
                            self.members.readmit(m)
                clocks = {w: o.contributions for w, o in self.members.by_name.items()}
                clocks[worker] = m.contributions + 1
            return m, None, clocks
        except BaseException:
            turn.release()
            raise

    def _async_replay(self, m: Member, number: int) -> Outcome:
        return self._current(number)

    def _current(self, number: int, contributors=()) -> Outcome:
        """A retry's answer from the session's current parameters."""
        s = self.session
        with s.lock:
            self.store.ensure_loaded(s)
            out = {n: np.array(a) for n, a in reply(s, True).tensors.items()}
            step = s.step
        return Outcome(step, out, number, tuple(contributors), replayed=True)

    def end_async(self, m: Member, number: int, applied_step: int | None) -> None:
        try:
            if applied_step is not None:
                with self.cond:
                    cur = self.members.by_name.get(m.worker, m)  # dropped and joined again meanwhile: the new one
                    cur.contributions += 1
                    cur.last_round = number
                    self.members.renew(cur)
                    self.cond.notify_all()
        finally:
            self.turns[m.worker].release()


class Hubs:
    """The hubs of every shared session, made on first use, and one background thread that ends leases
    and closes rounds whose waiters have gone."""

    def __init__(self, store, interval: float = 0.1, seats=None):
        self.store = store
        self.interval = interval
        self.seats = seats  # the server's --max-members (admission.Limit), shared by every session's members
        self._lock = threading.Lock()
        self._thread = None
        self._hubs: dict[str, Hub] = {}  # what the thread ticks: not every session of a 100,000-session store
        store.observers.append(self)

    def get(self, session) -> Hub:
        if session.workers is None:
            raise FailedPrecondition(f"session {session.id} is a single-writer session: it has no workers "
                                     "(create it with config.workers to share it)")
        with self._lock:
            hub = session.hub
            if hub is None:
                with session.lock:
                    self.store.ensure_loaded(session)  # the open round is the session's step
                hub = session.hub = self._hubs[session.id] = Hub(self.store, session, self.seats)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="optreg-rounds")
                self._thread.start()
            return hub

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            with self._lock:
                hubs = list(self._hubs.items())
            for sid, hub in hubs:
                if hub.deleted:
                    with self._lock:
                        if self._hubs.get(sid) is hub:
                            del self._hubs[sid]
                    continue
                try:
                    hub.tick()
                except Exception:  # a tick must never end the thread
                    log.exception("session %s: round tick failed", sid)

    # store observer
    def on_step(self, session, run):
        pass

    def on_refused(self, session, run):
        pass

    def on_delete(self, session):
        hub = session.hub
        if hub is not None:
            with hub.cond:
                hub.deleted = True
                hub.members.clear()
                if not hub.round.outcome.done():
                    hub.round.outcome.set_exception(self.store.missing(session.id))
                hub.cond.notify_all()
