"""What handlers need of a call on the asyncio server (grpc.aio), whichever way they run.

The server is grpc.aio: a call that waits (for its peer, its round, the next step to watch) is a
coroutine parked on the event loop and holds no thread. Handlers that never wait stay plain
functions and run on the server's bounded pool (`--threads`); their context has no is_active(),
which StepRun and the shared-memory calls poll: Context adds it. CPU work started from a
coroutine (kernels, large decodes, fsyncs, anything that may wait for a session's lock) goes to the
same pool through `offload`, so it never stalls the loop that every other call shares.
"""
from __future__ import annotations

import asyncio
import functools
import inspect


class Liveness:
    """is_active() of a call: true until it ends (answered, cancelled, or its deadline passed)."""

    def __init__(self, context, aio: bool):
        self.active = True
        if not aio:  # (a coroutine's ends with the coroutine: live_context)
            context.add_callback(self.end)

    def end(self, *_):
        self.active = False

    def __call__(self) -> bool:
        return self.active


class Context:
    """A handler's context with the is_active() the thread-pool server's had: `aio` for a coroutine's
    (the domain code it hands to the pool polls it; see live_context), else a plain handler's on the pool."""

    def __init__(self, context, aio: bool = True):
        self._context = context
        self.is_active = Liveness(context, aio)

    def __getattr__(self, name):
        return getattr(self._context, name)


def live_context(behavior):
    """A coroutine handler (method) called with a Context whose is_active() turns false when the coroutine
    ends: answered, or cancelled by grpc.aio (deadline passed, client gone). Not a done callback: grpc
    keeps those in a reference cycle with the call, which a long call (a member waiting for its round)
    carries into the oldest GC generation, and collecting thousands of them stalled the loop 100-300 ms."""
    if inspect.isasyncgenfunction(behavior):
        @functools.wraps(behavior)
        async def stream(self, request, context):
            ctx = Context(context)
            try:
                async for reply in behavior(self, request, ctx):
                    yield reply
            finally:
                ctx.is_active.end()
        return stream

    @functools.wraps(behavior)
    async def unary(self, request, context):
        ctx = Context(context)
        try:
            return await behavior(self, request, ctx)
        finally:
            ctx.is_active.end()
    return unary


async def offload(fn, *args):
    """fn(*args) on the server's pool (the loop's default executor). A cancelled call (client gone,
    deadline) stops waiting here; the work itself runs on and sees is_active() turn false."""
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))


def is_async(behavior) -> bool:
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


def adapt(handlers: dict) -> dict:
    """Method handlers for the aio server: the sync ones get a Context (coroutines are left as they are)."""
    out = {}
    for name, h in handlers.items():
        kind = next(k for k in ("unary_unary", "unary_stream", "stream_unary", "stream_stream") if getattr(h, k))
        behavior = getattr(h, kind)
        if not is_async(behavior):
            out[name] = h._replace(**{kind: _with_sync_context(behavior)})
        else:
            out[name] = h
    return out


def _with_sync_context(behavior):
    @functools.wraps(behavior)
    def run(request, context):
        return behavior(request, Context(context, aio=False))
    return run
