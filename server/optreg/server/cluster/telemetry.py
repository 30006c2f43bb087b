"""TelemetryService on a Ray cluster: each session host keeps its own sessions' telemetry rings (the
single server's TelemetryHub, fed by the same observer), in storage every node reaches
(DIR/telemetry/<id>.telemetry), so a session's telemetry moves with it.

GetTelemetry, ExportTelemetry and ImportTelemetry go to the owning host like any session call.
WatchSession is a stream of unbounded length, which one Ray call cannot carry: the host runs the
single server's WatchSession generator on a thread of its own and the front end pulls what it
yielded in batches (`Watches.next`); a watch nobody pulls for WATCH_IDLE_SECONDS ends by itself."""
from __future__ import annotations

import logging
import queue
import threading
import time
import uuid

from optreg.server.cluster.context import Abort
from optreg.server.telemetry.hub import TelemetryHub, TelemetryObserver

log = logging.getLogger("optreg.server.cluster")
WATCH_IDLE_SECONDS = 30.0  # a watch whose front end stopped pulling (gone, or the client left)
SUFFIX = ".telemetry"


def attach(store, root: str, registry) -> TelemetryHub:
    """A hub over DIR/telemetry fed by `store`'s steps (effective lr as the single server measures it)."""
    def effective_lr(optimizer: str):
        found = registry.optimizers.get(optimizer)
        return getattr(found.definition, "effective_lr", None) if found else None

    hub = TelemetryHub(root, effective_lr=effective_lr)
    store.observers.append(TelemetryObserver(hub))
    hub.start()
    return hub


def take(hub: TelemetryHub, session_id: str) -> None:
    """An adopted session: its ring as the previous owner last wrote it (every 5 s, and at drain)."""
    path = hub.dir / f"{session_id}{SUFFIX}"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return
    try:
        hub.import_(session_id, data)
        with hub._cond:  # import_ marks it dirty; it is what is on disk already
            hub._rings[session_id].dirty = False
    except Exception as e:  # noqa: BLE001 - telemetry must never stop an adoption
        log.warning("telemetry of session %s not loaded at adoption: %s", session_id, e)


def let_go(hub: TelemetryHub, session_id: str, save: bool) -> None:
    """A session leaving this host: written first when it leaves in order (a drain), dropped from
    memory either way (a superseded owner must not write over the new owner's file). The hub has no
    public "forget without deleting the file" (on_delete unlinks it), so the ring is popped here."""
    if save:
        try:
            hub.save(session_id)
        except OSError as e:
            log.warning("telemetry of session %s not written at drain: %s", session_id, e)
    hub.drain()
    with hub._cond:
        ring = hub._rings.pop(session_id, None)
        if ring is not None:
            ring.dirty = False


class _WatchContext:
    """The servicer's view of a watch: active until closed or left unpulled."""

    def __init__(self, owner: str | None = None):
        self.owner = owner or ""  # the caller's token hash (cluster/context.py)
        self.pulled = time.monotonic()
        self.closed = False

    def is_active(self):
        return not self.closed and time.monotonic() - self.pulled < WATCH_IDLE_SECONDS

    def abort(self, code, message):
        raise Abort(code, message)

    def invocation_metadata(self):
        return ()

    def peer(self):
        return "ray:front-end"


class Watches:
    """The host's running WatchSession generators, each on its own thread, pulled by id."""

    def __init__(self, servicer):
        self.servicer = servicer
        self._open: dict[str, tuple[_WatchContext, queue.Queue]] = {}
        self._lock = threading.Lock()

    def open(self, request, owner: str | None = None) -> str:
        watch_id, ctx, out = uuid.uuid4().hex, _WatchContext(owner), queue.Queue()
        with self._lock:
            self._open[watch_id] = (ctx, out)
        threading.Thread(target=self._run, args=(watch_id, request, ctx, out), daemon=True,
                         name="optreg-watch").start()
        return watch_id

    def _run(self, watch_id, request, ctx, out) -> None:
        try:
            for message in self.servicer.WatchSession(request, ctx):
                out.put(("message", message.SerializeToString()))
            out.put(("end", None))
        except Abort as a:
            out.put(("error", (a.code.name, a.message)))
        except Exception as e:  # noqa: BLE001 - reported to the caller, not lost on this thread
            log.exception("watch %s failed", watch_id)
            out.put(("error", ("INTERNAL", f"{type(e).__name__}: {e}")))
        finally:
            if not ctx.is_active():  # closed or left unpulled: nobody will read the end
                with self._lock:
                    self._open.pop(watch_id, None)

    def next(self, watch_id: str, seconds: float) -> tuple[list[bytes], tuple[str, str] | None, bool]:
        """(messages, error or None, ended): what the watch yielded, waiting up to `seconds` for the first."""
        with self._lock:
            got = self._open.get(watch_id)
        if got is None:
            return [], ("UNAVAILABLE", "the watch ended on its host (left unpulled, or the host restarted): "
                                       "watch again with from_step one past the last step received"), True
        ctx, out = got
        ctx.pulled = time.monotonic()
        messages = []
        try:
            items = [out.get(timeout=seconds)]
        except queue.Empty:
            return messages, None, False
        while True:
            try:
                items.append(out.get_nowait())
            except queue.Empty:
                break
        for kind, item in items:
            if kind == "message":
                messages.append(item)
            else:
                self.close(watch_id)
                return messages, (item if kind == "error" else None), True
        return messages, None, False

    def close(self, watch_id: str) -> None:
        with self._lock:
            got = self._open.pop(watch_id, None)
        if got is not None:
            got[0].closed = True
