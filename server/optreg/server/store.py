"""The session store: every session, in memory or on disk, its durability, idle unloading
and the memory budget.

Locking: the store's `_lock` guards the index and the byte count only; a session's
tensors are touched only under that session's own lock (`use()`), which also loads
them when they were unloaded. Nothing holds the store lock while taking a session's
lock, and eviction only *tries* other sessions' locks, so there is no lock order to
get wrong.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid

import grpc
import numpy as np

from optreg.plugins import HyperparameterError
from optreg.plugins.registry import Registry
from optreg.server import storage as fmt
from optreg.server.errors import RequestError, invalid, not_found
from optreg.server.sessions import DT, MASTER_DTYPES, REPLY, Session, check_finite
from optreg.v1 import session_pb2, tensor_pb2

log = logging.getLogger("optreg.server.store")

DUR = session_pb2.Durability
DTYPE_NAMES = {DT.DATA_TYPE_FLOAT32: "float32", DT.DATA_TYPE_FLOAT64: "float64"}
DTYPE_CODES = {v: k for k, v in DTYPE_NAMES.items()}


def resource_exhausted(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


class SessionStore:
    def __init__(self, registry: Registry, storage: fmt.Storage | None = None, *,
                 default_durability: int | None = None, periodic_steps: int = 100,
                 periodic_seconds: float = 30.0, idle_seconds: float = 0.0, memory_budget: int = 0,
                 auth: bool = False, metrics=None):
        self.registry = registry
        self.storage = storage
        if default_durability is None:
            default_durability = DUR.DURABILITY_EVERY_STEP if storage else DUR.DURABILITY_NONE
        self.default_durability = default_durability
        self.periodic_steps = periodic_steps
        self.periodic_seconds = periodic_seconds
        self.idle_seconds = idle_seconds
        self.memory_budget = memory_budget
        self.auth = auth
        self.metrics = metrics
        self._sessions: dict[str, Session] = {}
        self._unreadable: dict[str, str] = {}  # id -> why its file in the data dir could not be loaded
        self._lock = threading.Lock()
        self.loaded_bytes = 0
        self._stop = threading.Event()
        self._janitor: threading.Thread | None = None
        self.on_delete: list = []  # callables(session_id), run after a session is deleted

    # -- access ------------------------------------------------------------
    def _missing(self, session_id: str) -> RequestError:
        if self.auth:  # the same answer whether the session is absent or another token's
            return RequestError(grpc.StatusCode.PERMISSION_DENIED,
                                f"session {session_id!r} does not exist or belongs to another token")
        return not_found(f"session {session_id!r} not found")

    def get(self, session_id: str, owner: str = "") -> Session:
        """The session's record (its tensors may be unloaded: use `use()` to touch them)."""
        if not session_id:
            raise invalid("session_id is empty: pass the id CreateSession returned")
        session = self._sessions.get(session_id)
        if session is None or (self.auth and session.owner != owner):
            raise self._missing(session_id)
        return session  # last_used_at counts uses of the tensors only (use()), not info reads

    @contextlib.contextmanager
    def use(self, session_id: str, owner: str = "", session: Session | None = None):
        """Hold the session's lock with its tensors in memory (loading them if needed)."""
        session = session or self.get(session_id, owner)
        with session.lock:
            if self._sessions.get(session.id) is not session:  # deleted (maybe re-created) while we waited
                raise self._missing(session.id)
            session.last_used_at = time.time()
            if not session.loaded:
                self._load(session)
            yield session
            session.last_used_at = time.time()

    def list(self, owner: str = "") -> list[Session]:
        with self._lock:
            return [s for s in self._sessions.values() if not self.auth or s.owner == owner]

    def delete(self, session_id: str, owner: str = "") -> None:
        session = self.get(session_id, owner)
        with session.lock:
            if self._sessions.get(session_id) is not session:
                raise self._missing(session_id)
            # The file goes before the index entry: a create of the same id can only start after.
            if self.storage and session.persisted_step >= 0:
                self.storage.delete(session_id)
            with self._lock:
                self._sessions.pop(session_id, None)
                if session.loaded:
                    self.loaded_bytes -= session.nbytes
            session.params = session.state = session.last_delta = None
            session.__dict__.pop("_optreg_shadow", None)
        for callback in self.on_delete:
            callback(session_id)
        log.info("session %s deleted", session_id, extra={"session_id": session_id})
        self._gauges()

    # -- creation ----------------------------------------------------------
    def create(self, config: session_pb2.SessionConfig, params: dict[str, np.ndarray],
               state: dict[str, dict[str, np.ndarray]] | None = None, initial_step: int = 0,
               owner: str = "") -> Session:
        try:
            registered = self.registry.get(config.optimizer)
        except KeyError as e:
            raise not_found(e.args[0]) from None
        defn = registered.definition
        try:
            hp = defn.resolve(dict(config.hyperparameters))
        except HyperparameterError as e:
            raise invalid(str(e)) from None
        if not params:
            raise invalid("parameters is empty: a session needs at least one named tensor")
        if config.session_id and not fmt.valid_id(config.session_id):
            raise invalid(f"session_id {config.session_id!r}: use 1-128 letters, digits, '_', '-' or '.', "
                          "not starting with '.' or '-'")
        master = config.master_dtype
        if master == DT.DATA_TYPE_UNSPECIFIED:
            first = next(iter(params.values())).dtype
            master = DT.DATA_TYPE_FLOAT64 if first == np.float64 else DT.DATA_TYPE_FLOAT32
        if master not in MASTER_DTYPES:
            raise invalid(f"config.master_dtype {tensor_pb2.DataType.Name(master)} is not supported; "
                          "use DATA_TYPE_FLOAT32 or DATA_TYPE_FLOAT64")
        if config.step_reply not in REPLY.values():
            raise invalid(f"config.step_reply {config.step_reply} is not a StepReply value")
        if initial_step < 0:
            raise invalid(f"initial_step {initial_step} is negative")
        durability, p_steps, p_seconds = self._durability(config)
        dtype = MASTER_DTYPES[master]
        step_reply = config.step_reply or REPLY.STEP_REPLY_PARAMETERS
        state = state or {}
        declared = [s.name for s in defn.slots]
        extra = set(state) - set(declared)
        if extra:
            raise invalid(f"state slot(s) {', '.join(sorted(extra))} unknown to {defn.name}; "
                          f"it keeps: {', '.join(sorted(declared)) or 'none'}")
        if state and set(state) != set(declared):
            raise invalid(f"state must give every slot of {defn.name} ({', '.join(sorted(declared))}) or none")
        for name, p in params.items():
            if not name:
                raise invalid("a parameter has an empty name")
        need = sum(int(np.prod(np.shape(p), dtype=np.int64)) for p in params.values()) * dtype.itemsize * (
            1 + len(declared) + (step_reply == REPLY.STEP_REPLY_DELTA))
        self._reserve(need, None)
        try:
            master_params = {}
            for name, p in params.items():
                master_params[name] = np.array(p, dtype=dtype, order="C", copy=True)
                check_finite(name, master_params[name])
            slots = {}
            for slot in defn.slots:
                given = state.get(slot.name)
                if given is not None and set(given) != set(params):
                    raise invalid(f"state slot {slot.name!r} must have exactly the parameters' names")
                arrays = {}
                for name, p in master_params.items():
                    if given is None:
                        arrays[name] = np.full(p.shape, slot.initial_value, dtype=dtype)
                    else:
                        if tuple(given[name].shape) != p.shape:
                            raise invalid(f"state {slot.name}/{name}: shape {list(given[name].shape)}, "
                                          f"expected {list(p.shape)}")
                        arrays[name] = np.array(given[name], dtype=dtype, order="C", copy=True)
                slots[slot.name] = arrays
            session_id = config.session_id or uuid.uuid4().hex
            session = Session(session_id, registered, hp, master, step_reply, master_params, slots,
                              step=initial_step, durability=durability, periodic_steps=p_steps,
                              periodic_seconds=p_seconds, owner=owner, nbytes=need)
            with self._lock:
                existing = self._sessions.get(session_id)
                if existing is not None:
                    if self.auth and existing.owner != owner:
                        raise self._missing(session_id)
                    raise RequestError(grpc.StatusCode.ALREADY_EXISTS, f"session {session_id!r} already exists")
                if session_id in self._unreadable:
                    raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                       f"session {session_id!r} has a file in the data directory that could not be "
                                       f"loaded ({self._unreadable[session_id]}); install what it needs and "
                                       "restart, or move the file away")
                self._sessions[session_id] = session
        except BaseException:
            with self._lock:
                self.loaded_bytes -= need
            raise
        with session.lock:
            if session.durability != DUR.DURABILITY_NONE:
                try:
                    self._save(session)
                except OSError as e:  # not created after all: forget it, so a retry with the same id works
                    with self._lock:
                        self._sessions.pop(session_id, None)
                        self.loaded_bytes -= need
                    raise RequestError(grpc.StatusCode.UNAVAILABLE,
                                       f"session {session_id!r} could not be written to disk ({e}); "
                                       "nothing was created, retry") from None
        log.info("session %s created: %s, %s", session_id, defn.name, DUR.Name(durability),
                 extra={"session_id": session_id, "step": initial_step})
        self._gauges()
        return session

    def _durability(self, config) -> tuple[int, int, float]:
        d = config.durability or self.default_durability
        if d not in DUR.values():
            raise invalid(f"config.durability {d} is not a Durability value")
        if d != DUR.DURABILITY_NONE and self.storage is None:
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"durability {DUR.Name(d)} needs a server started with --data-dir; this one "
                               "keeps sessions in memory only (use DURABILITY_NONE)")
        if config.periodic_steps < 0 or config.periodic_seconds < 0 or not np.isfinite(config.periodic_seconds):
            raise invalid("periodic_steps and periodic_seconds must be >= 0 (0: the server's default)")
        if d != DUR.DURABILITY_PERIODIC:
            return d, 0, 0.0
        return d, config.periodic_steps or self.periodic_steps, config.periodic_seconds or self.periodic_seconds

    # -- durability ------------------------------------------------------
    def after_change(self, session: Session) -> None:
        """Apply the session's durability after a step or a change. Caller holds its lock.

        Called after replays too: a step applied but not yet on disk (a failed write) is
        written before its retry is acknowledged.
        """
        due = session.dirty and (
            session.durability == DUR.DURABILITY_EVERY_STEP
            or (session.durability == DUR.DURABILITY_PERIODIC
                and (session.step - session.persisted_step >= session.periodic_steps
                     or time.monotonic() - session.persisted_at >= session.periodic_seconds)))
        if not due:
            return
        try:
            self._save(session)
        except OSError as e:
            # UNAVAILABLE: the client retries the same step, which replays it and writes it then.
            log.error("session %s: checkpoint failed: %s", session.id, e, extra={"session_id": session.id})
            raise RequestError(grpc.StatusCode.UNAVAILABLE,
                               f"session {session.id!r} is at step {session.step} but could not be written to "
                               f"disk ({e}); retry the same step to have it written") from None

    def _save(self, session: Session) -> None:
        """Write the session's file. Caller holds its lock; its tensors are loaded."""
        data = fmt.encode(self._meta(session), session.params, session.state, session.last_delta)
        self.storage.save(session.id, data)
        session.dirty = False
        session.persisted_step = session.step
        session.persisted_at = time.monotonic()
        if self.metrics:
            self.metrics.checkpoint(len(data))
        log.debug("session %s checkpointed at step %d", session.id, session.step,
                  extra={"session_id": session.id, "step": session.step})

    @staticmethod
    def _meta(s: Session) -> dict:
        return {"session_id": s.id, "optimizer": s.optimizer.definition.name, "plugin": s.optimizer.plugin,
                "hyperparameters": {k: float(v) for k, v in s.hyperparameters.items()}, "step": s.step,
                "master_dtype": DTYPE_NAMES[s.master_code], "step_reply": REPLY.Name(s.step_reply),
                "created_at": s.created_at, "owner": s.owner, "durability": DUR.Name(s.durability),
                "periodic_steps": s.periodic_steps, "periodic_seconds": s.periodic_seconds,
                "shapes": {n: list(v) for n, v in s.shapes.items()}, "slots": list(s.slot_names),
                "saved_at": time.time()}

    def flush_all(self) -> int:
        """Write every session with unsaved changes (on SIGTERM); returns how many."""
        n = 0
        for s in self.list_all():
            if s.durability != DUR.DURABILITY_NONE and s.dirty and s.loaded:
                with s.lock:
                    if s.loaded and s.dirty and s.id in self._sessions:
                        self._save(s)
                        n += 1
        return n

    def list_all(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    # -- loading and unloading --------------------------------------------
    def open_all(self) -> int:
        """Register every session file in the data directory, unloaded (read on first use)."""
        if not self.storage:
            return 0
        for sid in self.storage.ids():
            try:
                meta = self.storage.meta(sid)
                session = self._from_meta(meta)
                if session.id != sid:
                    raise ValueError(f"it names session {session.id!r}, not its file name's {sid!r}")
            except Exception as e:  # one bad file must not keep the others away
                log.error("session file %s not loaded: %s", self.storage.path(sid), e, extra={"session_id": sid})
                # Keep its id taken, so no new session overwrites a checkpoint someone may still want.
                self._unreadable[sid] = str(e)
                continue
            self._sessions[sid] = session
        log.info("%d session(s) found in %s", len(self._sessions), self.storage.dir)
        self._gauges()
        return len(self._sessions)

    def _from_meta(self, meta: dict) -> Session:
        registered = self.registry.get(meta["optimizer"])  # KeyError names the optimizer
        hp = registered.definition.resolve(meta["hyperparameters"])
        s = Session(meta["session_id"], registered, hp, DTYPE_CODES[meta["master_dtype"]],
                    REPLY.Value(meta["step_reply"]), None, None, step=int(meta["step"]),
                    created_at=float(meta["created_at"]), owner=meta.get("owner", ""),
                    durability=DUR.Value(meta["durability"]), periodic_steps=int(meta["periodic_steps"]),
                    periodic_seconds=float(meta["periodic_seconds"]),
                    shapes={n: tuple(v) for n, v in meta["shapes"].items()}, slot_names=list(meta["slots"]))
        s.persisted_step = s.step
        s.dirty = False
        return s

    def _load(self, session: Session) -> None:
        """Read the session's tensors from disk. Caller holds its lock."""
        self._reserve(session.nbytes, session)
        try:
            meta, params, state, delta = self.storage.load(session.id)
            if int(meta["step"]) != session.step:
                raise RuntimeError(f"file holds step {meta['step']}, expected {session.step}")
            session.params, session.state, session.last_delta = params, state, delta
        except BaseException as e:
            with self._lock:
                self.loaded_bytes -= session.nbytes
            if isinstance(e, RequestError):
                raise
            log.error("session %s: loading failed: %s", session.id, e, extra={"session_id": session.id})
            raise RequestError(grpc.StatusCode.DATA_LOSS,
                               f"session {session.id!r} could not be read from disk: {e}") from None
        log.info("session %s loaded at step %d", session.id, session.step,
                 extra={"session_id": session.id, "step": session.step})
        self._gauges()

    def _unload(self, session: Session) -> bool:
        """Write and drop the tensors of an idle durable session. Caller holds its lock."""
        if (not session.loaded or session.durability == DUR.DURABILITY_NONE
                or self._sessions.get(session.id) is not session):
            return False
        if session.dirty:
            self._save(session)
        session.params = session.state = session.last_delta = None
        session.__dict__.pop("_optreg_shadow", None)  # the streamed step's second copy goes too
        with self._lock:
            self.loaded_bytes -= session.nbytes
        log.info("session %s unloaded at step %d", session.id, session.step,
                 extra={"session_id": session.id, "step": session.step})
        self._gauges()
        return True

    def _reserve(self, nbytes: int, for_session: Session | None) -> None:
        """Count `nbytes` against the memory budget, unloading idle sessions to make room."""
        tried: set[str] = set()
        while True:
            with self._lock:
                if not self.memory_budget or self.loaded_bytes + nbytes <= self.memory_budget:
                    self.loaded_bytes += nbytes
                    return
                victims = sorted((s for s in self._sessions.values()
                                  if s.loaded and s is not for_session and s.id not in tried
                                  and s.durability != DUR.DURABILITY_NONE), key=lambda s: s.last_used_at)
            if not victims:
                mib = 1 << 20
                raise resource_exhausted(
                    f"memory budget of {self.memory_budget / mib:.1f} MiB (--memory-budget-mb) is full: "
                    f"{self.loaded_bytes / mib:.1f} MiB held by loaded sessions, this needs {nbytes / mib:.1f} MiB "
                    "more; delete sessions, or make them durable so idle ones can be unloaded")
            v = victims[0]
            tried.add(v.id)
            if v.lock.acquire(blocking=False):
                try:
                    self._unload(v)
                finally:
                    v.lock.release()

    def check_budget(self, nbytes: int) -> None:
        """Refuse an incoming tensor of `nbytes` that could never fit (before allocating it)."""
        if self.memory_budget and nbytes > self.memory_budget:
            raise resource_exhausted(f"a tensor of {nbytes / (1 << 20):.1f} MiB exceeds the memory budget of "
                                     f"{self.memory_budget / (1 << 20):.1f} MiB (--memory-budget-mb)")

    # -- background work ---------------------------------------------------
    def start(self) -> None:
        if self.storage and self._janitor is None:
            self._janitor = threading.Thread(target=self._run_janitor, name="optreg-janitor", daemon=True)
            self._janitor.start()

    def stop(self) -> None:
        self._stop.set()
        if self._janitor:
            self._janitor.join()

    def _run_janitor(self) -> None:
        period = 0.5 if not self.idle_seconds else min(0.5, self.idle_seconds / 4)
        while not self._stop.wait(period):
            try:
                self.tick()
            except Exception:
                log.exception("background flush/unload failed")

    def tick(self) -> None:
        """Flush periodic sessions past their time window; unload idle ones."""
        now_wall, now = time.time(), time.monotonic()
        for s in self.list_all():
            if not s.loaded or s.durability == DUR.DURABILITY_NONE:
                continue
            idle = self.idle_seconds and now_wall - s.last_used_at >= self.idle_seconds
            due = (s.durability == DUR.DURABILITY_PERIODIC and s.dirty
                   and now - s.persisted_at >= s.periodic_seconds)
            if not (idle or due) or not s.lock.acquire(blocking=False):
                continue
            try:
                if idle and time.time() - s.last_used_at >= self.idle_seconds:
                    self._unload(s)
                elif s.loaded and s.dirty and s.id in self._sessions:
                    self._save(s)
            finally:
                s.lock.release()

    def _gauges(self) -> None:
        if self.metrics:
            with self._lock:
                loaded = sum(1 for s in self._sessions.values() if s.loaded)
                on_disk = sum(1 for s in self._sessions.values() if s.persisted_step >= 0)
            self.metrics.sessions(loaded, on_disk, self.loaded_bytes)
