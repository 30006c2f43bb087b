"""The transport: optreg's RPCs by name over a gRPC channel, raising optreg.client.errors.

Session and Client call only the four methods of `Transport` (plus `wait_until_ready`), with
protobuf requests and replies, so a test can put a fake in its place (see
tests/client/test_client_transport.py). Which RPC a step takes — Step, StepStream or
StepSharedMemory — is chosen above this layer (optreg.client._step_transport), by size and host.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import uuid
from typing import Iterable, Iterator, Protocol

import grpc

from optreg.client.errors import Unavailable, UsageError, from_rpc_error
from optreg.v1 import registry_pb2, session_pb2, telemetry_pb2, tensors

_SESSION = "/optreg.v1.SessionService/"
_REGISTRY = "/optreg.v1.OptimizerRegistryService/"
_TELEMETRY = "/optreg.v1.TelemetryService/"

# method -> (path, kind, request message, response deserializer). Kinds: "unary", "stream_in"
# (client streams), "stream_out" (server streams), "stream_both".
_S, _R, _T = session_pb2, registry_pb2, telemetry_pb2
METHODS = {
    "ListOptimizers": (_REGISTRY, "unary", _R.ListOptimizersRequest, _R.ListOptimizersResponse.FromString),
    "CreateSession": (_SESSION, "unary", _S.CreateSessionRequest, _S.CreateSessionResponse.FromString),
    "CreateSessionStream": (_SESSION, "stream_in", _S.CreateSessionStreamRequest,
                            _S.CreateSessionStreamResponse.FromString),
    "GetSession": (_SESSION, "unary", _S.GetSessionRequest, _S.GetSessionResponse.FromString),
    "ListSessions": (_SESSION, "unary", _S.ListSessionsRequest, _S.ListSessionsResponse.FromString),
    "DeleteSession": (_SESSION, "unary", _S.DeleteSessionRequest, _S.DeleteSessionResponse.FromString),
    "Step": (_SESSION, "unary", _S.StepRequest, _S.StepResponse.FromString),
    # StepStream's gradient chunks go out already encoded (tensors.encode_stream_message: one copy
    # each), and its replies are decoded with their chunks' bytes viewed, not copied, until they land
    # in the receive buffers (tensors.decode_step_response).
    "StepStream": (_SESSION, "stream_both", _S.StepStreamRequest, tensors.decode_step_response),
    "ReadParameters": (_SESSION, "unary", _S.ReadParametersRequest, _S.ReadParametersResponse.FromString),
    "ReadParametersStream": (_SESSION, "stream_out", _S.ReadParametersStreamRequest,
                             _S.ReadParametersStreamResponse.FromString),
    "ReadState": (_SESSION, "unary", _S.ReadStateRequest, _S.ReadStateResponse.FromString),
    "ReadStateStream": (_SESSION, "stream_out", _S.ReadStateStreamRequest, _S.ReadStateStreamResponse.FromString),
    "UpdateHyperparameters": (_SESSION, "unary", _S.UpdateHyperparametersRequest,
                              _S.UpdateHyperparametersResponse.FromString),
    "RegisterSharedMemory": (_SESSION, "stream_out", _S.RegisterSharedMemoryRequest,
                             _S.RegisterSharedMemoryResponse.FromString),
    "UnregisterSharedMemory": (_SESSION, "unary", _S.UnregisterSharedMemoryRequest,
                               _S.UnregisterSharedMemoryResponse.FromString),
    "StepSharedMemory": (_SESSION, "unary", _S.StepSharedMemoryRequest, _S.StepSharedMemoryResponse.FromString),
    "JoinSession": (_SESSION, "unary", _S.JoinSessionRequest, _S.JoinSessionResponse.FromString),
    "LeaveSession": (_SESSION, "unary", _S.LeaveSessionRequest, _S.LeaveSessionResponse.FromString),
    "Heartbeat": (_SESSION, "unary", _S.HeartbeatRequest, _S.HeartbeatResponse.FromString),
    "ExportTelemetry": (_TELEMETRY, "unary", _T.ExportTelemetryRequest, _T.ExportTelemetryResponse.FromString),
    "ImportTelemetry": (_TELEMETRY, "unary", _T.ImportTelemetryRequest, _T.ImportTelemetryResponse.FromString),
}


class StreamCall(Protocol):
    """A server-streaming call in progress: iterate its replies; cancel() ends it."""

    def __iter__(self) -> Iterator: ...

    def __next__(self): ...

    def cancel(self) -> None: ...


class Transport(Protocol):
    """What Client and Session need from a connection. Every method raises OptregError
    subclasses (never grpc.RpcError), also while a returned stream is being iterated.
    `metadata`: extra call headers, given only by a step taking over a session's writer lease."""

    address: str

    def unary(self, method: str, request, *, timeout: float | None, metadata: tuple = ()): ...

    def stream_in(self, method: str, requests: Iterable, *, timeout: float | None, metadata: tuple = ()): ...

    def stream_out(self, method: str, request, *, timeout: float | None, metadata: tuple = ()) -> StreamCall: ...

    def stream_both(self, method: str, requests: Iterable, *, timeout: float | None,
                    metadata: tuple = ()) -> StreamCall: ...

    def wait_until_ready(self, seconds: float) -> bool: ...

    def is_local(self) -> bool: ...

    def close(self) -> None: ...


