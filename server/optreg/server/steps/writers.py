"""The writer lease of a single-writer session: which client process steps it.

Two processes stepping one session (a script started twice by accident) would each be fenced
correctly step by step and still overwrite each other's training. So a client names itself in
the `optreg-writer` call header ("host=H pid=P ns=N id=R": N its pid namespace, R random, made once
per process). The
first named writer to step holds the session's lease and each of its steps renews it; another
writer's step is refused FAILED_PRECONDITION naming the holder, until

- the lease lapses (LEASE_SECONDS without a step from its holder: a writer that crashed),
- the holder's process is seen gone (it ran on this host in the server's pid namespace, called over
  loopback, and its pid no longer exists: a local restart after a crash takes over at once), or
- the new writer takes over deliberately (header `optreg-take-over: 1`; the Python client's
  `take_over=True`).

Leases live in memory only: after a server restart the first writer to step holds it. Calls that
name no writer (a raw gRPC client, grpcurl) are neither fenced by nor holders of a lease.
"""
from __future__ import annotations

import functools
import os
import socket
import time

from optreg.server.model.errors import FailedPrecondition, InvalidArgument, shown
from optreg.server.steps.shared_memory import is_local_peer

HEADER = "optreg-writer"
TAKE_OVER = "optreg-take-over"
LEASE_SECONDS = 30.0
MAX_HEADER = 512
MAX_PID = 1 << 22  # the kernel's largest pid_max
_HOST = socket.gethostname()


def _pid_namespace() -> str:
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


_NAMESPACE = _pid_namespace()


class Writer:
    """One writer process, as its header names it. Parsed only when the lease changes hands or is
    disputed: a step of the holder compares the header's text and nothing more."""

    def __init__(self, key: str, peer=""):
        self.key = key  # the header's value: one process
        self._peer = peer  # gRPC's peer string, or a callable giving it (read only if the pid is checked)
        self.since = 0.0  # wall clock, when it took the lease
        self.seen = 0.0  # monotonic, its last step

    @functools.cached_property
    def fields(self) -> dict:
        return dict(part.split("=", 1) for part in self.key.split() if "=" in part)

    @property
    def host(self) -> str:
        return self.fields.get("host", "")

    @property
    def pid(self) -> int:
        pid = self.fields.get("pid", "")
        return int(pid) if pid.isdigit() and 0 < int(pid) <= MAX_PID else 0

    @functools.cached_property
    def local(self) -> bool:
        """On this host, in this pid namespace, over loopback: its pid can be checked (a container with the
        host's name and network has pids of its own)."""
        peer = self._peer() if callable(self._peer) else self._peer
        return self.host == _HOST and self.fields.get("ns") == _NAMESPACE != "" and is_local_peer(peer)

    @property
    def who(self) -> str:
        """The holder as others may be told of it (not its random id, which would let them pose as it)."""
        return f"host={self.host or '?'} pid={self.pid or '?'}"

    def describe(self) -> str:
        who = f"host {shown(self.host or '?', 80)}, pid {self.pid or '?'}"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"{who}, holding it since {since}, last step {time.monotonic() - self.seen:.0f} s ago"

    def gone(self) -> bool:
        """Its process is known to have ended (a process on this host only)."""
        if not (self.local and self.pid > 0):
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # exists, another user's
            return False
        return False


def from_call(metadata, peer) -> tuple[Writer | None, bool]:
    """The caller's writer identity (None: it names none) and whether it asks to take over. `peer`: gRPC's
    peer string or a callable giving it."""
    value, take_over = None, False
    for k, v in metadata or ():
        if k == HEADER:
            value = v
        elif k == TAKE_OVER:
            take_over = v.strip().lower() in ("1", "true", "yes")
    if value is None:
        return None, take_over
    if not value or len(value) > MAX_HEADER or not (value.isascii() and value.isprintable()):
        raise InvalidArgument(f"header {HEADER} {shown(value)}: use 'host=H pid=P ns=N id=R' in at most "
                              f"{MAX_HEADER} printable ASCII characters")
    return Writer(value, peer), take_over


def claim(session, writer: Writer | None, take_over: bool = False) -> None:
    """Caller holds the session's lock: let `writer` step the session (taking or renewing its lease),
    or refuse naming the holder."""
    if writer is None:
        return
    now = time.monotonic()
    held = session.writer
    if held is not None and held.key != writer.key and not take_over:
        if now - held.seen < LEASE_SECONDS and not held.gone():
            raise FailedPrecondition(
                f"session {session.id} is being stepped by another writer ({held.describe()}); two writers would "
                f"overwrite each other's steps. If that run is gone, its lease lapses {LEASE_SECONDS:.0f} s after "
                "its last step; to take over now on purpose, attach with take_over=True (Python: "
                f"client.session(id, params, take_over=True) or create_session(..., resume=True, take_over=True); "
                f"other clients: send the header {TAKE_OVER}: 1)",
                metadata=(("optreg-writer-holder", held.who),))
    if held is None or held.key != writer.key:
        writer.since = time.time()
        session.writer = writer
    session.writer.seen = now
