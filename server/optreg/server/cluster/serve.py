"""`optreg serve --ray [ADDRESS]`: a gRPC front end on a Ray cluster (joins ADDRESS, or starts a
local Ray), serving the optreg.v1 contract over session hosts on every node."""
from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from optreg.plugins.registry import Registry
from optreg.server.assembly import bind_address, bind_port, method_handlers, secure, server_options, wait_interruptibly
from optreg.server.cluster.directory import Directory, connect
from optreg.server.cluster.frontend import Frontend
from optreg.server.telemetry.metrics import Metrics
from optreg.server.rpc.auth import ThreadedTokenAuth
from optreg.server.rpc.reflection import enable_reflection
from optreg.server.rpc.service import RegistryServicer
from optreg.v1 import registry_pb2, registry_pb2_grpc, session_pb2, telemetry_pb2

log = logging.getLogger("optreg.server.cluster")
SERVICES = (registry_pb2.DESCRIPTOR.services_by_name["OptimizerRegistryService"].full_name,
            session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
            telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryService"].full_name)


class ClusterServer:
    def __init__(self, data_dir: str, ray_address: str | None = None, host: str = "127.0.0.1", port: int = 50051,
                 workers: int = 16, max_message_mb: int = 64, memory_budget_mb: float | None = None,
                 allow_insecure: bool = False, drain_seconds: float = 30.0, token_file: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None):
        host = bind_address(host)
        metrics = Metrics()
        # the single server's flags and rule (assembly.secure): tokens checked here, sessions owned by token
        # on the hosts (the caller's token hash travels with each call)
        auth, creds, _ = secure("the gRPC front end", host, token_file, tls_cert, tls_key, allow_insecure,
                                metrics.error)
        connect(ray_address or None)
        self.directory = Directory(data_dir, memory_budget_mb)
        self.directory.ensure_hosts()
        self.frontend = Frontend(self.directory, auth=auth)
        self.drain_seconds = drain_seconds
        # The thread-pool server: the front end's handlers forward to the session hosts and wait on Ray
        # (not yet coroutines, as the single server's are); the single server's options, keepalive included.
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="optreg-front"),
            options=server_options(max_message_mb << 20),
            interceptors=[ThreadedTokenAuth(auth)] if auth else [])
        registry = method_handlers(registry_pb2_grpc.add_OptimizerRegistryServiceServicer_to_server,
                                   RegistryServicer(Registry(), metrics))
        for service, handlers in [registry] + list(self.frontend.tables().items()):
            self.grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        enable_reflection(SERVICES + (health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server)
        self.host = host
        self.port = bind_port(self.grpc_server, host, port, creds)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> None:
        self.grpc_server.start()
        for name in ("",) + SERVICES:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(self.drain_seconds if grace is None else grace).wait()

    def serve_forever(self) -> int:
        stopping = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopping.set())
        self.start()
        print(f"optreg serving on {self.address} (Ray front end; sessions in {self.directory.root})", flush=True)
        wait_interruptibly(stopping)
        self.stop()
        return 0
