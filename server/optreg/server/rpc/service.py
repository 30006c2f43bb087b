"""The gRPC servicers: thin adapters from messages to the domain (sessions/store.py, steps/) and back.

Every step, whatever its source, is a steps/run.py StepRun (docs/architecture.md, "The path of a
step"); refusals are the domain's exceptions, mapped to status codes by rpc/status.py's one table.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import struct
import threading
import time
import traceback

import grpc
import numpy as np

from optreg.plugins.registry import Registry
from optreg.server.rpc import admission, pages
from optreg.server.kernels import warmup
from optreg.server.steps import resident
from optreg.server.steps import shared_memory as shm
from optreg.server.steps import sparse_rows as sparse
from optreg.server.rpc import status
from optreg.server.steps import writers
from optreg.server.model.errors import (Cancelled, DataLoss, DeadlineExceeded, FailedPrecondition, InvalidArgument,
                                  ResourceExhausted, once, shown)
from optreg.server.sessions.factory import SessionConfig
from optreg.server.telemetry.metrics import Metrics
from optreg.server.steps.run import StepRun, gradients
from optreg.server.model.session import Session
from optreg.server.sessions.store import SessionStore
from optreg.server.rpc.workers import WorkerSteps, add_worker_info, worker_config_from
from optreg.v1 import names, registry_pb2, registry_pb2_grpc, session_pb2, session_pb2_grpc, tensor_pb2, tensors
from optreg.v1.names import name_of

log = logging.getLogger("optreg.server")

_HP_TYPES = {float: registry_pb2.HYPERPARAMETER_TYPE_FLOAT, int: registry_pb2.HYPERPARAMETER_TYPE_INT,
             bool: registry_pb2.HYPERPARAMETER_TYPE_BOOL}

def config_from(msg: session_pb2.SessionConfig) -> SessionConfig:
    """The contract's SessionConfig as the domain's plain one; enum values checked here."""
    if msg.master_dtype and name_of(names.MASTER_DTYPE, msg.master_dtype) is None:
        raise InvalidArgument(f"config.master_dtype {tensors.dtype_name(msg.master_dtype)} is not supported; "
                              "use DATA_TYPE_FLOAT32 or DATA_TYPE_FLOAT64")
    if msg.step_reply and name_of(names.STEP_REPLY, msg.step_reply) is None:
        raise InvalidArgument(f"config.step_reply {msg.step_reply} is not a StepReply value")
    if msg.durability and name_of(names.DURABILITY, msg.durability) is None:
        raise InvalidArgument(f"config.durability {msg.durability} is not a Durability value")
    if msg.shards > 1:  # (a cluster front end splits the session before any host sees the config)
        raise FailedPrecondition(f"config.shards {msg.shards}: this server holds a session whole; sharded "
                                 "sessions need a Ray cluster (optreg serve --ray): give shards 0 or 1")
    return SessionConfig(optimizer=msg.optimizer, hyperparameters=dict(msg.hyperparameters),
                         master_dtype=name_of(names.MASTER_DTYPE, msg.master_dtype, ""),
                         reply=name_of(names.STEP_REPLY, msg.step_reply, "parameters"), session_id=msg.session_id,
                         durability=name_of(names.DURABILITY, msg.durability, ""), periodic_steps=msg.periodic_steps,
                         periodic_seconds=msg.periodic_seconds, workers=worker_config_from(msg),
                         schedule=msg.schedule, schedule_parameters=dict(msg.schedule_parameters))


def session_info(s: Session) -> session_pb2.SessionInfo:
    info = session_pb2.SessionInfo(
        session_id=s.id, optimizer=s.optimizer.definition.name,
        hyperparameters={k: float(v) for k, v in s.hyperparameters.items()}, step=s.step,
        master_dtype=s.master_code, step_reply=names.STEP_REPLY[s.reply],
        parameters=[session_pb2.TensorInfo(name=n, dtype=s.master_code, shape=shape) for n, shape in s.shapes.items()],
        slots=list(s.slot_names), durability=names.DURABILITY[s.durability.mode],
        periodic_steps=s.durability.periodic_steps, periodic_seconds=s.durability.periodic_seconds,
        persisted_step=s.persisted_step, loaded=s.loaded, quarantined=s.quarantined,
        missing_optimizer=s.missing, size_bytes=s.set_nbytes)
    if s.schedule is not None:
        info.schedule = s.schedule.name
        info.schedule_parameters.update({k: float(v) for k, v in s.schedule.parameters.items()})
    if s.unsaved is not None:
        info.unsaved_steps, info.unsaved_seconds = s.unsaved()
    info.created_at.FromNanoseconds(int(s.created_at * 1e9))
    info.last_used_at.FromNanoseconds(int(s.last_used_at * 1e9))
    add_worker_info(info, s)
    return info


def listed_info(s: Session) -> bytes:
    """session_info(s) encoded; for a single-writer session with nothing unsaved, kept on it while the
    fields it shows are the same objects. A page of 100 sessions among 100,000, created in random id
    order, otherwise reads ~15 objects scattered over the heap for each (1.4x a page of 100 sessions
    made together, in process, caches cold): the kept encoding is one. Loaded sessions too: which
    of a page's sessions are loaded depends on their use and age, not on the page."""
    key = (s.step, s.persisted_step, s.last_used_at, s.hyperparameters, s.quarantined, s.missing, s.live is None)
    if s.workers is not None or (s.unsaved is not None and any(s.unsaved())):
        return session_info(s).SerializeToString()  # (what it shows changes by itself)
    kept = s.listed
    if kept is None or any(a is not b for a, b in zip(kept[1], key)):
        kept = s.listed = (session_info(s).SerializeToString(), key)
    return kept[0]


