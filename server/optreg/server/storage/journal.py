"""Where sessions' steps go to be durable: a data directory of snapshots and write-ahead logs.

State on disk = the session's latest snapshot (DIR/sessions/<id>.safetensors, checked,
written atomically) + its log (DIR/sessions/<id>.wal): one record per step applied since,
holding what was new in the step (fence, step, hyperparameters in force, the gradients as
received, checksums). Recovery replays the records through the same kernels as the steps
took, which are deterministic, so the recovered state equals the uninterrupted one bit
for bit. An optimizer that declares itself not deterministic is logged by its results.

Modes (a session's `durability`):
    every-step  the record is fsync'd before the step is committed (group commit: sessions
                stepping at once share fsyncs)
    log         (the default) the record is written to the session's memory log (a file on a
                tmpfs, storage/memlog.py) before the commit: a kill -9 of the server loses
                nothing acknowledged. A writer thread brings the disk up to date behind the
                steps (`_save`): the records themselves while they are smaller than a snapshot,
                else a snapshot, so records a snapshot covers are never written to the disk.
                A power loss loses the steps not yet on disk; steps wait while the oldest of
                them is older than --max-exposure-seconds, or while the memory logs are full.
                Without a usable tmpfs: the record is written to the disk log, as every-step
                without the fsync (fsync'd within a second)
    periodic    no log; a snapshot every periodic_steps steps or periodic_seconds seconds
    none        nothing written

Snapshots are taken when the log outgrows the session (LOG_FACTOR times its size, at least
LOG_MIN bytes) or has waited SNAPSHOT_SECONDS while the session is idle, at a clean stop,
before an unload and on a hyperparameter change; the log is emptied after each.
NoJournal is the memory-only server's: nothing is written.
"""
from __future__ import annotations

import collections
import contextlib
import errno
import logging
import math
import os
import pathlib
import threading
import time

import numpy as np

from optreg.plugins import HyperparameterError, Optimizer, Slot
from optreg.plugins.registry import Registered
from optreg.server.model import errors
from optreg.server.storage import index, memlog, snapshot
from optreg.server.storage import wal
from optreg.server.model.errors import InvalidArgument, NotFound
from optreg.server.storage.fsync import GroupSyncer, fsync_dir
from optreg.server.model.workers import LR_SCALED, WorkerConfig
from optreg.server.model.session import (DTYPE_NAMES, DURABILITIES, MAX_STEP, REPLIES, Arrays, Durability, Session,
                                         SessionSchedule, check_values)
from optreg.v1 import tensors

log = logging.getLogger("optreg.server.storage.journal")
DTYPE_CODES = {v: k for k, v in DTYPE_NAMES.items()}
SNAPSHOT = ".safetensors"
LOG_FACTOR = 8  # the log may grow to this many times the session's size before a snapshot is forced
LOG_MIN = 64 << 20
SNAPSHOT_SECONDS = 60.0  # an idle session whose log is older than this gets a snapshot
IDLE_SECONDS = 2.0
MAX_OPEN_LOGS = 256  # logs holding an open descriptor at once (--max-open-logs; wal.LogPool)
SYNC = {"every-step": "fsync", "log": "os"}
MAX_EXPOSURE = 60.0  # seconds (--max-exposure-seconds): steps wait while older steps are still not on disk
MEMORY_SHARE = 0.5  # of the memory file system's free space at start: the memory logs' bound (all sessions)
# A session's memory logs may hold this many times its set (at least LOG_MIN) before its steps wait: enough for
# the disk to take a snapshot while fast steps go on (Adam 1e7 at ~7 ms a step, a 120 MB snapshot at ~400 MB/s:
# ~45 records of 40 MB meanwhile).
SESSION_MEMORY = 16
MAPPED_RECORDS = 1 << 20  # records at least this large (on average) go to mapped memory logs (wal.Log.map_ahead)
WRITE_PAUSE = 0.02  # seconds between the disk writer's passes
TRACE_ENV = "OPTREG_FSYNC_TRACE"  # tests: a file where each disk-log size made durable is appended (power loss)


class NullRecord:
    def add(self, name, code, shape, start, data) -> None:
        pass

    def renumber(self, step: int, hyperparameters: dict) -> None:
        pass

    def add_array(self, key, array) -> None:
        pass

    def commit(self, arrays=None) -> None:
        pass

    def abort(self) -> None:
        pass


NULL_RECORD = NullRecord()


class _WindowGate(NullRecord):
    """A periodic session's step: no log, but its commit (under the lock, before the swap) checks the
    window. When the snapshot that should have closed it failed (a full disk), it is tried again now,
    and the step is refused if it fails again: acknowledging more steps would let a crash lose more
    than the window the session promises."""

    def __init__(self, journal: "Journal", session: Session):
        self.journal, self.session = journal, session

    def commit(self, arrays=None) -> None:
        s = self.session
        if self.journal.window_overdue(s):
            try:
                self.journal._snapshot(s)
            except OSError as e:
                raise write_failed(s, e, f"the periodic snapshot of step {s.step} (taken every "
                                         f"{s.durability.periodic_steps} steps or {s.durability.periodic_seconds:g} s)"
                                   ) from None


class NoJournal:
    """Memory-only server: nothing is written."""

    def create(self, session): pass
    def begin(self, session, step, fence, hp, metrics, extras=None): return NULL_RECORD
    def mend(self, session): pass
    def after_commit(self, session): pass
    def hyperparameters(self, session, hp): pass
    def wait_turn(self, session): pass
    def busy(self, session): return False
    def wait_for_steps(self, session, timeout): pass
    def delete(self, session): pass
    def unload(self, session): pass
    def exposure(self, session): return 0, 0.0
    unsynced: set = frozenset()
    def write_index(self, sessions, unchecked, whole): pass
    read_files = 0
    def scan(self): return iter(())
    def flush(self, session): pass
    def tick(self, session): pass
    def close(self): pass

    def load(self, session, budget):  # pragma: no cover - memory-only sessions are never unloaded
        raise RuntimeError("memory-only sessions are never unloaded")


def write_failed(session: Session, e: OSError, what: str) -> Exception:
    """A failed write as the refusal a client can act on; nothing was changed in memory."""
    return errors.write_failed(e, f"session {session.id}: {what}")


def meta_of(s: Session, hyperparameters: dict | None = None) -> dict:
    return {"session_id": s.id, "optimizer": s.optimizer.definition.name, "plugin": s.optimizer.plugin,
            "hyperparameters": {k: float(v) for k, v in (hyperparameters or s.hyperparameters).items()},
            "step": s.step, "first_step": s.first_step, "master_dtype": DTYPE_NAMES[s.master_code], "reply": s.reply,
            "created_at": s.created_at, "last_used_at": s.last_used_at, "owner": s.owner,
            "durability": s.durability.mode,
            "periodic_steps": s.durability.periodic_steps, "periodic_seconds": s.durability.periodic_seconds,
            "shapes": {n: list(v) for n, v in s.shapes.items()}, "slots": list(s.slot_names),
            "workers": s.workers.to_meta() if s.workers is not None else None, "round_record": s.round_record,
            "worker_rounds": s.worker_rounds, "worker_clocks": s.worker_clocks,
            "schedule": {"name": s.schedule.name, "parameters": s.schedule.parameters} if s.schedule else None}


