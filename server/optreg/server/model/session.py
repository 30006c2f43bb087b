"""A session: its optimizer, hyperparameters, step, and its tensors as immutable-by-convention sets.

A step never writes the live arrays. It computes into a staging set (a copy of the
live slices updated by the kernel, slice by slice while in cache) outside the
session's lock, and its commit swaps the staging set in under the lock, only if the
fence still holds. So a stalled sender holds no lock, a failed step leaves nothing
half-applied, and readers see whole steps only.

`Arrays.readers` counts the steps and replies reading a set outside the lock (changed
under the lock only). A set replaced by a commit becomes the session's `spare`, the
next step's staging, once nobody reads it; until then it is left to the garbage
collector, and its bytes leave the memory budget when it is collected.
"""
from __future__ import annotations

import contextlib
import functools
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from optreg.plugins.api import Slot
from optreg.plugins.registry import Registered
from optreg.server.model.errors import FailedPrecondition, shown
from optreg.v1 import names, tensor_pb2

DT = tensor_pb2.DataType
MASTER_DTYPES = {DT.DATA_TYPE_FLOAT32: np.dtype("<f4"), DT.DATA_TYPE_FLOAT64: np.dtype("<f8")}
DTYPE_NAMES = {code: name for name, code in names.MASTER_DTYPE.items()}
# A gradient may be the master dtype or narrower; it is widened on the server.
GRAD_DTYPES = {
    DT.DATA_TYPE_FLOAT32: (DT.DATA_TYPE_FLOAT32, DT.DATA_TYPE_FLOAT16, DT.DATA_TYPE_BFLOAT16),
    DT.DATA_TYPE_FLOAT64: (DT.DATA_TYPE_FLOAT64, DT.DATA_TYPE_FLOAT32, DT.DATA_TYPE_FLOAT16,
                           DT.DATA_TYPE_BFLOAT16),
}
REPLIES = ("parameters", "delta", "none", "bf16_delta")
DURABILITIES = ("every-step", "log", "periodic", "none")
# The largest step number: a step past it would not fit the contract's int64.
MAX_STEP = (1 << 63) - 1


SPARE_MIN_BYTES = 256 * 1024  # see Session.keep_spare
# Smaller sets a commit replaces go to the store-wide SetPool instead, up to this many bytes in all.
POOL_BYTES = 4 << 20
POOL_PER_LAYOUT = 8  # sets of one layout kept (concurrent steps of sessions shaped alike each take one)


@dataclass(frozen=True)
class Durability:
    """How a session's steps reach the disk (see docs/durability.md)."""
    mode: str = "none"  # one of DURABILITIES
    periodic_steps: int = 0
    periodic_seconds: float = 0.0


@dataclass(eq=False)
class Arrays:
    """One consistent set of a session's tensors: parameters, and slot -> name -> array."""
    params: dict[str, np.ndarray]
    state: dict[str, dict[str, np.ndarray]]
    readers: int = 0

    def blank(self) -> "Arrays":
        return Arrays({n: np.empty_like(p) for n, p in self.params.items()},
                      {s: {n: np.empty_like(a) for n, a in arrs.items()} for s, arrs in self.state.items()})

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for p in self.params.values()) + sum(
            a.nbytes for arrs in self.state.values() for a in arrs.values())


class SetPool:
    """Small sets that commits replaced, kept store-wide for the next step of any session of the same
    layout (names, shapes, dtype, slots): a small step then allocates nothing, and a small session
    still holds one set (a spare of its own would double it). Bounded by POOL_BYTES; each set stays
    counted in the memory budget until it is collected (MemoryBudget.hold), and make_room empties
    the pool first. Every user of a set overwrites all of it before reading it (the staging copy)."""

    def __init__(self, max_bytes: int = POOL_BYTES, per_layout: int = POOL_PER_LAYOUT):
        self.max_bytes, self.per_layout = max_bytes, per_layout
        self.held = 0
        self._free: dict[tuple, list[tuple[Arrays, int]]] = {}
        self._lock = threading.Lock()

    def take(self, layout: tuple) -> Arrays | None:
        with self._lock:
            free = self._free.get(layout)
            if not free:
                return None
            arrays, nbytes = free.pop()
            self.held -= nbytes
            return arrays

    def give(self, layout: tuple, arrays: Arrays, nbytes: int) -> None:
        """Keep `arrays` (nobody reads it: readers == 0) if there is room; else it is collected."""
        with self._lock:
            free = self._free.setdefault(layout, [])
            if len(free) < self.per_layout and self.held + nbytes <= self.max_bytes:
                free.append((arrays, nbytes))
                self.held += nbytes

    def clear(self) -> bool:
        """Drop every pooled set (their budget goes as they are collected); True if there were any."""
        with self._lock:
            had = self.held > 0
            self._free.clear()
            self.held = 0
            return had