DEFAULT_PORT = 50051
# gRPC target schemes passed through as they are (gRPC's own naming); any other "scheme://" is a mistake.
_GRPC_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")


def normalize_address(address: str) -> str:
    """HOST:PORT as gRPC needs it: a missing port is optreg's 50051 (gRPC's own default is 443), a bare
    IPv6 address is bracketed. A URL (http://...) or a bad port is a UsageError now, not a connection
    that fails later with a resolver's message."""
    text = address.strip()
    if text.startswith(_GRPC_SCHEMES):
        return text
    if "://" in text:
        rest = text.split("://", 1)[1].rstrip("/")
        raise UsageError(f"address {address!r}: give HOST:PORT without a scheme (e.g. {rest or '127.0.0.1:50051'}); "
                         "for TLS use tls=True (the CLI's --tls)")
    if text.count(":") > 1 and not text.startswith("["):  # a bare IPv6 address
        text = f"[{text}]"
    host, sep, port = text.rpartition(":") if not text.endswith("]") else (text, "", "")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    if not host or host == "[]":
        raise UsageError(f"address {address!r}: no host; give HOST:PORT, e.g. 127.0.0.1:{DEFAULT_PORT}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"address {address!r}: the port must be 1-65535 (HOST:PORT; without a port, "
                         f"{DEFAULT_PORT})")
    return f"{host}:{int(port)}"


def error_for(address: str, e: grpc.RpcError):
    """The OptregError for a failed call. gRPC's own connection failures become one line naming the address
    and what to check; a name that does not resolve is `permanent` (retrying cannot help).
    UNAVAILABLE sent by the server itself keeps its message."""
    error = from_rpc_error(e)
    if not isinstance(error, Unavailable):
        return error
    text = error.details
    cause = text.rsplit(": ", 1)[-1].strip().rstrip("]").lower()
    if text.startswith(("errors resolving", "DNS resolution failed")):
        error.details = f"cannot resolve the host of {address} ({cause}): check the address (HOST:PORT)"
        error.permanent = True
    elif text.startswith("failed to connect to all addresses"):
        error.details = f"cannot reach {address} ({cause}): is `optreg serve` running there?"
    return error


class _Replies:
    """A gRPC response iterator whose errors come out as OptregError."""

    def __init__(self, call, address: str):
        self._call = call
        self._address = address

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._call)
        except grpc.RpcError as e:
            raise error_for(self._address, e) from None

    def cancel(self) -> None:
        self._call.cancel()

    def done(self) -> bool:
        return self._call.done()