def snapshot_arrays(s: Session) -> tuple[dict, dict]:
    """(file key -> array, key -> [kind, slot, name]) for a session's live set and last delta."""
    arrays, table = {}, {}
    for name, a in s.live.params.items():
        arrays[f"params/{name}"], table[f"params/{name}"] = a, ["params", "", name]
    for slot, arrs in s.live.state.items():
        for name, a in arrs.items():
            arrays[f"state/{slot}/{name}"], table[f"state/{slot}/{name}"] = a, ["state", slot, name]
    for name, a in (s.last_delta or {}).items():
        arrays[f"last_delta/{name}"], table[f"last_delta/{name}"] = a, ["last_delta", "", name]
    for name, a in s.clocks.items():  # sparse rows: the step each row of a lazy parameter is current through
        arrays[f"clock/{name}"], table[f"clock/{name}"] = a, ["clock", "", name]
    return arrays, table


NOT_INSTALLED = "(not installed)"


def not_installed(name: str, slots) -> Registered:
    """What a session on disk names as its optimizer when no installed plugin provides it: enough to
    list the session and say why it cannot step (its slots as its files name them)."""
    def update(*args, **kwargs):
        raise RuntimeError(f"optimizer {name!r} is not installed")
    return Registered(Optimizer(name=name, summary="not installed on this server", update=update,
                                slots=tuple(Slot(n) for n in slots)), NOT_INSTALLED, "", "")


def schedule_meta(meta: dict, path) -> dict | None:
    """The metadata's schedule ({"name", "parameters"}: Journal.meta_of), None when it names none;
    CorruptFile when it is not of that form (its parameters are checked by the schedule itself).
    Shared with `optreg sessions export` files."""
    named = meta.get("schedule")
    if not named:
        return None
    if type(named) is not dict or type(named.get("name")) is not str or type(named.get("parameters")) is not dict \
            or not all(type(k) is str and type(v) in (int, float) for k, v in named["parameters"].items()):
        raise snapshot.CorruptFile(path, f"metadata schedule {str(named)[:80]!r}: must be {{name, parameters}}")
    return named


def check_meta(meta: dict, path) -> None:
    """Every metadata value a session is built from, of the type and in the range it must have: a
    checksum proves a file is as written, not that what was written is usable (a step of 2**70, a
    durability that does not exist). CorruptFile naming the file and the field otherwise. Shared by the
    data directory's snapshots and `optreg sessions export` files (optreg.app.sessionfile)."""
    def bad(field, rule):
        return snapshot.CorruptFile(path, f"metadata {field} {str(meta.get(field))[:80]!r}: {rule}")

    def number(v):
        return type(v) in (int, float) and math.isfinite(v)

    def count(v):
        return type(v) is int and v >= 0

    rules = {
        "session_id": (lambda v: type(v) is str, "must be a string"),
        "optimizer": (lambda v: type(v) is str, "must be a string"),
        "hyperparameters": (lambda v: type(v) is dict and all(type(k) is str and type(x) in (int, float, bool)
                                                               for k, x in v.items()), "must map names to numbers"),
        "step": (lambda v: type(v) is int and 0 <= v <= MAX_STEP, f"must be an integer in 0..{MAX_STEP}"),
        "master_dtype": (lambda v: v in DTYPE_CODES, f"must be one of {', '.join(DTYPE_CODES)}"),
        "reply": (lambda v: v in REPLIES, f"must be one of {', '.join(REPLIES)}"),
        "durability": (lambda v: v in DURABILITIES, f"must be one of {', '.join(DURABILITIES)}"),
        "periodic_steps": (count, "must be an integer >= 0"),
        "periodic_seconds": (lambda v: number(v) and v >= 0, "must be a number >= 0"),
        "created_at": (lambda v: v is None or number(v), "must be a time in seconds"),
        "shapes": (lambda v: type(v) is dict and v and all(
            type(k) is str and type(d) is list and len(d) <= 64 and all(count(n) for n in d) for k, d in v.items()),
            "must map parameter names to shapes (lists of integers >= 0)"),
        "slots": (lambda v: type(v) is list and all(type(x) is str for x in v), "must be a list of slot names"),
        "tensors": (lambda v: type(v) is dict and all(type(t) is list and len(t) == 3 and all(type(x) is str for x in t)
                                                      for t in v.values()), "must map keys to [kind, slot, name]"),
    }
    optional = {  # the data directory's alone
        "owner": (lambda v: type(v) is str, "must be a string"),
        "first_step": (lambda v: type(v) is int and 0 <= v <= MAX_STEP, f"must be an integer in 0..{MAX_STEP}"),
        "last_used_at": (lambda v: v is None or number(v), "must be a time in seconds"),
        "saved_at": (lambda v: v is None or number(v), "must be a time in seconds"),
        "round_record": (lambda v: v is None or type(v) is dict, "must be an object"),
        "worker_rounds": (lambda v: type(v) is dict and all(type(x) is int for x in v.values()),
                          "must map workers to rounds"),
        "worker_clocks": (lambda v: type(v) is dict and all(type(x) is int for x in v.values()),
                          "must map workers to clocks"),
    }
    if not isinstance(meta, dict):
        raise snapshot.CorruptFile(path, "metadata is not an object")
    for field, (ok, rule) in rules.items():
        if field not in meta:
            raise snapshot.CorruptFile(path, f"metadata has no {field}")
        if not ok(meta[field]):
            raise bad(field, rule)
    for field, (ok, rule) in optional.items():
        if field in meta and not ok(meta[field]):
            raise bad(field, rule)
    workers = meta.get("workers")
    if workers is not None:
        try:
            WorkerConfig(**workers).checked()
        except (TypeError, ValueError, InvalidArgument) as e:
            raise bad("workers", f"not a valid worker setup ({e})") from None


def check_against_meta(meta: dict, arrays: dict, path, clocks: dict | None = None,
                       slot_layouts: dict | None = None) -> tuple[dict, dict, dict | None]:
    """Split a snapshot's arrays into params, state and last delta, each checked against the metadata's
    shapes, slots and master dtype (a well-formed file that disagrees with itself is corrupt); sparse
    rows' clocks go into `clocks`. `slot_layouts` ({slot: {name: (shape, dtype)}}, Session.slot_layouts):
    the state arrays as the optimizer declares them; None (a client reading an export file, without the
    optimizer's definition): any shape and float dtype, checked by the server when the import creates
    the session (sessions/factory.py)."""
    dtype = np.dtype(meta["master_dtype"])
    shapes = {n: tuple(v) for n, v in meta["shapes"].items()}
    params, state, delta = {}, {s: {} for s in meta["slots"]}, {}
    for key, (kind, slot, name) in meta["tensors"].items():
        a = arrays.get(key)
        if a is None:
            raise snapshot.CorruptFile(path, f"tensor {key!r} named in the metadata is missing")
        if kind == "clock":
            shape = shapes.get(name, ())
            if len(shape) != 2 or a.shape != shape[:1] or a.dtype != np.int64 or (a.size and a.max() > meta["step"]):
                raise snapshot.CorruptFile(path, f"row clocks {key!r} do not fit parameter {name!r}")
            if clocks is not None:
                clocks[name] = np.array(a)
            continue
        want = (shapes.get(name, ()), dtype)
        if kind == "state" and slot_layouts is None and a.dtype.kind in "fV":
            want = (a.shape, a.dtype)  # (bfloat16 is numpy kind "V")
        elif kind == "state" and slot_layouts is not None and name in slot_layouts.get(slot, {}):
            want = slot_layouts[slot][name]
        if name not in shapes or a.shape != want[0] or a.dtype != want[1]:
            raise snapshot.CorruptFile(path, f"tensor {key!r} is {a.dtype} {list(a.shape)}, but the metadata says "
                                             f"{want[1]} {list(want[0])}")
        if kind == "params":
            params[name] = a
        elif kind == "state" and slot in state:
            state[slot][name] = a
        elif kind == "last_delta":
            delta[name] = a
        else:
            raise snapshot.CorruptFile(path, f"tensor {key!r}: unknown kind or slot")
    if set(params) != set(shapes) or any(set(v) != set(shapes) for v in state.values()):
        raise snapshot.CorruptFile(path, "the tensors do not cover every parameter and slot")
    return params, state, delta or None


