"""The calls that wait, as coroutines on the asyncio server (grpc.aio): parked on the event loop,
they hold no thread while they wait for their peer, their round or the next step to watch.

Work stays where it was (rpc/service.py, rpc/workers.py, rpc/telemetry.py, steps/); these
coroutines read and write the stream and hand the work to the server's pool (calls.offload):
everything that may wait for a session's lock, touch the disk or run a kernel on more than a
small message. A small dense step of a loaded session in memory-only or `log` durability whose
lock is free runs inline on the loop: handing it to a thread and back costs more than it does.
"""
from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time

import grpc
from google.protobuf.message import Message

from optreg.server.model.errors import DeadlineExceeded, InvalidArgument, ResourceExhausted
from optreg.server.rpc import status
from optreg.server.rpc.calls import live_context, offload
from optreg.server.rpc.service import SessionServicer, Upload, shared
from optreg.server.rpc.telemetry import POLL_SECONDS, TelemetryServicer
from optreg.server.steps import sparse_rows
from optreg.server.steps.rounds import Outcome
from optreg.v1 import session_pb2

# Messages and steps up to this many bytes of tensor data are worked on inline, on the loop; larger
# ones on the pool (a 64 KiB step is ~0.1 ms of work, less than the hand-off to a thread and back).
INLINE_BYTES = 64 << 10
STREAM_ENDED = object()
# Calls woken together (a round's members, a step's watchers) go on WAKE_SLICE at a time, a slice every
# WAKE_PACE seconds: each reply is work for grpc's core too, and a call arriving behind a burst of 1,000
# waited 150-300 ms there, before the loop saw it (docs/speed.md, "Waiting").
WAKE_SLICE = 8
WAKE_PACE = 0.005


def coroutines(servicer, handlers: dict) -> dict:
    """`handlers` with the servicer's waiting methods replaced by their coroutines."""
    out = dict(handlers)
    if isinstance(servicer, SessionServicer):
        aio = AioSessions(servicer)
        names = ("Step", "StepStream", "CreateSessionStream", "RegisterSharedMemory")
    elif isinstance(servicer, TelemetryServicer):
        aio = AioTelemetry(servicer)
        names = ("WatchSession",)
    else:
        return out
    for name in names:
        h = out[name]
        kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(h, k))
        out[name] = h._replace(**{kind: getattr(aio, name)})
    return out


class Waker:
    """Wakes many parked calls a slice at a time. When a round of 1,000 members closes, or 1,000
    watchers see the same step, each woken call sends its reply: woken at once, a call arriving
    meanwhile (a health check, another session's step) waits behind all of those replies, in the loop
    and in grpc's core; paced, it waits behind one slice. A few waiters (up to WAKE_SLICE) go at once;
    1,000 take 1000 / WAKE_SLICE * WAKE_PACE = 0.6 s."""

    def __init__(self):
        self.queue: collections.deque = collections.deque()

    def wake(self, loop: asyncio.AbstractEventLoop, wakes) -> None:
        """Calls each of `wakes` (callables) on the loop, a slice per turn (loop thread only)."""
        idle = not self.queue
        self.queue.extend(wakes)
        if idle and self.queue:
            loop.call_soon(self._turn, loop)

    def _turn(self, loop) -> None:
        for _ in range(min(WAKE_SLICE, len(self.queue))):
            self.queue.popleft()()
        if self.queue:
            loop.call_later(WAKE_PACE, self._turn, loop)


def _settle(f: asyncio.Future, source) -> None:
    """f takes the outcome of the (done) concurrent future `source`, unless its waiter left."""
    if not f.done():
        e = source.exception()
        f.set_exception(e) if e is not None else f.set_result(source.result())


def _data_bytes(tensors_) -> int:
    return sum(len(t.data) for t in tensors_)