class GrpcTransport:
    """optreg's RPCs over one gRPC channel (TLS and a bearer token optional).

    Builds its own multi-callables from the channel (METHODS), so no generated stub is patched.
    """

    def __init__(self, address: str, *, token: str | None = None, root_certificates: bytes | None = None,
                 tls: bool = False, tls_server_name: str | None = None, max_message_mb: int = 64,
                 channel: grpc.Channel | None = None):
        self.address = address
        limit = max_message_mb * 1024 * 1024
        options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit),
                   # A restarted server is found again within about a second, not gRPC's default
                   # reconnect backoff (up to 120 s), which would outlast any retry window.
                   ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                   ("grpc.max_reconnect_backoff_ms", 1000)]
        if tls_server_name:
            options.append(("grpc.ssl_target_name_override", tls_server_name))
        if channel is None:
            if root_certificates is not None or tls:
                creds = grpc.ssl_channel_credentials(root_certificates=root_certificates)
                channel = grpc.secure_channel(address, creds, options=options)
            else:
                channel = grpc.insecure_channel(address, options=options)
        self.channel = channel
        self._closed = False
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._named: tuple | None = None  # (this process's identity, the headers every call sends)
        self._calls = {}
        for name, (service, kind, request_cls, deserialize) in METHODS.items():
            serialize = request_cls.SerializeToString
            if name == "StepStream":
                serialize = tensors.serialize_passthrough(serialize)
            factory = {"unary": channel.unary_unary, "stream_in": channel.stream_unary,
                       "stream_out": channel.unary_stream, "stream_both": channel.stream_stream}[kind]
            self._calls[name] = factory(service + name, request_serializer=serialize,
                                        response_deserializer=deserialize)

    def _headers(self, extra: tuple) -> tuple:
        # Every call names this process, for the writer lease of the sessions it steps (the server's writers.py);
        # the tuple is made once per process (a forked child names itself anew).
        identity = writer_identity()
        if self._named is None or self._named[0] != identity:
            self._named = (identity, (*self._metadata, ("optreg-writer", identity)))
        return self._named[1] + extra if extra else self._named[1]

    def unary(self, method: str, request, *, timeout: float | None, metadata: tuple = ()):
        if self._closed:
            raise UsageError(f"this client's connection to {self.address} is closed")
        try:
            return self._calls[method](request, timeout=timeout, metadata=self._headers(metadata))
        except grpc.RpcError as e:
            raise error_for(self.address, e) from None

    stream_in = unary  # a client-streaming call is invoked like a unary one, with an iterator

    def stream_out(self, method: str, request, *, timeout: float | None, metadata: tuple = ()) -> StreamCall:
        if self._closed:
            raise UsageError(f"this client's connection to {self.address} is closed")
        return _Replies(self._calls[method](request, timeout=timeout, metadata=self._headers(metadata)),
                        self.address)

    stream_both = stream_out

    def wait_until_ready(self, seconds: float) -> bool:
        try:
            grpc.channel_ready_future(self.channel).result(timeout=seconds)
            return True
        except grpc.FutureTimeoutError:
            return False

    def is_local(self) -> bool:
        """Whether the address names this host (loopback), where shared memory can work."""
        return is_loopback(self.address)

    def close(self) -> None:
        self._closed = True
        self.channel.close()


_IDENTITY: tuple[int, str] = (0, "")


class Counted:
    """A transport that counts the serialized bytes of its Step calls both ways (the messages; not HTTP/2 and
    TCP framing): what a compressed or DiLoCo step costs on the wire. `client.transport = Counted(client.transport)`;
    `.bytes`, `.calls`."""

    def __init__(self, inner: Transport):
        self.inner, self.bytes, self.calls = inner, 0, 0

    def unary(self, method: str, request, **kw):
        reply = self.inner.unary(method, request, **kw)
        if method == "Step":
            self.bytes += request.ByteSize() + reply.ByteSize()
            self.calls += 1
        return reply

    def __getattr__(self, name):
        return getattr(self.inner, name)


def writer_identity() -> str:
    """This process as the server's writer lease shows it: host, pid and a random id (a forked child gets
    its own)."""
    global _IDENTITY
    pid = os.getpid()
    if _IDENTITY[0] != pid:
        host = socket.gethostname()
        if not host.isascii():  # a header value is ASCII: such a host is never matched as the server's own
            host = host.encode("ascii", "replace").decode()
        try:
            ns = os.stat("/proc/self/ns/pid").st_ino  # lets a server on this host check the pid (writers.py)
        except OSError:
            ns = ""
        _IDENTITY = (pid, f"host={host[:200]} pid={pid} ns={ns} id={uuid.uuid4().hex[:12]}")
    return _IDENTITY[1]


def is_loopback(address: str) -> bool:
    host = address
    if host.startswith("unix:"):
        return True
    for prefix in ("ipv4:", "ipv6:", "dns:///", "dns:"):
        if host.startswith(prefix):
            host = host[len(prefix):]
    if host.startswith("["):
        host = host[1:host.find("]")]
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
