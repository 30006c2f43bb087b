"""One step, as data: every step of every source takes this path (docs/architecture.md, "The path of a step").

    source -> fence -> validate -> apply into staging (outside the lock) -> log -> commit -> sink

A source is anything that hands over gradient tensors or chunks of them (a decoded
unary message, a chunk stream, shared-memory views); `StepRun.feed` takes them one at a
time, so a streamed step's update of chunk k overlaps the transfer of chunk k+1. Waiting
for the next chunk never holds the session's lock: the lock covers the fence check at the
start and the commit at the end (and, for steps that cannot be computed chunk by chunk,
the update itself, which starts only once every byte has arrived).

Fenced steps of elementwise optimizers are computed chunk by chunk into a staging set
copied from the live set they started on (`base`); the commit swaps staging in only if
`base` is still live, i.e. no other step was committed meanwhile. Losing that race means
another call applied the same fenced step (a retry that overtook its original): the loser
is answered as the retry it is. Unfenced steps and whole-tensor optimizers collect the
gradients first and compute under the lock at commit, on whatever step is current.
The commit itself is commit.py's, the one resident steps and recovery use too.
"""
from __future__ import annotations

import logging
import math
import time

import ml_dtypes
import numpy as np

from optreg.plugins import HyperparameterError
from optreg.server.kernels.stats import merge_stats, tensor_stats
from optreg.server.kernels import jit
from optreg.server.kernels import apply as kernels
from optreg.server.kernels import stats as kernelstats
from optreg.server.steps import sparse_rows
from optreg.server.steps import writers
from optreg.server.steps.commit import commit, next_step
from optreg.server.kernels.finite import check_finite
from optreg.server.kernels.widen import widen
from optreg.server.storage.journal import NULL_RECORD
from optreg.server.model.errors import Cancelled, FailedPrecondition, InvalidArgument, PluginFailed, shown
from optreg.server.model.session import Arrays, Buffers, Session, StepResult
from optreg.v1 import compressed, tensors

log = logging.getLogger("optreg.server")

# Answers up to this size are encoded under the session's lock (StepRun.finish).
SMALL_ANSWER = 64 << 10
# Below this many elements a slice's statistics come from numpy after the update (cheaper than the
# update pass's statistics path, which pays a setup per call); the same float64 sums either way.
SMALL_STATS = 1 << 14

# Client scalars a step may carry (StepRequest.metrics).
MAX_METRICS = 32
MAX_METRIC_NAME = 64


def check_metrics(metrics) -> dict[str, float]:
    if len(metrics) > MAX_METRICS:
        raise InvalidArgument(f"metrics: {len(metrics)} given, at most {MAX_METRICS} a step")
    out = {}
    for k, v in metrics.items():
        if not k or len(k) > MAX_METRIC_NAME:
            raise InvalidArgument(f"metrics name {shown(k)}: use 1-{MAX_METRIC_NAME} characters")
        out[k] = float(v)
    return out


def gradients(session: Session, request):
    """A Step request's dense gradients, then its compressed ones decoded (optreg.v1.compressed): the
    tensors the step applies, and its log holds, whatever their encoding on the wire. Decoded one at
    a time as the step takes them; a bad encoding is refused before the step commits."""
    if request.compressed and request.sparse:
        raise InvalidArgument("compressed: not with sparse rows in the same step; send the other parameters' "
                              "gradients in `gradients`")
    yield from request.gradients
    for i, c in enumerate(request.compressed):
        try:
            yield compressed.decode(c, session.spec, f"compressed[{i}]")
        except ValueError as e:
            raise InvalidArgument(f"{e}; the step was not applied") from None


