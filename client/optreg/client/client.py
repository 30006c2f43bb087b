"""The Python client: sessions over gRPC, with the caller's numpy arrays updated in place."""
from __future__ import annotations

import functools
import time
from typing import Iterator, Mapping

import grpc
import numpy as np

from optreg.client.errors import OptregError, StepMismatch, Unavailable, from_rpc_error
from optreg.v1 import registry_pb2, registry_pb2_grpc, session_pb2, session_pb2_grpc, tensor_pb2, tensors

# Above this many bytes of tensors a call goes over the streaming RPCs (unary
# messages stay well under gRPC's default 4 MiB limit).
STREAM_ABOVE_BYTES = 2 << 20
REPLY = {"parameters": session_pb2.STEP_REPLY_PARAMETERS, "delta": session_pb2.STEP_REPLY_DELTA,
         "none": session_pb2.STEP_REPLY_NONE}
DURABILITY = {None: session_pb2.DURABILITY_UNSPECIFIED, "every-step": session_pb2.DURABILITY_EVERY_STEP,
              "periodic": session_pb2.DURABILITY_PERIODIC, "none": session_pb2.DURABILITY_NONE}
MASTER = {None: tensor_pb2.DATA_TYPE_UNSPECIFIED, "float32": tensor_pb2.DATA_TYPE_FLOAT32,
          "float64": tensor_pb2.DATA_TYPE_FLOAT64}


def _rpc(fn):
    """Raise OptregError subclasses instead of grpc.RpcError."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
    return wrapper


def _nbytes(arrays: Mapping[str, np.ndarray]) -> int:
    return sum(np.asarray(a).nbytes for a in arrays.values())


def _collect(messages, field: str = "chunks") -> tuple[object, dict[str, np.ndarray], dict[str, dict]]:
    """Reassemble a stream of chunked replies: (first message, parameters, slots)."""
    first, assemblers = None, {}
    for msg in messages:
        first = first or msg
        slot = getattr(msg, "slot", "")
        asm = assemblers.setdefault(slot, tensors.Assembler())
        for t in getattr(msg, field):
            asm.add(t)
    params = assemblers.pop("", tensors.Assembler()).finish()
    return first, params, {slot: asm.finish() for slot, asm in assemblers.items()}


class _BearerToken(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                   grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds `authorization: Bearer <token>` to every call (over TLS or not)."""

    def __init__(self, token: str):
        self.entry = ("authorization", f"Bearer {token}")

    def _details(self, d):
        return d._replace(metadata=list(d.metadata or ()) + [self.entry]) if hasattr(d, "_replace") else \
            _CallDetails(d.method, d.timeout, list(d.metadata or ()) + [self.entry], d.credentials,
                         getattr(d, "wait_for_ready", None), getattr(d, "compression", None))

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)


class _CallDetails(grpc.ClientCallDetails):
    def __init__(self, method, timeout, metadata, credentials, wait_for_ready, compression):
        self.method, self.timeout, self.metadata = method, timeout, metadata
        self.credentials, self.wait_for_ready, self.compression = credentials, wait_for_ready, compression