class RegistryServicer(registry_pb2_grpc.OptimizerRegistryServiceServicer):
    def __init__(self, registry: Registry, metrics: Metrics | None = None):
        self.registry = registry
        self.metrics = metrics or Metrics()

    @status.handler
    def ListOptimizers(self, request, context):
        return list_optimizers(self.registry)


def list_optimizers(registry: Registry) -> registry_pb2.ListOptimizersResponse:
    out = registry_pb2.ListOptimizersResponse()
    for reg in registry.optimizers.values():
        d = reg.definition
        info = out.optimizers.add(name=d.name, summary=d.summary, elementwise=d.elementwise,
                                  sparse_rows=d.sparse_rows, plugin=reg.plugin, distribution=reg.distribution,
                                  version=reg.version)
        _specs(info.hyperparameters, d.hyperparameters)
        for s in d.slots:
            info.slots.add(name=s.name, initial_value=s.initial_value, shape=s.shape.__name__, dtype=s.dtype or "",
                           domain=s.domain)
    for reg in registry.schedules.values():
        d = reg.definition
        info = out.schedules.add(name=d.name, summary=d.summary, required=d.required, plugin=reg.plugin,
                                 distribution=reg.distribution, version=reg.version)
        _specs(info.parameters, d.parameters)
    for f in registry.failures:
        out.failures.add(plugin=f.plugin, reason=f.reason)
    return out


def _specs(into, hyperparameters) -> None:
    for h in hyperparameters:
        spec = into.add(name=h.name, type=_HP_TYPES[h.type], default=float(h.default),
                        minimum_exclusive=h.minimum_exclusive, maximum_exclusive=h.maximum_exclusive, doc=h.doc)
        if h.minimum is not None:
            spec.minimum = h.minimum
        if h.maximum is not None:
            spec.maximum = h.maximum


def _no_owner(context) -> str:
    return ""


def _writer(context) -> tuple:
    """(writers.Writer or None, take over?) of a single-writer step's caller."""
    # peer() now: the lease keeps it beyond the call, and an ended asyncio call cannot answer it
    return writers.from_call(context.invocation_metadata(), context.peer())


