"""Bearer tokens: a grpc.aio.ServerInterceptor (and a thread-pool one) that refuses calls without a known token, and
the owner of a call (the SHA-256 of its token; sessions record it, never the token).

Token file: one token per line; blank lines and lines starting with '#' are ignored.
Health checking and reflection stay open (they reveal no session).
"""
from __future__ import annotations

import hashlib
import pathlib

import grpc

OPEN_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def read_tokens(path: str | pathlib.Path) -> set[str]:
    tokens = set()
    for line in pathlib.Path(path).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            tokens.add(line)
    if not tokens:
        raise ValueError(f"token file {path} holds no token")
    return tokens


def bearer(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.partition(" ")
            return token.strip() if scheme.lower() == "bearer" else ""
    return None


def _deny(message: str):
    async def abort(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return abort


class TokenAuth(grpc.aio.ServerInterceptor):
    def __init__(self, tokens: set[str], on_error=None):
        self.hashes = frozenset(token_hash(t) for t in tokens)
        self.on_error = on_error  # called with the method name on every refusal (metrics)

    def owner(self, context) -> str:
        """The calling token's hash (the interceptor has already checked it)."""
        token = bearer(context.invocation_metadata())
        return token_hash(token) if token else ""

    def refusal(self, handler_call_details) -> str | None:
        """Why the call is refused (counted in the metrics), or None when it may go on."""
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return None
        token = bearer(handler_call_details.invocation_metadata)
        if token is None:
            message = "no token: send the metadata 'authorization: Bearer <token>'"
        elif not token or token_hash(token) not in self.hashes:
            message = "the token is not one this server accepts"
        else:
            return None
        if self.on_error:
            self.on_error(grpc.StatusCode.UNAUTHENTICATED.name, method.rsplit("/", 1)[-1])
        return message

    async def intercept_service(self, continuation, handler_call_details):
        message = self.refusal(handler_call_details)
        handler = await continuation(handler_call_details)
        if message is None or handler is None:
            return handler
        # Refused on the event loop (no thread), before any request is read.
        return _like(handler, _deny(message))


class ThreadedTokenAuth(grpc.ServerInterceptor):
    """The same check for a thread-pool grpc.server (the cluster front end)."""

    def __init__(self, auth: TokenAuth):
        self.auth = auth

    def intercept_service(self, continuation, handler_call_details):
        message = self.auth.refusal(handler_call_details)
        handler = continuation(handler_call_details)
        if message is None or handler is None:
            return handler

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return _like(handler, deny)


def _like(handler, behaviour):
    """A handler of `handler`'s kind (unary or streaming each way) that runs `behaviour`."""
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(behaviour)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(behaviour)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(behaviour)
    return grpc.unary_unary_rpc_method_handler(behaviour)