@dataclass(frozen=True)
class SessionSchedule:
    """A session's learning-rate schedule (optreg.plugins.schedule): step t runs with lr = the
    session's lr * factor(t - 1). A pure function of the step, so every worker of a shared session,
    a restart and the log's replay (which computes it again, steps/replay.py) get the same bits."""
    registered: Registered
    parameters: dict

    @property
    def name(self) -> str:
        return self.registered.definition.name

    def lr(self, base: float, t: int) -> float:
        return base * self.registered.definition.value(t - 1, self.parameters)


@dataclass
class StepResult:
    step: int
    replayed: bool
    tensors: dict[str, np.ndarray]  # what the session's reply asks for (empty for "none")
    lr: float = field(default=0.0, kw_only=True)  # the lr the step ran with (StepResponse.lr); 0: none


@dataclass(eq=False, slots=True)
class Session:
    id: str
    optimizer: Registered
    hyperparameters: dict
    master_code: int
    reply: str  # one of REPLIES
    durability: Durability
    shapes: dict[str, tuple]
    slot_names: tuple[str, ...]
    step: int = 0
    # The step it was created at (CreateSession's initial_step): the steps before it were never applied
    # here, so a fence naming one is no retry (check_fence). Kept in the snapshot's metadata.
    first_step: int = 0
    owner: str = ""  # the creating token's hash; "" when the server has no tokens
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)
    live: Arrays | None = None  # None while unloaded (its tensors on disk only)
    spare: Arrays | None = None  # the next step's staging, when nobody reads it (keep_spare)
    last_delta: dict[str, np.ndarray] | None = None  # reply "delta": a retry gets the same answer
    # reply "bf16_delta" (steps/run.py bf16_delta): the client's copy of the parameters as the replies made it
    # (None: unknown, the next answer is the parameters), and the last reply, which a retry gets again
    reply_copy: dict | None = field(default=None, repr=False)
    last_reply: tuple | None = field(default=None, repr=False)
    # Durability bookkeeping (sessions/store.py): the newest step on disk, and when.
    persisted_step: int = -1
    persisted_at: float = field(default_factory=time.monotonic)
    dirty: bool = True
    # log durability with a memory log: () -> (steps, seconds) acknowledged but not on disk yet (the journal's)
    unsaved: object | None = field(default=None, repr=False)
    quarantined: str = ""  # why its files cannot be trusted: every use is DATA_LOSS
    missing: str = ""  # the optimizer its files name, when no installed plugin provides it (journal.not_installed)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    spec: dict = field(init=False, repr=False)  # name -> (shape, gradient dtypes allowed)
    # Fixed for the session's life, so computed once (every step reads them).
    dtype: np.dtype = field(init=False, repr=False)
    elements: int = field(init=False, repr=False)
    layout: tuple = field(init=False, repr=False)  # what makes two sessions' sets interchangeable (SetPool)
    # {slot: {name: (shape, dtype)}}: each state array as its slot declares it (optreg.plugins.layouts)
    slot_layouts: dict = field(init=False, repr=False)
    reply_bytes: int = field(init=False, repr=False)  # the tensor bytes of a step's answer (steps.run.reply)
    set_nbytes: int = field(init=False, repr=False)  # set_bytes()
    # Shared sessions (model/workers.py WorkerConfig; None: single writer), members and rounds (steps/rounds.py Hub).
    workers: object | None = None
    hub: object | None = field(default=None, repr=False)
    round_record: dict | None = None  # the last sync round applied: {"round", "contributors", "members"} (logged)
    worker_rounds: dict = field(default_factory=dict)  # async/ssp: worker -> round of its last applied contribution
    worker_clocks: dict = field(default_factory=dict)  # the members at the last step -> contributions applied (logged)
    # Sparse rows (steps/sparse_rows.py): name -> int64 per row, the step the row is current through (lazy 2-D
    # parameters only), and the last sparse step's answer (a retry gets it again).
    clocks: dict = field(default_factory=dict, repr=False)
    last_sparse: object | None = field(default=None, repr=False)
    resident: object | None = field(default=None, repr=False)  # shm.Region holding the parameters (resident.py)
    writer: object | None = field(default=None, repr=False)  # writers.Writer holding the step lease (memory only)
    schedule: SessionSchedule | None = None  # its learning-rate schedule (CreateSession's config.schedule)
    listed: tuple | None = field(default=None, repr=False)  # rpc/service.py listed_info's encoding, kept while unchanged

    def keep_spare(self, arrays: Arrays) -> None:
        """Caller holds the lock: keep a set nobody reads as the next step's staging, when making a new one
        costs: a large set comes from mmap and faults in every page at its first write, while a small
        one is malloc's and cheap to make again (keeping it would double a small session's memory)."""
        if arrays.readers == 0 and self.spare is None and arrays.nbytes >= SPARE_MIN_BYTES:
            self.spare = arrays

    def __post_init__(self):
        slots = self.optimizer.definition.slots
        (self.spec, self.dtype, self.elements, self.reply_bytes, self.set_nbytes, self.layout,
         self.slot_layouts) = _derived(self.master_code, self.reply,
                                       tuple((n, tuple(s)) for n, s in self.shapes.items()), tuple(self.slot_names),
                                       tuple((s.shape, s.dtype) for s in slots if s.name in self.slot_names))

    def in_force(self, t: int, hp: dict) -> dict:
        """The hyperparameters step `t` runs with, from `hp` (the session's, or those the step set, as
        logged): with a schedule, its lr; `hp` itself otherwise. Every path that runs an update (live
        steps, resident steps, replay) takes them from here."""
        if self.schedule is None:
            return hp
        return {**hp, "lr": self.schedule.lr(hp["lr"], t)}

    @property
    def loaded(self) -> bool:
        return self.live is not None

    def set_bytes(self) -> int:
        """Bytes of one Arrays set (parameters and every slot)."""
        return self.set_nbytes

    def check_fence(self, fence: int | None) -> bool:
        """True when `fence` names the last applied step (a retry); raise when it names neither it nor the next.
        Caller holds the lock."""
        if fence is None or fence == self.step:
            return False
        retry = self.step > self.first_step  # it applied a step itself: the last one can be answered again
        if fence == self.step - 1 and retry:
            return True
        if fence == self.step - 1 and fence >= 0:
            why = (f"step {fence} was never applied by session {self.id}: it was created at step {self.step} "
                   "and has applied no step since")
        else:
            why = f"step {fence} does not match session {self.id}, which is at step {self.step}"
        raise FailedPrecondition(
            f"{why}: send step={self.step} for the next step"
            + (f" (or {self.step - 1} to retry the last one)" if retry else " (it has no step to retry)"),
            metadata=(("optreg-server-step", str(self.step)),))

    @contextlib.contextmanager
    def reading(self, arrays: Arrays):
        """Mark `arrays` read outside the lock (taken and given back under it)."""
        with self.lock:
            arrays.readers += 1
        try:
            yield arrays
        finally:
            with self.lock:
                arrays.readers -= 1


