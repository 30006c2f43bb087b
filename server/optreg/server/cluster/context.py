"""What the servicers need of a grpc.ServicerContext, when they run inside a Ray actor."""
from __future__ import annotations

import time


class Abort(Exception):
    """context.abort() inside an actor: the front end turns it into the gRPC status."""
    def __init__(self, code, message):
        self.code, self.message = code, message


class ActorContext:
    """What the servicer needs of a grpc.ServicerContext, inside the actor."""

    def __init__(self, remaining: float | None = None, owner: str | None = None):
        self.trailing = ()
        self.owner = owner or ""  # the caller's token hash, as the front end's token check found it
        # the client's deadline as the front end saw it (a shared session's round waits up to it)
        self.deadline = None if remaining is None else time.monotonic() + remaining

    def is_active(self):
        return self.deadline is None or time.monotonic() < self.deadline

    def time_remaining(self):
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    def peer(self):
        return "ray:front-end"  # never a local peer: shared-memory RPCs refuse it

    def add_callback(self, callback):
        return False

    def set_trailing_metadata(self, metadata):
        self.trailing = tuple(metadata)

    def invocation_metadata(self):
        return ()

    def abort(self, code, message):
        raise Abort(code, message)
