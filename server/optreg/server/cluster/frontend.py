"""The gRPC front end of a Ray cluster: the optreg.v1 contract, every SessionService call forwarded
as raw bytes to the host that owns its session (read from the owner record in storage), so existing
clients work unchanged against any front end.

Failures it hides: a host that died or is restarting (Ray retries the call when it comes back; the
front end also re-resolves and, when the owner is gone for good, has another host adopt the session
at the next epoch), a session that moved (MOVED), and a reply from a superseded owner (its epoch
is lower than one already seen for the session: dropped, asked again). A retried step carries the
client's fence, so it is applied once (answered as a replay when it was)."""
from __future__ import annotations

import logging
import threading
import time
import uuid

import grpc
import ray

from optreg.server.cluster import wire
from optreg.server.cluster.directory import Directory
from optreg.server.cluster.feed import FEED_BYTES
from optreg.server.cluster.host import CREATES, LARGE, MOVED, OK, pack, unpack
from optreg.server.cluster.sharded import Sharded
from optreg.v1 import session_pb2, telemetry_pb2

log = logging.getLogger("optreg.server.cluster")
SERVICE = session_pb2.DESCRIPTOR.services_by_name["SessionService"]
TELEMETRY = telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryService"]
NO_DEADLINE = 1e6  # seconds left above which a call has no deadline
WATCH_PULL_SECONDS = 1.0  # each pull of a watch waits this long for news (and the client's cancel is seen)
LOCAL_ONLY = ("RegisterSharedMemory", "UnregisterSharedMemory", "StepSharedMemory")
RETRYABLE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnschedulableError, ray.exceptions.GetTimeoutError,
             ray.exceptions.ObjectLostError)


class _Failed(Exception):
    def __init__(self, code: str, message: str, trailing=()):
        self.code, self.message, self.trailing = code, message, trailing


