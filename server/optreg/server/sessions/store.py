"""The session store: the index of sessions and who owns each, their lifecycle (create, load,
unload, delete), and the hooks every step calls (journal, metrics, observers).

Locking: the store's `_lock` guards the index only; a session's tensors are touched under
that session's own lock. Nothing holds the store lock while taking a session's lock, and
eviction only *tries* other sessions' locks, so there is no lock order to get wrong.

Token rule: a session belongs to the token that created it and is invisible to every
other token (PERMISSION_DENIED, whether or not it exists). A session created while the
server had no tokens has no owner and stays open to every token.
"""
from __future__ import annotations

import bisect
import gc
import logging
import threading
import time


from optreg.plugins import HyperparameterError
from optreg.plugins.registry import Registry
from optreg.server.model.budget import MemoryBudget
from optreg.server.model.errors import (AlreadyExists, DataLoss, FailedPrecondition, InvalidArgument, NotFound,
                                  PermissionDenied, Refused, Unavailable, out_of_descriptors, shown, write_failed)
from optreg.server.sessions.factory import Limits, SessionConfig, SessionFactory
from optreg.server.steps import sparse_rows as sparse
from optreg.server.steps.replay import replay
from optreg.server.storage.journal import NoJournal
from optreg.server.model.session import SPARE_MIN_BYTES, Arrays, Session, SetPool

log = logging.getLogger("optreg.server.sessions.store")
# A start that had to read this many sessions' files (not in the data directory's index, or changed
# since it was written: a crash) writes the index anew, so the next start need not read them again.
REINDEX_AFTER = 1000