class _Paced:
    """A request stream read by a thread of its own into a small queue, so the handler can end a
    sender that makes no progress (no new tensor data) for `seconds` with a status that says so:
    a stalled client holds its worker thread and stream slot for a bounded time only."""
    _END = object()

    def __init__(self, requests, seconds: float, slot=None):
        self.seconds = seconds
        self.slot = slot  # the call's stream slot: a worker's contribution gives it back once received
        self.closed = False
        self.deadline = time.monotonic() + seconds
        self.queue: queue.Queue = queue.Queue(maxsize=4)  # read-ahead, so a fast sender is not slowed
        threading.Thread(target=self._read, args=(iter(requests),), daemon=True,
                         name="optreg-stream-reader").start()

    def _read(self, requests) -> None:
        try:
            for m in requests:
                if not self._put(m):
                    return
            self._put(self._END)
        except grpc.RpcError:  # the client cancelled the call (or its deadline passed): no server error
            self._put(Cancelled("the call was cancelled before its last message; nothing of it was applied"))
        except BaseException as e:  # the call broke otherwise: hand it to the handler
            self._put(e)

    def _put(self, item) -> bool:
        while not self.closed:
            try:
                self.queue.put(item, timeout=0.5)
                return True
            except queue.Full:
                pass
        return False

    def progress(self) -> None:
        self.deadline = time.monotonic() + self.seconds

    def __iter__(self):
        while True:
            wait = self.deadline - time.monotonic() if self.seconds else None
            if wait is not None and wait <= 0:
                raise DeadlineExceeded(f"no tensor data for {self.seconds:g} s (--stream-idle-seconds): the server "
                                       "ended the stream; nothing was applied, send the step again")
            try:
                item = self.queue.get(timeout=wait)
            except queue.Empty:
                continue
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def received(self) -> None:
        """The whole request stream is in: the stream slot is free for another sender (a shared
        session's contribution then waits for its round under --max-members, rpc/workers.py)."""
        if self.slot is not None:
            self.slot.release()

    def close(self) -> None:
        self.closed = True


