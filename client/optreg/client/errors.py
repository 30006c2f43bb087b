"""The client's exceptions, one per gRPC status code a caller may want to catch."""
from __future__ import annotations

import grpc


class OptregError(Exception):
    """Any error the service returned; `.code` is the grpc.StatusCode, `.details` its message."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


class InvalidArgument(OptregError, ValueError):
    pass


class NotFound(OptregError, KeyError):
    def __str__(self):  # KeyError would quote the message
        return OptregError.__str__(self)


class AlreadyExists(OptregError):
    pass


class StepMismatch(OptregError):
    """The session is at another step than the client sent (FAILED_PRECONDITION); `.server_step` tells which."""

    def __init__(self, code, details, server_step: int | None = None):
        super().__init__(code, details)
        self.server_step = server_step


class PermissionDenied(OptregError):
    pass


class Unauthenticated(OptregError):
    pass


class ResourceExhausted(OptregError):
    pass


class Unavailable(OptregError):
    pass


class DeadlineExceeded(OptregError):
    pass


class Internal(OptregError):
    pass


_BY_CODE = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.INTERNAL: Internal,
}


def from_rpc_error(e: grpc.RpcError) -> OptregError:
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.FAILED_PRECONDITION:
        step = dict(e.trailing_metadata() or ()).get("optreg-server-step")
        return StepMismatch(code, details, int(step) if step is not None else None)
    return _BY_CODE.get(code, OptregError)(code, details)
