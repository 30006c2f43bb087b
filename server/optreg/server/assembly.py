"""Builds and runs the gRPC server: optreg's services, standard health checking, reflection."""
from __future__ import annotations

import asyncio
import errno
import gc
import ipaddress
import logging
import resource
import os
import pathlib
import signal
import socket
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from optreg.plugins.registry import Registry
from optreg.server.rpc.auth import TokenAuth, read_tokens
from optreg.server.storage.datadir import DataDirLock
from optreg.server.rpc.reflection import enable_reflection
from optreg.server.telemetry.metrics import Metrics
from optreg.server.sessions.janitor import Janitor
from optreg.server.rpc.service import RegistryServicer, SessionServicer
from optreg.server.model import budget as memory
from optreg.server.sessions.factory import Limits
from optreg.server.storage.fsync import GroupSyncer
from optreg.server.storage.journal import Journal
from optreg.server.sessions.store import SessionStore
from optreg.server.rpc import calls
from optreg.server.rpc.aio import coroutines
from optreg.server.rpc import telemetry as telemetry_service
from optreg.server.telemetry.hub import TelemetryHub, TelemetryObserver
from optreg.v1 import registry_pb2, registry_pb2_grpc, session_pb2, session_pb2_grpc, tensors

log = logging.getLogger("optreg.server")
GC_THRESHOLDS = (5000, 3, 300)  # the cyclic collector's (default 700, 10, 10; see start)

SERVICE_NAMES = (
    registry_pb2.DESCRIPTOR.services_by_name["OptimizerRegistryService"].full_name,
    session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
    telemetry_service.SERVICE_NAME,
)


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    workers: int = 16
    max_message_mb: int = 64
    drain_seconds: float = 30.0
    # Persistence: None or "" keeps sessions in memory only.
    data_dir: str | None = None
    default_durability: str = ""  # every-step | log | periodic | none; "": log with a data dir, else none
    periodic_steps: int = 100
    periodic_seconds: float = 30.0
    idle_seconds: float = 300.0  # a durable session unused this long is unloaded (0: never)
    max_loaded_sessions: int = 10_000  # durable sessions in memory at most (0: no bound); the idlest unloaded
    memory_budget_mb: float | None = None  # None: budget.DEFAULT_SHARE of physical memory; 0: unlimited
    # Admission limits (rpc/admission.py): calls beyond them are refused with RESOURCE_EXHAUSTED. A waiting
    # call holds no thread (grpc.aio), only its memory: a few KiB each.
    max_streams: int = 1024  # streaming calls at once (uploads and downloads)
    max_watchers: int = 1024  # WatchSession calls at once
    max_members: int = 2048  # sync/SSP members on the server; worker calls in flight: two each
    max_shm_registrations: int = 256  # shared-memory registrations at once
    stream_idle_seconds: float = 30.0
    fsync_method: str = "threads"  # how the log syncer makes a batch durable (fsync.METHODS)
    max_open_logs: int = 256  # logs with an open descriptor at once (capped below RLIMIT_NOFILE: open_logs_cap)
    memory_log_dir: str = "/dev/shm"  # log durability's memory logs ("": none, records to the disk log)
    max_exposure_seconds: float = 60.0  # steps wait while a step older than this is not on disk (memory logs)
    max_tensors: int = 4096
    token_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    allow_insecure: bool = False
    metrics_port: int | None = None  # None: no endpoint; 0 picks a free port
    metrics_host: str = "127.0.0.1"
    dashboard_port: int | None = None  # None: no dashboard; 0 picks a free port
    dashboard_host: str = "127.0.0.1"
    telemetry_steps: int = 2048  # steps kept at full resolution per session (older ones downsampled)