@functools.lru_cache(maxsize=4096)
def _derived(master_code: int, reply: str, shapes: tuple, slot_names: tuple, declared: tuple) -> tuple:
    """What a Session computes from its layout once, shared by the sessions of one layout (a server
    holds many sessions shaped alike: their spec, layout... are one object, not one each; never
    changed in place). `declared`: (shape, dtype) of each slot as its optimizer declares it."""
    dtype = MASTER_DTYPES[master_code]
    spec = {name: (shape, GRAD_DTYPES[master_code]) for name, shape in shapes}
    elements = sum(int(np.prod(s, dtype=np.int64)) for _, s in shapes)
    slots = {name: Slot(name, shape=shape, dtype=dt) for name, (shape, dt) in zip(slot_names, declared)}
    slots.update({name: Slot(name) for name in slot_names if name not in slots})  # (not installed: as files say)
    slot_layouts = {name: {n: slots[name].layout(shape, dtype) for n, shape in shapes} for name in slot_names}
    state_bytes = sum(int(np.prod(shape, dtype=np.int64)) * dt.itemsize
                      for arrays in slot_layouts.values() for shape, dt in arrays.values())
    return (spec, dtype, elements, 0 if reply == "none" else elements * dtype.itemsize,
            elements * dtype.itemsize + state_bytes, (dtype.str, shapes, slot_names, declared), slot_layouts)


class Buffers(dict):
    """name -> array; a dict the memory budget can follow to its end (a plain dict cannot be weakly referenced)."""


def check_values(defn, params: dict[str, np.ndarray], state: dict[str, dict[str, np.ndarray]]) -> str | None:
    """The one domain check of restored numbers, run on every path that restores them (CreateSession,
    so import and torch's load_state_dict; a snapshot's load): parameters hold no NaN, and each slot's
    arrays are inside its declared domain (optreg.plugins.api.Slot: +-inf allowed where a step can
    reach it). A message naming the tensor; None when all are valid."""
    for name, p in params.items():
        nan = int(np.count_nonzero(np.isnan(p))) if p.dtype.kind == "f" else 0
        if nan:
            return f"parameter {shown(name)} has {nan} NaN value(s); a parameter must be a number (+-inf allowed)"
    for slot in defn.slots:
        for name, a in state.get(slot.name, {}).items():
            problem = slot.check(shown(name), a, defn.name)
            if problem:
                return problem
    return None
