"""What the server refuses, as domain exceptions: no grpc here.

The servicers map each class to its gRPC status in one table (rpc/status.py). A message
says what is wrong and how to fix it; client input quoted in it goes through
`shown()`, so a 100 KB name cannot make the reply's trailers too large.
"""
from __future__ import annotations

import errno

# Longest piece of client input quoted back in a message (ids, names, values).
ECHO_LIMIT = 80


class Refused(Exception):
    """A request the server refuses. `metadata`: (key, value) pairs for the trailers."""
    code = "UNKNOWN"

    def __init__(self, message: str, metadata: tuple = ()):
        super().__init__(message)
        self.message = message
        self.metadata = metadata


class InvalidArgument(Refused):
    code = "INVALID_ARGUMENT"


class NotFound(Refused):
    code = "NOT_FOUND"


class AlreadyExists(Refused):
    code = "ALREADY_EXISTS"


class PermissionDenied(Refused):
    code = "PERMISSION_DENIED"


class FailedPrecondition(Refused):
    code = "FAILED_PRECONDITION"


class ResourceExhausted(Refused):
    code = "RESOURCE_EXHAUSTED"


class Unavailable(Refused):
    """A transient fault (a failed write): the same call may succeed when retried."""
    code = "UNAVAILABLE"


class DataLoss(Refused):
    code = "DATA_LOSS"


class Cancelled(Refused):
    code = "CANCELLED"


class DeadlineExceeded(Refused):
    code = "DEADLINE_EXCEEDED"


class PluginFailed(Refused):
    """An optimizer's update raised; the session is as it was before the step."""
    code = "INTERNAL"


# Errors of the process, not of a file (its descriptor table, the system's, memory): transient, so a
# session whose files they hit is refused for now (UNAVAILABLE), never quarantined.
OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)


def out_of_descriptors(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in OUT_OF_DESCRIPTORS


# A write that fails for want of space: retrying does not help until space is freed.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def write_failed(e: OSError, what: str) -> Refused:
    """A failed write of `what` (nothing was changed) as the refusal a client can act on: a full disk
    is RESOURCE_EXHAUSTED (clients retry UNAVAILABLE at once, and that would fail until space is
    freed); any other failure UNAVAILABLE, a transient fault."""
    if e.errno in DISK_FULL:
        return ResourceExhausted(f"{what} could not be written: the disk is full ({e.strerror}); nothing was "
                                 "changed: free space, then retry")
    return Unavailable(f"{what} could not be written ({e.strerror or e}); nothing was changed: retry")


def invalid(message: str) -> InvalidArgument:
    return InvalidArgument(message)


def not_found(message: str) -> NotFound:
    return NotFound(message)


def shown(value, limit: int = ECHO_LIMIT) -> str:
    """repr() of client input, cut to about `limit` characters with the full length said."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if hasattr(value, "__len__") else len(text)
    return f"{text[:limit]}...({size} characters)"


def once(seen, what: str, name: str) -> None:
    """Refuse a name a request gives twice (`seen`: the names so far, a set or dict the caller adds to)."""
    if name in seen:
        raise InvalidArgument(f"{what} {shown(name)} is given twice")