def open_logs_cap(settings: Settings) -> int:
    """--max-open-logs, lowered to fit the process's descriptor limit (RLIMIT_NOFILE) with room for
    everything else: about 64 of the process's own (the data directory's lock, the syncer, telemetry,
    numba's imports), a snapshot file per pool thread (--threads), and 256 connections."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return settings.max_open_logs
    room = soft - (64 + settings.workers + 256)
    if room >= settings.max_open_logs:
        return settings.max_open_logs
    cap = max(16, room)
    log.warning("--max-open-logs %d lowered to %d: the descriptor limit is %d (ulimit -n)",
                settings.max_open_logs, cap, soft)
    return cap


def default_data_dir() -> str:
    """$OPTREG_DATA_DIR, else $XDG_DATA_HOME/optreg, else ~/.local/share/optreg."""
    if "OPTREG_DATA_DIR" in os.environ:
        return os.environ["OPTREG_DATA_DIR"]
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "optreg")


def bind_address(host: str) -> str:
    """The numeric address a host names ("127.1", "0x7f000001" and "::ffff:127.0.0.1" are 127.0.0.1, as the C
    library reads them); names that resolve to several addresses (localhost) stay names. ValueError when unresolvable."""
    bare = host.strip("[]")
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        pass
    else:  # ::ffff:127.0.0.1 is 127.0.0.1 (all an IPv6 socket bound to it serves; asyncio's, the
        # dashboard's, are IPv6-only and cannot bind it at all)
        return str(getattr(ip, "ipv4_mapped", None) or ip)
    try:
        found = {a[4][0] for a in socket.getaddrinfo(bare, None, proto=socket.IPPROTO_TCP)}
    except OSError as e:
        raise ValueError(f"cannot resolve host {host!r}: {e.strerror or e}") from None
    if len(found) == 1:
        return found.pop()
    return bare


def _loopback_ip(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    # ::ffff:127.0.0.1 is 127.0.0.1 as an IPv6 socket carries it; ipaddress calls it non-loopback.
    return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback


def is_loopback(host: str) -> bool:
    """Whether `host` is this machine's loopback in any spelling: 127.x.y.z, ::1, 0:0:0:0:0:0:0:1,
    ::ffff:127.0.0.1, 127.1, localhost, or a name that resolves to loopback addresses only. The one check
    --host, --metrics-host and --dashboard-host go through (guard)."""
    try:
        bare = bind_address(host)
    except ValueError:
        return False
    if bare in ("localhost", "ip6-localhost"):
        return True
    try:
        return _loopback_ip(bare)
    except ValueError:
        try:
            return all(_loopback_ip(a[4][0]) for a in socket.getaddrinfo(bare, None))
        except (OSError, ValueError):
            return False


def guard(what: str, host: str, secured: bool, missing: str, allow_insecure: bool) -> None:
    """A non-loopback address needs TLS and tokens (`secured`), or --allow-insecure."""
    if is_loopback(host) or secured:
        return
    if not allow_insecure:
        raise ValueError(f"refusing to bind {what} to non-loopback address {host} without {missing}: "
                         "pass --tls-cert/--tls-key and --token-file, or --allow-insecure")
    log.warning("%s on non-loopback %s without %s (--allow-insecure)", what, host, missing)


def secure(what: str, host: str, token_file: str | None, tls_cert: str | None, tls_key: str | None,
           allow_insecure: bool, on_error=None) -> tuple[TokenAuth | None, grpc.ServerCredentials | None, str]:
    """--token-file, --tls-cert/--tls-key and the non-loopback guard, as every gRPC server of optreg
    takes them (the single server and the cluster front end): (the token check or None, the TLS
    credentials or None, what is missing, e.g. "TLS and tokens")."""
    auth = TokenAuth(read_tokens(token_file), on_error) if token_file else None
    tls = bool(tls_cert or tls_key)
    if tls and not (tls_cert and tls_key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    missing = " and ".join(w for w, on in (("TLS", tls), ("tokens", auth)) if not on)
    guard(what, host, bool(tls and auth), missing, allow_insecure)
    creds = grpc.ssl_server_credentials([(pathlib.Path(tls_key).read_bytes(),
                                          pathlib.Path(tls_cert).read_bytes())]) if tls else None
    return auth, creds, missing


class OptregServer:
    def __init__(self, settings: Settings, registry: Registry | None = None):
        self.settings = settings
        self.registry = registry or Registry()
        self.metrics = Metrics()
        settings.host = bind_address(settings.host)
        settings.metrics_host = bind_address(settings.metrics_host)
        self.auth, creds, missing = secure("the gRPC server", settings.host, settings.token_file, settings.tls_cert,
                                           settings.tls_key, settings.allow_insecure, self.metrics.error)
        tls = creds is not None
        if settings.metrics_port is not None:  # plain HTTP, no tokens: never off loopback unless allowed
            guard("the metrics endpoint", settings.metrics_host, False, "TLS and tokens", settings.allow_insecure)
        if settings.dashboard_port is not None:  # the dashboard serves TLS with the same certificate
            settings.dashboard_host = bind_address(settings.dashboard_host)
            guard("the dashboard", settings.dashboard_host, bool(tls and self.auth), missing, settings.allow_insecure)
        # One server per data directory (DataDirInUse, an OSError, names the holder otherwise).
        self.data_lock = DataDirLock(settings.data_dir) if settings.data_dir else None
        if settings.max_open_logs < 1:
            raise ValueError(f"--max-open-logs {settings.max_open_logs}: give at least 1")
        journal = (Journal(pathlib.Path(settings.data_dir), self.metrics, GroupSyncer(settings.fsync_method),
                           max_open_logs=open_logs_cap(settings), memory_dir=settings.memory_log_dir,
                           max_exposure=settings.max_exposure_seconds)
                   if settings.data_dir else None)
        budget_bytes = (memory.default_budget() if settings.memory_budget_mb is None
                        else int(settings.memory_budget_mb * memory.MIB))
        self.store = SessionStore(
            self.registry, journal, budget=memory.MemoryBudget(budget_bytes),
            limits=Limits(max_tensors=settings.max_tensors), default_durability=settings.default_durability or None,
            periodic_steps=settings.periodic_steps, periodic_seconds=settings.periodic_seconds,
            idle_seconds=settings.idle_seconds, max_loaded=settings.max_loaded_sessions, auth=self.auth is not None,
            metrics=self.metrics)
        self.janitor = Janitor(self.store) if journal else None
        self.store.open_all()
        self.telemetry = _telemetry(settings, self.registry, self.auth)
        self.store.observers.append(TelemetryObserver(self.telemetry))
        limit = settings.max_message_mb * 1024 * 1024
        for flag, value in (("--threads", settings.workers), ("--max-watchers", settings.max_watchers),
                            ("--max-members", settings.max_members)):
            if value < 1:
                raise ValueError(f"{flag} {value}: give at least 1")
        # grpc.aio: waiting calls are coroutines on the loop and hold no thread; --threads bounds the pool
        # that runs the plain handlers and the CPU work coroutines hand off (rpc/calls.py).
        self.grpc_server = GrpcServer(settings.workers, limit, interceptors=[self.auth] if self.auth else [])
        owner = self.auth.owner if self.auth else (lambda context: "")
        self.sessions = SessionServicer(self.store, metrics=self.metrics, owner=owner, max_message_bytes=limit,
                                        shm_registrations=settings.max_shm_registrations,
                                        max_streams=settings.max_streams,
                                        stream_idle_seconds=settings.stream_idle_seconds,
                                        max_members=settings.max_members)
        watching = telemetry_service.TelemetryServicer(
            self.telemetry, owner, check_session=lambda sid, who: self.store.get(sid, who),
            max_watchers=settings.max_watchers, budget=self.store.budget)
        for service, handlers in build_services(self.sessions, watching, RegistryServicer(self.registry, self.metrics),
                                                aio=True).items():
            self.grpc_server.add(service, handlers)
        self.grpc_server.add_health_and_reflection(SERVICE_NAMES)
        self.port = self.grpc_server.bind(settings.host, settings.port, creds)

    @property
    def address(self) -> str:
        host = self.settings.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self) -> None:
        if self.settings.metrics_port is not None:
            self.metrics_port = self.metrics.serve(self.settings.metrics_port, self.settings.metrics_host)
            log.info("metrics on http://%s:%d/metrics", self.settings.metrics_host, self.metrics_port)
        if self.janitor:
            self.janitor.start()
        self.telemetry.start()
        self.dashboard = _dashboard(self.settings, self.telemetry, self.auth)
        # Calls that wait (a round's members, watchers, stalled streams) keep their objects alive past the
        # young collections, so each round promotes thousands of them. At the defaults a full collection ran
        # about every round (100-300 ms of the loop each, beside 1,000 members); young collections larger,
        # middle ones more often (smaller), full ones rarer: pauses stay under ~50 ms (docs/speed.md).
        gc.set_threshold(*GC_THRESHOLDS)
        self.grpc_server.start()

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones (steps included) finish within `grace` seconds."""
        self.grpc_server.enter_graceful_shutdown()
        self.sessions.shm.close_all()  # ends the registration calls, which would otherwise hold the drain
        self.grpc_server.stop(self.settings.drain_seconds if grace is None else grace)
        if self.janitor:
            self.janitor.stop()
        if getattr(self, "dashboard", None):
            self.dashboard.stop()
        self.telemetry.close()
        failures = self.store.flush_all()
        self.store.journal.close()
        for session_id, why in failures:
            log.error("session %s was not written at shutdown: %s", session_id, why)
        if self.data_lock is not None:
            self.data_lock.release()
        return failures

    def serve_forever(self) -> None:
        """Run until SIGTERM or SIGINT, then drain and stop."""
        stopping = threading.Event()

        def on_signal(signum, frame):
            log.info("signal %s: draining in-flight calls (up to %ss)", signum, self.settings.drain_seconds)
            stopping.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        self.start()
        print(f"optreg serving on {self.address}", flush=True)
        if self.dashboard:
            print(f"optreg dashboard on {self.dashboard.url}", flush=True)
        # After the lines scripts read (the address first, then the dashboard's URL).
        print(f"optreg sessions in {pathlib.Path(self.settings.data_dir).resolve()}" if self.settings.data_dir else
              "optreg sessions in memory only (lost when the server stops)", flush=True)
        log.info("optimizers: %s", ", ".join(self.registry.optimizers))
        for f in self.registry.failures:
            log.error("plugin %s failed: %s", f.plugin, f.reason)
        wait_interruptibly(stopping)
        failures = self.stop()
        log.info("stopped")
        return 1 if failures else 0