class StepRun:
    """One step of one session. Use: `open()`; then `feed()` each tensor or chunk; then `finish()`;
    `close()` always (it gives back what an unfinished step held)."""

    def __init__(self, store, session: Session, fence: int | None, hyperparameters=None, metrics=None,
                 is_active=lambda: True, out: dict[str, np.ndarray] | None = None, extras: dict | None = None,
                 sparse: bool = False, writer: tuple = (None, False)):
        self.store, self.session, self.fence = store, session, fence
        self.writer = writer  # (writers.Writer or None, take over?): the caller, for the session's lease
        self.extras = extras  # logged with the step (a shared session's round)
        # A sparse step (sparse_rows.py): some rows of 2-D parameters via feed_sparse(); parameters it does not
        # name have a zero gradient. Computed under the lock at commit on gathered rows, never overlapped.
        self.is_sparse = sparse
        self.sparse: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.hp_changes = dict(hyperparameters) if hyperparameters else {}
        self.metrics = check_metrics(metrics) if metrics else {}
        self.is_active = is_active
        self.out = out  # shared memory: the updated parameters are copied here after the commit
        self.defn = session.optimizer.definition
        self.reader: Arrays | None = None  # a set this run reads outside the lock
        self.staging: Arrays | None = None
        self.grads: Buffers | None = None
        self.delta: dict[str, np.ndarray] | None = None
        self.record = None
        self.result: StepResult | None = None
        self.done = False
        self.t0 = time.perf_counter()
        self.stats: dict[str, np.ndarray] = {}  # name -> [sum g^2, sum p_new^2, sum dp^2, max |g|] (telemetry)
        self.reply_buffers = None  # reply "bf16_delta": what its answer is made in (bf16_delta, below)

    # -- fence ---------------------------------------------------------------
    def open(self) -> StepResult | None:
        """Check the fence. Returns the answer when this is a retry of the applied step (nothing more to do)."""
        s = self.session
        if s.reply == "bf16_delta":
            if self.is_sparse:
                raise InvalidArgument(f"sparse: session {s.id} answers with bf16 deltas (step_reply bf16_delta), "
                                      "which sparse steps do not; send the gradients dense")
            self.reply_buffers = self._reply_buffers()
        self.store.journal.wait_turn(s)  # a hyperparameter change waiting for the steps in flight goes first
        with s.lock:
            self.store.ensure_loaded(s)
            self.store.journal.mend(s)  # a log a failed sync left unusable, replaced if the disk allows
            writers.claim(s, *self.writer)
            if s.resident is not None:  # its parameters live in a client's segment (resident.py)
                raise FailedPrecondition(f"session {s.id} keeps its parameters in shared memory: step it with "
                                         "StepSharedMemory, or end that registration first")
            if self.is_sparse:
                sparse_rows.require(s)
            if s.check_fence(self.fence):
                return self._replay()
            self.t = next_step(s)
            self._hyperparameters(s)
            # Rows owed steps (sparse_rows.py) are caught up in the staging copy at commit: no overlap then.
            self.overlap = self.fence is not None and self.defn.elementwise and not s.clocks and not self.is_sparse
            if self.overlap:
                self.reader = s.live
                s.live.readers += 1
                self.staging, s.spare = s.spare, None
            # Open under the lock that resolved self.hp, so a hyperparameter change (journal.wait_for_steps)
            # either waits for this record or comes before it, never between.
            extras = {**(self.extras or {}), "sparse": 1} if self.is_sparse else self.extras
            self.record = self.store.journal.begin(s, self.t, self.fence, self.hp, self.metrics, extras)
        if self.overlap and self.staging is None:
            self.staging = self.store.allocate_set(s, "a step's staging copy")
        self.tracker = tensors.ChunkTracker(s.spec, "gradient")
        if s.reply == "delta" and self.overlap:
            self.delta = self._buffers("a step's delta")
        return None

    def _buffers(self, what: str) -> "Buffers":
        """One master-dtype array per parameter, counted against the memory budget while alive."""
        s = self.session
        return self.store.budget.allocate(what, s.elements * s.dtype.itemsize,
                                          lambda: Buffers({n: np.empty(shape, s.dtype) for n, shape in s.shapes.items()}))

    def _reply_buffers(self) -> tuple:
        """(the client's copy when the session has none yet, the bf16 answer), counted before allocated."""
        s = self.session
        copy = None
        if s.reply_copy is None and self.out is None:  # (read without the lock: at worst unused)
            copy = self._buffers("the client's copy of the parameters (step_reply bf16_delta)")
        answer = self.store.budget.allocate("a step's bf16 answer", s.elements * 2, lambda: Buffers(
            {n: np.empty(shape, ml_dtypes.bfloat16) for n, shape in s.shapes.items()}))
        return copy, answer

    def _hyperparameters(self, s: Session) -> None:
        """Step self.t's hyperparameters: `hp`, the session's or those the step sets (logged, and kept by
        the commit), and `ran`, what the update runs with (s.in_force: a schedule's lr; replay's too)."""
        self.hp = self._resolve(s)
        try:
            self.ran = s.in_force(self.t, self.hp)
        except Exception as e:
            raise PluginFailed(f"schedule {s.schedule.name} (plugin {s.schedule.registered.plugin}) failed at "
                               f"step {self.t}: {type(e).__name__}: {shown(str(e), 300)}; the session is "
                               "unchanged") from e

    def _resolve(self, s: Session) -> dict:
        if "lr" in self.hp_changes and s.schedule is not None:
            raise InvalidArgument(
                f"hyperparameters lr={self.hp_changes['lr']!r}: session {s.id} follows schedule {s.schedule.name}, "
                f"which sets every step's lr from the session's lr ({s.hyperparameters['lr']!r}); leave lr out of the "
                "step (UpdateHyperparameters changes the base the schedule multiplies); the step was not applied")
        if not self.hp_changes:
            return s.hyperparameters
        try:
            return self.defn.resolve(self.hp_changes, base=s.hyperparameters)
        except HyperparameterError as e:
            raise InvalidArgument(f"hyperparameters: {e}; the step was not applied") from None

    def _replay(self) -> StepResult:
        s = self.session
        self.done = True
        if self.is_sparse:  # the rows the step answered with (none when a snapshot came after it: read them)
            last = s.last_sparse
            if last is not None and last.step == s.step:
                self.result = sparse_rows.SparseStepResult(s.step, True, last.tensors, last.sparse)
            else:
                self.result = sparse_rows.SparseStepResult(s.step, True, {}, {})
            return self.result
        self.reader = s.live
        s.live.readers += 1
        if self.out is not None:
            for n, o in self.out.items():
                np.copyto(o, s.live.params[n])
        self.result = reply(s, True, self.reply_buffers, self.out is not None)
        return self.result

    # -- validate and apply ------------------------------------------------------
    def feed(self, t) -> tuple[str, int, np.ndarray] | None:
        """Validate one tensor or chunk and apply it; returns (name, first element, the updated parameter
        slice) when the step is computed chunk by chunk (the streamed reply sends it at once)."""
        try:
            start, data = self.tracker.accept(t)
        except ValueError as e:
            raise InvalidArgument(f"{e}; the step was not applied") from None
        name = t.name
        if name in self.sparse:
            raise InvalidArgument(f"gradient {shown(name)} is given both as sparse rows and dense: send one")
        if self.record is not NULL_RECORD:  # (a memory-only session's steps are not logged)
            self.record.add(name, t.dtype, tuple(t.shape), start, data)
        s = self.session
        # Fenced elementwise steps widen float16/bfloat16 inside the kernel pass (kernels.widens_in_pass).
        if data.dtype == s.dtype:
            g = data
        else:
            g = data if self.overlap and kernels.widens_in_pass(self.defn, s.dtype, data) else widen(data, s.dtype)
        # A fenced step is computed into staging, and nothing is committed before its check: a small whole
        # tensor's statistics pass sees every element of g (the check rides on it, in _kernel); a large tensor
        # or chunk's update pass measures max |g| when a built-in kernel with statistics runs (_checks_in_pass).
        whole = self.overlap and start == 0 and g.size == self.reader.params[name].size
        fused = whole and g.size < SMALL_STATS
        checked_in_pass = self.overlap and not fused and self._checks_in_pass(g)
        if not (fused or checked_in_pass):
            check_finite(name, g, start)
        end = start + g.size
        if not self.overlap:
            if self.grads is None:
                self.grads = Buffers() if self.is_sparse else self._buffers("a step's gradients")
            if name not in self.grads:  # a sparse step: only the parameters it sends densely
                self.grads[name] = self.store.budget.allocate(
                    "a step's gradient", int(np.prod(s.shapes[name])) * s.dtype.itemsize,
                    lambda: np.empty(s.shapes[name], s.dtype))
            self.grads[name].reshape(-1)[start:end] = g
            return None
        base, st = self.reader, self.staging
        live_p = base.params[name]
        # The staging set is computed from the live one: the kernel reads the live values (kernels.apply(src=)).
        if start == 0 and g.size == live_p.size:  # a whole tensor (unary, shared memory, a one-chunk stream)
            p = st.params[name]
            slots = {slot: arrs[name] for slot, arrs in st.state.items()}
            src = (live_p, {slot: base.state[slot][name] for slot in slots})
            self._kernel(p, g.reshape(p.shape), slots, parallel=True, name=name, old=live_p,
                         checked=not (fused or checked_in_pass), src=src)
            if self.delta is not None:
                np.subtract(p, live_p, out=self.delta[name])
            return name, 0, p.reshape(-1)
        p = st.params[name].reshape(-1)[start:end]
        slots = {slot: arrs[name].reshape(-1)[start:end] for slot, arrs in st.state.items()}
        src = (live_p.reshape(-1)[start:end], {slot: base.state[slot][name].reshape(-1)[start:end] for slot in slots})
        self._kernel(p, g, slots, parallel=False, name=name, old=live_p.reshape(-1)[start:end],
                     checked=not checked_in_pass, src=src, start=start)
        if self.delta is not None:
            np.subtract(p, live_p.reshape(-1)[start:end], out=self.delta[name].reshape(-1)[start:end])
        return name, start, p

    def feed_sparse(self, msg, where: str = "sparse") -> None:
        """Validate one SparseRows message (a sparse step's) and log it; applied at commit."""
        if not self.is_sparse:
            raise InvalidArgument(f"{where}: sparse rows must come in the step's first message (the step is "
                                  "computed as a sparse step only when they do)")
        self.add_sparse(*sparse_rows.parse(self.session, msg, where), where=where)

    def add_sparse(self, name: str, rows: np.ndarray, values: np.ndarray, where: str = "sparse") -> None:
        """Rows already validated (sorted, unique, master dtype): logged, applied at commit."""
        if name in self.tracker.kinds:
            raise InvalidArgument(f"{where} {shown(name)}: the gradient is given both as sparse rows and dense: "
                                  "send one")
        if name in self.sparse:
            raise InvalidArgument(f"{where} {shown(name)}: this parameter is already in the step; name each "
                                  "parameter once (rows named twice in one SparseRows are summed)")
        sparse_rows.log_sparse(self.record, name, rows, values)
        self.sparse[name] = (rows, values)

    def _checks_in_pass(self, g: np.ndarray) -> bool:
        """Whether the finite check of a large tensor or chunk can come from its update pass: a compiled
        kernel with statistics writes the staging copy, and NaN or Inf in g shows in its max |g| (one pass
        over g fewer; a kernel never raises, docs/plugins.md). A narrower gradient widened in the pass
        likewise: widening keeps NaN and Inf, and the widening drivers measure max |g| of what they widen."""
        s = self.session
        if g.size < SMALL_STATS:
            return False
        if g.dtype != s.dtype:  # feed leaves g narrow only when it widens in the pass
            return True
        comp = jit.lookup(self.defn, s.dtype)
        return comp is not None and kernelstats.stats_kernel(self.defn, comp) is not None

    def _kernel(self, p, g, slots, parallel, name, old, grad_abs_max=None, checked=True, src=None,
                start: int = 0) -> None:
        """Apply the update; fold this tensor's (or chunk's) statistics into self.stats: measured in
        the update pass for large slices, from `old` (the values before, still live) for small ones,
        where kernels.apply(stats=) costs more in setup than the few dot products do.
        `checked=False` (g computed into staging, its statistics measured): g's finite check is done here,
        from its statistics (sum g^2 and max |g| are finite exactly when g is, short of float64 overflow,
        which the exact check then settles), saving a pass per step. `start`: g's first element in its
        tensor (a chunk's), for the refusal's message."""
        small = p.size < SMALL_STATS
        part = None if small else np.zeros(kernels.STATS)
        try:
            kernels.apply(self.defn, p, g, slots, self.t, self.ran, parallel=parallel, stats=part,
                          grad_abs_max=None if small else grad_abs_max, src=src)
            if small:
                part = tensor_stats(g, old, p)
        except Exception as e:
            if not checked:  # a non-finite gradient is refused as such, whatever the update made of it
                check_finite(name, g.reshape(-1), start)
            raise PluginFailed(f"optimizer {self.defn.name} (plugin {self.session.optimizer.plugin}) raised in "
                               f"update: {type(e).__name__}: {shown(str(e), 300)}; the session is unchanged") from e
        if not checked and not (math.isfinite(part[0]) and math.isfinite(part[3])):
            check_finite(name, g.reshape(-1), start)  # raises, counting them (only staging was written)
        acc = self.stats.get(name)
        if acc is None:
            self.stats[name] = part
        else:
            merge_stats(acc, part)

    # -- commit --------------------------------------------------------------
    def finish(self, encode=None):
        """Every gradient complete: commit (the log record first, as durable as the session's mode says).
        Returns the StepResult, or `encode(result)` when given: a small answer is encoded under the lock
        (cheaper than marking the arrays read), a large one outside it while they are marked read."""
        try:
            if self.is_sparse:  # parameters not named have a zero gradient; those sent must be whole
                sparse_rows.check_whole(self.tracker)
            else:
                self.tracker.finish()
        except ValueError as e:
            raise InvalidArgument(f"{e}; the step was not applied") from None
        if not self.is_active():  # deadline passed or client gone: apply no step nobody will see
            raise Cancelled("the call ended before the step was committed; it was not applied")
        s = self.session
        with s.lock:
            self.store.ensure_loaded(s)  # deleted meanwhile: NOT_FOUND; unloaded while idle: read back
            if self.is_sparse:
                lost = self._commit_sparse(encode)
                if lost is not None:
                    return lost
            else:
                answer = self._commit_dense(encode)
                if answer is _LOST:
                    return self._lost_race(encode)
        if self.is_sparse:  # the answer's arrays are the plan's own (not the live set's): encoded now
            self.store.stepped(s, self, time.perf_counter() - self.t0)
            return self.result if encode is None else encode(self.result)
        if self.out is not None:  # the sink: the caller's shared memory, after the commit
            for n, o in self.out.items():
                np.copyto(o, self.reader.params[n])
        self.store.stepped(s, self, time.perf_counter() - self.t0)
        if encode is None:
            return self.result
        return answer if answer is not None else encode(self.result)

    def _commit_dense(self, encode):
        """Caller holds the lock: swap the staging set in. Returns the answer encoded under the lock (None
        when it is to be encoded outside it), or _LOST when another call committed this step first."""
        s = self.session
        if self.overlap:
            if s.live is not self.reader:  # another call committed this step first
                return _LOST
        else:
            if self.fence is not None and s.step != self.fence:  # another call applied it meanwhile
                return _LOST
            self.t = next_step(s)  # unfenced: applied at whatever step is current
            self._hyperparameters(s)  # and with the hyperparameters in force now
            self.record.renumber(self.t, self.hp)
            self._compute_buffered()
        # The record first (Unavailable/ResourceExhausted on a failed write: nothing swapped); the hyperparameters
        # the step set go on top of the values now in force (a concurrent UpdateHyperparameters stays).
        self._commit(self._swap_in, logged=self.staging, delta=self.delta)
        answer = None
        if encode is not None and s.reply_bytes <= SMALL_ANSWER:
            answer = encode(self.result)
        else:
            self.reader = s.live
            s.live.readers += 1
        return answer

    def _commit(self, write, logged=None, delta=None, plan=None) -> None:
        """Caller holds the lock: the step becomes the session's (commit.py), and is answered."""
        s = self.session
        commit(s, self.t, self.hp, write, record=self.record, logged=logged, changes=self.hp_changes,
               extras=self.extras, delta=delta, plan=plan, store=self.store)
        self.done = True
        self.result = s.last_sparse if plan is not None else reply(s, False, self.reply_buffers, self.out is not None)
        self.result.lr = float(self.ran.get("lr", 0.0))  # as it ran (a staleness-scaled lr too)

    def _swap_in(self) -> None:
        """A live step's write: the staging set becomes the live one; the old goes to recycling."""
        s = self.session
        old = s.live
        s.live, self.staging = self.staging, None
        if self.reader is old:
            old.readers -= 1
            self.reader = None
        self.store.recycle(s, old)

    def _compute_buffered(self) -> None:
        """Whole tensors, under the lock, on the current live set (unfenced steps, whole-tensor optimizers)."""
        s = self.session
        base = s.live
        st, s.spare = s.spare, None
        if st is None:
            st = self.store.allocate_set(s, "a step's staging copy")
        if s.reply == "delta":
            self.delta = self._buffers("a step's delta")
        for name, g in self.grads.items():
            p = self._update_copy(st, base, name, g)
            if self.delta is not None:
                np.subtract(p, base.params[name], out=self.delta[name])
        self.staging = st

    def _update_copy(self, st: Arrays, base: Arrays, name: str, g: np.ndarray) -> np.ndarray:
        """One whole tensor of `base` copied into `st` (parameter and slots), then updated there."""
        p = st.params[name]
        np.copyto(p, base.params[name])
        slots = {slot: st.state[slot][name] for slot in st.state}
        for slot in slots:
            np.copyto(slots[slot], base.state[slot][name])
        # Rows a sparse step left lazy owe steps (with the hyperparameters they ran with): first those.
        sparse_rows.settle_tensor(self.session, st, name, self.t - 1, self.session.hyperparameters)
        self._kernel(p, g, slots, parallel=True, name=name, old=base.params[name])
        return p

    def _commit_sparse(self, encode):
        """Caller holds the lock: a sparse step, computed on gathered rows, logged, then written in."""
        s = self.session
        if self.fence is not None and s.step != self.fence:  # another call applied it meanwhile
            return self._lost_race(encode)
        self.t = next_step(s)
        self._hyperparameters(s)
        self.record.renumber(self.t, self.hp)
        base, clocks = s.live, s.clocks
        if self.hp != s.hyperparameters and sparse_rows.owes(s):  # owed steps ran with the old ones
            base, clocks = sparse_rows.settled_copy(self.store, s), {}
        try:
            plan = sparse_rows.compute(s, base, clocks, self.t, self.ran, dict(self.grads or {}), self.sparse,
                                       origin=s.live.params)
        except Exception as e:
            raise PluginFailed(f"optimizer {self.defn.name} (plugin {self.session.optimizer.plugin}) raised in "
                               f"a sparse update: {type(e).__name__}: {shown(str(e), 300)}; the session is "
                               "unchanged") from e
        copy = None
        if base is s.live and s.live.readers:  # made before the record commits: a refusal changes nothing
            copy = sparse_rows.copy_set(self.store, s, "a sparse step's copy")

        def write():
            if base is not s.live:
                sparse_rows.swap(s, base)
                sparse_rows.write(s, base, plan)
            else:
                sparse_rows.commit(s, plan, copy)

        self._commit(write, plan=plan)  # the record first: a failed write changes nothing
        self.stats = plan.stats
        return None

    def _lost_race(self, encode=None):
        s = self.session
        self.record.abort()
        if self.fence is not None and s.step == self.fence + 1:
            if self.reader is not None:
                self.reader.readers -= 1
                self.reader = None
            result = self._replay()
            return result if encode is None else encode(result)
        raise FailedPrecondition(f"session {s.id} moved to step {s.step} while this step was in flight; "
                                 f"it was not applied: send step={s.step}",
                                 metadata=(("optreg-server-step", str(s.step)),))

    def close(self) -> None:
        """Give back what the run held; after a failure the session is exactly as before."""
        s = self.session
        if self.done and self.reader is None and self.staging is None:
            return  # a committed step whose answer was encoded under the lock holds nothing
        with s.lock:
            if self.reader is not None:
                self.reader.readers -= 1
                self.reader = None
            if self.staging is not None and s.live is not None:
                self.store.recycle(s, self.staging)
            self.staging = None
            if not self.done:
                if self.record is not None:
                    self.record.abort()
                self.store.refused(s, self)