class Client:
    """A connection to an optreg server.

    >>> with Client("127.0.0.1:50051") as c:
    ...     s = c.create_session("adam", {"W": W}, lr=0.01)
    ...     s.step({"W": dW})        # W now holds the updated values
    """

    def __init__(self, address: str = "127.0.0.1:50051", *, timeout: float | None = 60.0, retries: int = 5,
                 channel: grpc.Channel | None = None, max_message_mb: int = 64, token: str | None = None,
                 root_certificates: bytes | None = None, tls: bool = False,
                 tls_server_name: str | None = None):
        """`token`: a bearer token sent with every call. `root_certificates` (PEM bytes) or
        `tls=True` (the system's roots) connect over TLS; `tls_server_name` overrides the
        name checked against the server's certificate."""
        limit = max_message_mb * 1024 * 1024
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if channel is None:
            if root_certificates is not None or tls:
                channel = grpc.secure_channel(
                    address, grpc.ssl_channel_credentials(root_certificates=root_certificates), options=options)
            else:
                channel = grpc.insecure_channel(address, options=options)
        self._raw_channel = channel
        if token is not None:
            channel = grpc.intercept_channel(channel, _BearerToken(token))
        self.channel = channel
        self.timeout = timeout
        self.retries = retries
        self.registry = registry_pb2_grpc.OptimizerRegistryServiceStub(self.channel)
        self.sessions = session_pb2_grpc.SessionServiceStub(self.channel)
        # StepStream's gradient chunks go out already encoded (tensors.encode_stream_message: one copy
        # each), and its replies are decoded with their chunks' bytes viewed, not copied, until they land
        # in the receive buffers (tensors.decode_step_response).
        self.sessions.StepStream = self.channel.stream_stream(
            "/optreg.v1.SessionService/StepStream",
            request_serializer=tensors.serialize_passthrough(session_pb2.StepStreamRequest.SerializeToString),
            response_deserializer=tensors.decode_step_response)

    def close(self) -> None:
        self._raw_channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @_rpc
    def optimizers(self) -> registry_pb2.ListOptimizersResponse:
        return self.registry.ListOptimizers(registry_pb2.ListOptimizersRequest(), timeout=self.timeout)

    @_rpc
    def create_session(self, optimizer: str, params: Mapping[str, np.ndarray], *, master_dtype: str | None = None,
                       reply: str = "parameters", session_id: str = "", state=None, initial_step: int = 0,
                       durability: str | None = None, periodic_steps: int = 0, periodic_seconds: float = 0.0,
                       **hyperparameters) -> "Session":
        """Open a session; `params` (name -> array) are the initial values, copied to the server.

        The arrays passed are the ones later `step` calls write into. `state`
        (slot -> name -> array) and `initial_step` restore a session read with `read_state`.
        `durability`: "every-step", "periodic" (with periodic_steps / periodic_seconds), "none",
        or None for the server's default.
        """
        config = session_pb2.SessionConfig(optimizer=optimizer, hyperparameters=hyperparameters,
                                           master_dtype=MASTER[master_dtype], step_reply=REPLY[reply],
                                           session_id=session_id, durability=DURABILITY[durability],
                                           periodic_steps=periodic_steps, periodic_seconds=periodic_seconds)
        state = state or {}
        if _nbytes(params) + sum(_nbytes(s) for s in state.values()) > STREAM_ABOVE_BYTES:
            info = self.sessions.CreateSessionStream(self._create_messages(config, params, state, initial_step),
                                                     timeout=self.timeout).session
        else:
            info = self.sessions.CreateSession(session_pb2.CreateSessionRequest(
                config=config, parameters=[tensors.from_numpy(n, a) for n, a in params.items()],
                state=[tensor_pb2.SlotTensors(slot=s, tensors=[tensors.from_numpy(n, a) for n, a in arrs.items()])
                       for s, arrs in state.items()],
                initial_step=initial_step), timeout=self.timeout).session
        return Session(self, info, params)

    @staticmethod
    def _create_messages(config, params, state, initial_step) -> Iterator[session_pb2.CreateSessionStreamRequest]:
        yield session_pb2.CreateSessionStreamRequest(config=config, initial_step=initial_step)
        for slot, arrays in [("", params), *state.items()]:
            chunks = (c for n, a in arrays.items() for c in tensors.chunk(n, a))
            for batch in tensors.pack(chunks):
                yield session_pb2.CreateSessionStreamRequest(slot=slot, chunks=batch)

    def session(self, session_id: str, params: Mapping[str, np.ndarray] | None = None) -> "Session":
        """Attach to an existing session; `params` are the arrays steps write into (read from the server if None)."""
        info = self.get_session(session_id)
        s = Session(self, info, params or {})
        if params is None:
            s.arrays = s.read_parameters()
        return s

    @_rpc
    def get_session(self, session_id: str) -> session_pb2.SessionInfo:
        return self.sessions.GetSession(session_pb2.GetSessionRequest(session_id=session_id),
                                        timeout=self.timeout).session

    @_rpc
    def list_sessions(self) -> list[session_pb2.SessionInfo]:
        return list(self.sessions.ListSessions(session_pb2.ListSessionsRequest(), timeout=self.timeout).sessions)

    @_rpc
    def delete_session(self, session_id: str) -> None:
        self.sessions.DeleteSession(session_pb2.DeleteSessionRequest(session_id=session_id), timeout=self.timeout)