class Upload:
    """A CreateSessionStream's arrays as they arrive: add() each message, then finish(); close() always."""

    def __init__(self, store: SessionStore):
        self.store = store
        self.config, self.initial_step = None, 0
        self.arrays: dict[str, tensors.Assembler] = {}
        self.held = []  # reservations for the uploaded arrays, released when this call ends

    def _reserve(self, name, nbytes):
        self.store.budget.reserve(nbytes, f"uploading {shown(name)}")
        self.held.append(nbytes)

    def add(self, i: int, msg) -> bool:
        """Message `i`; whether it brought tensor data."""
        if i == 0:
            if not msg.HasField("config"):
                raise InvalidArgument("the first CreateSessionStream message must carry config")
            self.config, self.initial_step = config_from(msg.config), msg.initial_step
        elif msg.HasField("config"):
            raise InvalidArgument("config may only be sent in the first message")
        arrays = self.arrays
        if msg.slot not in arrays and len(arrays) > 64:
            raise InvalidArgument("too many state slots in the stream")
        asm = arrays.get(msg.slot)
        if asm is None:
            asm = arrays[msg.slot] = tensors.Assembler(
                what="parameter" if not msg.slot else f"state {shown(msg.slot)}",
                max_tensors=self.store.limits.max_tensors, reserve=self._reserve)
        before = sum(asm.tracker.filled.values())
        for t in msg.chunks:
            asm.add(t)
        return sum(asm.tracker.filled.values()) > before

    def finish(self, owner: str) -> session_pb2.CreateSessionStreamResponse:
        if self.config is None:
            raise InvalidArgument("the stream was empty: send config and the parameters")
        params = self.arrays.pop("", tensors.Assembler()).finish()
        state = {slot: asm.finish() for slot, asm in self.arrays.items()}
        # the assembled arrays are this call's own: the session takes them without a copy
        session = self.store.create(self.config, params, state, self.initial_step, owner, adopt=True)
        return session_pb2.CreateSessionStreamResponse(session=session_info(session))

    def close(self) -> None:
        self.arrays.clear()
        for n in self.held:
            self.store.budget.release(n)
        self.held = []


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    """`owner(context)` names the caller (a token's hash; "" without auth); the store checks it.

    Calls that stream tensors in or out are admitted up to `max_streams` at once (the rest are refused
    with RESOURCE_EXHAUSTED). On the asyncio server, rpc/aio.py runs the calls that wait (Step,
    StepStream, CreateSessionStream, RegisterSharedMemory) as coroutines over these methods; the
    methods themselves also serve callers that invoke them directly (cluster/host.py)."""

    def __init__(self, store: SessionStore, chunk_bytes: int = tensors.CHUNK_BYTES, metrics: Metrics | None = None,
                 owner=_no_owner, max_message_bytes: int = 64 << 20, shm_registrations: int = 4,
                 max_streams: int = 8, stream_idle_seconds: float = 30.0, max_members: int = 64):
        self.store = store
        self.page_tokens = pages.PageTokens()  # ListSessions
        self.max_message_bytes = max_message_bytes
        self.chunk_bytes = max(4096, min(chunk_bytes, max_message_bytes - (64 << 10)))  # room for the envelope
        self.metrics = metrics or Metrics()
        self.owner = owner
        self.shm = shm.SharedMemoryRegistry(shm_registrations)
        self.max_streams = max_streams
        self._streams = admission.Limit(max_streams, f"this server is running {max_streams} streaming calls, its "
                                        "limit (--max-streams); retry shortly, or send small steps with Step")
        self.stream_idle_seconds = stream_idle_seconds
        store.observers.append(_ReleaseSegments(self.shm))
        self.workers = WorkerSteps(store, self.chunk_bytes, max_message_bytes, max_members)  # shared sessions
        # JIT the server's own optimizers' kernels in the background (numpy until then: same numbers);
        # compiled kernels are found by their definition, so these objects, not a fresh registry's.
        warmup.warm(definitions=[r.definition for r in store.registry.optimizers.values()])

    @contextlib.contextmanager
    def _upload(self, request_iterator):
        """A stream slot, and the requests paced by the idle timeout, for a call that receives a stream."""
        with self._streams.take() as slot:
            paced = _Paced(request_iterator, self.stream_idle_seconds, slot)
            try:
                yield paced
            finally:
                paced.close()

    # -- lifecycle -------------------------------------------------------
    @status.handler
    def CreateSession(self, request, context):
        params = _tensor_map(request.parameters, "parameter")
        state = {}
        for slot in request.state:
            once(state, "state slot", slot.slot)
            state[slot.slot] = _tensor_map(slot.tensors, f"state {slot.slot}")
        session = self.store.create(config_from(request.config), params, state, request.initial_step,
                                    self.owner(context))
        return session_pb2.CreateSessionResponse(session=session_info(session))

    @status.handler
    def CreateSessionStream(self, request_iterator, context):
        with self._upload(request_iterator) as requests:
            return self._create_stream(requests, context)

    def _create_stream(self, requests, context):
        upload = Upload(self.store)
        try:
            for i, msg in enumerate(requests):
                if upload.add(i, msg):
                    requests.progress()
            return upload.finish(self.owner(context))
        finally:
            upload.close()

    @status.handler
    def GetSession(self, request, context):
        s = self.store.get(request.session_id, self.owner(context))
        if s.workers is not None and s.hub is None and not s.quarantined:
            # After a restart: the members and clocks come back from the log when the hub is made (it loads
            # the session), so GetSession lists them before any worker has called again.
            try:
                self.workers.hubs.get(s)
            except (ResourceExhausted, DataLoss) as e:  # no room to load it now, or damaged files: shown
                log.warning("session %s: members not listed: %s", s.id, e)  # without members, as before
        return session_pb2.GetSessionResponse(session=session_info(s))

    @status.handler
    def ListSessions(self, request, context):
        owner = self.owner(context)
        pages.check_page_size(request.page_size)
        after = self.page_tokens.after(request.page_token, owner) if request.page_token else ""
        found, more = self.store.page(owner, after, request.page_size)
        out = [b"\x0a" + tensors.varint(len(b)) + b for b in map(listed_info, found)]  # sessions = 1
        if more and found:
            token = self.page_tokens.issue(found[-1].id, owner).encode()
            out.append(b"\x12" + tensors.varint(len(token)) + token)  # next_page_token = 2
        return b"".join(out)  # (its serializer passes bytes through: assembly.build_services)

    @status.handler
    def DeleteSession(self, request, context):
        self.store.delete(request.session_id, self.owner(context))
        return session_pb2.DeleteSessionResponse()

    # -- steps -----------------------------------------------------------
    def _run(self, request, context, out=None, session: Session | None = None) -> StepRun:
        if session is None:
            session = self.store.get(request.session_id, self.owner(context))
        fence = request.step if request.HasField("step") else None
        return StepRun(self.store, session, fence, request.hyperparameters, request.metrics, context.is_active, out,
                       sparse=bool(getattr(request, "sparse", None)), writer=_writer(context))

    @status.handler
    def Step(self, request, context):
        session = self.store.get(request.session_id, self.owner(context))
        if shared(session, request.worker):
            return self.workers.step(session, request, context)
        return self.step(session, request, context)

    def step(self, session, request, context):
        """A single-writer session's step: its answer encoded (_step_reply)."""
        run = self._run(request, context, session=session)
        try:
            result = run.open()
            if result is None:
                s = run.session
                if s.reply != "none" and not run.is_sparse:  # a sparse step answers with its rows
                    # Refuse before applying: a step whose reply cannot be sent would be applied and never answered.
                    reply_bytes = s.elements * s.dtype.itemsize
                    if reply_bytes > self.max_message_bytes - (64 << 10):
                        raise FailedPrecondition(
                            f"the reply to this step ({reply_bytes} bytes) exceeds the server's message limit "
                            f"({self.max_message_bytes} bytes): use StepStream, or a session with step_reply "
                            "STEP_REPLY_NONE; the step was not applied")
                names = set()
                for t in gradients(s, request):
                    once(names, "gradient", t.name)
                    names.add(t.name)
                    run.feed(t)
                for i, sr in enumerate(request.sparse):
                    run.feed_sparse(sr, f"sparse[{i}]")
                if run.is_sparse and sparse.reply_bytes(s, names, run.sparse) > self.max_message_bytes - (64 << 10):
                    raise FailedPrecondition(
                        f"the reply to this sparse step (the rows, and the parameters stepped densely) exceeds the "
                        f"server's message limit ({self.max_message_bytes} bytes): use StepStream, or a session with "
                        "step_reply STEP_REPLY_NONE; the step was not applied")
                return run.finish(_step_reply)
            return _step_reply(result)  # a retry: the run holds the answer's arrays as a reader
        finally:
            run.close()

    @status.handler
    def StepStream(self, request_iterator, context):
        with self._upload(request_iterator) as requests:
            yield from self._step_stream(requests, context)

    def _step_stream(self, requests, context):
        request_iterator = iter(requests)
        first = next(request_iterator, None)
        if first is None:
            raise InvalidArgument("the stream was empty: the first message must carry session_id")
        session = self.store.get(first.session_id, self.owner(context))
        if shared(session, first.worker):
            yield from self.workers.step_stream(session, first, request_iterator, requests, context)
            return
        run = self._run(first, context, session=session)
        try:
            result = run.open()
            if result is not None:  # a retry: drain the stream, answer again
                for msg in request_iterator:
                    if any(t.data for t in msg.chunks):  # tensor data only: empty messages are no progress
                        requests.progress()
                yield from self._reply_batches(result.step, True, result.tensors, sparse.to_messages(result))
                return
            for i, msg in enumerate(itertools.chain([first], request_iterator)):
                replies, progress = self.stream_feed(run, i, msg)
                if progress:
                    requests.progress()
                yield from replies
            yield from self.stream_finish(run, run.finish())
        finally:
            run.close()

    def stream_feed(self, run: StepRun, i: int, msg) -> tuple[list, bool]:
        """One StepStream message into the run: (the replies it makes, whether it brought tensor data).
        The result streams while the gradients arrive (the update overlaps the transfer), marked
        provisional: the step may yet be refused (a NaN in a later chunk) or lose its fence's race."""
        if i and msg.session_id and msg.session_id != run.session.id:
            raise InvalidArgument("session_id changed mid-stream")
        if i and msg.sparse:
            raise InvalidArgument("sparse rows came after the stream's first message: send every "
                                  "SparseRows in the first message (each whole)")
        for k, sr in enumerate(msg.sparse):
            run.feed_sparse(sr, f"sparse[{k}]")
        send = run.session.reply == "parameters" and run.overlap
        code, chunk = run.session.master_code, self.chunk_bytes
        out = []
        before = sum(run.tracker.filled.values())
        for t in msg.chunks:
            got = run.feed(t)
            if send and got is not None:
                name, start, p = got
                shape = run.session.shapes[name]
                # A reply chunk can be wider than the gradient chunk (bf16 in, fp32 out): split it.
                per = max(1, chunk // p.itemsize)
                for a in range(0, max(p.size, 1), per):
                    out.append((name, code, shape, start + a, p[a:a + per]))
        # Encoded before the next chunk arrives: one copy of each updated slice, into the message.
        head = tensors.response_head(run.t, provisional=True)
        replies = [tensors.encode_stream_message(head, batch) for batch in tensors.pack_views(out, chunk)]
        return replies, sum(run.tracker.filled.values()) > before

    def stream_finish(self, run: StepRun, result) -> list:
        """The last replies of a committed StepStream step."""
        if run.session.reply == "parameters" and run.overlap and not result.replayed:
            # the provisional chunks are its result
            return [session_pb2.StepStreamResponse(step=result.step, lr=result.lr)]
        # a lost race is answered as the retry it is: the committed step's reply, whole
        return list(self._reply_batches(result.step, result.replayed, result.tensors, sparse.to_messages(result),
                                        result.lr))

    def _reply_batches(self, step, replayed, arrays, rows=(), lr=0.0):
        """The reply's tensors in chunks; a sparse step's rows (`rows`, SparseRows) in the last message."""
        chunks = (c for n, a in arrays.items() for c in tensors.chunk_views(n, a, self.chunk_bytes))
        head = tensors.response_head(step, replayed, lr=lr)
        sent = False
        for batch in tensors.pack_views(chunks, self.chunk_bytes):
            sent = True
            yield tensors.encode_stream_message(head, batch)
        if not sent or rows:
            yield session_pb2.StepStreamResponse(step=step, replayed=replayed, sparse=rows, lr=lr)

    # -- reads -----------------------------------------------------------
    def _read(self, request, context):
        return self.store.read(request.session_id, self.owner(context))

    @staticmethod
    def _selected(session: Session, params: dict, names) -> dict[str, np.ndarray]:
        unknown = [n for n in names if n not in params]
        if unknown:
            raise InvalidArgument(f"unknown parameter(s) {shown(', '.join(unknown))}; the session has: "
                                  f"{shown(', '.join(params), 400)}")
        return {n: params[n] for n in (names or params)}

    @status.handler
    def ReadParameters(self, request, context):
        session, arrays, step = self._read(request, context)
        try:
            return session_pb2.ReadParametersResponse(
                step=step, parameters=[tensors.from_numpy(n, a)
                                       for n, a in self._selected(session, arrays.params, request.names).items()])
        finally:
            self.store.done_reading(session, arrays)

    @status.handler
    def ReadParametersStream(self, request, context):
        with self._streams.take():
            session, arrays, step = self._read(request, context)
            try:
                selected = self._selected(session, arrays.params, request.names)
                for batch in tensors.pack(
                        (c for n, a in selected.items() for c in tensors.chunk(n, a, self.chunk_bytes)),
                        self.chunk_bytes):
                    yield session_pb2.ReadParametersStreamResponse(step=step, chunks=batch)
            finally:
                self.store.done_reading(session, arrays)

    @status.handler
    def ReadState(self, request, context):
        session, arrays, _ = self._read(request, context)
        try:
            return session_pb2.ReadStateResponse(
                session=session_info(session),
                parameters=[tensors.from_numpy(n, a) for n, a in arrays.params.items()],
                state=[tensor_pb2.SlotTensors(slot=slot, tensors=[tensors.from_numpy(n, a) for n, a in arrs.items()])
                       for slot, arrs in arrays.state.items()])
        finally:
            self.store.done_reading(session, arrays)

    @status.handler
    def ReadStateStream(self, request, context):
        with self._streams.take():
            session, arrays, _ = self._read(request, context)
            try:
                yield session_pb2.ReadStateStreamResponse(session=session_info(session))
                parts = [("", arrays.params)] + list(arrays.state.items())
                for slot, arrs in parts:
                    for batch in tensors.pack(
                            (c for n, a in arrs.items() for c in tensors.chunk(n, a, self.chunk_bytes)),
                            self.chunk_bytes):
                        yield session_pb2.ReadStateStreamResponse(slot=slot, chunks=batch)
            finally:
                self.store.done_reading(session, arrays)

    @status.handler
    def UpdateHyperparameters(self, request, context):
        session = self.store.set_hyperparameters(request.session_id, dict(request.hyperparameters),
                                                 self.owner(context), context.time_remaining())
        return session_pb2.UpdateHyperparametersResponse(session=session_info(session))

    # -- same-host shared memory ---------------------------------------------
    @status.handler
    def RegisterSharedMemory(self, request, context):
        got = self.register_shm(request, context)
        if got is None:
            return
        region, step = got
        yield session_pb2.RegisterSharedMemoryResponse(byte_size=region.size, step=step)
        while not region.closed.wait(1.0):
            if not context.is_active():
                break
        self.shm.release(region, "registration ended" if context.is_active() else "client gone")

    def register_shm(self, request, context):
        """(region, step) of a new registration, released when the call ends; None if it ended already."""
        if not shm.is_local_peer(context.peer()):
            raise FailedPrecondition(f"shared memory needs a client on the server's host (connected over loopback); "
                                     f"this call came from {shown(context.peer())}: use Step")
        if request.parameters and not request.resident:
            raise InvalidArgument("parameters are placed only by a resident registration: set resident, or "
                                  "name the parameters in each StepSharedMemory")
        owner = self.owner(context)
        session = self.store.get(request.session_id, owner)
        region = self.shm.register(request.key, request.byte_size, session.id, owner, request.pid, request.fd)
        # The registration lives as long as this call: when it ends (cancelled, the client gone,
        # the server stopping) the segment is unmapped.
        (context.add_done_callback if hasattr(context, "add_done_callback") else context.add_callback)(
            lambda *_: self.shm.release(region, "client gone"))
        if not context.is_active():
            self.shm.release(region, "client gone")
            return None
        step = 0
        if request.resident:
            try:
                with region.lock:  # not released meanwhile (the release detaches under this lock)
                    if region.closed.is_set():
                        return None
                    step = resident.attach(self.store, session, region, request.parameters, context.is_active)
            except BaseException as e:
                # The failed attach's frames hold views of the mapping, and the exception may outlive this
                # call (held by the loop's future): clear them so the segment unmaps now.
                traceback.clear_frames(e.__traceback__)
                self.shm.release(region, "resident registration refused")
                raise
        return region, step

    @status.handler
    def UnregisterSharedMemory(self, request, context):
        owner = self.owner(context)
        session = self.store.get(request.session_id, owner)
        self.shm.release(self.shm.get(request.key, session.id, owner), "unregistered")
        return session_pb2.UnregisterSharedMemoryResponse()

    @status.handler
    def StepSharedMemory(self, request, context):
        owner = self.owner(context)
        session = self.store.get(request.session_id, owner)
        if session.workers is not None:
            raise FailedPrecondition(f"session {session.id} is shared by workers: send contributions with Step or "
                                     "StepStream (worker and round)")
        region = self.shm.get(request.key, session.id, owner)
        if region.resident is not None:
            return self._step_resident(session, region, request, context)
        grads = shm.tensors_in(region, request.gradients, session.master_code, "gradient")
        targets = shm.tensors_in(region, request.parameters, session.master_code, "parameter")
        check = tensors.ChunkTracker({n: (shape, (session.master_code,)) for n, shape in session.shapes.items()},
                                     "parameter")
        out = {}
        for t in targets:
            once(out, "parameter", t.name)
            try:
                check.accept(t)
            except ValueError as e:
                raise InvalidArgument(str(e)) from None
            out[t.name] = np.frombuffer(t.data, dtype=session.dtype).reshape(t.shape)
        with region.lock:
            if region.closed.is_set():
                raise FailedPrecondition(f"shared-memory segment {shown(region.key)} was unregistered")
            run = self._run(request, context, out, session)
            try:
                result = run.open()
                if result is None:
                    names = set()
                    for t in grads:
                        once(names, "gradient", t.name)
                        names.add(t.name)
                        run.feed(t)
                    result = run.finish()
                return session_pb2.StepSharedMemoryResponse(step=result.step, replayed=result.replayed, lr=result.lr)
            finally:
                run.close()
                del out

    def _step_resident(self, session, region, request, context):
        if request.parameters:
            raise InvalidArgument("parameters: leave empty for a resident registration (the parameters are "
                                  "updated where they live in the segment)")
        grads = shm.tensors_in(region, request.gradients, session.master_code, "gradient")
        with region.lock:
            if region.closed.is_set():
                raise FailedPrecondition(f"shared-memory segment {shown(region.key)} was unregistered")
            run = resident.ResidentStep(self.store, session, region, request.step if request.HasField("step") else None,
                                        request.hyperparameters, request.metrics, context.is_active,
                                        _writer(context))
            try:
                run.run(grads)
                return session_pb2.StepSharedMemoryResponse(step=run.result.step, replayed=run.result.replayed,
                                                            lr=run.result.lr)
            finally:
                run.close()

    # -- shared sessions (rpc/workers.py) ---------------------------------------------------
    @status.handler
    def JoinSession(self, request, context):
        session = self.store.get(request.session_id, self.owner(context))
        round_ = self.workers.join(session, request.worker)
        return session_pb2.JoinSessionResponse(session=session_info(session), round=round_)

    @status.handler
    def LeaveSession(self, request, context):
        session = self.store.get(request.session_id, self.owner(context))
        self.workers.leave(session, request.worker)
        return session_pb2.LeaveSessionResponse()

    @status.handler
    def Heartbeat(self, request, context):
        session = self.store.get(request.session_id, self.owner(context))
        return session_pb2.HeartbeatResponse(round=self.workers.heartbeat(session, request.worker))


def shared(session, worker: str) -> bool:
    """Whether a step call is a worker's contribution (rpc/workers.py); refused when it names a worker
    of a single-writer session."""
    if session.workers is None and worker:
        raise FailedPrecondition(f"worker {shown(worker)} given, but session {session.id} is a "
                                 "single-writer session: leave worker empty")
    return session.workers is not None


def _step_reply(result) -> bytes | session_pb2.StepResponse:
    """Step's answer. A dense one is encoded directly: the bytes SerializeToString gives for the same
    StepResponse (tests compare them), each tensor's field header made once per name, dtype and
    shape (_TENSOR_HEADS) and its data copied once: ~2 us a small step against ~7 us to build the
    message and serialize it. The handler's serializer passes bytes through (app._add_session_service).
    Sparse answers are built as messages."""
    if getattr(result, "sparse", None) or getattr(result, "rows", None):
        return _step_response(result)
    parts = [tensors.response_head(result.step, result.replayed)]
    for name, a in result.tensors.items():
        key = (name, a.dtype, a.shape)
        head = _TENSOR_HEADS.get(key)
        if head is None:
            if len(_TENSOR_HEADS) >= 4096:  # bounded: names and shapes come from clients
                _TENSOR_HEADS.clear()
            got: list = []
            tensors._append_tensor(got, name, tensors.to_code(a.dtype), a.shape, 0, a)
            head = _TENSOR_HEADS[key] = got[0] + got[1]  # field 3's tag and length, the Tensor's fields 1-4
        parts.append(head)
        if a.size:
            parts.append(a.reshape(-1).view(np.uint8))
    if result.lr:
        parts.append(_LR_FIELD + struct.pack("<d", result.lr))
    return b"".join(parts)


_LR_FIELD = b"\x49"  # StepResponse field 9 (lr), a double: tag (9 << 3) | 1


_TENSOR_HEADS: dict[tuple, bytes] = {}


def _step_response(result) -> session_pb2.StepResponse:
    return session_pb2.StepResponse(step=result.step, replayed=result.replayed,
                                    tensors=[tensors.from_numpy(n, a) for n, a in result.tensors.items()],
                                    sparse=sparse.to_messages(result), lr=result.lr)


def _tensor_map(items, what: str) -> dict[str, np.ndarray]:
    out = {}
    for t in items:
        once(out, what, t.name)
        out[t.name] = tensors.to_numpy(t)
    return out


class _ReleaseSegments:
    """Store observer: a deleted session's shared-memory registrations end with it."""

    def __init__(self, registry: shm.SharedMemoryRegistry):
        self.registry = registry

    def on_step(self, session, run):
        pass

    def on_refused(self, session, run):
        pass

    def on_delete(self, session):
        self.registry.release_session(session.id)