class Frontend:
    def __init__(self, directory: Directory, retry_seconds: float = 60.0, auth=None):
        self.directory = directory
        self.auth = auth  # rpc/auth.py's TokenAuth (the interceptor has checked the token), or None
        self.retry_seconds = retry_seconds
        self.routes: dict[str, str] = {}  # session id -> host name believed to own it
        self.epochs: dict[str, int] = {}  # session id -> highest epoch a reply carried
        self.answered: dict[str, int] = {}  # session id -> highest step number answered to a client
        self._lock = threading.Lock()
        self.sharded = Sharded(self, _Failed, RETRYABLE)

    # -- routing -----------------------------------------------------------------------------
    def _route(self, session_id: str) -> tuple[str, int]:
        """(host name, the epoch it must take the session over from, 0 for none)."""
        name = self.routes.get(session_id)
        if name and self.directory.handle(name) is not None:
            return name, 0
        epoch, holder = self.directory.ownership.current(session_id)
        owner = (holder or {}).get("host", "")
        # (a draining owner is still the owner: it answers MOVED until its sessions are adopted)
        if owner and not holder.get("deleted") and self.directory.handle(owner) is not None:
            return owner, 0
        if epoch == 0 or (holder or {}).get("deleted"):  # no such session: any host answers NOT_FOUND
            return self.directory.place(), 0
        return self.directory.place(), epoch  # its owner is gone: adopt it elsewhere, from that epoch

    def owner(self, context) -> str:
        """The caller's token hash, which the hosts check sessions against (None: this front end takes
        no tokens, and the hosts answer as a server without tokens does)."""
        return self.auth.owner(context) if self.auth else None

    def forward(self, method: str, messages: list[bytes], invoke=None, remaining: float | None = None, rest=None,
                owner: str | None = None, whole: bool = True, place: str | None = None):
        """(body, ends, trailing) of the owner's reply, retried across failures and moves.
        `invoke(host, session_id, take_over)`, when given, makes the call instead of host.call.
        `remaining`: the client's time left, the host's bound on a shared session's round wait.
        `rest`: the client stream's messages after `messages`, not read yet: the first attempt sends
        them to the host as they arrive (cluster/feed.py); they are kept for a retry. `owner`: the caller's
        token hash. `whole=False`: a shard's call (sharded.py), its replays left as they are. `place`:
        the host a create goes to first."""
        first = messages[0] if messages else b""
        create = method in CREATES
        if create:
            session_id = wire.create_id(first)
            if not session_id and (method == "CreateSession" or wire.field_bytes(first, 1) is not None):
                session_id = uuid.uuid4().hex  # drawn here, so a create retried after a failure keeps its id
                messages = [wire.with_create_id(first, session_id)] + messages[1:]
        else:
            session_id = wire.session_id(first)
        payload = ends = None
        deadline = time.monotonic() + max(self.retry_seconds, (remaining or 0) + 5)
        attempt, take_over, name = 0, 0, None
        while True:
            if attempt and time.monotonic() > deadline:
                raise _Failed("UNAVAILABLE", f"session {session_id}: no owner answered within "
                                             f"{self.retry_seconds:g} s; retry")
            if attempt:
                time.sleep(min(0.05 * 2 ** min(attempt, 5), 1.0))
            attempt += 1
            if create and attempt == 1:
                name, take_over = place or self.directory.place(), 0
            else:
                name, take_over = self._route(session_id) if session_id else (self.directory.place(), 0)
            host = self.directory.handle(name)
            if host is None:
                self.routes.pop(session_id, None)
                continue
            try:
                if rest is not None:  # the first attempt at a client stream: forwarded as it arrives
                    ref, rest = self._feed(host, method, session_id, messages, rest, take_over, remaining,
                                           owner), None
                elif invoke is not None:
                    ref = invoke(host, session_id, take_over)
                else:
                    if payload is None:
                        buf, ends = pack(messages)
                        payload = ray.put(buf) if buf.nbytes >= LARGE else buf  # large tensors via the object store
                    ref = host.call.remote(method, session_id, payload, ends, take_over, remaining, None, owner)
                status, epoch, body, out_ends, trailing = ray.get(ref,
                    timeout=max(1.0, deadline - time.monotonic()))
            except RETRYABLE as e:
                log.warning("session %s: host %s failed (%s); retrying", session_id, name, type(e).__name__)
                self.routes.pop(session_id, None)
                self.directory.forget(name)
                self.directory.stale_infos()
                continue
            if status == MOVED:
                self.routes.pop(session_id, None)
                owner = (body or {}).get("host") if isinstance(body, dict) else None
                if owner and self.directory.handle(owner) is not None and owner != name:
                    self.routes[session_id] = owner
                continue
            with self._lock:
                if epoch and epoch < self.epochs.get(session_id, 0):
                    log.warning("session %s: dropped a reply from epoch %d (owner is at %d)", session_id, epoch,
                                self.epochs[session_id])
                    self.routes.pop(session_id, None)
                    continue
                if epoch:
                    self.epochs[session_id] = epoch
                    self.routes[session_id] = name
            if status == "ALREADY_EXISTS" and create and attempt > 1:
                # our own earlier attempt created it before its host failed: answer as the create would
                return self._created(method, session_id, owner)
            if status != OK:
                raise _Failed(status, body, trailing)
            if method == "DeleteSession":
                self.routes.pop(session_id, None)
            if method in ("Step", "StepStream") and whole:
                body, out_ends = self._answered(session_id, method, body, out_ends)
            return body, out_ends, trailing

    def _feed(self, host, method, session_id, messages, rest, take_over, remaining, owner=None):
        """Start the host's call with `messages`, then send the rest of the stream in groups of about
        FEED_BYTES as it arrives (each group a numpy buffer: Ray passes it through the object store),
        appending them to `messages` for a retry. The call's reply ref."""
        call_id = uuid.uuid4().hex
        ref = host.call.remote(method, session_id, *pack(messages), take_over, remaining, call_id, owner)
        group, size, seq = [], 0, 0
        for m in rest:
            messages.append(m)
            group.append(m)
            size += len(m)
            if size >= FEED_BYTES:
                host.feed.remote(call_id, seq, *pack(group), False)
                group, size, seq = [], 0, seq + 1
        host.feed.remote(call_id, seq, *pack(group), True)
        return ref

    def _answered(self, session_id: str, method: str, body, ends):
        """Note the step answered; a replay of a step this front end never answered is shown as applied.

        Ray retries a call whose host died (max_task_retries), and the front end retries too: when the
        first send was applied and its answer lost, the retry is answered as a replay. To the client it
        is its own step, applied once (its client would otherwise report a mismatch). A replay of a step
        this front end did answer is left as it is: that one is the client's concern."""
        if ends is None:
            last = body[-1] if body else b""
        else:  # one numpy buffer: read the last message in place, no copy of the tensors before it
            last = memoryview(body)[ends[-2] if len(ends) > 1 else 0:ends[-1]] if ends else b""
        step, replayed = wire.field_varint(last, 1), wire.field_varint(last, 2)
        with self._lock:
            seen = self.answered.get(session_id, 0)
            self.answered[session_id] = max(seen, step)
        if replayed and seen < step:
            return _not_replayed(method, _replies(body, ends))
        return body, ends

    def _created(self, method, session_id, owner=None):
        body, ends, trailing = self.forward("GetSession", [session_pb2.GetSessionRequest(
            session_id=session_id).SerializeToString()], owner=owner)
        info = session_pb2.GetSessionResponse.FromString(_replies(body, ends)[0]).session
        kind = session_pb2.CreateSessionResponse if method == "CreateSession" else session_pb2.CreateSessionStreamResponse
        return [kind(session=info).SerializeToString()], None, trailing

    def list_sessions(self, owner: str | None = None) -> bytes:
        """ListSessions: every host's loaded sessions (a session on disk but owned by no live host is
        adopted on first use by id, and listed by `python -m optreg.server.cluster sessions`)."""
        out = session_pb2.ListSessionsResponse()
        refs = [h.call.remote("ListSessions", "", *pack([b""]), 0, None, None, owner) for n in self.directory.host_names()
                if (h := self.directory.handle(n)) is not None]
        for ref in refs:
            try:
                status, _, body, ends, _ = ray.get(ref, timeout=self.retry_seconds)
            except RETRYABLE:
                continue
            if status == OK:
                out.sessions.extend(session_pb2.ListSessionsResponse.FromString(_replies(body, ends)[0]).sessions)
        listed = self.sharded.merge_listed(list(out.sessions))  # a sharded session as one
        del out.sessions[:]
        out.sessions.extend(listed)
        return out.SerializeToString()

    def watch(self, request: bytes, context):
        """WatchSession: the owner runs the single server's watch; its messages are pulled in batches.
        When the owner fails or the session moves, the watch is opened again on the new owner from
        one past the last step sent (the steps in between are in the ring it wrote to storage)."""
        session_id = wire.session_id(request)
        original, last_step, seen_alerts, owner = request, 0, set(), self.owner(context)
        while context.is_active():
            opened = []

            def invoke(host, sid, take_over):
                opened[:] = [host]
                return host.watch.remote(sid, request, take_over, owner)

            watch_id = self.forward("WatchSession", [request], invoke, owner=owner)[0]
            host = opened[0]
            try:
                while context.is_active():
                    messages, error, ended = ray.get(host.watch_next.remote(watch_id, WATCH_PULL_SECONDS),
                                                     timeout=WATCH_PULL_SECONDS + self.retry_seconds)
                    for m in messages:
                        reply = telemetry_pb2.WatchSessionResponse.FromString(m)
                        if reply.HasField("step"):
                            last_step = max(last_step, reply.step.step)
                        else:  # a reopened watch sends its first step's alerts again
                            key = reply.alert.SerializeToString(deterministic=True)
                            if key in seen_alerts:
                                continue
                            seen_alerts.add(key)
                        yield m
                    if error is not None and error[0] != "UNAVAILABLE":
                        raise _Failed(*error)
                    if error is not None or (ended and self._moved(session_id, host)):
                        break  # the watch ended on a host that no longer has the session: open it again
                    if ended:
                        return
            except RETRYABLE as e:
                log.warning("session %s: watch on a host failed (%s); watching again", session_id, type(e).__name__)
                self.routes.pop(session_id, None)
            finally:
                if not context.is_active():
                    host.watch_close.remote(watch_id)
            request = original if not last_step else telemetry_pb2.WatchSessionRequest(
                session_id=session_id, from_step=last_step + 1).SerializeToString()

    def _moved(self, session_id: str, host) -> bool:
        """Whether a watch ended because its host let go of the session (not because it was deleted)."""
        epoch, holder = self.directory.ownership.current(session_id)
        return epoch > 0 and not (holder or {}).get("deleted") and self.epochs.get(session_id, 0) < epoch

    # -- gRPC --------------------------------------------------------------------------------------
    def tables(self) -> dict[str, dict[str, grpc.RpcMethodHandler]]:
        """{service: {method: handler}} of the session and telemetry services."""
        table = {}
        for m in SERVICE.methods:
            table[m.name] = _handler(self, m.name, m.client_streaming, m.server_streaming)
        watched = {m.name: _handler(self, m.name, False, False) for m in TELEMETRY.methods if m.name != "WatchSession"}
        watched["WatchSession"] = grpc.unary_stream_rpc_method_handler(self._watch_handler)
        return {SERVICE.full_name: table, TELEMETRY.full_name: watched}

    def _watch_handler(self, request: bytes, context):
        try:
            yield from self.watch(request, context)
        except _Failed as f:
            context.abort(grpc.StatusCode[f.code], f.message)


