"""Resident sessions: the master parameters live in a client's shared-memory segment.

A resident registration (RegisterSharedMemory with `resident`) moves a session's live
parameters into the segment: the server writes the current values there and the live set's
parameter arrays become views of it (the optimizer state stays in the server's memory). A
step then moves no tensor bytes and copies no parameters: it runs under the session's lock,
with every gradient validated and finite-checked before anything is touched (the check's max |g| is
the step's telemetry figure, so the update pass leaves it out), the log record
made durable next, and only then the update applied where the parameters live.

Never half-applied: an update that cannot fail once its inputs are checked (a built-in
optimizer's compiled kernel) runs in place; any other (a third party's update, a
whole-tensor or non-deterministic optimizer, a kernel not compiled yet) runs into a staging
set that is copied over the live one after the commit. Readers outside the lock (ReadState
and the like) are waited for before an in-place update starts.

When the registration ends (see `detach`) the parameters are copied back into the server's
own memory, or, when the client is gone or the server stops, stay in the server's mapping of
the segment (its client can still write it, never shrink it).
"""
from __future__ import annotations

import logging
import mmap
import time

import numpy as np

from optreg.server.kernels import jit
from optreg.server.kernels import apply as kernels
from optreg.server.kernels import stats as kernelstats
from optreg.server.steps import sparse_rows as sparse
from optreg.server.steps import writers
from optreg.server.model.errors import Cancelled, FailedPrecondition, InvalidArgument, PluginFailed, once, shown
from optreg.server.kernels.finite import abs_max, check_finite
from optreg.server.kernels.widen import widen
from optreg.server.steps.commit import next_step
from optreg.server.steps.run import SMALL_STATS, StepRun, reply
from optreg.server.model.session import Session
from optreg.server.steps.shared_memory import Region, tensors_in
from optreg.v1 import tensors

log = logging.getLogger("optreg.server.steps.resident")

READER_WAIT = 0.001  # seconds between looks while a reader holds the live set
STATS_COMPILE_WAIT = 60.0  # seconds a resident registration waits for the kernels it will step with
PARALLEL_FINITE = 1 << 20  # elements: below, one thread checks a gradient (a hand-off costs more)
# Why a registration ends when the server keeps the segment's mapping instead of copying the parameters out.
KEEP_MAPPING = ("client gone", "server stopping")


def _wait_for_readers(session: Session, is_active) -> None:
    """Caller holds the lock; returns holding it, with nobody reading the live set outside it."""
    while session.live is not None and session.live.readers:
        if not is_active():
            raise Cancelled("the call ended while a read of the session was in progress; nothing was applied")
        session.lock.release()
        try:
            time.sleep(READER_WAIT)
        finally:
            session.lock.acquire()


def attach(store, session: Session, region: Region, items, is_active=lambda: True) -> int:
    """Move the session's parameters into `region` at the places `items` name; returns the step they hold."""
    if session.workers is not None:
        raise FailedPrecondition(f"session {session.id} is shared by workers: its parameters cannot live in one "
                                 "client's segment; register without resident")
    views = {}
    for t in tensors_in(region, items, session.master_code, "parameter"):
        once(views, "parameter", t.name)
        if t.dtype != session.master_code:
            raise InvalidArgument(f"parameter {shown(t.name)}: a resident parameter has the master dtype "
                                  f"{session.dtype.name}; send that dtype (or leave it unspecified)")
        views[t.name] = t
    check = tensors.ChunkTracker({n: (shape, (session.master_code,)) for n, shape in session.shapes.items()},
                                 "parameter")
    for t in views.values():
        try:
            check.accept(t)
        except ValueError as e:
            raise InvalidArgument(f"{e}; resident registration refused") from None
    try:
        check.finish()
    except ValueError as e:
        raise InvalidArgument(f"{e}: a resident registration places every parameter in the segment") from None
    _check_disjoint(region, views.values())
    _compiled_before_first_step(session)
    arrays = {n: np.frombuffer(t.data, dtype=session.dtype).reshape(session.shapes[n]) for n, t in views.items()}
    with session.lock:
        store.ensure_loaded(session)
        if session.resident is not None:
            raise FailedPrecondition(f"session {session.id} already keeps its parameters in segment "
                                     f"{shown(session.resident.key)}; unregister that one first")
        _wait_for_readers(session, is_active)
        if sparse.owes(session):  # rows of earlier sparse steps owe steps: the segment gets them current
            sparse.swap(session, sparse.settled_copy(store, session))
        live = session.live
        for n, a in arrays.items():
            np.copyto(a, live.params[n])
        live.params = arrays  # the private arrays go (their bytes stay counted: the set still holds them)
        session.spare = None  # a spare set would be a second full copy; resident steps never use one
        session.resident = region
        region.resident = session
        region.detach = lambda why: detach(store, session, region, why)
        region.param_spans = sorted((t.byte_offset, t.byte_offset + t.data.nbytes) for t in views.values())
        step = session.step
    log.info("session %s: parameters resident in shared-memory segment %s at step %d", session.id, region.key, step,
             extra={"session_id": session.id})
    return step