_LOST = object()  # _commit_dense: another call committed this step first


def reply(s: Session, replayed: bool, buffers: tuple | None = None, exact: bool = False) -> StepResult:
    """The reply for the session's current step. Caller holds the lock (or reads `live` under a reader).
    `buffers`, `exact`: reply "bf16_delta"'s (bf16_delta)."""
    if s.reply == "none":
        out = {}
    elif s.reply == "bf16_delta":
        out = bf16_delta(s, replayed, buffers, exact)
    elif s.reply == "delta":
        out = s.last_delta or {n: np.zeros_like(p) for n, p in s.live.params.items()}
    elif s.clocks:  # rows a sparse step left lazy: their dense-equivalent values
        out = sparse_rows.caught_up(s).params
    else:
        out = s.live.params
    # A retry's lr: the last step's, from the session's (a live step's own is set by its commit)
    lr = float(s.in_force(s.step, s.hyperparameters).get("lr", 0.0)) if replayed and s.step > 0 else 0.0
    return StepResult(s.step, replayed, out, lr=lr)


def bf16_delta(s: Session, replayed: bool, buffers: tuple | None, exact: bool) -> dict[str, np.ndarray]:
    """Reply "bf16_delta": bfloat16(parameters - the client's copy), added to the copy exactly as the client
    adds it, so what one answer rounds off the next one carries (error feedback: no drift). The parameters
    themselves when the copy is unknown (a new or reloaded session) or a retry's answer is gone; `exact`:
    the client's arrays were just written whole (shared memory). Caller holds the lock.
    `buffers`: (a new copy or None, the bf16 answer's arrays), counted by the caller; None: none made."""
    if replayed and not exact and s.last_reply is not None and s.last_reply[0] == s.step:
        return s.last_reply[1]  # the original call's answer, which its client never added
    s.last_reply = None
    copy, answer = buffers if buffers is not None else (None, None)
    if exact or answer is None:  # the client holds the parameters themselves (shared memory, resident steps)
        s.reply_copy = None
        return s.live.params
    if replayed or s.reply_copy is None:  # answered with the parameters: they become the client's copy
        if s.reply_copy is None:
            s.reply_copy = copy
        if s.reply_copy is not None:
            for name, p in s.live.params.items():
                np.copyto(s.reply_copy[name], p)
        return s.live.params
    for name, p in s.live.params.items():
        c = s.reply_copy[name]
        np.subtract(p, c, out=answer[name], casting="unsafe")  # rounded to bfloat16 once, to nearest even
        c += answer[name].astype(c.dtype)
    s.last_reply = (s.step, answer)
    return answer