class Paced:
    """A request stream read ahead by a task of its own (a few messages, so the next chunk arrives
    while the pool works on this one, as a fast sender needs), ended by DeadlineExceeded when the
    sender brings no new tensor data for `seconds` (--stream-idle-seconds): a stalled client holds a
    stream slot (and no thread) for a bounded time only."""

    def __init__(self, requests, seconds: float, slot=None):
        self.requests = requests
        self.seconds, self.slot = seconds, slot
        self.deadline = time.monotonic() + seconds
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=4)
        self.reader: asyncio.Task | None = None

    async def _read(self) -> None:
        try:
            async for m in self.requests:
                await self.queue.put(m)
            await self.queue.put(STREAM_ENDED)
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the call broke: hand it to the handler
            await self.queue.put(e)

    def progress(self) -> None:
        self.deadline = time.monotonic() + self.seconds

    def ready(self) -> bool:
        """Whether the next message (or the stream's end) is already in."""
        return not self.queue.empty()

    def received(self) -> None:
        """The whole request stream is in: the stream slot is free for another sender."""
        if self.slot is not None:
            self.slot.release()

    async def next(self):
        """The next message, or STREAM_ENDED."""
        if self.reader is None:
            self.reader = asyncio.ensure_future(self._read())
        wait = self.deadline - time.monotonic() if self.seconds else None
        try:
            if wait is not None and wait <= 0:
                raise asyncio.TimeoutError
            item = await asyncio.wait_for(self.queue.get(), wait)
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"no tensor data for {self.seconds:g} s (--stream-idle-seconds): the server "
                                   "ended the stream; nothing was applied, send the step again") from None
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        if self.reader is not None:
            self.reader.cancel()


async def _work(size: int, fn, *args):
    """fn(*args) inline when it handles at most INLINE_BYTES of tensor data, else on the pool."""
    return fn(*args) if size <= INLINE_BYTES else await offload(fn, *args)


