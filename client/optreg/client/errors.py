"""The client's exceptions (the tree is drawn in optreg.client's docstring).

Three kinds, told apart by their base class:

- TransportError: the call ended without the server's answer (server down, deadline, cancelled).
  A step that ends this way may or may not have been applied; the step fence makes retrying it safe.
- Refusal: the server answered with an error status; nothing was changed (one class per status).
- UsageError (a ValueError): the call was refused by the client before anything was sent.

ReassemblyError is the client's own: a reply arrived, but its chunks did not fit together.
It is not the server's DATA_LOSS (a session file the server could not read).
"""
from __future__ import annotations

import grpc


class OptregError(Exception):
    """Every error this client raises. `.code` is the grpc.StatusCode (None for errors raised by the
    client itself), `.details` the message."""

    code: grpc.StatusCode | None = None

    def __init__(self, details: str, code: grpc.StatusCode | None = None):
        super().__init__(details)
        self.details = details
        if code is not None:
            self.code = code

    def __str__(self):
        return f"{self.code.name}: {self.details}" if self.code is not None else self.details


# -- the call did not get an answer ---------------------------------------------------------------

class TransportError(OptregError):
    """The call ended without the server's answer."""


class Unavailable(TransportError):
    """The server could not be reached (or asked for a retry) for the whole retry window. `permanent`:
    retrying cannot help (the host's name does not resolve), so it was raised at once."""
    code = grpc.StatusCode.UNAVAILABLE
    permanent = False


class DeadlineExceeded(TransportError):
    """The server did not answer within the call's timeout; the call may have been applied."""
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Cancelled(TransportError):
    """The call was cancelled (by this process, or by a server shutting down) before it completed."""
    code = grpc.StatusCode.CANCELLED


# -- the server answered: no ----------------------------------------------------------------------

class Refusal(OptregError):
    """The server refused the call with an error status; it changed nothing."""


class InvalidArgument(Refusal, ValueError):
    """A bad hyperparameter, tensor name, shape, dtype, NaN... (the message names the field)."""
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(Refusal, LookupError):
    """No such session (or optimizer: the message lists the available ones)."""
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(Refusal):
    """A session with that id exists (create_session(..., resume=True) attaches to it instead)."""
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(Refusal):
    """The session's state does not allow the call (durability without a data dir, shared memory
    from another host, a reply too large for one message...)."""
    code = grpc.StatusCode.FAILED_PRECONDITION


class StepMismatch(FailedPrecondition):
    """The session is at another step than the one sent; `.server_step` says which (None if unknown)."""

    def __init__(self, details: str, code: grpc.StatusCode | None = None, server_step: int | None = None):
        super().__init__(details, code)
        self.server_step = server_step


class WriterConflict(FailedPrecondition):
    """Another process is stepping this single-writer session; `.holder` names it ("host=H pid=P id=R").
    Attach with take_over=True to take the session over on purpose."""

    def __init__(self, details: str, code: grpc.StatusCode | None = None, holder: str = ""):
        super().__init__(details, code)
        self.holder = holder


class PermissionDenied(Refusal):
    """The session belongs to another token."""
    code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(Refusal):
    """No token, or one the server does not know."""
    code = grpc.StatusCode.UNAUTHENTICATED


class ResourceExhausted(Refusal):
    """The server's memory budget (or message size limit) refuses the call."""
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DataLoss(Refusal):
    """The server could not read a session's file from its data directory."""
    code = grpc.StatusCode.DATA_LOSS


class Internal(Refusal):
    """An optimizer plugin raised inside its update; the session is left as before the step."""
    code = grpc.StatusCode.INTERNAL


class Unimplemented(Refusal):
    """The server does not have this method (an older server)."""
    code = grpc.StatusCode.UNIMPLEMENTED


class Unknown(Refusal):
    """An unexpected failure in the server (see its log)."""
    code = grpc.StatusCode.UNKNOWN


# -- the client's own -----------------------------------------------------------------------------

class ReassemblyError(OptregError):
    """A streamed reply's chunks did not fit together (out of order, short, empty). Raised by the
    client; the server reported success. For a step, the step was applied: read_parameters() gives
    its result."""


class UsageError(OptregError, ValueError):
    """The call was refused before anything was sent: a wrong argument, a resume that does not
    match the existing session, shared memory not enabled..."""


_BY_CODE: dict[grpc.StatusCode, type[OptregError]] = {
    cls.code: cls for cls in (Unavailable, DeadlineExceeded, Cancelled, InvalidArgument, NotFound, AlreadyExists,
                              FailedPrecondition, PermissionDenied, Unauthenticated, ResourceExhausted, DataLoss,
                              Internal, Unimplemented, Unknown)}


def for_status(code: grpc.StatusCode, details: str, server_step: int | None = None,
               holder: str | None = None) -> OptregError:
    """The exception for a gRPC status (StepMismatch when the server named its step, WriterConflict when
    it named the session's writer)."""
    if code == grpc.StatusCode.FAILED_PRECONDITION and server_step is not None:
        return StepMismatch(details, code, server_step)
    if code == grpc.StatusCode.FAILED_PRECONDITION and holder is not None:
        return WriterConflict(details, code, holder)
    cls = _BY_CODE.get(code)
    if cls is None:  # ABORTED, OUT_OF_RANGE...: statuses optreg's server does not send
        return Refusal(details, code)
    return cls(details, code)


def from_rpc_error(e: grpc.RpcError) -> OptregError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else str(e)) or ""
    step = holder = None
    if code == grpc.StatusCode.FAILED_PRECONDITION and hasattr(e, "trailing_metadata"):
        trailers = dict(e.trailing_metadata() or ())
        value = trailers.get("optreg-server-step")
        step = int(value) if value is not None else None
        holder = trailers.get("optreg-writer-holder")
    return for_status(code, details, step, holder)