# Chunks at least this large are written by the log's writer thread, overlapped with the step's update
# and the next chunk's transfer; smaller ones inline (a thread hand-off would cost more than the write).
BACKGROUND_WRITE = 256 << 10
_writer = None


def _background():
    global _writer
    if _writer is None:
        from concurrent.futures import ThreadPoolExecutor
        # Two: a memory log's mapped chunks are copied in parallel (wal.RecordWriter._add_mapped); the
        # chunks of one tensor may reach the file in either order (each names its offset).
        _writer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="optreg-log")
    return _writer


class _Record:
    """A step's log record, written as its gradients arrive (see steps/run.py StepRun). Whole small tensors
    wait (copied) while nothing of the record is written: a record of only those (a small unary step's)
    goes out at commit as one wal.Log.append; anything else opens a wal.RecordWriter, which writes the
    rest as it comes."""

    def __init__(self, journal: "Journal", session: Session, lg: wal.Log, step: int, fence, hp, extras: dict,
                 results: bool):
        self.journal, self.session, self.log, self.results = journal, session, lg, results
        self.step, self.fence, self.hp, self.extras = step, fence, hp, extras
        self.writer: wal.RecordWriter | None = None
        self.hyperparameters = None  # None: those given to begin()
        self.waiting: list = []  # (name, dtype, shape, bytes) of whole small tensors, while there is no writer
        self.waiting_bytes = 0
        self.nbytes = 0
        self.pending: list = []
        self.open = True
        journal.count_open(session, +1)

    def _closed(self) -> None:
        if self.open:
            self.open = False
            self.journal.count_open(self.session, -1)

    def _failed(self, e: Exception) -> Exception:
        """A write's failure as the refusal to send: the log closed under the record means its session
        was deleted meanwhile (a new session may hold the id, with a log of its own)."""
        if self.log.closed:
            return NotFound(f"session {self.session.id} was deleted while step {self.step} was in flight; "
                            "it was not applied")
        return write_failed(self.session, e, f"the log record of step {self.step}") if isinstance(e, OSError) else e

    def _writer(self) -> wal.RecordWriter:
        """The record's writer, opened (its BEGIN frame pending) with the tensors that waited."""
        if self.writer is None:
            try:
                self.writer = self.log.begin(self.step, self.fence, self.hp, self.extras)
                for name, dtype, shape, data in self.waiting:
                    self.writer.add(name, dtype, shape, 0, data)
            except (OSError, ValueError) as e:
                raise self._failed(e) from None
            self.waiting = []
        return self.writer

    def add(self, name, code, shape, start, data) -> None:
        if self.results:
            return
        self.nbytes += data.nbytes
        if (self.writer is None and start == 0 and data.size == math.prod(shape)
                and self.waiting_bytes + data.nbytes <= wal.DEFER_BYTES):
            self.waiting.append((name, tensors.DTYPES[code], shape, data.tobytes()))
            self.waiting_bytes += data.nbytes
            return
        writer = self._writer()
        if data.nbytes >= BACKGROUND_WRITE:
            dtype = tensors.DTYPES[code]
            parts = [(start, data)]
            if self.log.mapped and data.nbytes >= 2 * wal.MAPPED_PARALLEL:  # copied into memory by two threads
                half = data.size // 2
                parts = [(start, data[:half]), (start + half, data[half:])]
            for at, part in parts:
                self.pending.append(_background().submit(writer.add, name, dtype, shape, at, part))
            return
        self._settle()
        try:
            writer.add(name, tensors.DTYPES[code], shape, start, data)
        except (OSError, ValueError) as e:
            raise self._failed(e) from None

    def _settle(self) -> None:
        """Wait for the chunks handed to the writer thread; raise the first failure."""
        pending, self.pending = self.pending, []
        error = None
        for f in pending:
            e = f.exception()
            error = error or e
        if error is not None:
            raise self._failed(error)

    def add_array(self, key: str, array: np.ndarray) -> None:
        """A whole array the step needs replayed with it (a sparse step's rows and values)."""
        self.nbytes += array.nbytes
        writer = self._writer()
        self._settle()
        try:
            writer.add(key, array.dtype, array.shape, 0, np.ascontiguousarray(array).reshape(-1))
        except (OSError, ValueError) as e:
            raise self._failed(e) from None

    def renumber(self, step: int, hyperparameters: dict) -> None:
        """An unfenced step learns its number, and the hyperparameters it ran with, at commit."""
        self.step, self.hyperparameters = step, hyperparameters

    def commit(self, arrays: Arrays | None = None) -> None:
        try:
            if self.writer is None and not self.results:
                hp = self.hp if self.hyperparameters is None else self.hyperparameters
                self.log.append(self.step, self.fence, hp, self.extras, self.waiting)
            else:
                writer = self._writer()
                self._settle()
                if self.results and arrays is not None:  # not deterministic: log what it computed
                    for name, p in arrays.params.items():
                        writer.add(f"p/{name}", p.dtype, p.shape, 0, p.reshape(-1))
                    for slot, arrs in arrays.state.items():
                        for name, a in arrs.items():
                            writer.add(f"s/{slot}/{name}", a.dtype, a.shape, 0, a.reshape(-1))
                writer.commit(self.step, hyperparameters=self.hyperparameters,
                              extras={**self.extras, "kind": "result"} if self.results else None)
        except OSError as e:
            self._abort_writer()
            raise write_failed(self.session, e, f"the log record of step {self.step}") from None
        except BaseException:
            self._abort_writer()
            raise
        self._closed()
        if self.journal.metrics:
            self.journal.metrics.log_record(self.nbytes)

    def _abort_writer(self) -> None:
        if self.writer is not None:
            self.writer.abort()
        self._closed()

    def abort(self) -> None:
        try:
            self._settle()
        except Exception:
            pass  # the record is void either way
        self._abort_writer()


class _Chain:
    """A session's logs in order (disk, memory set aside, memory), read as one at the start."""

    def __init__(self, logs: list):
        self.logs = logs

    @property
    def last_step(self) -> int:
        return max(lg.last_step for lg in self.logs)

    def last_settings(self):
        for lg in reversed(self.logs):
            got = lg.last_settings()
            if got is not None:
                return got
        return None

    def close(self) -> None:
        for lg in self.logs:
            lg.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _Mem:
    """A `log` session's disk side while its records go to a memory log (Journal._logs): the disk log,
    the memory log set aside while the writer brings the disk up to it, the step the disk holds (snapshot
    and disk log, fsync'd) and when each later step was committed (the window of exposure)."""

    def __init__(self, disk: wal.Log, prev: wal.Log | None):
        self.disk, self.prev = disk, prev
        # The memory log the disk caught up with, kept with its pages and mapping for the next rotation
        # (wal.Log.recycle): a steady session allocates no memory-log pages after its first cycles.
        self.spare: wal.Log | None = None
        self._copies: dict = {}  # copy_of's buffers
        self.disk_step = disk.last_step
        self.session: Session | None = None
        self.times: collections.deque = collections.deque()  # (step, monotonic time) of steps not on disk
        self.error: OSError | None = None  # the disk writer's last failure (a full disk), until it succeeds
        self.retry_at = 0.0
        # The disk side's writes: the writer's, and a snapshot taken under the session's lock (taken in
        # that order: session lock, then this one; the writer never holds both). Reentrant: a snapshot
        # replacing a broken log closes the logs under it.
        self.lock = threading.RLock()

    def copy_of(self, arrays: dict) -> dict:
        """A copy of `arrays` (the state a snapshot writes while the steps go on), into the buffers of the
        last copy where they fit: fresh ones would fault their pages in under the session's lock each cycle."""
        kept, out = self._copies, {}
        for key, a in arrays.items():
            b = kept.get(key)
            if b is None or b.shape != a.shape or b.dtype != a.dtype:
                b = np.empty_like(a)
            np.copyto(b, a)
            out[key] = b
        self._copies = out
        return out

    def memory_bytes(self, cur: wal.Log | None) -> int:
        return (cur.log_bytes if cur is not None else 0) + (self.prev.log_bytes if self.prev is not None else 0)


