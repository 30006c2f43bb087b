"""The session host: a detached, named Ray actor that owns many sessions.

One Ray actor per session would cost a process (~73 MB unique once optreg is imported: docs/scale-out.md,
"Why one actor per node"), so a host is one actor process per node holding many sessions, each owned
through its own epoch in storage (ownership.py); the unit of ownership is still the session.

Inside, the host is the single server's core: a SessionStore over a FencedJournal and the very
SessionServicer the gRPC server uses, called with the raw request bytes the front end received.
Every reply carries the session's epoch, so a front end can drop one from a superseded owner.
"""
from __future__ import annotations

import itertools
import logging
import os
import threading
import uuid

import grpc
import numpy as np

from optreg.plugins.registry import Registry
from optreg.server.model import budget as memory
from optreg.server.assembly import build_services
from optreg.server.rpc import telemetry as telemetry_service
from optreg.server.cluster import telemetry
from optreg.server.cluster.context import Abort, ActorContext
from optreg.server.cluster.feed import Feeds, FeedStopped
from optreg.server.cluster.fenced import FencedJournal
from optreg.server.cluster.ownership import EpochTaken, StaleOwner
from optreg.server.model.errors import AlreadyExists, NotFound, Refused
from optreg.server.storage.fsync import GroupSyncer
from optreg.server.sessions.janitor import Janitor
from optreg.server.telemetry.metrics import Metrics
from optreg.server.rpc.service import SessionServicer
from optreg.server.rpc.status import translate
from optreg.server.sessions.store import SessionStore
from optreg.v1 import session_pb2, telemetry_pb2

log = logging.getLogger("optreg.server.cluster")
CREATES = ("CreateSession", "CreateSessionStream")
OK = "OK"
MOVED = "MOVED"  # not this host's session: the reply names the owner's epoch and host
LARGE = 1 << 20  # replies at least this large go back as one numpy buffer (object store, no pickling)


def pack(messages: list) -> tuple[np.ndarray, list[int]]:
    """Byte strings as one uint8 buffer and their end offsets (zero-copy through Ray's object store)."""
    ends, total = [], 0
    for m in messages:
        total += len(m)
        ends.append(total)
    buf = np.empty(total, np.uint8)
    at = 0
    for m in messages:
        buf[at:at + len(m)] = np.frombuffer(m, np.uint8)
        at += len(m)
    return buf, ends


def unpack(buf, ends) -> list[memoryview]:
    view, out, at = memoryview(buf), [], 0
    for end in ends:
        out.append(view[at:end])
        at = end
    return out


_caller = threading.local()  # the call this thread serves: whether its front end takes tokens


class ClusterStore(SessionStore):
    """The store of one host: sessions come and go by ownership, not only by create and delete."""

    @property
    def auth(self) -> bool:
        """Per call, not per store: front ends with and without tokens share the hosts. A call from a
        front end that checks tokens is answered as a server with tokens answers (a session is its
        creating token's; an absent one is PERMISSION_DENIED like another token's), one from a front
        end without them as a server without tokens (NOT_FOUND)."""
        return getattr(_caller, "auth", False)

    @auth.setter
    def auth(self, value) -> None:
        pass  # (SessionStore.__init__ sets it; here it comes with each call)

    def adopted(self, session) -> None:
        with self._lock:
            self._indexed(session)
        self._gauges()

    def index_has(self, session_id: str) -> bool:
        return session_id in self._sessions

    def forget(self, session_id: str) -> None:
        with self._lock:
            session = self._sessions.get(session_id)
            self._unindexed(session_id)
        if session is not None:
            session.live = session.spare = None


