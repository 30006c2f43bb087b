"""The gRPC servicers: turn requests into session operations and errors into status codes."""
from __future__ import annotations

import functools
import inspect
import itertools
import logging

import grpc
import numpy as np

from optreg.plugins import HyperparameterError
from optreg.server import fastkernels, streaming
from optreg.server.errors import RequestError, invalid
from optreg.server.sessions import PluginError, Session, SessionStore, check_finite
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
    """Map the server's exceptions to gRPC status codes, for unary and streaming handlers alike."""

    def translate(context, e):
        if isinstance(e, RequestError):
            _abort(context, e.code, e.message, e.metadata)
        elif isinstance(e, ValueError):
            _abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(e))
        elif isinstance(e, PluginError):
            log.error("%s", e)
            _abort(context, grpc.StatusCode.INTERNAL, f"{e}; the session is unchanged")
        elif isinstance(e, MemoryError):
            _abort(context, grpc.StatusCode.RESOURCE_EXHAUSTED, "the server is out of memory for this request")
        raise e

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, request, context):
            try:
                yield from method(self, request, context)
            except Exception as e:
                translate(context, e)
        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        try:
            return method(self, request, context)
        except Exception as e:
            translate(context, e)
    return unary


def session_info(s: Session) -> session_pb2.SessionInfo:
    info = session_pb2.SessionInfo(
        session_id=s.id, optimizer=s.optimizer.definition.name,
        hyperparameters={k: float(v) for k, v in s.hyperparameters.items()}, step=s.step,
        master_dtype=s.master_code, step_reply=s.step_reply,
        parameters=[session_pb2.TensorInfo(name=n, dtype=s.master_code, shape=p.shape) for n, p in s.params.items()],
        slots=list(s.state))
    info.created_at.FromNanoseconds(int(s.created_at * 1e9))
    info.last_used_at.FromNanoseconds(int(s.last_used_at * 1e9))
    return info


def _decode_gradients(session: Session, tensors_in) -> dict[str, np.ndarray]:
    spec = session.gradient_spec()
    grads: dict[str, np.ndarray] = {}
    for t in tensors_in:
        if t.name in grads:
            raise invalid(f"gradient {t.name!r} is given twice")
        if t.name not in spec:
            raise invalid(f"unknown gradient {t.name!r}; the session's parameters are: {', '.join(spec)}")
        shape, allowed = spec[t.name]
        if t.dtype not in allowed:
            raise invalid(f"gradient {t.name!r}: dtype {tensors.dtype_name(t.dtype)} does not fit the session's "
                          f"master dtype {tensors.dtype_name(session.master_code)}; send one of "
                          + ", ".join(tensors.dtype_name(a) for a in allowed))
        if tuple(t.shape) != shape:
            raise invalid(f"gradient {t.name!r}: shape {list(t.shape)}, but the parameter's is {list(shape)}")
        grads[t.name] = tensors.to_numpy(t)
    return _finish_gradients(session, grads)


