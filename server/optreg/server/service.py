"""The gRPC servicers: turn requests into session operations and errors into status codes."""
from __future__ import annotations

import functools
import inspect
import itertools
import logging
import time

import grpc
import numpy as np

from optreg.plugins import HyperparameterError
from optreg.server import fastkernels, shm, streaming
from optreg.server.errors import RequestError, invalid
from optreg.server.metrics import Metrics
from optreg.server.sessions import PluginError, Session, check_finite
from optreg.server.store import SessionStore
from optreg.plugins.registry import Registry
from optreg.v1 import registry_pb2, registry_pb2_grpc, session_pb2, session_pb2_grpc, tensor_pb2, tensors

log = logging.getLogger("optreg.server")

_HP_TYPES = {float: registry_pb2.HYPERPARAMETER_TYPE_FLOAT, int: registry_pb2.HYPERPARAMETER_TYPE_INT,
             bool: registry_pb2.HYPERPARAMETER_TYPE_BOOL}


def _abort(context, code, message, metadata=()):
    if metadata:
        context.set_trailing_metadata(metadata)
    context.abort(code, message)


def _status(method):
    """Map the server's exceptions to gRPC status codes, for unary and streaming handlers alike;
    count bytes in and out and errors by code."""

    def translate(self, context, e):
        if isinstance(e, RequestError):
            code, message, metadata = e.code, e.message, e.metadata
        elif isinstance(e, ValueError):
            code, message, metadata = grpc.StatusCode.INVALID_ARGUMENT, str(e), ()
        elif isinstance(e, PluginError):
            log.error("%s", e)
            code, message, metadata = grpc.StatusCode.INTERNAL, f"{e}; the session is unchanged", ()
        elif isinstance(e, MemoryError):
            code, message, metadata = (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                       "the server is out of memory for this request", ())
        else:
            self.metrics.error(grpc.StatusCode.UNKNOWN.name, method.__name__)
            log.exception("%s failed", method.__name__)
            raise e
        self.metrics.error(code.name, method.__name__)
        _abort(context, code, message, metadata)

    def counted(self, iterator):
        for msg in iterator:
            if type(msg) is tuple:  # (size on the wire, message): StepStream's, see app._add_session_service
                size, msg = msg
            else:
                size = msg.ByteSize()  # upb encodes the message to size it: a copy of every byte
            self.metrics.bytes_in(size)
            yield msg

    streaming_in = method.__name__.endswith("Stream") and method.__name__ in ("CreateSessionStream", "StepStream")

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, request, context):
            if streaming_in:
                request = counted(self, request)
            else:
                self.metrics.bytes_in(request.ByteSize())
            try:
                for reply in method(self, request, context):
                    # StepStream yields some replies already encoded (bytes)
                    self.metrics.bytes_out(len(reply) if type(reply) is bytes else reply.ByteSize())
                    yield reply
            except Exception as e:
                translate(self, context, e)
        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        if streaming_in:
            request = counted(self, request)
        else:
            self.metrics.bytes_in(request.ByteSize())
        try:
            reply = method(self, request, context)
        except Exception as e:
            translate(self, context, e)
        self.metrics.bytes_out(reply.ByteSize())
        return reply
    return unary


def session_info(s: Session) -> session_pb2.SessionInfo:
    info = session_pb2.SessionInfo(
        session_id=s.id, optimizer=s.optimizer.definition.name,
        hyperparameters={k: float(v) for k, v in s.hyperparameters.items()}, step=s.step,
        master_dtype=s.master_code, step_reply=s.step_reply,
        parameters=[session_pb2.TensorInfo(name=n, dtype=s.master_code, shape=shape) for n, shape in s.shapes.items()],
        slots=list(s.slot_names), durability=s.durability, periodic_steps=s.periodic_steps,
        periodic_seconds=s.periodic_seconds, persisted_step=s.persisted_step, loaded=s.loaded)
    info.created_at.FromNanoseconds(int(s.created_at * 1e9))
    info.last_used_at.FromNanoseconds(int(s.last_used_at * 1e9))
    return info


def _decode_gradients(session: Session, tensors_in) -> dict[str, np.ndarray]:
    grads: dict[str, np.ndarray] = {}
    for t in tensors_in:
        if t.name in grads:
            raise invalid(f"gradient {t.name!r} is given twice")
        session.check_gradient(t)
        grads[t.name] = tensors.to_numpy(t)
    return _finish_gradients(session, grads)


