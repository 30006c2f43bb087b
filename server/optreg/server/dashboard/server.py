"""HTTP side of the dashboard.

    GET /                                  the page (static, vendored uPlot, no build step)
    GET /api/sessions?q=TEXT               the caller's sessions with telemetry (q: substring of the id),
                                           newest first, with `age`: seconds since the last step
    GET /api/sessions/ID/telemetry         every record the ring holds, and the alerts (JSON)
    GET /api/sessions/ID/events            server-sent events: `event: step` with `id: STEP`, then live;
                                           `event: alert` (no id, so Last-Event-ID stays a step number)

Tokens: the same token file as gRPC. A call carries `Authorization: Bearer TOKEN` or, for EventSource
(which cannot set headers), `?token=TOKEN`; it sees only the sessions its token created. The access
log is off so a token in a URL is not written anywhere.

Resuming: a browser's EventSource reconnects by itself and sends the last `id:` it saw as
Last-Event-ID; the stream then starts at the next step, so no step is lost or repeated while the
ring still holds it at full resolution.
"""
from __future__ import annotations

import asyncio
import json
import logging
import math
import pathlib
import ssl
import threading
import time

from aiohttp import web

from optreg.server.rpc.auth import bearer, token_hash
from optreg.server.telemetry.hub import Record, TelemetryHub, visible

log = logging.getLogger("optreg.server.dashboard")

STATIC = pathlib.Path(__file__).resolve().parent / "static"
KEEPALIVE_SECONDS = 15.0
RETRY_MS = 500  # how soon a browser reconnects after the stream breaks