def wait_interruptibly(event: threading.Event) -> None:
    """event.wait() for the main thread, in slices. The kernel may deliver SIGTERM to any thread
    (gRPC's among them); CPython then only marks its Python handler as due, and the main thread runs
    it the next time it runs Python code: blocked in one untimed wait, it never would, and the
    server ignored SIGTERM (seen once in a few dozen shutdowns)."""
    while not event.wait(0.2):
        pass


def _telemetry(settings: Settings, registry: Registry, auth) -> TelemetryHub:
    def effective_lr(optimizer: str):
        found = registry.optimizers.get(optimizer)
        return getattr(found.definition, "effective_lr", None) if found else None

    hub = TelemetryHub(settings.data_dir or None, recent_steps=settings.telemetry_steps,
                       effective_lr=effective_lr, auth=auth is not None, idle_seconds=settings.idle_seconds)
    return hub


def _dashboard(settings: Settings, hub: TelemetryHub, auth):
    """The web dashboard on its own thread, under the same loopback/TLS/token rule as the gRPC port."""
    if settings.dashboard_port is None:
        return None
    from optreg.server.dashboard import DashboardServer  # aiohttp only when asked for
    context = None
    if settings.tls_cert and settings.tls_key:
        import ssl
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    dashboard = DashboardServer(hub, settings.dashboard_host, settings.dashboard_port,
                                token_hashes=auth.hashes if auth else None, ssl_context=context)
    dashboard.start()
    log.info("dashboard on %s", dashboard.url)
    return dashboard


