"""Builds and runs the gRPC server: optreg's services, standard health checking, reflection."""
from __future__ import annotations

import logging
import signal
import threading
from concurrent import futures
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from optreg.plugins.registry import Registry
from optreg.server.service import RegistryServicer, SessionServicer
from optreg.server.sessions import SessionStore
from optreg.v1 import registry_pb2, registry_pb2_grpc, session_pb2, session_pb2_grpc

log = logging.getLogger("optreg.server")

SERVICE_NAMES = (
    registry_pb2.DESCRIPTOR.services_by_name["OptimizerRegistryService"].full_name,
    session_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
)


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 50051
    workers: int = 16
    max_message_mb: int = 64
    drain_seconds: float = 30.0


class OptregServer:
    def __init__(self, settings: Settings, registry: Registry | None = None):
        self.settings = settings
        self.registry = registry or Registry()
        self.store = SessionStore(self.registry)
        limit = settings.max_message_mb * 1024 * 1024
        self.grpc_server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=settings.workers, thread_name_prefix="optreg"),
            options=[("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)])
        registry_pb2_grpc.add_OptimizerRegistryServiceServicer_to_server(RegistryServicer(self.registry),
                                                                          self.grpc_server)
        session_pb2_grpc.add_SessionServiceServicer_to_server(SessionServicer(self.store), self.grpc_server)
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc_server)
        reflection.enable_server_reflection(
            SERVICE_NAMES + (health.SERVICE_NAME, reflection.SERVICE_NAME), self.grpc_server)
        self.port = self.grpc_server.add_insecure_port(f"{settings.host}:{settings.port}")
        if self.port == 0:
            raise OSError(f"could not bind {settings.host}:{settings.port}")

    @property
    def address(self) -> str:
        host = self.settings.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def start(self) -> None:
        self.grpc_server.start()
        for name in ("",) + SERVICE_NAMES:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls, let in-flight ones (steps included) finish within `grace` seconds."""
        self.health.enter_graceful_shutdown()
        self.grpc_server.stop(self.settings.drain_seconds if grace is None else grace).wait()

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
        log.info("optimizers: %s", ", ".join(self.registry.optimizers))
        for f in self.registry.failures:
            log.error("plugin %s failed: %s", f.plugin, f.reason)
        stopping.wait()
        self.stop()
        log.info("stopped")