def _finite(x):
    """JSON has no NaN or infinity: send null (the page shows a gap and the alert says why)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def record_json(record: Record, names) -> dict:
    return _finite({"step": record.step, "steps": record.steps, "t": record.wall_time,
                    "tensors": record.tensor_figures(names), "metrics": record.metrics,
                    "hp": record.hyperparameters})


class DashboardServer:
    """`token_hashes`: None without tokens, else the accepted tokens' SHA-256 (TokenAuth.hashes)."""

    def __init__(self, hub: TelemetryHub, host: str = "127.0.0.1", port: int = 0,
                 token_hashes: frozenset[str] | None = None, ssl_context: ssl.SSLContext | None = None):
        self.hub, self.host, self.requested_port = hub, host, port
        self.token_hashes = token_hashes
        self.ssl_context = ssl_context
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._wakers: dict[str, asyncio.Event] = {}
        self._closing = False
        self._generation = 0  # drop_streams() bumps it: streams of an older generation end

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> int:
        """Serve on a daemon thread; return the bound port (raises if it cannot bind)."""
        started = threading.Event()
        failure: list[BaseException] = []

        def run():
            loop = self._loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._setup())
            except BaseException as e:  # noqa: BLE001 - reported to start()'s caller
                failure.append(e)
                started.set()
                return
            started.set()
            loop.run_forever()
            loop.run_until_complete(self._runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name="optreg-dashboard", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise failure[0]
        self.hub.add_listener(self._on_change)
        return self.port

    async def _setup(self) -> None:
        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/favicon.ico", self._no_icon)
        app.router.add_get("/api/sessions", self._sessions)
        app.router.add_get("/api/sessions/{id}/telemetry", self._telemetry)
        app.router.add_get("/api/sessions/{id}/events", self._events)
        app.router.add_static("/static/", STATIC, follow_symlinks=False)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.requested_port, ssl_context=self.ssl_context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    def stop(self) -> None:
        self.hub.remove_listener(self._on_change)
        if self._loop is None:
            return
        self._closing = True
        self._loop.call_soon_threadsafe(self._end_streams_and_stop)
        self._thread.join(10)

    def _end_streams_and_stop(self) -> None:
        for ev in self._wakers.values():
            ev.set()
        self._loop.call_later(0.05, self._loop.stop)

    def drop_streams(self) -> None:
        """Break every open event stream (browsers reconnect with Last-Event-ID); for tests and drills."""
        def drop():
            self._generation += 1
            for ev in list(self._wakers.values()):
                ev.set()
            self._wakers.clear()
        self._loop.call_soon_threadsafe(drop)

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.ssl_context else 'http'}://{host}:{self.port}/"

    # -- wake-ups from committing threads --------------------------------------------------------
    def _on_change(self, session_id: str) -> None:
        if session_id in self._wakers:  # only sessions someone watches cost a hand-off
            self._loop.call_soon_threadsafe(self._wake, session_id)

    def _wake(self, session_id: str) -> None:
        ev = self._wakers.pop(session_id, None)
        if ev is not None:
            ev.set()

    def _waker(self, session_id: str) -> asyncio.Event:
        ev = self._wakers.get(session_id)
        if ev is None:
            ev = self._wakers[session_id] = asyncio.Event()
        return ev

    # -- auth ------------------------------------------------------------------------------------
    def _caller(self, request: web.Request) -> str:
        """The caller's token hash ("" without tokens); 401 for a missing or unknown token."""
        if self.token_hashes is None:
            return ""
        header = request.headers.get("Authorization")
        token = bearer([("authorization", header)]) if header is not None else None
        if token is None:
            token = request.query.get("token")
        if not token:
            raise web.HTTPUnauthorized(text="no token: send 'Authorization: Bearer TOKEN' or ?token=TOKEN",
                                       headers={"WWW-Authenticate": "Bearer"})
        h = token_hash(token)
        if h not in self.token_hashes:
            raise web.HTTPUnauthorized(text="the token is not one this server accepts",
                                       headers={"WWW-Authenticate": "Bearer"})
        return h

    def _ring(self, request: web.Request, caller: str):
        session_id = request.match_info["id"]
        ring = self.hub.ring(session_id)
        if ring is None or not visible(ring.owner, caller, self.hub.auth):
            raise web.HTTPNotFound(text=f"no telemetry for session {session_id[:64]!r} visible to this token")
        return session_id, ring

    # -- handlers --------------------------------------------------------------------------------
    async def _no_icon(self, request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def _index(self, request: web.Request) -> web.StreamResponse:
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    async def _sessions(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        q = request.query.get("q", "").lower()
        found = [s for s in self.hub.sessions(caller) if q in s["session_id"].lower()]
        found.sort(key=lambda s: -s["wall_time"])
        now = time.time()
        for s in found:  # the page tells a session still training from one that stopped, whatever its clock
            s["age"] = max(0.0, now - s["wall_time"])
        return web.json_response({"sessions": _finite(found), "auth": self.token_hashes is not None})

    async def _telemetry(self, request: web.Request) -> web.Response:
        caller = self._caller(request)
        session_id, _ = self._ring(request, caller)
        records, alerts, _, ring = self.hub.snapshot(session_id)
        return web.json_response({"summary": _finite(ring.summary()),
                                  "steps": [record_json(r, ring.names) for r in records],
                                  "alerts": [a.as_dict() for a in alerts]})

    async def _events(self, request: web.Request) -> web.StreamResponse:
        caller = self._caller(request)
        session_id, _ = self._ring(request, caller)
        try:
            after = int(request.headers.get("Last-Event-ID") or request.query.get("from") or 0)
        except ValueError:
            raise web.HTTPBadRequest(text="Last-Event-ID and ?from= must be a step number") from None
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
        await resp.prepare(request)
        try:
            await resp.write(f"retry: {RETRY_MS}\n\n".encode())
            after_alert, generation = 0, self._generation
            while not self._closing and generation == self._generation:
                ev = self._waker(session_id)  # taken before the read: a change after it wakes us
                records, alerts, version, ring = self.hub.snapshot(session_id, after, after_alert)
                if ring is None:
                    await resp.write(b"event: deleted\ndata: {}\n\n")
                    break
                chunks = []
                for a in alerts:
                    chunks.append(f"event: alert\ndata: {json.dumps(_finite(a.as_dict()))}\n\n")
                    after_alert = a.seq
                for r in records:
                    chunks.append(f"id: {r.step}\nevent: step\ndata: {json.dumps(record_json(r, ring.names))}\n\n")
                    after = r.step
                if chunks:
                    await resp.write("".join(chunks).encode())
                try:
                    await asyncio.wait_for(ev.wait(), KEEPALIVE_SECONDS)
                except asyncio.TimeoutError:
                    await resp.write(b": keepalive\n\n")
        except ConnectionResetError:
            pass
        return resp