def _not_replayed(method: str, replies: list[bytes]):
    """A step this front end sent again after a failure, answered as a replay: the first send was
    applied (the same request, the same fence), so to the client it is this call's step, not an
    earlier call's (which its client would report as a mismatch)."""
    kind = session_pb2.StepResponse if method == "Step" else session_pb2.StepStreamResponse
    out = []
    for r in replies:
        m = kind.FromString(r)
        m.replayed = False
        out.append(m.SerializeToString())
    return out, None


def _remaining(context) -> float | None:
    """The client's time left; None without a deadline (gRPC then reports a huge number, which would
    overflow Ray's timeout)."""
    left = context.time_remaining()
    return None if left is None or left > NO_DEADLINE else left


def _replies(body, ends) -> list[bytes]:
    if ends is None:
        return list(body)
    return [bytes(v) for v in unpack(body, ends)]


def _handler(front: Frontend, name: str, client_streaming: bool, server_streaming: bool):
    def run(request, context):
        if name in LOCAL_ONLY:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"{name}: shared memory needs the session's own process, which a cluster front end "
                          "is not: use Step or StepStream")
        if name == "ListSessions":
            return [front.list_sessions(front.owner(context))]
        if not client_streaming:
            shards = wire.create_shards(request) if name == "CreateSession" else 0
            if shards > 1 or (name != "CreateSession" and front.sharded.layout(wire.session_id(request))):
                try:
                    return front.sharded.call(name, [request], front.owner(context), _remaining(context))
                except _Failed as f:
                    context.abort(grpc.StatusCode[f.code], f.message)
        rest = None
        if client_streaming:  # the first message read here, the rest forwarded as it arrives
            first = next(request, None)
            messages, rest = ([], None) if first is None else ([first], request)
            if first is not None and (front.sharded.layout(wire.session_id(first)) if name != "CreateSessionStream"
                                      else wire.create_shards(first) > 1):
                try:  # the stream gathered, then split by shard (sharded.py)
                    return front.sharded.call(name, [first, *request], front.owner(context), _remaining(context))
                except _Failed as f:
                    context.abort(grpc.StatusCode[f.code], f.message)
        else:
            messages = [request]
        try:
            body, ends, trailing = front.forward(name, messages, remaining=_remaining(context), rest=rest,
                                                 owner=front.owner(context))
        except _Failed as f:
            if f.trailing:
                context.set_trailing_metadata(f.trailing)
            context.abort(grpc.StatusCode[f.code], f.message)
        if trailing:
            context.set_trailing_metadata(trailing)
        return _replies(body, ends)

    if client_streaming and server_streaming:
        return grpc.stream_stream_rpc_method_handler(lambda it, ctx: iter(run(it, ctx)))
    if client_streaming:
        return grpc.stream_unary_rpc_method_handler(lambda it, ctx: run(it, ctx)[0])
    if server_streaming:
        return grpc.unary_stream_rpc_method_handler(lambda r, ctx: iter(run(r, ctx)))
    return grpc.unary_unary_rpc_method_handler(lambda r, ctx: run(r, ctx)[0])
