"""The live training dashboard: an aiohttp server on its own thread and event loop, beside the threaded
gRPC server, reading the TelemetryHub. See docs/telemetry.md for why aiohttp."""
from optreg.server.dashboard.server import DashboardServer

__all__ = ["DashboardServer"]