class SessionHost:
    """Wrapped by ray.remote in directory.py (the class stays importable without Ray)."""

    def __init__(self, name: str, root: str, memory_budget_mb: float | None = None):
        self.name, self.root = name, root
        self.incarnation = uuid.uuid4().hex[:12]
        self.node_id = _current_node()  # after a restart elsewhere: the new node
        self.metrics = Metrics()
        self.journal = FencedJournal(root, self.metrics, GroupSyncer())
        budget = memory.default_budget() if memory_budget_mb is None else int(memory_budget_mb * memory.MIB)
        # (auth comes with each call: ClusterStore.auth)
        self.store = ClusterStore(Registry(), self.journal, budget=memory.MemoryBudget(budget),
                                  default_durability="log", metrics=self.metrics)
        self.journal.on_stale = self._superseded
        self.servicer = SessionServicer(self.store, metrics=self.metrics, max_streams=64, owner=_owner)
        # TelemetryService: the same servicer as the single server's, over this host's sessions
        self.telemetry = telemetry.attach(self.store, root, self.store.registry)
        watching = telemetry_service.TelemetryServicer(
            self.telemetry, _owner, check_session=lambda sid, who: self.store.get(sid, who))
        # The single server's handlers, called here with the request bytes the front end received
        self.handlers = {}
        for handlers in build_services(self.servicer, watching, aio=False).values():
            self.handlers.update(handlers)
        self.watches = telemetry.Watches(watching)
        self.feeds = Feeds()
        self.janitor = Janitor(self.store)
        self.janitor.start()
        self.draining = False
        self._adopt_locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        log.info("session host %s (incarnation %s) on node %s, pid %d", name, self.incarnation, self.node_id,
                 os.getpid())

    # -- what the directory asks ------------------------------------------------------------
    def info(self) -> dict:
        return {"host": self.name, "node": self.node_id, "pid": os.getpid(), "incarnation": self.incarnation,
                "sessions": len(self.store.list_all()), "bytes": self.store.budget.held, "draining": self.draining}

    def sessions(self) -> list[dict]:
        return [{"session_id": s.id, "step": s.step, "epoch": self.journal.epoch_of(s.id), "host": self.name,
                 "node": self.node_id, "optimizer": s.optimizer.definition.name}
                for s in self.store.list_all()]

    def holder(self) -> dict:
        return {"host": self.name, "node": self.node_id, "pid": os.getpid(), "incarnation": self.incarnation}

    def adopt(self, session_id: str, expected: int) -> int:
        """Take the session over from epoch `expected` (its owner is gone or drained); its epoch."""
        with self._lock_for(session_id):
            # (claimed here and still ours: adopted by the call before us, or a create in progress)
            if session_id in self.journal.claims and self.journal.ownership.holds(self.journal.claims[session_id]):
                return self.journal.claims[session_id].epoch
            return self._take(session_id, expected).epoch

    def rollback(self, session_id: str, expected: int, until: int) -> tuple[int, int]:
        """A shard of a sharded session found past its session's last commit record (sharded.py): take
        it over from epoch `expected` (from this host too, dropping what it holds in memory), replaying
        its log only up to step `until`. (epoch, step) after; EpochTaken when it moved meanwhile."""
        with self._lock_for(session_id):
            if session_id in self.journal.claims:
                self.journal.release(session_id)
                self.store.forget(session_id)
                telemetry.let_go(self.telemetry, session_id, save=False)
            claim = self._take(session_id, expected, until)
            return claim.epoch, until

    def _take(self, session_id: str, expected: int, until: int | None = None):
        """Claim epoch expected + 1 and load the session from the older epoch's files (its log replayed up
        to step `until`, when given); its claim. Caller holds the session's adopt lock."""
        claim = self.journal.ownership.claim(session_id, expected, self.holder())
        try:
            session = self.journal.adopt(claim, self.store.registry, self.store.budget, until=until)
        except BaseException:
            self.journal.release(session_id)
            raise
        telemetry.take(self.telemetry, session_id)
        self.store.adopted(session)
        log.info("session %s adopted at step %d, epoch %d%s", session_id, session.step, claim.epoch,
                 "" if until is None else f" (rolled back to the commit record, step {until})",
                 extra={"session_id": session_id, "step": session.step})
        return claim

    def drain(self) -> list[tuple[str, int]]:
        """Stop taking calls; write every session's snapshot and let go of it: [(id, epoch)] to move."""
        self.draining = True
        moved = []
        for s in self.store.list_all():
            with s.lock:
                epoch = self.journal.epoch_of(s.id)
                try:
                    if s.live is not None:
                        self.journal.flush(s)
                except (OSError, StaleOwner) as e:
                    log.error("session %s not flushed at drain: %s", s.id, e)
                self.journal.release(s.id)
                self.store.forget(s.id)
                telemetry.let_go(self.telemetry, s.id, save=True)
            if epoch:
                moved.append((s.id, epoch))
        self.janitor.stop()
        return moved

    def pid(self) -> int:
        return os.getpid()

    def _superseded(self, session_id: str) -> None:
        self.store.forget(session_id)
        telemetry.let_go(self.telemetry, session_id, save=False)

    # -- WatchSession: a generator here, pulled in batches by the front end (cluster/telemetry.py) --
    def watch(self, session_id: str, request: bytes, take_over: int = 0, owner: str | None = None):
        """(status, epoch, watch id or message, None, ()) like call's: the watch started on the owner."""
        if self.draining:
            return MOVED, 0, None, None, ()
        try:
            moved = self._ensure_owned(session_id, take_over)
        except Refused as e:
            code, message, trailing = translate(e)
            return code.name, 0, message, None, trailing
        if moved is not None:
            return moved
        parsed = telemetry_pb2.WatchSessionRequest.FromString(request)
        return OK, self.journal.epoch_of(session_id), self.watches.open(parsed, owner), None, ()

    def watch_next(self, watch_id: str, seconds: float):
        return self.watches.next(watch_id, seconds)

    def watch_close(self, watch_id: str) -> None:
        self.watches.close(watch_id)

    # -- calls -----------------------------------------------------------------------------
    def call(self, method: str, session_id: str, payload, ends, take_over: int = 0, remaining: float | None = None,
             fed: str | None = None, owner: str | None = None):
        """(status, epoch, body, ends, trailing): status is OK, MOVED (body: the owner's record) or a
        grpc status name (body: the message). `fed`: the rest of the client stream comes by `feed`
        calls under this id (cluster/feed.py), read as the step goes. `owner`: the caller's token hash."""
        if fed is None:
            return self._call(method, session_id, unpack(payload, ends), take_over, remaining, owner)
        stopped = []

        def rest():
            try:
                yield from self.feeds.messages(fed)
            except FeedStopped:
                stopped.append(True)
                raise

        try:
            answer = self._call(method, session_id, itertools.chain(unpack(payload, ends), rest()), take_over,
                                remaining, owner)
        except FeedStopped:
            answer = None
        finally:
            self.feeds.end(fed)
        # Groups that never came (the front end is gone, or this is Ray's retry of the call in a new
        # incarnation, the groups sent to the old one lost): nothing was applied; the front end, if
        # still there, sends the whole request again.
        return (MOVED, 0, None, None, ()) if stopped or answer is None else answer

    def feed(self, call_id: str, seq: int, payload, ends, last: bool) -> bool:
        return self.feeds.put(call_id, seq, unpack(payload, ends), last)

    def _call(self, method, session_id, messages, take_over, remaining, owner=None):
        if self.draining:
            return MOVED, 0, None, None, ()
        try:
            if method in CREATES:
                session_id, messages = self._claim_new(method, messages)
            else:
                moved = self._ensure_owned(session_id, take_over)
                if moved is not None:
                    return moved
        except Refused as e:
            code, message, trailing = translate(e)
            return code.name, 0, message, None, trailing
        epoch = self.journal.epoch_of(session_id)
        status, body, out_ends, trailing = self._invoke(method, messages, remaining, owner)
        if method in CREATES and status != OK:
            self._unclaim(session_id)
        if status == grpc.StatusCode.UNAVAILABLE.name and session_id not in self.journal.claims:
            return MOVED, epoch, None, None, ()  # superseded during the call: the front end retries
        return status, epoch, body, out_ends, trailing

    def _invoke(self, method, messages, remaining=None, owner=None):
        h = self.handlers[method]
        ctx = ActorContext(remaining, owner)
        fn = h.unary_unary or h.unary_stream or h.stream_unary or h.stream_stream
        _caller.auth = owner is not None  # (None: the front end takes no tokens)
        try:
            request = (h.request_deserializer(m) for m in messages) if h.request_streaming \
                else h.request_deserializer(messages[0])
            out = fn(request, ctx)
            replies = [h.response_serializer(m) for m in out] if h.response_streaming \
                else [h.response_serializer(out)]
        except Abort as a:
            return a.code.name, a.message, None, ctx.trailing
        if sum(len(r) for r in replies) >= LARGE:
            buf, ends = pack(replies)
            return OK, buf, ends, ctx.trailing
        return OK, replies, None, ctx.trailing

    def _owned(self, session_id: str) -> bool:
        """Claimed and in the store (an adoption claims first and registers the session last)."""
        return session_id in self.journal.claims and self.store.index_has(session_id)

    def _lock_for(self, session_id: str) -> threading.Lock:
        with self._guard:
            return self._adopt_locks.setdefault(session_id, threading.Lock())

    def _ensure_owned(self, session_id: str, take_over: int):
        """None when this host owns the session, adopting it when its record names this host (an
        earlier incarnation: restarted by Ray) or names epoch `take_over`, whose owner the front end
        found gone; else the MOVED answer. Adopting only from the epoch the front end saw keeps a late
        or repeated request from taking a session away from the owner that adopted it meanwhile."""
        if not session_id:
            return None
        if self._owned(session_id):
            if self.journal.ownership.holds(self.journal.claims[session_id]):
                return None  # (checked on every call, so a superseded owner never serves a stale read)
            self.journal.stale(session_id)
        epoch, holder = self.journal.ownership.current(session_id)
        if epoch == 0 or (holder or {}).get("deleted"):
            return None  # the servicer answers NOT_FOUND in the contract's words
        if (holder or {}).get("host") != self.name and take_over != epoch:
            return MOVED, epoch, holder, None, ()
        try:
            self.adopt(session_id, epoch)
        except EpochTaken as e:
            return MOVED, e.epoch, e.holder, None, ()
        except NotFound:
            return None
        return None

    def _claim_new(self, method: str, messages):
        """A create: the id (one is drawn if the request has none) claimed at epoch 1 before anything."""
        kind = session_pb2.CreateSessionRequest if method == "CreateSession" else session_pb2.CreateSessionStreamRequest
        rest = iter(messages)  # (the rest of a fed stream is still arriving: not read here)
        raw = next(rest, None)
        first = kind.FromString(raw) if raw is not None else kind()
        if not first.config.session_id:
            first.config.session_id = uuid.uuid4().hex
            raw = first.SerializeToString()
        messages = [raw] if method == "CreateSession" else itertools.chain([raw], rest)
        sid = first.config.session_id
        from optreg.server.sessions.factory import valid_id
        if valid_id(sid):  # else the servicer refuses it, and nothing was claimed
            try:
                self.journal.claims[sid] = self.journal.ownership.claim(sid, 0, self.holder())
            except EpochTaken:
                raise AlreadyExists(f"session {sid} already exists; attach to it, or delete it first") from None
        return sid, messages

    def _unclaim(self, session_id: str) -> None:
        claim = self.journal.claims.pop(session_id, None)
        if claim is not None and not self.store.index_has(session_id):
            try:
                self.journal.ownership.remove(claim)
            except Refused:
                pass


def _owner(context) -> str:
    return context.owner


def _current_node() -> str:
    try:
        import ray
        if not ray.is_initialized():  # (asking would start a local Ray)
            return ""
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return ""