class Session:
    """One training run's optimizer on the server. `step(grads)` updates `self.arrays` in place."""

    def __init__(self, client: Client, info: session_pb2.SessionInfo, arrays: Mapping[str, np.ndarray]):
        self.client = client
        self.info = info
        self.id = info.session_id
        self.step_count = info.step
        self.arrays = dict(arrays)
        self._shm: SharedMemory | None = None
        self._large = sum(int(np.prod(t.shape, dtype=np.int64)) * (8 if info.master_dtype == tensor_pb2.DATA_TYPE_FLOAT64 else 4)
                          for t in info.parameters) > STREAM_ABOVE_BYTES

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.delete()

    def step(self, grads: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Send one step of gradients; write the result into the session's arrays; return them.

        A call that fails with UNAVAILABLE is retried with the same step number:
        the server applies it once and answers a repeat with the same reply.
        """
        attempt = 0
        while True:
            try:
                replayed, step, result = self._send_step(grads)
                break
            except grpc.RpcError as e:
                err = from_rpc_error(e)
                if not isinstance(err, Unavailable) or attempt >= self.client.retries:
                    raise err from None
                attempt += 1
                time.sleep(min(0.05 * 2 ** attempt, 2.0))
        self.step_count = step
        mode = self.info.step_reply
        for name, value in result.items():
            target = self.arrays.get(name)
            if target is None:
                self.arrays[name] = target = np.array(value)
            elif mode == session_pb2.STEP_REPLY_DELTA:
                target += value
            else:
                np.copyto(target, value, casting="unsafe")
        if replayed and attempt == 0:
            # This call's own first send was answered as a repeat: an earlier call that raised
            # (a deadline, say) had been applied after all. Its result is now in the arrays;
            # these gradients were not applied, and silently dropping them would be worse.
            raise StepMismatch(grpc.StatusCode.FAILED_PRECONDITION,
                               f"step {step} had already been applied by an earlier call that failed; its result "
                               "is now in the arrays and these gradients were NOT applied: send them again",
                               server_step=step)
        return self.arrays

    def _send_step(self, grads):
        sessions, timeout = self.client.sessions, self.client.timeout
        if self._shm is not None:
            return self._shm.step(self, grads)
        if self._large or _nbytes(grads) > STREAM_ABOVE_BYTES:
            return self._receive_step(sessions.StepStream(self._step_messages(grads), timeout=timeout,
                                                          wait_for_ready=True))
        reply = sessions.Step(session_pb2.StepRequest(
            session_id=self.id, step=self.step_count,
            gradients=[tensors.from_numpy(n, g) for n, g in grads.items()]), timeout=timeout, wait_for_ready=True)
        return reply.replayed, reply.step, {t.name: tensors.to_numpy(t) for t in reply.tensors}

    def _receive_step(self, replies):
        """Chunks into receive buffers kept across steps (no fresh 40 MB arrays); returned only when the
        stream ends OK, i.e. after the server committed the step (a broken stream raises, nothing applied)."""
        rx = getattr(self, "_rx", None)
        if rx is None:
            rx = self._rx = {}
        filled, last = {}, None
        for msg in replies:
            last = msg
            for t in msg.chunks:
                dtype = tensors.numpy_dtype(t.dtype)
                buf = rx.get(t.name)
                shape = tuple(t.shape)
                if buf is None or buf.shape != shape or buf.dtype != dtype:
                    buf = rx[t.name] = np.empty(shape, dtype)
                data = t.data  # a view of the received message
                n = len(data) // dtype.itemsize
                start = filled.get(t.name, 0)
                if t.offset != start or start + n > buf.size:
                    raise OptregError(grpc.StatusCode.DATA_LOSS,
                                      f"reply chunk for {t.name!r} at offset {t.offset}, expected {start}")
                buf.reshape(-1)[start:start + n] = np.frombuffer(data, dtype)
                filled[t.name] = start + n
        expected = [] if self.info.step_reply == session_pb2.STEP_REPLY_NONE else [p.name for p in self.info.parameters]
        for name in expected:
            got, size = filled.get(name, 0), int(np.prod(rx[name].shape)) if name in rx else -1
            if got != size:
                raise OptregError(grpc.StatusCode.DATA_LOSS,
                                  f"the step's reply for {name!r} ended after {got} elements; the step may have been "
                                  "applied: call refresh() and read_parameters()")
        if last is None:
            raise OptregError(grpc.StatusCode.DATA_LOSS, "the step's reply stream was empty")
        return last.replayed, last.step, {n: rx[n] for n in filled}

    def _step_messages(self, grads):
        yield session_pb2.StepStreamRequest(session_id=self.id, step=self.step_count)
        chunks = (c for n, g in grads.items() for c in tensors.chunk_views(n, g))
        for batch in tensors.pack_views(chunks):
            yield tensors.encode_stream_message(b"", batch)  # a StepStreamRequest(chunks=batch)

    @_rpc
    def read_parameters(self, names=()) -> dict[str, np.ndarray]:
        """A fresh copy of the server's parameters (the master dtype)."""
        s, timeout = self.client.sessions, self.client.timeout
        if self._large:
            _, params, _ = _collect(s.ReadParametersStream(
                session_pb2.ReadParametersStreamRequest(session_id=self.id, names=names), timeout=timeout))
            return params
        reply = s.ReadParameters(session_pb2.ReadParametersRequest(session_id=self.id, names=names), timeout=timeout)
        return {t.name: tensors.to_numpy(t).copy() for t in reply.parameters}

    @_rpc
    def read_state(self) -> tuple[session_pb2.SessionInfo, dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
        """(info, parameters, {slot: {name: array}}): everything needed to recreate the session."""
        s, timeout = self.client.sessions, self.client.timeout
        if self._large:
            first, params, slots = _collect(s.ReadStateStream(session_pb2.ReadStateStreamRequest(session_id=self.id),
                                                              timeout=timeout))
            return first.session, params, slots
        reply = s.ReadState(session_pb2.ReadStateRequest(session_id=self.id), timeout=timeout)
        params = {t.name: tensors.to_numpy(t).copy() for t in reply.parameters}
        slots = {st.slot: {t.name: tensors.to_numpy(t).copy() for t in st.tensors} for st in reply.state}
        return reply.session, params, slots

    @_rpc
    def refresh(self) -> session_pb2.SessionInfo:
        self.info = self.client.get_session(self.id)
        self.step_count = self.info.step
        return self.info

    @_rpc
    def set_hyperparameters(self, **values) -> session_pb2.SessionInfo:
        self.info = self.client.sessions.UpdateHyperparameters(session_pb2.UpdateHyperparametersRequest(
            session_id=self.id, hyperparameters=values), timeout=self.client.timeout).session
        return self.info

    def delete(self) -> None:
        self.client.delete_session(self.id)  # the server releases the segment too
        if self._shm is not None:
            self._shm.close(unregister=False)
            self._shm = None

    def enable_shared_memory(self) -> dict[str, np.ndarray]:
        """Move `self.arrays` into a shared-memory segment the server maps too (same host only).

        Returns the new `self.arrays`: views into the segment, holding the current parameters,
        which every later `step` updates in place with nothing but names and offsets on the
        wire. Gradients are read from the segment too: write them into `self.gradients[name]`
        (views as well) and pass those to `step`, or pass any arrays and they are copied there.
        The segment lives as long as this session object keeps its registration open: it is
        released by `disable_shared_memory()`, `delete()`, or the client process ending.
        """
        if self._shm is None:
            self._shm = SharedMemory.create(self)
        return self.arrays

    @property
    def gradients(self) -> dict[str, np.ndarray]:
        """Gradient buffers in the shared segment (after enable_shared_memory)."""
        if self._shm is None:
            raise OptregError("call enable_shared_memory() first")
        return self._shm.grads

    def disable_shared_memory(self) -> None:
        """Back to steps over gRPC; `self.arrays` become ordinary arrays again (copies of the segment's)."""
        if self._shm is not None:
            self.arrays = {n: np.array(a) for n, a in self.arrays.items()}
            self._shm.close(unregister=True)
            self._shm = None


_ALIGN = 64


class SharedMemory:
    """A /dev/shm segment holding a session's parameters and gradient buffers, registered with the server."""

    def __init__(self, session: "Session", key: str, mm, size: int, params: dict, grads: dict, offsets: dict,
                 call):
        self.session, self.key, self.mm, self.size = session, key, mm, size
        self.params, self.grads, self.offsets, self.call = params, grads, offsets, call
        self.base = np.frombuffer(mm, np.uint8).__array_interface__["data"][0]
        code = session.info.master_dtype
        self._param_msgs = [session_pb2.SharedMemoryTensor(name=n, dtype=code, shape=a.shape,
                                                           byte_offset=offsets[n][0]) for n, a in params.items()]

    @classmethod
    @_rpc
    def create(cls, session: "Session") -> "SharedMemory":
        import mmap
        import os
        import uuid

        info = session.info
        dtype = tensors.numpy_dtype(info.master_dtype)
        offsets, pos = {}, 0
        for t in info.parameters:
            nbytes = int(np.prod(t.shape, dtype=np.int64)) * dtype.itemsize
            p_off = pos
            pos = -(-(pos + nbytes) // _ALIGN) * _ALIGN
            offsets[t.name] = (p_off, pos)
            pos = -(-(pos + nbytes) // _ALIGN) * _ALIGN
        size = max(pos, _ALIGN)
        key = f"optreg-{uuid.uuid4().hex}"
        path = f"/dev/shm/{key}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, size)
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        try:
            current = session.arrays if all(t.name in session.arrays for t in info.parameters) \
                else session.read_parameters()
            params, grads = {}, {}
            for t in info.parameters:
                shape, (p_off, g_off) = tuple(t.shape), offsets[t.name]
                count = int(np.prod(shape, dtype=np.int64))
                params[t.name] = np.frombuffer(mm, dtype, count, p_off).reshape(shape)
                grads[t.name] = np.frombuffer(mm, dtype, count, g_off).reshape(shape)
                np.copyto(params[t.name], current[t.name], casting="unsafe")
            # The registration lives while this call is open (no deadline); the first reply acknowledges it.
            call = session.client.sessions.RegisterSharedMemory(session_pb2.RegisterSharedMemoryRequest(
                session_id=session.id, key=key, byte_size=size), timeout=None, wait_for_ready=True)
            next(call)
        except BaseException:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            raise
        self = cls(session, key, mm, size, params, grads, offsets, call)
        session.arrays = dict(params)
        return self

    def _offset_of(self, name: str, g: np.ndarray) -> int | None:
        """g's byte offset in the segment when g is the gradient buffer there (or a view of it, C-contiguous)."""
        if g is self.grads.get(name):
            return self.offsets[name][1]
        return None

    def step(self, session: "Session", grads) -> tuple[bool, int, dict]:
        msgs = []
        for name, g in grads.items():
            off = self._offset_of(name, g)
            buf = self.grads.get(name)
            if off is None:
                if buf is None:
                    raise OptregError(f"unknown gradient {name!r}; the session's parameters are: "
                                      + ", ".join(self.grads))
                np.copyto(buf, g, casting="same_kind")  # one local copy; nothing large crosses gRPC
                off = self.offsets[name][1]
            msgs.append(session_pb2.SharedMemoryTensor(name=name, dtype=session.info.master_dtype,
                                                       shape=buf.shape, byte_offset=off))
        reply = session.client.sessions.StepSharedMemory(session_pb2.StepSharedMemoryRequest(
            session_id=session.id, step=session.step_count, key=self.key, gradients=msgs,
            parameters=self._param_msgs), timeout=session.client.timeout, wait_for_ready=True)
        return reply.replayed, reply.step, {}

    def close(self, unregister: bool = True) -> None:
        import os
        if unregister:
            try:
                self.session.client.sessions.UnregisterSharedMemory(session_pb2.UnregisterSharedMemoryRequest(
                    session_id=self.session.id, key=self.key), timeout=self.session.client.timeout)
            except grpc.RpcError:
                pass  # cancelling the registration below releases it as well
        self.call.cancel()
        try:
            os.unlink(f"/dev/shm/{self.key}")
        except FileNotFoundError:
            pass
        # The mapping stays while arrays view it; it is unmapped when the last one is collected.