def _finish_gradients(session: Session, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = [n for n in session.shapes if n not in grads]
    if missing:
        raise invalid(f"missing gradient(s) for {', '.join(missing)}: a step needs one for every parameter")
    out = {}
    for name, g in grads.items():
        check_finite(name, g)
        out[name] = g if g.dtype == session.dtype else g.astype(session.dtype)
    return out


class RegistryServicer(registry_pb2_grpc.OptimizerRegistryServiceServicer):
    def __init__(self, registry: Registry, metrics: Metrics | None = None):
        self.registry = registry
        self.metrics = metrics or Metrics()

    @_status
    def ListOptimizers(self, request, context):
        return list_optimizers(self.registry)


def list_optimizers(registry: Registry) -> registry_pb2.ListOptimizersResponse:
    out = registry_pb2.ListOptimizersResponse()
    for reg in registry.optimizers.values():
        d = reg.definition
        info = out.optimizers.add(name=d.name, summary=d.summary, elementwise=d.elementwise,
                                  sparse_rows=d.sparse_rows, plugin=reg.plugin, distribution=reg.distribution,
                                  version=reg.version)
        for h in d.hyperparameters:
            spec = info.hyperparameters.add(name=h.name, type=_HP_TYPES[h.type], default=float(h.default),
                                            minimum_exclusive=h.minimum_exclusive,
                                            maximum_exclusive=h.maximum_exclusive, doc=h.doc)
            if h.minimum is not None:
                spec.minimum = h.minimum
            if h.maximum is not None:
                spec.maximum = h.maximum
        for s in d.slots:
            info.slots.add(name=s.name, initial_value=s.initial_value)
    for f in registry.failures:
        out.failures.add(plugin=f.plugin, reason=f.reason)
    return out


def _no_owner(context) -> str:
    return ""


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    """`owner(context)` names the caller (a token's hash; "" without auth); the store checks it."""

    def __init__(self, store: SessionStore, chunk_bytes: int = tensors.CHUNK_BYTES, metrics: Metrics | None = None,
                 owner=_no_owner, max_message_bytes: int = 64 << 20, shm_registrations: int = 4):
        self.store = store
        self.max_message_bytes = max_message_bytes
        self.chunk_bytes = max(4096, min(chunk_bytes, max_message_bytes - (64 << 10)))  # room for the envelope
        self.metrics = metrics or Metrics()
        self.owner = owner
        self.shm = shm.SharedMemoryRegistry(shm_registrations)
        store.on_delete.append(self.shm.release_session)
        fastkernels.warm()  # JIT the built-ins' fused kernels in the background (numpy until then: same numbers)

    def _use(self, session_id, context):
        return self.store.use(session_id, self.owner(context))

    # -- lifecycle -------------------------------------------------------
    @_status
    def CreateSession(self, request, context):
        params = {}
        for t in request.parameters:
            if t.name in params:
                raise invalid(f"parameter {t.name!r} is given twice")
            params[t.name] = tensors.to_numpy(t)
        state = {}
        for slot in request.state:
            if slot.slot in state:
                raise invalid(f"state slot {slot.slot!r} is given twice")
            state[slot.slot] = {}
            for t in slot.tensors:
                if t.name in state[slot.slot]:
                    raise invalid(f"state {slot.slot}/{t.name} is given twice")
                state[slot.slot][t.name] = tensors.to_numpy(t)
        session = self.store.create(request.config, params, state, request.initial_step, self.owner(context))
        return session_pb2.CreateSessionResponse(session=session_info(session))

    @_status
    def CreateSessionStream(self, request_iterator, context):
        config, initial_step = None, 0
        arrays: dict[str, tensors.Assembler] = {}
        owner = self.owner(context)
        for i, msg in enumerate(request_iterator):
            if i == 0:
                if not msg.HasField("config"):
                    raise invalid("the first CreateSessionStream message must carry config")
                config, initial_step = msg.config, msg.initial_step
            elif msg.HasField("config"):
                raise invalid("config may only be sent in the first message")
            asm = arrays.setdefault(msg.slot, tensors.Assembler(max_bytes=self.store.memory_budget or None))
            for t in msg.chunks:
                asm.add(t)
        if config is None:
            raise invalid("the stream was empty: send config and the parameters")
        params = arrays.pop("", tensors.Assembler()).finish()
        state = {slot: asm.finish() for slot, asm in arrays.items()}
        session = self.store.create(config, params, state, initial_step, owner)
        return session_pb2.CreateSessionStreamResponse(session=session_info(session))

    @_status
    def GetSession(self, request, context):
        return session_pb2.GetSessionResponse(
            session=session_info(self.store.get(request.session_id, self.owner(context))))

    @_status
    def ListSessions(self, request, context):
        return session_pb2.ListSessionsResponse(
            sessions=[session_info(s) for s in self.store.list(self.owner(context))])

    @_status
    def DeleteSession(self, request, context):
        self.store.delete(request.session_id, self.owner(context))
        return session_pb2.DeleteSessionResponse()

    # -- steps -----------------------------------------------------------
    def _step(self, session: Session, fence, grads, context):
        """Apply under the lock, then the durability policy; caller holds the lock."""
        t0 = time.perf_counter()
        result = session.fenced_apply(fence, grads, context.is_active)
        self.store.after_change(session)
        self.metrics.step(time.perf_counter() - t0, result.replayed)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("session %s step %d%s", session.id, result.step, " (replayed)" if result.replayed else "",
                      extra={"session_id": session.id, "step": result.step})
        return result

    @_status
    def Step(self, request, context):
        owner = self.owner(context)
        session = self.store.get(request.session_id, owner)
        fence = request.step if request.HasField("step") else None
        # Decoding reads only the session's fixed shapes, so it happens outside the lock.
        grads = _decode_gradients(session, request.gradients)
        reply_bytes = 0 if session.step_reply == session_pb2.STEP_REPLY_NONE else sum(
            g.nbytes for g in grads.values())  # gradients are widened to the master dtype: the reply's size
        if reply_bytes > self.max_message_bytes - (64 << 10):
            # Refuse before applying: a step whose reply cannot be sent would be applied and never answered.
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"the reply to this step ({reply_bytes} bytes) exceeds the server's message limit "
                               f"({self.max_message_bytes} bytes): use StepStream, or a session with "
                               "step_reply STEP_REPLY_NONE; the step was not applied")
        with self.store.use(session.id, owner, session) as session:
            result = self._step(session, fence, grads, context)
            return session_pb2.StepResponse(
                step=result.step, replayed=result.replayed,
                tensors=[tensors.from_numpy(n, a) for n, a in result.tensors.items()])

    @_status
    def StepStream(self, request_iterator, context):
        owner = self.owner(context)
        request_iterator = iter(request_iterator)
        first = next(request_iterator, None)
        if first is None:
            raise invalid("the stream was empty: the first message must carry session_id")
        session = self.store.get(first.session_id, owner)
        fence = first.step if first.HasField("step") else None
        if streaming.overlappable(session):  # update chunk k while chunk k+1 is on the wire
            with self.store.use(session.id, owner, session) as session:
                t0 = time.perf_counter()
                result = yield from streaming.step_stream(session, fence, first, request_iterator, context,
                                                          self.chunk_bytes)
                self.store.after_change(session)  # durable before the commit message acknowledges it
                self.metrics.step(time.perf_counter() - t0, result.replayed)
            yield session_pb2.StepStreamResponse(step=result.step, replayed=result.replayed)
            return
        asm = tensors.Assembler(session.gradient_spec())
        for i, msg in enumerate(itertools.chain([first], request_iterator)):
            if i and msg.session_id and msg.session_id != session.id:
                raise invalid("session_id changed mid-stream")
            for t in msg.chunks:
                asm.add(t)
        grads = _finish_gradients(session, asm.finish())
        with self.store.use(session.id, owner, session) as session:
            result = self._step(session, fence, grads, context)
            # Encode while the arrays cannot change; send after releasing the lock.
            batches = self._batches(result.tensors)
        if not batches:
            yield session_pb2.StepStreamResponse(step=result.step, replayed=result.replayed)
        for batch in batches:
            yield session_pb2.StepStreamResponse(step=result.step, replayed=result.replayed, chunks=batch)

    def _batches(self, arrays: dict[str, np.ndarray]) -> list[list[tensor_pb2.Tensor]]:
        chunks = (c for n, a in arrays.items() for c in tensors.chunk(n, a, self.chunk_bytes))
        return list(tensors.pack(chunks, self.chunk_bytes))

    # -- reads -----------------------------------------------------------
    def _selected(self, session: Session, names) -> dict[str, np.ndarray]:
        unknown = [n for n in names if n not in session.params]
        if unknown:
            raise invalid(f"unknown parameter(s) {', '.join(unknown)}; the session has: {', '.join(session.params)}")
        return {n: session.params[n] for n in (names or session.params)}

    @_status
    def ReadParameters(self, request, context):
        with self._use(request.session_id, context) as session:
            return session_pb2.ReadParametersResponse(
                step=session.step,
                parameters=[tensors.from_numpy(n, a) for n, a in self._selected(session, request.names).items()])

    @_status
    def ReadParametersStream(self, request, context):
        with self._use(request.session_id, context) as session:
            step = session.step
            batches = self._batches(self._selected(session, request.names))
        for batch in batches:
            yield session_pb2.ReadParametersStreamResponse(step=step, chunks=batch)

    @_status
    def ReadState(self, request, context):
        with self._use(request.session_id, context) as session:
            return session_pb2.ReadStateResponse(
                session=session_info(session),
                parameters=[tensors.from_numpy(n, a) for n, a in session.params.items()],
                state=[tensor_pb2.SlotTensors(slot=slot, tensors=[tensors.from_numpy(n, a) for n, a in arrs.items()])
                       for slot, arrs in session.state.items()])

    @_status
    def ReadStateStream(self, request, context):
        with self._use(request.session_id, context) as session:
            info = session_info(session)
            parts = [("", self._batches(session.params))]
            parts += [(slot, self._batches(arrs)) for slot, arrs in session.state.items()]
        yield session_pb2.ReadStateStreamResponse(session=info)
        for slot, batches in parts:
            for batch in batches:
                yield session_pb2.ReadStateStreamResponse(slot=slot, chunks=batch)

    @_status
    def UpdateHyperparameters(self, request, context):
        with self._use(request.session_id, context) as session:
            try:
                session.hyperparameters = session.optimizer.definition.resolve(
                    dict(request.hyperparameters), base=session.hyperparameters)
            except HyperparameterError as e:
                raise invalid(str(e)) from None
            session.dirty = True
            if session.durability != session_pb2.DURABILITY_NONE:
                self.store._save(session)  # rare: written at once in every durable mode
            return session_pb2.UpdateHyperparametersResponse(session=session_info(session))

    # -- same-host shared memory ---------------------------------------------
    @_status
    def RegisterSharedMemory(self, request, context):
        if not shm.is_local_peer(context.peer()):
            raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                               f"shared memory needs a client on the server's host (connected over loopback); "
                               f"this call came from {context.peer()}: use Step")
        owner = self.owner(context)
        session = self.store.get(request.session_id, owner)
        region = self.shm.register(request.key, request.byte_size, session.id, owner)
        # The registration lives as long as this call: when it ends (cancelled, the client gone,
        # the server stopping) the segment is unmapped and its name unlinked.
        context.add_callback(lambda: self.shm.release(region, "client gone"))
        if not context.is_active():
            self.shm.release(region, "client gone")
            return
        yield session_pb2.RegisterSharedMemoryResponse(byte_size=region.size)
        while not region.closed.wait(1.0):
            if not context.is_active():
                break
        self.shm.release(region, "registration ended")

    @_status
    def UnregisterSharedMemory(self, request, context):
        owner = self.owner(context)
        session = self.store.get(request.session_id, owner)
        self.shm.release(self.shm.get(request.key, session.id, owner), "unregistered")
        return session_pb2.UnregisterSharedMemoryResponse()

    @_status
    def StepSharedMemory(self, request, context):
        owner = self.owner(context)
        session = self.store.get(request.session_id, owner)
        region = self.shm.get(request.key, session.id, owner)
        fence = request.step if request.HasField("step") else None
        spec = session.gradient_spec()
        grad_at = shm.layout(region, request.gradients, spec, session.master_code, "gradient")
        missing = [n for n in session.shapes if n not in {g[0] for g in grad_at}]
        if missing:
            raise invalid(f"missing gradient(s) for {', '.join(missing)}: a step needs one for every parameter")
        master = (session.master_code,)
        param_at = shm.layout(region, request.parameters, {n: (s, master) for n, s in session.shapes.items()},
                              session.master_code, "parameter")
        with self.store.use(session.id, owner, session) as session, region.lock:
            if region.closed.is_set():
                raise RequestError(grpc.StatusCode.FAILED_PRECONDITION,
                                   f"shared-memory segment {region.key!r} was unregistered")
            t0 = time.perf_counter()
            out = {n: region.view(off, session.dtype, shape) for n, _, shape, off in param_at}
            if session.check_fence(fence):  # a retry: write the current parameters again, apply nothing
                for n, o in out.items():
                    np.copyto(o, session.params[n])
                replayed = True
            else:
                grads = {}
                for n, code, shape, off in grad_at:  # all validated before anything changes
                    g = region.view(off, tensors.numpy_dtype(code), shape)
                    check_finite(n, g)
                    grads[n] = g if g.dtype == session.dtype else g.astype(session.dtype)
                if not context.is_active():
                    raise RequestError(grpc.StatusCode.CANCELLED, "the call ended before the step was applied")
                session.apply(grads, out)
                replayed = False
                del grads, g
            del out
            self.store.after_change(session)
            self.metrics.step(time.perf_counter() - t0, replayed)
            return session_pb2.StepSharedMemoryResponse(step=session.step, replayed=replayed)