def bind_port(grpc_server, host: str, port: int, creds) -> int:
    """Bind host:port (0: any free port) and return the port; OSError with one line when that fails."""
    if not 0 <= port <= 65535:
        raise OSError(f"port {port} is outside 0-65535")
    bind = f"[{host}]:{port}" if ":" in host and "[" not in host else f"{host}:{port}"
    if port and _in_use(host.strip("[]"), port):  # before gRPC, whose failed bind logs a C-core line too
        raise OSError(f"port {port} on {host} is in use: another server is listening on it "
                      "(stop it, or pick another --port; --port 0 picks a free one)")
    try:
        bound = grpc_server.add_secure_port(bind, creds) if creds else grpc_server.add_insecure_port(bind)
    except RuntimeError:  # grpcio >= 1.60 raises where older ones returned 0
        bound = 0
    if bound:
        return bound
    raise OSError(f"could not listen on {host}:{port} (is {host} an address of this machine, "
                  "and the port free?)")


def _in_use(host: str, port: int) -> bool:
    """Whether binding host:port fails with EADDRINUSE, tried as gRPC binds (SO_REUSEADDR, no SO_REUSEPORT)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return False  # gRPC's own bind reports a bad host
    for family, kind, proto, _, addr in infos:
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(addr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
    return False


class _Handlers:
    """Stands in for a server to catch the generated code's method handlers."""

    def add_generic_rpc_handlers(self, handlers):
        pass

    def add_registered_method_handlers(self, service, handlers):
        self.service, self.handlers = service, dict(handlers)


def method_handlers(add, servicer) -> tuple[str, dict]:
    """(service, {method: handler}) as the generated add_*_to_server(servicer, server) registers them."""
    got = _Handlers()
    add(servicer, got)
    return got.service, got.handlers


# StepStream messages of at least this many bytes that hold only chunks are decoded by
# tensors.decode_request_chunks (no copy of their data; protobuf copies each bytes field when read);
# smaller ones by protobuf, faster there than the Python decoder.
DECODE_CHUNKS_ABOVE = 64 << 10


