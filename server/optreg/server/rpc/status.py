"""The one table from the domain's refusals to gRPC status codes, and the decorator that applies it
to every handler (unary and streaming, plain functions or coroutines), counting bytes and errors on the way."""
from __future__ import annotations

import functools
import inspect
import logging

import grpc

from optreg.server.model import errors

log = logging.getLogger("optreg.server")

STATUS = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DataLoss: grpc.StatusCode.DATA_LOSS,
    errors.Cancelled: grpc.StatusCode.CANCELLED,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.PluginFailed: grpc.StatusCode.INTERNAL,
}
# A status message stays well under gRPC's metadata limit (8 KiB by default, trailers included).
MAX_DETAILS = 2000


def translate(e: Exception) -> tuple[grpc.StatusCode, str, tuple] | None:
    """(code, message, trailing metadata) for an expected failure; None for a bug."""
    if isinstance(e, errors.Refused):
        code = next((STATUS[c] for c in type(e).__mro__ if c in STATUS), grpc.StatusCode.UNKNOWN)  # subclasses too
        message, metadata = e.message, e.metadata
        if isinstance(e, errors.PluginFailed):
            log.error("%s", e)
    elif isinstance(e, ValueError):  # the wire codec's refusals (optreg.v1.tensors)
        code, message, metadata = grpc.StatusCode.INVALID_ARGUMENT, str(e), ()
    elif isinstance(e, OSError) and e.errno in errors.DISK_FULL:  # a write no caller named: still no retry
        return translate(errors.ResourceExhausted(f"a write failed: the disk is full ({e.strerror}); free space, "
                                                  "then retry"))
    elif isinstance(e, MemoryError):
        code, message, metadata = (grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   "the server ran out of memory for this request; nothing was changed", ())
    else:
        return None
    if len(message) > MAX_DETAILS:
        message = message[:MAX_DETAILS] + f"... ({len(message)} characters)"
    return code, message, metadata


def handler(method):
    """Map exceptions to statuses for a servicer method; count bytes in and out and errors by code."""
    name = method.__name__

    def fail(self, context, e):
        t = translate(e)
        if t is None:
            self.metrics.error(grpc.StatusCode.UNKNOWN.name, name)
            log.exception("%s failed", name)
            raise e
        code, message, metadata = t
        self.metrics.error(code.name, name)
        if code == grpc.StatusCode.CANCELLED:  # the client's doing, one line
            log.info("%s: %s", name, message)
        if metadata:
            context.set_trailing_metadata(metadata)
        context.abort(code, message)

    def counted(self, iterator):
        for msg in iterator:
            if type(msg) is tuple:  # (size on the wire, message): StepStream's, see app._add_session_service
                size, msg = msg
            else:
                size = msg.ByteSize()
            self.metrics.bytes_in(size)
            yield msg

    async def afail(self, context, e):
        if isinstance(e, grpc.aio.AbortError):  # the handler answered with a status itself
            raise e
        t = translate(e)
        if t is None:
            fail(self, context, e)  # logs and raises it
        code, message, metadata = t
        self.metrics.error(code.name, name)
        if code == grpc.StatusCode.CANCELLED:
            log.info("%s: %s", name, message)
        if metadata:
            context.set_trailing_metadata(metadata)
        await context.abort(code, message)

    async def acounted(self, iterator):
        async for msg in iterator:
            if type(msg) is tuple:
                size, msg = msg
            else:
                size = msg.ByteSize()
            self.metrics.bytes_in(size)
            yield msg

    streaming_in = name in ("CreateSessionStream", "StepStream")

    def received(self, request):
        if streaming_in:
            return acounted(self, request) if hasattr(request, "__aiter__") else counted(self, request)
        self.metrics.bytes_in(request.ByteSize())
        return request

    def sent(self, reply):
        self.metrics.bytes_out(len(reply) if type(reply) is bytes else reply.ByteSize())  # bytes: Step's
        return reply

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def astream(self, request, context):
            request = received(self, request)
            try:
                async for reply in method(self, request, context):
                    yield sent(self, reply)
            except Exception as e:
                await afail(self, context, e)
        return astream

    if inspect.iscoroutinefunction(method):
        @functools.wraps(method)
        async def aunary(self, request, context):
            request = received(self, request)
            try:
                reply = await method(self, request, context)
            except Exception as e:
                await afail(self, context, e)
            return sent(self, reply)
        return aunary

    if inspect.isgeneratorfunction(method):
        @functools.wraps(method)
        def stream(self, request, context):
            request = received(self, request)
            try:
                for reply in method(self, request, context):
                    yield sent(self, reply)
            except Exception as e:
                fail(self, context, e)
        return stream

    @functools.wraps(method)
    def unary(self, request, context):
        request = received(self, request)
        try:
            reply = method(self, request, context)
        except Exception as e:
            fail(self, context, e)
        return sent(self, reply)
    return unary
