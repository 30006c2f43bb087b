"""`optreg serve --ray [ADDRESS]`: a gRPC front end on a Ray cluster (joins ADDRESS, or starts a
local Ray), serving the optreg.v1 contract over session hosts on every node."""
from __future__ import annotations

import logging
import signal
import threading

from optreg.plugins.registry import Registry
from optreg.server.assembly import GrpcServer, bind_address, guard, method_handlers, wait_interruptibly
from optreg.server.cluster.directory import Directory, connect
from optreg.server.cluster.frontend import Frontend
from optreg.server.telemetry.metrics import Metrics
from optreg.server.rpc import calls
from optreg.server.rpc.service import RegistryServicer
from optreg.v1 import registry_pb2, registry_pb2_grpc, session_pb2, telemetry_pb2

log = logging.getLogger("optreg.server.cluster")
SERVICES = (registry_pb2.DESCRIPTOR.services_by_name["OptimizerRegistryService"].full_name,
            session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
            telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryService"].full_name)


class ClusterServer:
    def __init__(self, data_dir: str, ray_address: str | None = None, host: str = "127.0.0.1", port: int = 50051,
                 workers: int = 16, max_message_mb: int = 64, memory_budget_mb: float | None = None,
                 allow_insecure: bool = False, drain_seconds: float = 30.0):
        host = bind_address(host)
        guard("the gRPC front end", host, False, "TLS and tokens", allow_insecure)
        connect(ray_address or None)
        self.directory = Directory(data_dir, memory_budget_mb)
        self.directory.ensure_hosts()
        self.frontend = Frontend(self.directory)
        self.drain_seconds = drain_seconds
        # The single server's (assembly.GrpcServer): grpc.aio, the same options (keepalive included), health
        # and reflection; the front end's handlers run on its pool of `workers` threads.
        self.grpc_server = GrpcServer(workers, max_message_mb << 20, name="optreg-front")
        registry = method_handlers(registry_pb2_grpc.add_OptimizerRegistryServiceServicer_to_server,
                                   RegistryServicer(Registry(), Metrics()))
        for service, handlers in [registry] + list(self.frontend.tables().items()):
            self.grpc_server.add(service, calls.adapt(handlers))
        self.grpc_server.add_health_and_reflection(SERVICES)
        self.host = host
        self.port = self.grpc_server.bind(host, port, None)

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> None:
        self.grpc_server.start()

    def stop(self, grace: float | None = None) -> None:
        self.grpc_server.enter_graceful_shutdown()
        self.grpc_server.stop(self.drain_seconds if grace is None else grace)

    def serve_forever(self) -> int:
        stopping = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stopping.set())
        self.start()
        print(f"optreg serving on {self.address} (Ray front end; sessions in {self.directory.root})", flush=True)
        wait_interruptibly(stopping)
        self.stop()
        return 0