def build_services(sessions: SessionServicer, watching=None, registry=None, aio: bool = True) -> dict[str, dict]:
    """{service name: {method: handler}} of optreg's services, for the single server (aio: the
    coroutine handlers of rpc/aio.py, the rest adapted to run on the pool) or, aio=False, for callers
    that invoke the handlers themselves (cluster/host.py). As the generated registration, except that
    StepStream's replies may come already encoded (bytes from tensors.encode_stream_message: the
    updated parameters copied once, not four times) and its requests come with their size on the wire,
    for the metrics (large chunk messages decoded without copies, see DECODE_CHUNKS_ABOVE); Step's
    dense answers come encoded too (service._step_reply), and ListSessions' pages (service.listed_info)."""
    out = {}
    service, handlers = method_handlers(session_pb2_grpc.add_SessionServiceServicer_to_server, sessions)
    h = handlers["StepStream"]
    parse = h.request_deserializer

    def parse_sized(data):  # sized without ByteSize()
        if len(data) >= DECODE_CHUNKS_ABOVE:  # a large chunk message: its tensors' bytes not copied
            msg = tensors.decode_request_chunks(data)
            if msg is not None:
                return len(data), msg
        return len(data), parse(data)
    handlers["StepStream"] = grpc.stream_stream_rpc_method_handler(
        h.stream_stream, request_deserializer=parse_sized,
        response_serializer=tensors.serialize_passthrough(h.response_serializer))
    for name in ("Step", "ListSessions"):
        h = handlers[name]
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            h.unary_unary, request_deserializer=h.request_deserializer,
            response_serializer=tensors.serialize_passthrough(h.response_serializer))
    if aio:
        handlers = coroutines(sessions, handlers)
    out[service] = handlers
    if watching is not None:
        service, handlers = method_handlers(telemetry_service.add_to_server, watching)
        if aio:
            handlers = coroutines(watching, handlers)
        out[service] = handlers
    if registry is not None:
        service, handlers = method_handlers(registry_pb2_grpc.add_OptimizerRegistryServiceServicer_to_server, registry)
        out[service] = handlers
    if aio:
        out = {service: calls.adapt(handlers) for service, handlers in out.items()}
    return out


def server_options(max_message_bytes: int) -> list[tuple]:
    return [("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            # Ping idle peers so a dead client's stream (which may hold a session's lock) ends in
            # about 40 s rather than the 2 h TCP default.
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000),
            ("grpc.keepalive_permit_without_calls", 1),
            # gRPC sets SO_REUSEPORT by default: a second server on a port in use would start and
            # take half the new connections. Without it, that bind fails (see bind_port).
            ("grpc.so_reuseport", 0)]


class GrpcServer:
    """A grpc.aio server on an event loop of its own thread, driven from plain code (start, stop), with
    standard health checking and reflection. `threads` bound the pool that runs plain handlers and the
    work coroutines hand off (the loop's default executor): waiting calls hold none of them."""

    def __init__(self, threads: int, max_message_bytes: int, interceptors=(), name: str = "optreg"):
        self.pool = futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self.loop = asyncio.new_event_loop()
        self.loop.set_default_executor(self.pool)
        self.thread = threading.Thread(target=self.loop.run_forever, name=f"{name}-loop", daemon=True)
        self.thread.start()
        self.services: list[str] = []

        async def make():
            return grpc.aio.server(migration_thread_pool=self.pool, interceptors=list(interceptors),
                                   options=server_options(max_message_bytes))
        self.server = self.run(make())
        self.health = health_aio.HealthServicer()

    def run(self, coro, timeout: float | None = None):
        """Run a coroutine on the loop from another thread; its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def add(self, service: str, handlers: dict) -> None:
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        self.server.add_registered_method_handlers(service, handlers)
        self.services.append(service)

    def add_generic(self, service: str, generic) -> None:
        self.server.add_generic_rpc_handlers((generic,))
        self.services.append(service)

    def add_health_and_reflection(self, names) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._names = tuple(names)
        enable_reflection(self._names + (health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)

    def bind(self, host: str, port: int, creds) -> int:
        return bind_port(self.server, host, port, creds)

    def start(self) -> None:
        async def start():
            await self.server.start()
            for name in ("",) + self._names:
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self.run(start())

    def enter_graceful_shutdown(self) -> None:
        self.run(self.health.enter_graceful_shutdown())

    def stop(self, grace: float | None) -> None:
        """Refuse new calls; let those in flight finish within `grace` seconds; then end the loop."""
        if self.loop.is_closed():
            return
        try:
            self.run(self.server.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.pool.shutdown(wait=False, cancel_futures=True)