def _compiled_before_first_step(session: Session, seconds: float = STATS_COMPILE_WAIT) -> None:
    """Wait (once, at registration) for the optimizer's kernel with statistics to be compiled. Until it is,
    a step's statistics come from numpy slice by slice, which contends for the GIL with the compiler:
    measured, the first step of a 5e8 session took 200 s that way instead of ~1 s."""
    defn = session.optimizer.definition
    comp = jit.lookup(defn, session.dtype)
    end = time.monotonic() + seconds
    while comp is None and jit.status(defn) == "pending" and time.monotonic() < end:
        time.sleep(0.02)
        comp = jit.lookup(defn, session.dtype)
    if comp is None:
        return
    while kernelstats.stats_kernel(defn, comp) is None and kernelstats.stats_status(defn) == "pending" \
            and time.monotonic() < end:
        time.sleep(0.02)


def _check_disjoint(region: Region, views) -> None:
    """Two parameters in the same bytes would update each other."""
    spans = sorted((t.byte_offset, t.byte_offset + t.data.nbytes, t.name) for t in views)
    for (a0, a1, an), (b0, b1, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise InvalidArgument(f"parameters {shown(an)} and {shown(bn)} overlap in segment {shown(region.key)} "
                                  f"(bytes {a0}..{a1} and {b0}..{b1}); give each its own bytes")


def detach(store, session: Session, region: Region, why: str = "") -> bool:
    """The registration ends. Unregistered by a live client: the parameters are copied back into the server's
    memory (the client keeps its mapping). The client gone or the server stopping: the server keeps the
    mapping as the parameters' home (it cannot shrink: sealed, see shared_memory.py) and gives back
    the segment's other pages (the gradients): no copy, so no second 4 GB at 1e9. Returns True when
    the mapping must stay (the caller must not close it)."""
    keep = why in KEEP_MAPPING
    with session.lock:
        if session.resident is not region:
            return False
        live = session.live
        if live is not None:
            _wait_for_readers(session, lambda: True)
            if store.index_of(session) is not session:  # deleted: nothing to keep
                session.live = session.spare = None
                keep = False
            elif keep:
                _give_back_others(region, live.params.values())
            else:
                live.params = {n: np.array(a) for n, a in live.params.items()}
        else:
            keep = False
        session.resident = None
        region.resident = None
    log.info("session %s: parameters %s at step %d", session.id,
             "kept in the segment's mapping" if keep else "back in server memory", session.step,
             extra={"session_id": session.id})
    return keep


def _give_back_others(region: Region, params) -> None:
    """MADV_REMOVE every whole page of the segment that holds no parameter."""
    base = np.frombuffer(region.mm, np.uint8, 1).ctypes.data
    spans = sorted((a.ctypes.data - base, a.ctypes.data - base + a.nbytes) for a in params)
    page = mmap.PAGESIZE
    pos = 0
    for a, b in spans + [(region.size, region.size)]:
        lo, hi = -(-pos // page) * page, (a // page) * page
        if hi > lo:
            try:
                region.mm.madvise(mmap.MADV_REMOVE, lo, hi - lo)
            except (OSError, ValueError, AttributeError) as e:  # not Linux, or not shmem: the pages stay
                log.info("segment %s: pages not given back (%s)", region.key, e)
                return
        pos = max(pos, b)


def _check_finite(name: str, g: np.ndarray) -> float | None:
    """check_finite, split over the kernel threads for large gradients: this pass is the one a resident
    step adds to the update's own (it must finish before anything is touched). Returns max |g|, which the
    check's reduction yields anyway (kernels/finite.py abs_max), for kernels.apply(grad_abs_max=); None when
    the compiled check does not fit (numpy checked)."""
    parts = jit.threads() if g.size >= PARALLEL_FINITE else 1
    if abs_max(g[:1]) is None:
        check_finite(name, g)
        return None
    bounds = np.linspace(0, g.size, parts + 1).astype(np.int64)
    futures = [kernels.executor(parts).submit(abs_max, g[a:b]) for a, b in zip(bounds[1:-1], bounds[2:])]
    tops = [abs_max(g[:bounds[1]])] + [f.result() for f in futures]
    if not np.isfinite(tops).all():
        check_finite(name, g)  # raises, counting the bad values
    return max(tops)


def in_place(session: Session, grads: dict[str, np.ndarray]) -> bool:
    """Whether this step's update may run where the parameters live: a compiled, deterministic,
    elementwise kernel, whoever's plugin it is (a kernel never raises: docs/plugins.md, checked by the
    conformance kit), once the gradients are checked finite."""
    defn = session.optimizer.definition
    if not defn.elementwise or session.clocks:
        return False  # (rows a sparse step left lazy are caught up in the staging copy: StepRun._update_copy)
    if not getattr(defn, "deterministic", True) or jit.lookup(defn, session.dtype) is None:
        return False
    return all(g.dtype == session.dtype or kernels.widens_in_pass(defn, session.dtype, g) for g in grads.values())


class ResidentStep(StepRun):
    """One step of a resident session, whole under its lock: nothing in it waits on the network."""

    def __init__(self, store, session: Session, region: Region, fence, hyperparameters, metrics, is_active,
                 writer: tuple = (None, False)):
        super().__init__(store, session, fence, hyperparameters, metrics, is_active, writer=writer)
        self.region = region
        self.grad_max: dict[str, float | None] = {}  # name -> max |g| from its finite check

    def run(self, items) -> None:
        s = self.session
        self.store.journal.wait_turn(s)  # (as StepRun.open: a change queued first; the disk writer's back-pressure)
        with s.lock:
            self.store.ensure_loaded(s)
            if s.resident is not self.region:
                raise FailedPrecondition(f"segment {shown(self.region.key)} no longer holds session {s.id}'s "
                                         "parameters; register it again with resident")
            writers.claim(s, *self.writer)
            if s.check_fence(self.fence):
                self.done = True
                self.result = reply(s, True)  # the segment holds the step's parameters already
                return
            self.t = next_step(s)
            _wait_for_readers(s, self.is_active)
            self.store.journal.mend(s)
            self._hyperparameters(s)
            self.record = self.store.journal.begin(s, self.t, self.fence, self.hp, self.metrics, self.extras)
            grads = self._validate(items)
            if not self.is_active():
                raise Cancelled("the call ended before the step was committed; it was not applied")
            if in_place(s, grads):  # logged before anything changes (a failed write changes nothing)
                self._commit(lambda: self._apply_in_place(grads))
            else:
                staging = self.store.allocate_set(s, "a resident step's staging copy")
                for name, g in grads.items():
                    self._update_copy(staging, s.live, name, g)
                self._commit(lambda: self._copy_in(staging), logged=staging)  # a failed write: nothing copied
        self.store.stepped(s, self, time.perf_counter() - self.t0)

    def _validate(self, items) -> dict[str, np.ndarray]:
        s, tracker, grads = self.session, tensors.ChunkTracker(self.session.spec, "gradient"), {}
        for t in items:
            once(grads, "gradient", t.name)
            end = t.byte_offset + t.data.nbytes
            if any(a < end and t.byte_offset < b for a, b in self.region.param_spans):
                raise InvalidArgument(f"gradient {shown(t.name)}: bytes [{t.byte_offset}, {end}) overlap the resident "
                                      "parameters; give gradients their own bytes in the segment")
            try:
                _, data = tracker.accept(t)
            except ValueError as e:
                raise InvalidArgument(f"{e}; the step was not applied") from None
            self.record.add(t.name, t.dtype, tuple(t.shape), 0, data)
            g = data if kernels.widens_in_pass(self.defn, s.dtype, data) else widen(data, s.dtype)
            self.grad_max[t.name] = _check_finite(t.name, g.reshape(-1))
            grads[t.name] = g.reshape(s.shapes[t.name])
        try:
            tracker.finish()
        except ValueError as e:
            raise InvalidArgument(f"{e}; the step was not applied") from None
        return grads

    def _apply_in_place(self, grads) -> None:
        live = self.session.live
        try:
            for name, g in grads.items():
                p = live.params[name]
                old = p.copy() if p.size < SMALL_STATS else p  # small tensors' statistics read the values before
                self._kernel(p, g, {slot: arrs[name] for slot, arrs in live.state.items()}, parallel=True,
                             name=name, old=old, grad_abs_max=self.grad_max.get(name))
        except PluginFailed as e:  # cannot happen for a compiled built-in on finite input; if it does, say so
            s = self.session
            s.quarantined = (f"step {self.t} failed while updating its parameters in place ({e.message}); "
                             "the log holds the step: restart the server to recover it")
            raise

    def _copy_in(self, staging) -> None:
        """A staged resident step's write: the parameters copied where they live, the state swapped."""
        live = self.session.live
        for name, p in staging.params.items():
            np.copyto(live.params[name], p)
        live.state = staging.state  # private arrays: swapped, not copied