class Journal:
    """A data directory: DIR/sessions/<id>.safetensors and <id>.wal for every durable session."""

    def __init__(self, root: pathlib.Path, metrics=None, syncer: GroupSyncer | None = None,
                 max_open_logs: int = MAX_OPEN_LOGS, memory_dir: str | None = None,
                 max_exposure: float = MAX_EXPOSURE):
        self.dir = pathlib.Path(root) / "sessions"
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in pathlib.Path(root).glob(".*.tmp"):  # the index's write cut short by a crash (those
            stale.unlink(missing_ok=True)                 # in self.dir: _files)
        self.metrics = metrics
        self.syncer = syncer or GroupSyncer()
        self._logs: dict[str, wal.Log] = {}
        self.pool = wal.LogPool(max_open_logs)  # the logs' descriptors: opened on use, the idle closed
        self._snapshot_at: dict[str, float] = {}
        self._kinds: dict[int, tuple] = {}  # during scan(): what sessions of one index kind share
        self.read_files = 0  # sessions the last scan() read from their files (not from the index)
        self.unsynced: set[str] = set()  # close(): sessions whose logs' last sync failed
        # session -> its steps whose log records are open. By the object, not the id: a deleted session's
        # stream may still hold a record (of its own, closed log) while a new session takes the id.
        self._inflight: dict[Session, int] = {}
        self._queued: dict[Session, int] = {}  # session -> its hyperparameter changes waiting for them
        self._turns = threading.Condition(threading.Lock())  # guards both; notified as they empty
        # `log` sessions' memory logs (memlog.py): None when there is no usable tmpfs (records to the disk log).
        self.root = pathlib.Path(root)
        self.memory, why, self.memory_lost = memlog.folder(root, memory_dir)
        self.max_exposure = float(max_exposure)
        if self.memory is None:
            (log.warning if memory_dir else log.info)(
                "log durability without a memory log: %s; each record goes to the disk log before the reply "
                "(fsync'd within a second)", why)
            self.memory_cap = 0
        else:
            st = os.statvfs(self.memory)
            self.memory_cap = int(st.f_bavail * st.f_frsize * MEMORY_SHARE)
            log.info("log durability: records go to memory logs in %s (up to %.0f MiB), the disk follows behind "
                     "(a power loss loses at most about %g s of steps, --max-exposure-seconds)", self.memory,
                     self.memory_cap / (1 << 20), self.max_exposure)
        self._mem: dict[str, _Mem] = {}
        self.memory_bytes = 0  # pages of every memory log (preallocated ones too), as the writer last counted them
        self._saved = threading.Condition(threading.Lock())  # notified after each pass of the writer
        self._writer_thread: threading.Thread | None = None
        self._stopping = False
        self._trace = os.environ.get(TRACE_ENV)
        self.budget = None  # the store's MemoryBudget: the memory logs' bytes are charged to it
        self._charged = 0

    def count_open(self, session: Session, delta: int) -> None:
        with self._turns:
            n = self._inflight.get(session, 0) + delta
            if n > 0:
                self._inflight[session] = n
            else:
                self._inflight.pop(session, None)
                self._turns.notify_all()

    def busy(self, s: Session) -> bool:
        """Whether a step of `s` may wait here beyond one write() of its record: a hyperparameter change
        queued, a log to mend, a snapshot due (or close), an fsync (every-step) or a window's snapshot
        (periodic). The asyncio server runs small steps only of sessions that are not (rpc/aio.py)."""
        if s.durability.mode in ("every-step", "periodic") or s in self._queued:
            return True
        m = self._mem.get(s.id)
        if m is not None:
            return self._pressed(s, m)
        lg = self._logs.get(s.id)
        return lg is not None and (lg.broken is not None
                                   or lg.log_bytes + 2 * s.set_bytes() >= max(LOG_MIN, LOG_FACTOR * s.set_bytes()))

    def wait_turn(self, session: Session) -> None:
        """A step about to begin (not holding its session's lock) waits while a hyperparameter change of
        the session waits for the steps before it: the change goes first, so steps cannot starve it."""
        if session in self._queued:  # (a dict read: nothing on a step's path otherwise)
            with self._turns:
                self._turns.wait_for(lambda: session not in self._queued)
        m = self._mem.get(session.id)
        if m is not None and self._pressed(session, m):  # back-pressure: the disk writer is behind
            with self._saved:
                while self._mem.get(session.id) is m and self._pressed(session, m) and not self._stopping:
                    if m.error is not None:  # the disk refuses (full): so is the step, as without a memory log
                        raise write_failed(session, m.error, f"bringing the disk up to step {session.step} "
                                                             "(the steps not on disk reached their bound)")
                    self._saved.wait(0.1)

    def _pressed(self, s: Session, m: _Mem) -> bool:
        """Whether `s`'s next step must wait for the disk writer: the oldest step not on disk is older than
        --max-exposure-seconds, or its memory logs (or all of them) hold as much as they may."""
        times = m.times
        if times and time.monotonic() - times[0][1] >= self.max_exposure:
            return True
        mine = m.memory_bytes(self._logs.get(s.id))
        return bool(mine) and (mine >= max(LOG_MIN, SESSION_MEMORY * s.set_bytes())
                               or self.memory_bytes >= self.memory_cap
                               or (self.budget is not None and self.budget.over))

    def exposure(self, s: Session) -> tuple[int, float]:
        """(steps, seconds) a power loss would lose now: steps acknowledged but not yet on disk, and the age
        of the oldest of them. (0, 0.0) for a session whose records reach the disk before the reply."""
        m = self._mem.get(s.id)
        if m is None:
            return 0, 0.0
        times = m.times
        oldest = times[0][1] if times else None
        return max(0, s.step - m.disk_step), (time.monotonic() - oldest) if oldest is not None else 0.0

    def wait_for_steps(self, s: Session, timeout: float | None) -> None:
        """Caller holds s's lock: return, holding it, once no step of s has its log record open. The
        lock is let go meanwhile (their commits need it), and steps not yet begun wait (wait_turn): a
        change to the session's snapshot queues behind the steps in flight, which began with the
        values in force before it. DeadlineExceeded if `timeout` seconds pass first."""
        if not self._inflight.get(s):
            return
        end = None if timeout is None else time.monotonic() + timeout
        with self._turns:
            self._queued[s] = self._queued.get(s, 0) + 1
        try:
            while self._inflight.get(s):
                s.lock.release()
                try:
                    with self._turns:
                        done = self._turns.wait_for(lambda: not self._inflight.get(s),
                                                    None if end is None else end - time.monotonic())
                finally:
                    s.lock.acquire()
                if not done:
                    raise errors.DeadlineExceeded(
                        f"session {s.id}: the call's deadline passed while a step of it was in flight (this "
                        "change waits for it); nothing was changed: retry, or give the call a longer deadline")
        finally:
            with self._turns:
                n = self._queued.pop(s) - 1
                if n:
                    self._queued[s] = n
                self._turns.notify_all()

    def snapshot_path(self, session_id: str) -> pathlib.Path:
        return self.dir / f"{session_id}{SNAPSHOT}"

    def log_path(self, session_id: str) -> pathlib.Path:
        return wal.path_for(self.dir, session_id)

    # -- snapshots ------------------------------------------------------------------------
    def _snapshot(self, s: Session, hyperparameters: dict | None = None) -> None:
        """Write the session's snapshot, then empty its log. Caller holds its lock; its set is loaded.
        OSError (EBUSY) before anything is written while a step's log record is open: the log cannot
        be emptied under it, and that step commits hyperparameters resolved before this snapshot."""
        if self._inflight.get(s):
            raise OSError(errno.EBUSY, "a step of this session is in flight (its log record is open)")
        m = self._mem.get(s.id)
        with m.lock if m is not None else contextlib.nullcontext():  # (the disk writer's cycle is done)
            self._snapshot_locked(s, hyperparameters, m)

    def _snapshot_locked(self, s: Session, hyperparameters: dict | None, m: _Mem | None) -> None:
        arrays, table = snapshot_arrays(s)
        meta = dict(meta_of(s, hyperparameters), tensors=table, saved_at=time.time())
        durable = True
        try:
            size = snapshot.write(self.snapshot_path(s.id), meta, arrays)
        except snapshot.RenameNotDurable as e:  # the file holds this state: it is written, not yet durable
            log.error("session %s: %s; its log is kept", s.id, e, extra={"session_id": s.id})
            durable, size = False, self.snapshot_path(s.id).stat().st_size
        lg = self._logs.get(s.id)
        if lg is not None and durable and lg.broken is not None:  # mend(): the snapshot replaces it
            self._close_log(s.id, delete=True)
            if s.durability.mode in SYNC:
                self._open_log(s.id, s.step, s.durability.mode)
        elif lg is not None and durable:  # (not durable: the log keeps covering the previous file)
            if s.durability.mode in SYNC:
                try:
                    if m is not None:  # the disk log and the memory log set aside: covered too
                        self._covered(s, m, s.step)
                    lg.reset(s.step)
                except (OSError, ValueError) as e:
                    # The snapshot is written: it holds the whole state (a hyperparameter change
                    # included) and covers every record in the log, which recovery skips. The log is
                    # only left longer; the next snapshot empties it.
                    log.error("session %s: the log was not emptied after the snapshot at step %d: %s", s.id,
                              s.step, e, extra={"session_id": s.id})
            else:  # the mode has no log now: the snapshot is the whole state
                self._close_log(s.id, delete=True)
        elif lg is None and s.durability.mode in SYNC:
            self._open_log(s.id, s.step, s.durability.mode)
        s.dirty = False
        s.persisted_step = s.step
        s.persisted_at = time.monotonic()
        self._snapshot_at[s.id] = time.monotonic()
        if self.metrics:
            self.metrics.checkpoint(size)

    def memory_path(self, session_id: str, prev: bool = False) -> pathlib.Path:
        return self.memory / f"{session_id}{wal.SUFFIX}{'.prev' if prev else ''}"

    def spare_path(self, session_id: str) -> pathlib.Path:
        """A memory log kept for its pages (_Mem.spare): all it holds is on disk, and recovery never reads it."""
        return self.memory / f"{session_id}{wal.SUFFIX}.spare"

    def _open_log(self, session_id: str, base_step: int, mode: str, keep: bool = True):
        """The session's log (created empty at `base_step` if missing; emptied at `base_step` if it ends
        before it: a crash between a snapshot and its log's reset), kept in `_logs` if `keep`. A `log`
        session with a memory log: its disk log, then its memory logs (_Chain); with `keep` the memory log
        (created if missing) is returned and kept in `_logs`, the rest in `_mem`."""
        opened = []
        try:
            lg = wal.Log.open(self.log_path(session_id), session_id, base_step=base_step, sync=SYNC[mode],
                              syncer=self.syncer, pool=self.pool)
            opened.append(lg)
            if lg.last_step < base_step:
                lg.reset(base_step)
            if self.memory is None or mode != "log":
                if keep:
                    self._logs[session_id] = lg
                return lg
            if keep:  # (a spare left by a server killed: nothing in it is needed)
                self.spare_path(session_id).unlink(missing_ok=True)
            for prev in (True, False):
                path = self.memory_path(session_id, prev)
                if path.exists() or (keep and not prev):
                    base = max(x.last_step for x in opened)
                    mem = wal.Log.open(path, session_id, base_step=base, sync="none", pool=self.pool, salvage=True)
                    if mem.base_step > base:  # the one before it was damaged (cut): its records cannot follow
                        log.error("session %s: memory log %s holds steps %d..%d, which cannot follow step %d (the "
                                  "memory log before it was damaged): they are lost", session_id, path,
                                  mem.base_step + 1, mem.last_step, base, extra={"session_id": session_id})
                        mem.close()
                        path.unlink()
                        if prev or not keep:
                            continue
                        mem = wal.Log.open(path, session_id, base_step=base, sync="none", pool=self.pool)
                    opened.append(mem)
                    if mem.last_step < base:  # older than the disk: covered (a crash before it was emptied)
                        mem.reset(base)
        except BaseException:
            for lg in opened:
                lg.close()
            raise
        if not keep:
            return _Chain(opened)
        self._mem[session_id] = _Mem(opened[0], opened[1] if len(opened) == 3 else None)
        self._logs[session_id] = opened[-1]
        return opened[-1]

    def _chain(self, session_id: str) -> list:
        """A loaded session's logs, in the order their records follow each other."""
        m, lg = self._mem.get(session_id), self._logs.get(session_id)
        if m is None:
            return [lg] if lg is not None else []
        return [m.disk] + ([m.prev] if m.prev is not None else []) + ([lg] if lg is not None else [])

    def _close_log(self, session_id: str, delete: bool = False) -> None:
        m = self._mem.get(session_id)
        with m.lock if m is not None else contextlib.nullcontext():  # (not under the disk writer)
            lg = self._logs.pop(session_id, None)
            # Memory logs go with the session, or once the disk holds all they hold (else they stay for the
            # next start: a stop whose last snapshot failed).
            covered = m is not None and (lg is None or lg.last_step <= m.disk_step)
            self._mem.pop(session_id, None)
            for x in ([lg] if lg is not None else []) + ([m.disk, m.prev, m.spare] if m else []):
                if x is not None:
                    x.close()
        if delete:
            self.log_path(session_id).unlink(missing_ok=True)
        if self.memory is not None:
            self.spare_path(session_id).unlink(missing_ok=True)
            if delete or covered:
                for prev in (False, True):
                    self.memory_path(session_id, prev).unlink(missing_ok=True)

    # -- the store's calls --------------------------------------------------------------
    def create(self, s: Session) -> None:
        if s.durability.mode == "none":
            return
        self._close_log(s.id, delete=True)  # a leftover of a deleted session of the same id
        self._snapshot(s)

    def mend(self, s: Session) -> None:
        """Caller holds the lock; its set is loaded. A log whose sync failed may have lost data
        (fsyncgate), so it refuses every record; memory holds exactly the session's acknowledged
        steps, so a snapshot of it and a new, empty log stand for all the broken log held. If that
        fails too (the disk still failing), the log stays broken and the step is refused as before."""
        lg = self._logs.get(s.id)
        if lg is None or lg.broken is None or self._inflight.get(s):
            return
        try:
            self._snapshot(s)
        except OSError as e:
            log.error("session %s: its log is unusable (%s) and a snapshot to replace it failed: %s", s.id,
                      lg.broken, e, extra={"session_id": s.id})
            return
        log.warning("session %s: its log was unusable (%s); replaced by a snapshot at step %d and a new log", s.id,
                    lg.broken, s.step, extra={"session_id": s.id})

    def begin(self, s: Session, step: int, fence, hp, metrics, extras=None):
        lg = self._logs.get(s.id)
        if lg is None:  # periodic or none: no log
            return _WindowGate(self, s) if s.durability.mode == "periodic" else NULL_RECORD
        extras = dict(extras or {})  # a shared session's round (rounds.py) rides in its step's record
        if metrics:
            extras["metrics"] = metrics
        extras = extras or None
        results = not getattr(s.optimizer.definition, "deterministic", True)
        if lg.broken is not None:  # refused before any work (mend could not replace it)
            raise write_failed(s, lg.broken, f"the log record of step {step}")
        return _Record(self, s, lg, step, fence, hp, extras or {}, results)

    def after_commit(self, s: Session) -> None:
        """Caller holds the lock; the step is committed (and logged as its mode says)."""
        mode = s.durability
        m = self._mem.get(s.id)
        if m is not None:  # in the memory log: the disk writer takes it from here
            if m.session is not s:
                m.session, s.unsaved = s, (lambda: self.exposure(s))
            m.times.append((s.step, time.monotonic()))
            self._start_writer()
            return
        lg = self._logs.get(s.id)
        if lg is not None:
            s.persisted_step = s.step
            if lg.log_bytes >= max(LOG_MIN, LOG_FACTOR * s.set_bytes()):
                self._try_snapshot(s)
            return
        if mode.mode == "periodic" and (s.step - s.persisted_step >= mode.periodic_steps
                                        or time.monotonic() - s.persisted_at >= mode.periodic_seconds):
            self._try_snapshot(s)

    @staticmethod
    def window_overdue(s: Session) -> bool:
        """A periodic session whose window closed without a snapshot (it failed)."""
        mode = s.durability
        return s.dirty and (s.step - s.persisted_step >= mode.periodic_steps
                            or time.monotonic() - s.persisted_at >= mode.periodic_seconds)

    def _try_snapshot(self, s: Session) -> None:
        """A snapshot the step does not depend on: a failure is logged, and tried again later."""
        if self._inflight.get(s):  # another step of the session is in flight: after it
            return
        try:
            self._snapshot(s)
        except OSError as e:
            log.error("session %s: snapshot at step %d failed: %s", s.id, s.step, e, extra={"session_id": s.id})

    def hyperparameters(self, s: Session, hp: dict) -> None:
        """A change outside a step: on disk (a snapshot holding it) before it is applied."""
        if s.durability.mode == "none":
            return
        try:
            self._snapshot(s, hp)
        except OSError as e:
            raise write_failed(s, e, "the hyperparameter change") from None

    def delete(self, s: Session) -> None:
        self._close_log(s.id, delete=True)
        self._snapshot_at.pop(s.id, None)
        try:
            self.snapshot_path(s.id).unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.dir)

    def flush(self, s: Session) -> None:
        """A snapshot now if anything changed since the last (clean stop, unload)."""
        if s.durability.mode != "none" and s.live is not None and (s.dirty or self._log_bytes(s.id)):
            self._snapshot(s)

    def unload(self, s: Session) -> None:
        """Caller holds the lock; the session was just flushed (its snapshot holds it all, its log is
        empty): close its log, kept for loaded sessions only (load opens it again)."""
        self._close_log(s.id)
        self._snapshot_at.pop(s.id, None)

    def _log_bytes(self, session_id: str) -> int:
        """Bytes of records after the snapshot: its log's (a memory log's, the disk's and the one set aside)."""
        return sum(lg.log_bytes for lg in self._chain(session_id))

    def tick(self, s: Session) -> None:
        """Janitor: periodic windows; a snapshot for an idle session whose log has waited long enough."""
        mode = s.durability
        now = time.monotonic()
        if mode.mode == "periodic":
            if s.dirty and now - s.persisted_at >= mode.periodic_seconds:
                self._snapshot(s)
        elif (s.id not in self._mem and self._log_bytes(s.id) and not self._inflight.get(s)
              and time.time() - s.last_used_at >= IDLE_SECONDS
              and now - self._snapshot_at.get(s.id, 0.0) >= SNAPSHOT_SECONDS):
            self._snapshot(s)

    def close(self) -> None:
        """Sync and close every log; `unsynced` gets the sessions whose logs may not hold what they
        acknowledged (a failed sync)."""
        self._stop_writer()
        for sid in list(self._logs):
            lg = self._logs[sid]
            self._close_log(sid)
            if lg.broken is not None:
                self.unsynced.add(sid)
        if self.memory is not None and not any(self.memory.glob(f"*{wal.SUFFIX}*")):
            memlog.remove(self.root)  # all on disk: a next start finding no folder is told apart from a power loss

    # -- the disk writer (log sessions with a memory log) -----------------------------------
    def _start_writer(self) -> None:
        if self._writer_thread is None and not self._stopping:
            self._writer_thread = threading.Thread(target=self._write_behind, name="optreg-disk-writer", daemon=True)
            self._writer_thread.start()

    def _stop_writer(self) -> None:
        self._stopping = True
        with self._saved:
            self._saved.notify_all()
        if self._writer_thread is not None:
            self._writer_thread.join()

    def _write_behind(self) -> None:
        """The writer thread: pass after pass over the sessions whose memory logs hold steps the disk does
        not, bringing the disk up to each (`_save`); the waiting steps are told after each pass."""
        while not self._stopping:
            total = unsaved = 0
            oldest = None
            for sid, m in list(self._mem.items()):
                s = m.session
                if s is not None and s.step > m.disk_step and time.monotonic() >= m.retry_at:
                    try:
                        self._save(s, m)
                        m.error = None
                    except Exception as e:  # (the disk failing: the memory log keeps every record meanwhile)
                        if m.error is None:
                            log.error("session %s: writing it to the disk failed (tried again each second): %s",
                                      sid, e, extra={"session_id": sid})
                        m.error = e if isinstance(e, OSError) else OSError(errno.EIO, str(e))
                        m.retry_at = time.monotonic() + 1.0
                total += sum(memlog.allocated(p) for p in (self.memory_path(sid), self.memory_path(sid, True),
                                                           self.spare_path(sid)))
                if s is not None:
                    unsaved += max(0, s.step - m.disk_step)
                    if m.times:
                        oldest = min(oldest or m.times[0][1], m.times[0][1])
            self.memory_bytes = total
            if self.budget is not None and total != self._charged:
                if total > self._charged:
                    self.budget.charge(total - self._charged)
                else:
                    self.budget.release(self._charged - total)
                self._charged = total
            if self.metrics:
                self.metrics.exposure(unsaved, 0.0 if oldest is None else time.monotonic() - oldest)
            with self._saved:
                self._saved.notify_all()
                if not self._stopping:
                    self._saved.wait(WRITE_PAUSE)

    def _save(self, s: Session, m: _Mem) -> None:
        """Bring the disk up to `s`'s step k: under the session's lock (briefly) the memory log is set aside
        (steps after k go to a new one) and, when the records to write outweigh a snapshot, the state is
        copied; then, holding only `m.lock`, the records are appended to the disk log and fsync'd, or the
        snapshot written (records it covers are never written). The set-aside log then goes."""
        with s.lock:
            lg = self._logs.get(s.id)
            if s.live is None or lg is None or self._mem.get(s.id) is not m or self._inflight.get(s):
                return  # (a step's record open: the next pass)
            k = s.step
            if k <= m.disk_step:
                return
            pending = m.memory_bytes(lg)
            snap = m.prev is not None or pending + m.disk.log_bytes > max(s.set_bytes(), 1 << 20)
            if snap:
                arrays, table = snapshot_arrays(s)
                arrays = m.copy_of(arrays)  # (the steps go on meanwhile)
                meta = dict(meta_of(s), tensors=table, saved_at=time.time())
            rotated = m.prev is None
            if rotated:  # set the memory log aside; the next steps go to a new one
                lg.rename(self.memory_path(s.id, prev=True))
                m.prev = lg
                lg = self._logs[s.id] = self._memory_log(s.id, m, k)
        records = m.prev.last_step - m.prev.base_step if rotated else 0
        if records and m.prev.log_bytes >= MAPPED_RECORDS * records:
            # Large records: the new log's pages allocated and mapped now, off the steps' path (kept from cycle to
            # cycle: _Mem.spare), for twice what the last cycle took and a few records more, within the bounds
            room = [2 * m.prev.log_bytes + 8 * (m.prev.log_bytes // records),
                    max(LOG_MIN, SESSION_MEMORY * s.set_bytes()) - m.prev.log_bytes,
                    self.memory_cap - self.memory_bytes]
            if self.budget is not None and self.budget.total:
                room.append((self.budget.total - self.budget.held) // 2)
            lg.map_ahead(min(room))
        with m.lock:
            if self._mem.get(s.id) is not m or m.disk_step >= k:
                return  # deleted, or a snapshot under the session's lock covered it meanwhile
            if snap:
                size = snapshot.write(self.snapshot_path(s.id), meta, arrays)
                if self.metrics:
                    self.metrics.checkpoint(size)
            else:
                for r in m.prev.records(after=m.disk_step):
                    m.disk.append(r.step, r.fence, r.hyperparameters, r.extras,
                                  [(n, a.dtype, a.shape, a.reshape(-1)) for n, a in r.tensors.items()])
                m.disk.sync_now()
            self._covered(s, m, k)
        s.persisted_step = k

    def _covered(self, s: Session, m: _Mem, k: int) -> None:
        """The disk holds `s` through step k (a snapshot at k, or the disk log's records up to it), fsync'd:
        the memory log set aside goes, and the steps through k leave the window. Caller holds m.lock."""
        if m.disk.last_step < k:  # a snapshot at k: the disk log starts again there
            m.disk.reset(k)
        if self._trace:
            self._trace_synced(m.disk.path)
        if m.prev is not None:
            prev, m.prev = m.prev, None
            if prev.mapped and m.spare is None and not prev.closed and self._spare_fits():  # the next rotation's log
                try:
                    prev.rename(self.spare_path(s.id))
                    m.spare = prev
                    prev = None
                except OSError:
                    pass
            if prev is not None:
                prev.close()
                prev.path.unlink(missing_ok=True)
        m.disk_step = k
        while m.times and m.times[0][0] <= k:
            m.times.popleft()

    def _spare_fits(self) -> bool:
        """Whether a memory log the disk caught up with may be kept for its pages: only with room to spare in
        every bound the memory logs count against, so that pages kept ahead never make steps wait."""
        return self.memory_bytes <= self.memory_cap // 2 and (
            self.budget is None or not self.budget.total or self.budget.held <= self.budget.total // 2)

    def _memory_log(self, sid: str, m: _Mem, base_step: int) -> wal.Log:
        """A new memory log for the steps after `base_step`: the spare used again, or a new file."""
        spare, m.spare = m.spare, None
        if spare is not None:
            try:
                spare.recycle(self.memory_path(sid), base_step)
                return spare
            except (OSError, ValueError) as e:
                log.warning("session %s: the spare memory log could not be used again (%s)", sid, e,
                            extra={"session_id": sid})
                spare.close()
                spare.path.unlink(missing_ok=True)
        return wal.Log.open(self.memory_path(sid), sid, base_step=base_step, sync="none", pool=self.pool)

    def _trace_synced(self, path: pathlib.Path) -> None:
        """Tests (power loss): append "<inode> <size> <path>" of a disk log just made durable, after its fsync."""
        st = os.stat(path)
        with open(self._trace, "a") as f:
            f.write(f"{st.st_ino} {st.st_size} {path}\n")

    # -- start and load -------------------------------------------------------------------
    def _files(self) -> set[str]:
        """The ids of the sessions with a snapshot, from one listing of the directory (whose leftovers
        of writes cut short by a crash go)."""
        found = set()
        with os.scandir(self.dir) as entries:
            for e in entries:
                name = e.name
                if name.startswith("."):
                    if name.endswith(".tmp"):
                        os.unlink(e.path)
                elif name.endswith(SNAPSHOT):
                    found.add(name[:-len(SNAPSHOT)])
        return found

    def _with_memory_logs(self) -> set[str]:
        """The ids of the sessions with a memory log (one listing of the memory folder)."""
        if self.memory is None:
            return set()
        with os.scandir(self.memory) as entries:
            names = [e.name for e in entries]
        return {n[:-len(end)] for n in names for end in (wal.SUFFIX, wal.SUFFIX + ".prev") if n.endswith(end)}

    def scan(self):
        """(session id, its snapshot metadata with "step" advanced past its log | the exception, the
        index's keys of its files | None) for every session in the directory, in id order: from the
        index (storage/index.py) without touching its files (the keys then say what to check at its
        first use: rescan), else read from its files (scan_one), as is a session with a memory log,
        which the index does not know. The directory is listed only when its names may differ from
        the index's. `self.read_files` counts the sessions read from their files."""
        self._kinds = {}
        self.read_files = 0
        try:
            indexed, folder = index.read(self.root) or ({}, None)
        except (ValueError, TypeError, KeyError, IndexError) as e:  # (json's errors are ValueErrors)
            log.warning("%s; reading every session's files instead", e)
            indexed, folder = {}, None
        ids = indexed.keys() if folder is not None and folder == index.folder_key(self.dir) else self._files()
        in_memory = self._with_memory_logs()
        for sid in sorted(ids):
            hit = indexed.get(sid)
            if hit is not None and sid not in in_memory:
                yield sid, hit[0], hit[1]
                continue
            self.read_files += 1
            try:
                yield sid, self.scan_one(sid), None
            except Exception as e:
                yield sid, e, None
        self._kinds = {}

    def rescan(self, sid: str, keys: list):
        """A session scan() took from the index, at its first use: None while its files are those the
        index recorded (a stat of each); else what scan() would yield for it now: its metadata read
        from its files or the exception (FileNotFoundError: its snapshot is gone)."""
        snap = index.file_key(self.snapshot_path(sid))
        if snap and snap + index.file_key(self.log_path(sid)) == keys:
            return None
        try:
            return self.scan_one(sid)
        except Exception as e:
            return e

    def write_index(self, sessions, unchecked: dict[str, list], whole: bool) -> None:
        """Record `sessions` (those of this directory, as in memory now: nothing may change them while
        this runs) in the index, each with its files' identity (`unchecked`'s keys for those whose
        files nothing has touched since scan(); the rest are stat'ed). Left out, to be read from
        their files at the next start: a periodic session's unsaved steps, and any session with a
        problem (a log whose last sync failed among them). `whole`: the directory holds no session
        but these (else, or with any left out, the next start lists it)."""
        folder = index.folder_key(self.dir)  # (writing the index leaves it alone: the index is beside it)
        metas = []
        for s in sessions:
            lg = self._logs.get(s.id)
            if s.durability.mode == "none":
                continue
            if (s.quarantined or s.missing or (s.dirty and s.durability.mode not in SYNC)
                    or (lg is not None and lg.broken is not None) or s.id in self.unsynced):
                whole = False
                continue
            keys = unchecked.get(s.id)
            if keys is None:
                keys = index.file_key(self.snapshot_path(s.id))
                if not keys:  # no files
                    continue
                keys += index.file_key(self.log_path(s.id))
            metas.append((meta_of(s), keys))
        index.write(self.root, metas, folder if whole else None)

    def scan_one(self, sid: str) -> dict:
        """One session's snapshot metadata, "step" advanced past its log (read, a torn tail cut, and
        closed again: a session's log is open while it is loaded, Journal.load)."""
        path = self.snapshot_path(sid)
        meta = snapshot.read_meta(path)
        check_meta(meta, path)
        if meta.get("session_id") != sid:
            raise snapshot.CorruptFile(path, f"it names session {meta.get('session_id')!r}, not {sid!r}")
        meta["log_error"] = ""
        meta["snapshot_step"] = int(meta["step"])  # (the step of the snapshot itself, before its log)
        if meta["durability"] in SYNC:
            try:
                with self._open_log(sid, int(meta["step"]), meta["durability"], keep=False) as lg:
                    if lg.last_step > int(meta["step"]):
                        meta["step"] = lg.last_step
                        meta["log_step"] = True
                        # ...and the hyperparameters in force, as its last record logged them (what
                        # GetSession shows before the session is loaded and replayed)
                        hp, extras = lg.last_settings()
                        if not extras.get(LR_SCALED):
                            meta["hyperparameters"] = hp
            except (wal.CorruptData, ValueError, OSError) as e:
                if errors.out_of_descriptors(e):  # the process's, not the file's: never a quarantine
                    raise
                meta["log_error"] = f"log {self.log_path(sid)}: {e}"
        return meta

    def session_from(self, meta: dict, registry) -> Session:
        """The unloaded session `meta` (checked by scan_one) describes; CorruptFile names a value its
        optimizer cannot take. A session whose optimizer is not installed is listed, with `missing`
        naming it, and served again once a server with that plugin starts."""
        kind = self._kinds.get(meta["kind"]) if "kind" in meta else None
        if kind is None:
            kind = self._kind(meta, registry)
            if "kind" in meta:  # sessions of one kind in the index share what it builds
                self._kinds[meta["kind"]] = kind
        registered, hp, code, durability, shapes, slots, schedule = kind
        s = Session(meta["session_id"], registered, hp, code, meta["reply"], durability, shapes, slots, schedule=schedule,
                    step=int(meta["step"]), first_step=int(meta.get("first_step", 0)), owner=meta.get("owner", ""),
                    created_at=float(meta["created_at"] or meta.get("saved_at") or 0.0),
                    last_used_at=float(meta.get("last_used_at") or meta.get("saved_at") or meta["created_at"] or 0.0))
        if meta.get("workers") is not None:
            s.workers = WorkerConfig.from_meta(meta["workers"])
        s.round_record = meta.get("round_record")
        if meta.get("worker_rounds"):
            s.worker_rounds = dict(meta["worker_rounds"])
        if meta.get("worker_clocks"):
            s.worker_clocks = dict(meta["worker_clocks"])
        s.persisted_step = s.step
        s.dirty = False
        if meta.get("log_error"):
            s.quarantined = f"{meta['log_error']} (files kept: {self.snapshot_path(s.id)}, {self.log_path(s.id)})"
        if registered.plugin == NOT_INSTALLED:
            s.missing = meta["optimizer"]
        elif meta.get("schedule") and schedule is None:  # listed, kept, and served once a server has it
            s.missing = f"schedule {meta['schedule']['name']}"
        return s

    def _kind(self, meta: dict, registry) -> tuple:
        """(optimizer, resolved hyperparameters, dtype code, durability, shapes, slots) of `meta`."""
        name = meta["optimizer"]
        if name not in registry.optimizers:
            # (numbers only: the log's last values replace the checked ones, and listing must not fail)
            registered = not_installed(name, meta["slots"])
            hp = {k: v for k, v in meta["hyperparameters"].items() if type(v) in (int, float, bool)}
        else:
            registered = registry.get(name)
            try:
                hp = registered.definition.resolve(meta["hyperparameters"])
            except HyperparameterError as e:
                raise snapshot.CorruptFile(self.snapshot_path(meta["session_id"]),
                                           f"metadata hyperparameters: {e}") from None
        defn = registered.definition
        if meta["slots"] != [s.name for s in defn.slots]:
            raise snapshot.CorruptFile(self.snapshot_path(meta["session_id"]),
                                       f"metadata slots {meta['slots']!r} are not {defn.name}'s")
        return (registered, hp, DTYPE_CODES[meta["master_dtype"]],
                Durability(meta["durability"], int(meta["periodic_steps"]), float(meta["periodic_seconds"])),
                {n: tuple(v) for n, v in meta["shapes"].items()}, tuple(meta["slots"]), self._schedule(meta, registry))

    def _schedule(self, meta: dict, registry) -> SessionSchedule | None:
        """The schedule `meta` names, its parameters checked as CreateSession checks them; None when it
        names none, or one no installed plugin provides (session_from marks the session missing)."""
        path = self.snapshot_path(meta["session_id"])
        named = schedule_meta(meta, path)
        if named is None:
            return None
        if named["name"] not in registry.schedules:
            return None
        registered = registry.schedule(named["name"])
        try:
            return SessionSchedule(registered, registered.definition.resolve(named["parameters"]))
        except HyperparameterError as e:
            raise snapshot.CorruptFile(path, f"metadata schedule: {e}") from None

    def load(self, s: Session, budget, replay) -> None:
        """The snapshot, then every log record after it, replayed by `replay(session, record)` (the step's
        own commit, steps/replay.py through steps/commit.py). Caller holds the session's lock."""
        path = self.snapshot_path(s.id)
        target = s.step  # the step scan() found (snapshot + log)
        try:
            def build():
                meta, arrays = snapshot.read(path)
                clocks = {}
                params, state, delta = check_against_meta(meta, arrays, path, clocks, s.slot_layouts)
                problem = check_values(s.optimizer.definition, params, state)
                if problem:  # the same check as CreateSession's: a checksum does not make NaN usable
                    raise snapshot.CorruptFile(path, problem)
                s.last_delta = delta
                s.clocks = clocks
                s.step = int(meta["step"])
                s.hyperparameters = s.optimizer.definition.resolve(meta["hyperparameters"])
                return Arrays(params, state)
            s.live = budget.allocate(f"session {s.id}", s.set_bytes(), build)
            snapshot_step = s.step
            if self._logs.get(s.id) is None and s.durability.mode in SYNC:  # (the snapshot's step: s.step now)
                self._open_log(s.id, s.step, s.durability.mode)
            steps = []
            for lg in self._chain(s.id):  # disk log, then memory logs: one replay
                if lg.last_step > s.step:
                    for record in lg.records(after=s.step):
                        replay(s, record)
                steps.append(s.step)
            if s.step != target:
                raise snapshot.CorruptFile(path, f"recovered step {s.step}, but the files named step {target}")
        except BaseException as e:
            s.live = None
            s.step = target
            self._close_log(s.id)
            if isinstance(e, (snapshot.CorruptData, ValueError, KeyError)):
                raise RuntimeError(f"{e} (files kept: {path}, {self.log_path(s.id)})") from None
            raise
        s.dirty = False
        m = self._mem.get(s.id)
        if m is not None:
            m.session, s.unsaved = s, (lambda: self.exposure(s))
            now = time.monotonic()
            m.times.extend((t, now) for t in range(m.disk_step + 1, s.step + 1))
            if self.memory_lost:  # the memory folder did not survive: the disk is all there is
                log.warning("session %s: recovered to step %d from the disk alone (snapshot at step %d, disk log "
                            "to step %d); there was no memory log (the machine restarted): if the last server did "
                            "not stop cleanly, steps it acknowledged after step %d are lost (at most about "
                            "--max-exposure-seconds of them)", s.id, s.step, snapshot_step, steps[0], s.step,
                            extra={"session_id": s.id, "step": s.step})
            else:
                log.info("session %s: recovered to step %d (snapshot %d, disk log to %d, memory log to %d)", s.id,
                         s.step, snapshot_step, steps[0], steps[-1], extra={"session_id": s.id, "step": s.step})
            if s.step > m.disk_step:
                self._start_writer()