class AioSessions:
    """Step, StepStream, CreateSessionStream and RegisterSharedMemory of a SessionServicer as coroutines."""

    def __init__(self, servicer: SessionServicer):
        self.s = servicer
        self.metrics = servicer.metrics  # (status.handler counts here)
        self._replies = Shared()  # a round's reply, encoded once for all its members
        self._waker = Waker()
        self._rounds: dict = {}  # a round's outcome future -> the asyncio futures of its waiting members

    # -- Step ------------------------------------------------------------------------------
    @status.handler
    @live_context
    async def Step(self, request, ctx):
        s = self.s
        session = s.store.get(request.session_id, s.owner(ctx))
        if shared(session, request.worker):
            return await self._contribute(session, request, ctx)
        if self._inline(session, request):
            return s.step(session, request, ctx)
        return await offload(s.step, session, request, ctx)

    def _inline(self, session, request) -> bool:
        """Whether a step cannot wait (for the session's lock, a load, an fsync or a snapshot) and is
        small: then it runs on the loop. The lock is free now and the loop is the only thread taking it
        this instant but the pool's; a pool step taking it in between makes this one wait that step's commit."""
        s = session
        return (s.live is not None and s.hub is None and s.resident is None and not request.sparse
                and not request.compressed  # decoded to the session's size: not on the loop
                and s.durability.mode in ("none", "log") and not s.lock.locked()
                and not self.s.store.journal.busy(s) and _data_bytes(request.gradients) <= INLINE_BYTES)

    def _inline_contribution(self, session, request) -> bool:
        """Whether a sync member's contribution is small and will not close its round (so it only joins
        the round in memory): then it is committed on the loop. A thousand members each handing theirs to
        a thread and back kept the loop waiting for the GIL behind the pool. (Read without the round's
        lock: a round that fills meanwhile is closed here, a small session's one step.)"""
        s, hub = session, session.hub
        r = hub.round if hub is not None else None
        return (r is not None and not r.closing and not request.sparse and s.live is not None
                and len(r.contribs) + 1 < len(hub.members.by_name)
                and s.elements * s.dtype.itemsize <= INLINE_BYTES and _data_bytes(request.gradients) <= INLINE_BYTES)

    async def _contribute(self, session, request, ctx):
        workers = self.s.workers
        if session.workers.mode != "sync":  # async/SSP: one step each (SSP may wait for the slowest member)
            return await offload(workers.step, session, request, ctx)
        with workers.call(session, request.worker):
            if self._inline_contribution(session, request):
                o = workers.contribution(session, request, ctx, False)
            else:
                o = await offload(workers.contribution, session, request, ctx, False)
            o = (await self._round(session, request.worker, request.round, o, ctx)).to(request.worker)
            if _outcome_bytes(o) > INLINE_BYTES:  # made on the pool for each member (not kept: its size)
                return await offload(workers.reply, o)
            return self._replies.get(o, workers.reply)

    async def _round(self, session, worker: str, number: int, o, ctx) -> Outcome:
        """The round's outcome: awaited (no thread) until its close resolves it, up to the call's deadline."""
        if isinstance(o, Outcome):
            return o
        if o.done():  # this member closed the round
            return o.result()
        hub = session.hub
        loop = asyncio.get_running_loop()
        waiters = self._rounds.get(o)
        if waiters is None:  # the first member to wait: the close (on the pool) wakes them through the loop
            waiters = self._rounds[o] = []
            o.add_done_callback(lambda _: loop.call_soon_threadsafe(self._closed, loop, o))
        mine = loop.create_future()
        waiters.append(mine)
        try:
            return await asyncio.wait_for(mine, ctx.time_remaining())
        except asyncio.TimeoutError:
            raise DeadlineExceeded(
                f"round {number} did not close within this call's deadline; worker {worker!r}'s contribution is "
                "committed to it: send the same (worker, round) again to receive the round's reply (it is applied "
                "once)") from None
        finally:
            hub.done_waiting(number, worker)

    def _closed(self, loop, o) -> None:
        self._waker.wake(loop, [lambda f=f: _settle(f, o) for f in self._rounds.pop(o, ())])

    # -- streams ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _paced(self, request_iterator):
        """A stream slot (--max-streams), and the requests paced by the idle timeout."""
        with self.s._streams.take() as slot:
            paced = Paced(request_iterator, self.s.stream_idle_seconds, slot)
            try:
                yield paced
            finally:
                paced.close()

    @status.handler
    @live_context
    async def StepStream(self, request_iterator, ctx):
        s = self.s
        with self._paced(request_iterator) as requests:
            first = await requests.next()
            if first is STREAM_ENDED:
                raise InvalidArgument("the stream was empty: the first message must carry session_id")
            session = s.store.get(first.session_id, s.owner(ctx))
            if shared(session, first.worker):
                async for reply in self._contribute_stream(session, first, requests, ctx):
                    yield reply
                return
            run = s._run(first, ctx, session=session)
            try:
                result = await offload(run.open)
                if result is not None:  # a retry: drain the stream, answer again
                    while (msg := await requests.next()) is not STREAM_ENDED:
                        if any(t.data for t in msg.chunks):
                            requests.progress()
                    for reply in await offload(lambda: list(s._reply_batches(
                            result.step, True, result.tensors, sparse_rows.to_messages(result)))):
                        yield reply
                    return
                # The pool feeds message i while the loop writes the replies of message i - 1.
                i, msg, replies = 0, first, []
                while msg is not STREAM_ENDED:
                    feeding = asyncio.ensure_future(_work(_data_bytes(msg.chunks), s.stream_feed, run, i, msg))
                    try:
                        for reply in replies:
                            yield reply
                    finally:
                        if not feeding.done():  # the run is not closed under a feed in flight
                            await asyncio.wait([feeding])
                    replies, progress = feeding.result()
                    if progress:
                        requests.progress()
                    if not requests.ready():  # the sender pauses: answer what is stepped now, not after it
                        for reply in replies:
                            yield reply
                        replies = []
                    i, msg = i + 1, await requests.next()
                for reply in replies:
                    yield reply
                result = await offload(run.finish)
                for reply in await offload(s.stream_finish, run, result):
                    yield reply
            finally:
                run.close()

    async def _contribute_stream(self, session, first, requests: Paced, ctx):
        """A worker's StepStream: the messages read without a thread, the contribution staged on the pool."""
        workers = self.s.workers
        with workers.call(session, first.worker):
            messages = []
            while (msg := await requests.next()) is not STREAM_ENDED:
                if any(len(t.data) for t in msg.chunks):
                    requests.progress()
                messages.append(msg)
            requests.received()  # its stream slot is free while it waits for its round (under --max-members)
            o = await offload(workers.stream_contribution, session, first, iter(messages), _Read(), ctx,
                              session.workers.mode != "sync")
            del messages
            o = (await self._round(session, first.worker, first.round, o, ctx)).to(first.worker)
            for reply in await _work(_outcome_bytes(o), lambda: list(workers.stream_replies(o))):
                yield reply

    @status.handler
    @live_context
    async def CreateSessionStream(self, request_iterator, ctx):
        s = self.s
        with self._paced(request_iterator) as requests:
            upload = Upload(s.store)
            try:
                i = 0
                while (msg := await requests.next()) is not STREAM_ENDED:
                    if await _work(_data_bytes(msg.chunks), upload.add, i, msg):
                        requests.progress()
                    i += 1
                return await offload(upload.finish, s.owner(ctx))
            finally:
                upload.close()

    # -- shared memory ---------------------------------------------------------------------
    @status.handler
    @live_context
    async def RegisterSharedMemory(self, request, ctx):
        got = await offload(self.s.register_shm, request, ctx)
        if got is None:
            return
        region, step = got
        yield session_pb2.RegisterSharedMemoryResponse(byte_size=region.size, step=step)
        # The registration lives as long as this call: it ends when the segment is released (unregistered,
        # its session deleted, the server stopping) or the call ends (the done callback releases it).
        while not region.closed.is_set() and ctx.is_active():
            await asyncio.sleep(0.5)
        self.s.shm.release(region, "registration ended" if ctx.is_active() else "client gone")