class SessionStore:
    def __init__(self, registry: Registry, journal=None, *, budget: MemoryBudget | None = None,
                 limits: Limits = Limits(), default_durability: str | None = None, periodic_steps: int = 100,
                 periodic_seconds: float = 30.0, idle_seconds: float = 0.0, max_loaded: int = 0, auth: bool = False,
                 metrics=None):
        self.registry = registry
        self.journal = journal or NoJournal()
        self.budget = budget or MemoryBudget(0)
        self.journal.budget = self.budget  # (memory logs count against it)
        self.budget.make_room = self._make_room
        self.limits = limits
        has_disk = not isinstance(self.journal, NoJournal)
        self.factory = SessionFactory(registry, self.budget, limits,
                                      default_durability or ("log" if has_disk else "none"), has_disk,
                                      periodic_steps, periodic_seconds)
        self.idle_seconds = idle_seconds
        self.max_loaded = max_loaded  # durable sessions in memory at most (0: no bound); the janitor unloads
        self.auth = auth
        self.metrics = metrics
        self.observers: list = []  # objects with on_step(session, run, seconds) / on_refused / on_delete
        self._sessions: dict[str, Session] = {}
        self._ids: list[str] = []  # the keys of _sessions, sorted: ListSessions' pages (page)
        # The indexed sessions whose tensors are in memory, and how many are durable: kept as sessions
        # come, go, load and unload, so the janitor, eviction and the gauges never walk every session.
        self._loaded: dict[str, Session] = {}
        self._durable = 0
        self._unreadable: dict[str, str] = {}  # id -> why its files could not be read at start
        # id -> its files' keys as the data directory's index recorded them, for the sessions taken from
        # it at start and not used since: their first use checks the files (_checked).
        self._unchecked: dict[str, list] = {}
        self._checking = threading.Lock()
        self._lock = threading.Lock()
        self.pool = SetPool()  # small sets, recycled across steps and sessions (allocate_set, recycle)

    # -- access ------------------------------------------------------------
    def missing(self, session_id: str) -> Refused:
        if self.auth:  # the same answer whether the session is absent or another token's
            return PermissionDenied(f"session {shown(session_id)} does not exist or belongs to another token")
        return NotFound(f"session {shown(session_id)} not found")

    def index_of(self, session: Session) -> Session | None:
        return self._sessions.get(session.id)

    def get(self, session_id: str, owner: str = "") -> Session:
        """The session's record (its tensors may be unloaded)."""
        if not session_id:
            raise InvalidArgument("session_id is empty: pass the id CreateSession returned")
        session = self._sessions.get(session_id)
        if session is not None and session_id in self._unchecked:
            session = self._checked(session)
        if session is None and session_id in self._unreadable:
            raise DataLoss(f"session {shown(session_id)} could not be loaded at start: "
                           f"{shown(self._unreadable[session_id], 600)}; its files are kept")
        if session is None or (self.auth and session.owner and session.owner != owner):
            raise self.missing(session_id)
        return session

    def list(self, owner: str = "") -> list[Session]:
        with self._lock:
            return [s for s in self._sessions.values() if not self.auth or not s.owner or s.owner == owner]

    def page(self, owner: str, after: str, limit: int) -> tuple[list[Session], bool]:
        """(the sessions `owner` may see with ids after `after`, in id order, at most `limit` of them
        (0: all), and whether sessions with later ids exist). Each call costs its page (plus other
        owners' ids skipped), not the whole index."""
        out = []
        with self._lock:
            ids = self._ids
            i = bisect.bisect_right(ids, after)
            while i < len(ids) and (not limit or len(out) < limit):
                s = self._sessions[ids[i]]
                i += 1
                if not self.auth or not s.owner or s.owner == owner:
                    out.append(s)
            more = i < len(ids)
        if self._unchecked:  # (after a start: the first listing of a session checks its files)
            out = [c for c in (self._checked(s) if s.id in self._unchecked else s for s in out) if c is not None]
        return out, more

    def _checked(self, session: Session) -> Session | None:
        """`session` as its files have it now: at the first use of a session taken from the data
        directory's index at start, a stat of its files must match the index's record, else it is read
        from them again (a crash after the index was written; a file changed while no server ran) and
        replaced in the index; None when its snapshot is gone or its files cannot be read (then
        `_unreadable` says why)."""
        with self._checking:  # (one reader of a session's files at a time; not the index lock)
            keys = self._unchecked.get(session.id)
            if keys is None or self._sessions.get(session.id) is not session:  # checked meanwhile
                return self._sessions.get(session.id)
            found = self.journal.rescan(session.id, keys)
            if found is not None and not isinstance(found, Exception):
                try:
                    found = self.journal.session_from(found, self.registry)
                except Exception as e:
                    found = e
            with self._lock:
                del self._unchecked[session.id]
                if found is None:
                    return session
                self._unindexed(session.id)
                if not isinstance(found, Exception):
                    self._indexed(found)
                    return found
            if not isinstance(found, FileNotFoundError):
                log.error("session %s not loaded: %s", session.id, found, extra={"session_id": session.id})
                self._unreadable[session.id] = f"{type(found).__name__}: {found}"
            return None

    def _indexed(self, session: Session) -> None:
        """Caller holds _lock: `session` enters the index (in place of one of the same id)."""
        self._unindexed(session.id)
        self._sessions[session.id] = session
        bisect.insort(self._ids, session.id)
        self._durable += session.durability.mode != "none"
        if session.live is not None:
            self._loaded[session.id] = session

    def _unindexed(self, session_id: str) -> None:
        """Caller holds _lock: the id leaves the index."""
        session = self._sessions.pop(session_id, None)
        self._unchecked.pop(session_id, None)
        if session is not None:
            del self._ids[bisect.bisect_left(self._ids, session_id)]
            self._durable -= session.durability.mode != "none"
            self._loaded.pop(session_id, None)

    def _loaded_now(self, session: Session, loaded: bool) -> None:
        """`session`'s tensors were just read in (or dropped)."""
        with self._lock:
            if not loaded:
                if self._loaded.get(session.id) is session:
                    del self._loaded[session.id]
            elif self._sessions.get(session.id) is session:
                self._loaded[session.id] = session

    def list_loaded(self) -> list[Session]:
        with self._lock:
            return list(self._loaded.values())

    def list_all(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def ensure_loaded(self, session: Session) -> None:
        """Caller holds the session's lock: its tensors in memory, or DATA_LOSS / NOT_FOUND."""
        if self._sessions.get(session.id) is not session:  # deleted (maybe re-created) while we waited
            raise self.missing(session.id)
        if session.missing:
            what = session.missing if session.missing.startswith("schedule ") else f"optimizer {shown(session.missing)}"
            raise FailedPrecondition(
                f"session {session.id} needs {what}, which is not installed on this "
                "server: install the plugin that provides it (`optreg optimizers` lists what is installed) and restart "
                "the server; the session's files are kept")
        if session.quarantined:
            raise DataLoss(f"session {session.id} is quarantined: {session.quarantined}")
        session.last_used_at = time.time()
        if session.live is None:
            self._load(session)

    def read(self, session_id: str, owner: str = ""):
        """(session, its live set marked read, the step it holds): read the set outside the lock, then
        `done_reading`."""
        session = self.get(session_id, owner)
        with session.lock:
            self.ensure_loaded(session)
            arrays = sparse.read_view(self, session)  # the live set, or dense-equivalent copies of lazy rows
            return session, arrays, session.step

    @staticmethod
    def done_reading(session: Session, arrays: Arrays) -> None:
        with session.lock:
            arrays.readers -= 1
            sparse.done_reading(arrays)

    def allocate_set(self, session: Session, what: str) -> Arrays:
        """A set for a copy of `session`'s tensors (contents undefined: the caller overwrites all of it)."""
        nbytes = session.set_nbytes
        if nbytes < SPARE_MIN_BYTES:
            arrays = self.pool.take(session.layout)
            if arrays is not None:
                return arrays
        return self.budget.allocate(f"{what} of session {session.id}", nbytes, session.live.blank)

    def recycle(self, session: Session, arrays: Arrays) -> None:
        """Caller holds the session's lock: a set nobody reads any more (replaced by a commit, or an
        unfinished step's staging) becomes a later step's staging: the session's spare when large,
        the store's pool when small."""
        if arrays.readers:
            return
        nbytes = session.set_nbytes
        if nbytes >= SPARE_MIN_BYTES:
            session.keep_spare(arrays)
        else:
            self.pool.give(session.layout, arrays, nbytes)

    # -- lifecycle -----------------------------------------------------------
    def create(self, config: SessionConfig, params, state=None, initial_step: int = 0, owner: str = "",
               adopt: bool = False) -> Session:
        session = self.factory.build(config, params, state, initial_step, owner, adopt)
        if session.id in self._unchecked:  # (are its files still there?)
            self._checked(self._sessions[session.id])
        with self._lock:
            existing = self._sessions.get(session.id)
            if existing is not None:
                if self.auth and existing.owner and existing.owner != owner:
                    raise self.missing(session.id)
                why = f" (it needs optimizer {shown(existing.missing)}, not installed here)" if existing.missing else ""
                raise AlreadyExists(f"session {session.id} already exists{why}; attach to it, or delete it first")
            if session.id in self._unreadable:
                raise FailedPrecondition(
                    f"session {session.id} has files in the data directory that could not be loaded "
                    f"({self._unreadable[session.id]}); install what it needs and restart, or move them away")
            self._indexed(session)
        with session.lock:
            try:
                self.journal.create(session)
            except OSError as e:  # not created after all: a retry with the same id works
                with self._lock:
                    self._unindexed(session.id)
                raise write_failed(e, f"session {session.id}") from None
        log.info("session %s created: %s, durability %s", session.id, session.optimizer.definition.name,
                 session.durability.mode, extra={"session_id": session.id, "step": initial_step})
        self._gauges()
        return session

    def delete(self, session_id: str, owner: str = "") -> None:
        session = self.get(session_id, owner)
        with session.lock:
            if self._sessions.get(session_id) is not session:
                raise self.missing(session_id)
            self.journal.delete(session)  # the files go before the index entry
            with self._lock:
                self._unindexed(session_id)
            session.live = session.spare = session.last_delta = None
        for o in self.observers:
            o.on_delete(session)
        log.info("session %s deleted", session_id, extra={"session_id": session_id})
        self._gauges()

    def set_hyperparameters(self, session_id: str, values: dict, owner: str = "",
                            timeout: float | None = None) -> Session:
        """Change them for the steps to come; a durable session's steps in flight commit first, with the
        values they began with (waited for up to `timeout` seconds, then DeadlineExceeded)."""
        session = self.get(session_id, owner)
        with session.lock:
            self.journal.wait_for_steps(session, timeout)  # lets the lock go while it waits
            self.ensure_loaded(session)
            try:
                hp = session.optimizer.definition.resolve(values, base=session.hyperparameters)
            except HyperparameterError as e:
                raise InvalidArgument(str(e)) from None
            settled = None
            if sparse.owes(session):  # rows owed steps catch up with the hyperparameters those steps ran with
                settled, old = sparse.settled_copy(self, session), (session.live, session.clocks)
                session.live, session.clocks = settled, {}  # what the snapshot holds
            try:
                self.journal.hyperparameters(session, hp)  # on disk first: a failed write changes nothing
            except BaseException:
                if settled is not None:
                    session.live, session.clocks = old
                raise
            if settled is not None:
                session.live, session.clocks = old
                sparse.swap(session, settled)
            session.hyperparameters = hp
        return session

    # -- the step's hooks (steps/run.py StepRun) ---------------------------------------
    def after_commit(self, session: Session) -> None:
        """Caller holds the lock; the step is committed."""
        self.journal.after_commit(session)

    def stepped(self, session: Session, run, seconds: float) -> None:
        if self.metrics:
            self.metrics.step(seconds, run.result.replayed)
        for o in self.observers:
            o.on_step(session, run)

    def refused(self, session: Session, run) -> None:
        for o in self.observers:
            o.on_refused(session, run)

    # -- loading and unloading --------------------------------------------
    def open_all(self) -> int:
        """Register every session in the data directory, unloaded (read on first use)."""
        # Nothing built here is garbage, and the cyclic collector would scan every session registered so
        # far, again and again: half of a 100,000-session start. Off meanwhile; then those sessions (and
        # the modules) are left out of its later scans (gc.freeze: they live as long as the process).
        collecting = gc.isenabled()
        gc.disable()
        try:
            self._open_all()
        finally:
            if collecting:
                gc.enable()
            gc.freeze()
        if self.journal.read_files >= REINDEX_AFTER:
            t = time.monotonic()
            try:
                self._write_index()
            except OSError as e:
                log.warning("the data directory's index was not written: %s", e)
            log.info("%d sessions' files read at start; their index written in %.1f s", self.journal.read_files,
                     time.monotonic() - t)
        self._gauges()
        return len(self._sessions)

    def _open_all(self) -> None:
        for sid, meta_or_error, keys in self.journal.scan():
            if out_of_descriptors(meta_or_error):  # the process's limit, not the session's files: stop
                raise OSError(meta_or_error.errno, f"reading the data directory ({sid}): {meta_or_error.strerror}; "
                                                   "raise the descriptor limit (ulimit -n) or lower --max-open-logs")
            if isinstance(meta_or_error, Exception):
                log.error("session %s not loaded: %s", sid, meta_or_error, extra={"session_id": sid})
                self._unreadable[sid] = str(meta_or_error)  # its id stays taken: nothing overwrites its files
                continue
            try:
                session = self.journal.session_from(meta_or_error, self.registry)
            except Exception as e:
                log.error("session %s not loaded: %s", sid, e, extra={"session_id": sid})
                self._unreadable[sid] = f"{type(e).__name__}: {e}"
                continue
            with self._lock:
                self._indexed(session)
                if keys is not None:
                    self._unchecked[sid] = keys

    def _write_index(self) -> None:
        with self._lock:
            sessions, unchecked = list(self._sessions.values()), dict(self._unchecked)
        self.journal.write_index(sessions, unchecked, whole=not self._unreadable)

    def _load(self, session: Session) -> None:
        """Read the session's tensors from disk. Caller holds its lock."""
        try:
            self.journal.load(session, self.budget, replay)
        except Refused:
            raise
        except Exception as e:
            if out_of_descriptors(e):  # the process ran out, not the files: refused for now, never quarantined
                log.warning("session %s not loaded: %s", session.id, e, extra={"session_id": session.id})
                raise Unavailable(f"session {session.id} could not be loaded now ({e.strerror}): the server is "
                                  "out of file descriptors or memory; nothing was changed: retry") from None
            session.quarantined = f"its files could not be read: {e}"
            log.error("session %s quarantined: %s", session.id, e, extra={"session_id": session.id})
            raise DataLoss(f"session {session.id} is quarantined: {session.quarantined}") from None
        log.info("session %s loaded at step %d", session.id, session.step,
                 extra={"session_id": session.id, "step": session.step})
        self._loaded_now(session, True)
        self._gauges()

    def _unload(self, session: Session) -> bool:
        """Write and drop the tensors of an idle durable session. Caller holds its lock."""
        if (session.live is None or session.durability.mode == "none" or session.live.readers
                or session.resident is not None or self._sessions.get(session.id) is not session):
            return False
        self.journal.flush(session)
        self.journal.unload(session)
        # (their budget goes when they are collected; load reads the last delta back from the snapshot; a
        # bf16_delta session's copy of its client's parameters goes too: its next answer is the parameters)
        session.live = session.spare = session.last_delta = session.reply_copy = session.last_reply = None
        self._loaded_now(session, False)
        log.info("session %s unloaded at step %d", session.id, session.step,
                 extra={"session_id": session.id, "step": session.step})
        self._gauges()
        return True

    def _make_room(self, nbytes: int) -> bool:
        """Free memory for a reservation: drop the pooled small sets and idle sessions' spare sets, then
        unload idle durable ones."""
        if self.pool.clear():  # no cycles hold them: their budget is released as the references go
            return True
        candidates = sorted((s for s in self.list_loaded() if s.live is not None), key=lambda s: s.last_used_at)
        for s in candidates:
            if s.lock.acquire(blocking=False):
                try:
                    if s.spare is not None:
                        s.spare = None
                        return True
                    if self._unload(s):
                        return True
                except OSError as e:
                    log.error("session %s could not be unloaded: %s", s.id, e)
                finally:
                    s.lock.release()
        return False

    def flush_all(self) -> list[tuple[str, str]]:
        """At shutdown (nothing may change the sessions any more): write every session with unsaved
        changes, close the journal (every log synced), then write the data directory's index of every
        session. Tries every one; returns the failures."""
        failures = []
        for s in self.list_loaded():
            if s.durability.mode == "none" or s.live is None:
                continue
            with s.lock:
                try:
                    if self._sessions.get(s.id) is s and s.live is not None:
                        self.journal.flush(s)
                except Exception as e:
                    log.error("session %s could not be written at shutdown: %s", s.id, e,
                              extra={"session_id": s.id})
                    failures.append((s.id, str(e)))
        self.journal.close()
        try:
            self._write_index()
        except OSError as e:  # the next start reads every session's files instead
            log.error("the data directory's index was not written: %s", e)
        return failures

    def tick(self) -> None:
        """Janitor: periodic snapshots past their window, idle sessions unloaded, and the least recently
        used ones while more than `max_loaded` are in memory."""
        now = time.time()
        loaded = self.list_loaded()
        if self.max_loaded and len(loaded) > self.max_loaded:
            loaded.sort(key=lambda s: s.last_used_at)
            for s in loaded[:len(loaded) - self.max_loaded]:
                if s.durability.mode != "none" and s.lock.acquire(blocking=False):
                    try:
                        self._unload(s)
                    except OSError as e:
                        log.error("session %s could not be unloaded: %s", s.id, e, extra={"session_id": s.id})
                    finally:
                        s.lock.release()
        for s in loaded:
            if s.live is None or s.durability.mode == "none" or not s.lock.acquire(blocking=False):
                continue
            try:
                if self.idle_seconds and now - s.last_used_at >= self.idle_seconds:
                    self._unload(s)
                elif self._sessions.get(s.id) is s and s.live is not None:
                    self.journal.tick(s)
            except OSError as e:
                log.error("session %s: background write failed: %s", s.id, e, extra={"session_id": s.id})
            finally:
                s.lock.release()

    def _gauges(self) -> None:
        if self.metrics:
            self.metrics.sessions(len(self._loaded), self._durable, self.budget.held)