def _finish_gradients(session: Session, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    missing = [n for n in session.params if n not in grads]
    if missing:
        raise invalid(f"missing gradient(s) for {', '.join(missing)}: a step needs one for every parameter")
    out = {}
    for name, g in grads.items():
        check_finite(name, g)
        out[name] = g if g.dtype == session.dtype else g.astype(session.dtype)
    return out


class RegistryServicer(registry_pb2_grpc.OptimizerRegistryServiceServicer):
    def __init__(self, registry: Registry):
        self.registry = registry

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


class SessionServicer(session_pb2_grpc.SessionServiceServicer):
    def __init__(self, store: SessionStore, chunk_bytes: int = tensors.CHUNK_BYTES):
        self.store = store
        self.chunk_bytes = chunk_bytes
        fastkernels.warm()  # JIT the built-ins' fused kernels in the background (numpy until then: same numbers)

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
            state[slot.slot] = {t.name: tensors.to_numpy(t) for t in slot.tensors}
        session = self.store.create(request.config, params, state, request.initial_step)
        return session_pb2.CreateSessionResponse(session=session_info(session))

    @_status
    def CreateSessionStream(self, request_iterator, context):
        config, initial_step = None, 0
        arrays: dict[str, tensors.Assembler] = {}
        for i, msg in enumerate(request_iterator):
            if i == 0:
                if not msg.HasField("config"):
                    raise invalid("the first CreateSessionStream message must carry config")
                config, initial_step = msg.config, msg.initial_step
            elif msg.HasField("config"):
                raise invalid("config may only be sent in the first message")
            asm = arrays.setdefault(msg.slot, tensors.Assembler())
            for t in msg.chunks:
                asm.add(t)
        if config is None:
            raise invalid("the stream was empty: send config and the parameters")
        params = arrays.pop("", tensors.Assembler()).finish()
        state = {slot: asm.finish() for slot, asm in arrays.items()}
        session = self.store.create(config, params, state, initial_step)
        return session_pb2.CreateSessionStreamResponse(session=session_info(session))

    @_status
    def GetSession(self, request, context):
        return session_pb2.GetSessionResponse(session=session_info(self.store.get(request.session_id)))

    @_status
    def ListSessions(self, request, context):
        return session_pb2.ListSessionsResponse(sessions=[session_info(s) for s in self.store.list()])

    @_status
    def DeleteSession(self, request, context):
        self.store.delete(request.session_id)
        return session_pb2.DeleteSessionResponse()

    # -- steps -----------------------------------------------------------
    @_status
    def Step(self, request, context):
        session = self.store.get(request.session_id)
        fence = request.step if request.HasField("step") else None
        # Decoding reads only the session's fixed shapes, so it happens outside the lock.
        grads = _decode_gradients(session, request.gradients)
        with session.lock:
            result = session.fenced_apply(fence, grads, context.is_active)
            return session_pb2.StepResponse(
                step=result.step, replayed=result.replayed,
                tensors=[tensors.from_numpy(n, a) for n, a in result.tensors.items()])

    @_status
    def StepStream(self, request_iterator, context):
        request_iterator = iter(request_iterator)
        first = next(request_iterator, None)
        if first is None:
            raise invalid("the stream was empty: the first message must carry session_id")
        session = self.store.get(first.session_id)
        fence = first.step if first.HasField("step") else None
        if streaming.overlappable(session):  # update chunk k while chunk k+1 is on the wire
            yield from streaming.step_stream(session, fence, first, request_iterator, context, self.chunk_bytes)
            return
        asm = tensors.Assembler(session.gradient_spec())
        for i, msg in enumerate(itertools.chain([first], request_iterator)):
            if i and msg.session_id and msg.session_id != session.id:
                raise invalid("session_id changed mid-stream")
            for t in msg.chunks:
                asm.add(t)
        grads = _finish_gradients(session, asm.finish())
        with session.lock:
            result = session.fenced_apply(fence, grads, context.is_active)
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
        session = self.store.get(request.session_id)
        with session.lock:
            return session_pb2.ReadParametersResponse(
                step=session.step,
                parameters=[tensors.from_numpy(n, a) for n, a in self._selected(session, request.names).items()])

    @_status
    def ReadParametersStream(self, request, context):
        session = self.store.get(request.session_id)
        with session.lock:
            step = session.step
            batches = self._batches(self._selected(session, request.names))
        for batch in batches:
            yield session_pb2.ReadParametersStreamResponse(step=step, chunks=batch)

    @_status
    def ReadState(self, request, context):
        session = self.store.get(request.session_id)
        with session.lock:
            return session_pb2.ReadStateResponse(
                session=session_info(session),
                parameters=[tensors.from_numpy(n, a) for n, a in session.params.items()],
                state=[tensor_pb2.SlotTensors(slot=slot, tensors=[tensors.from_numpy(n, a) for n, a in arrs.items()])
                       for slot, arrs in session.state.items()])

    @_status
    def ReadStateStream(self, request, context):
        session = self.store.get(request.session_id)
        with session.lock:
            info = session_info(session)
            parts = [("", self._batches(session.params))]
            parts += [(slot, self._batches(arrs)) for slot, arrs in session.state.items()]
        yield session_pb2.ReadStateStreamResponse(session=info)
        for slot, batches in parts:
            for batch in batches:
                yield session_pb2.ReadStateStreamResponse(slot=slot, chunks=batch)

    @_status
    def UpdateHyperparameters(self, request, context):
        session = self.store.get(request.session_id)
        with session.lock:
            try:
                session.hyperparameters = session.optimizer.definition.resolve(
                    dict(request.hyperparameters), base=session.hyperparameters)
            except HyperparameterError as e:
                raise invalid(str(e)) from None
            return session_pb2.UpdateHyperparametersResponse(session=session_info(session))