class _Read:
    """The paced stream of a contribution already read whole (its progress and slot were handled then)."""

    def progress(self) -> None:
        pass

    def received(self) -> None:
        pass


class Shared:
    """The last few answers made for an object (a round's outcome, a step's watch events), made once for
    every call that sends it: when a round of 1,000 members closes, or 1,000 watchers see the same step,
    the loop encodes it once instead of in a burst of 1,000 (every other call waits behind a burst)."""

    def __init__(self, keep: int = 64):
        self.keep = keep
        self.made: dict = {}

    def get(self, key, make, *args):
        """make(*args) (or make(key), when args are empty), made once for `key`: a tuple, or an object whose
        identity is the key; what the key names by id is kept alive here, so no id is reused meanwhile."""
        k = key if isinstance(key, tuple) else id(key)
        got = self.made.get(k)
        if got is None:
            made = make(*args) if args else make(key)
            if isinstance(made, Message):
                made = made.SerializeToString()  # the Step handler sends bytes as they are
            got = self.made[k] = (made, key, args)  # (key and args keep alive what the key names by id)
            while len(self.made) > self.keep:  # (only the loop uses it: no lock)
                del self.made[next(iter(self.made))]
        return got[0]


def _outcome_bytes(o: Outcome) -> int:
    return sum(a.nbytes for a in (o.tensors or {}).values())


class AioTelemetry:
    """WatchSession as a coroutine: each watcher waits on an asyncio.Event the hub's listener sets (from
    whichever thread folded the step in) through the loop."""

    def __init__(self, servicer: TelemetryServicer):
        self.s = servicer
        self.loop: asyncio.AbstractEventLoop | None = None
        self.waiting: dict[str, set[asyncio.Event]] = {}
        self.shared = Shared()  # a step's events, made once for all the watchers at the same point
        self.waker = Waker()
        self.queued: set[asyncio.Event] = set()  # watchers in the waker's queue
        servicer.hub.add_listener(self._changed)

    def _changed(self, session_id: str) -> None:  # any thread: only hands off
        loop = self.loop
        if loop is not None and session_id in self.waiting:
            loop.call_soon_threadsafe(self._wake, session_id)

    def _wake(self, session_id: str) -> None:
        # A watcher is queued once: a session stepping faster than the waker's pace must not grow its queue.
        events = [e for e in self.waiting.get(session_id, ()) if e not in self.queued]
        self.queued.update(events)
        self.waker.wake(self.loop, [functools.partial(self._set, e) for e in events])

    def _set(self, event: asyncio.Event) -> None:
        self.queued.discard(event)
        event.set()

    async def WatchSession(self, request, context):
        self.loop = asyncio.get_running_loop()
        try:
            slot = self.s.watchers.take()
        except ResourceExhausted as e:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, e.message)
        with slot:
            try:
                async for reply in self._watch(request, context):
                    yield reply
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                t = status.translate(e)
                if t is None:
                    raise
                await context.abort(t[0], t[1])

    async def _watch(self, request, context):
        s, hub = self.s, self.s.hub
        owner = s.owner(context)
        if request.from_step < 0:
            raise InvalidArgument("from_step must be >= 0 (0: only steps committed from now on)")
        session_id = request.session_id
        ring = s.find_ring(session_id, owner)
        if request.from_step > 0:
            after_step, after_alert = request.from_step - 1, None  # alerts from that step on
        else:  # from now on
            after_step = ring.last_step if ring is not None else 0
            after_alert = ring.alert_seq if ring is not None else 0
        event = asyncio.Event()
        self.waiting.setdefault(session_id, set()).add(event)
        try:
            version = None
            while True:
                event.clear()  # before the snapshot: a change after it sets the event again
                records, alerts, now, ring = hub.snapshot(session_id, after_step, after_alert or 0)
                if ring is not None:
                    key = (id(ring), now, owner, after_step, after_alert,
                           request.from_step if after_alert is None else 0)
                    events, after_step, after_alert = self.shared.get(
                        key, s.events, records, alerts, ring, owner, request.from_step, after_step, after_alert)
                    for item in events:
                        yield item
                elif version is not None and version >= 0:
                    return  # the session was deleted while we watched
                try:
                    await asyncio.wait_for(event.wait(), POLL_SECONDS)
                except asyncio.TimeoutError:
                    pass
                current = hub.ring(session_id)
                version = -1 if current is None else current.version
        finally:
            watchers = self.waiting.get(session_id)
            if watchers is not None:
                watchers.discard(event)
                if not watchers:
                    del self.waiting[session_id]
