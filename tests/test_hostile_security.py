"""Issue 22, finding 5: every expansion of client input is bounded and counted against the memory budget.

A 1 MB ImportTelemetry request (`zlib.compress(b' ' * (1000 << 20), 9)`) used to grow the server by
2 GB, under `--memory-budget-mb 64` too. The server's peak resident memory (VmHWM) is read before and
after: a bound on memory (loose: it must only tell hundreds of MiB from gigabytes), not on time.
"""
from __future__ import annotations

import zlib

import grpc
import numpy as np
import pytest

from optreg.client import Client
from optreg.v1 import telemetry_pb2, telemetry_pb2_grpc

MIB = 1 << 20


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return zlib.compress(b" " * (1000 * MIB), 9)


def _peak_rss(server) -> int:
    with open(f"/proc/{server.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _import(server, session_id: str, data: bytes):
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 * MIB)]) as ch:
        stub = telemetry_pb2_grpc.TelemetryServiceStub(ch)
        return stub.ImportTelemetry(telemetry_pb2.ImportTelemetryRequest(session_id=session_id, data=data),
                                    timeout=120)


def _stepped_session(client):
    s = client.create_session("sgd", {"w": np.ones(16, np.float32)}, lr=0.1)
    s.step({"w": np.ones(16, np.float32)})
    return s


@pytest.mark.parametrize("budget_mb,code,words", [
    ("64", grpc.StatusCode.RESOURCE_EXHAUSTED, "memory budget"),
    (None, grpc.StatusCode.INVALID_ARGUMENT, "inflates to more than 256 MiB"),
])
def test_import_telemetry_bomb_is_bounded(start_server, bomb, budget_mb, code, words):
    srv = start_server(*(["--memory-budget-mb", budget_mb] if budget_mb else []))
    with Client(srv.address, timeout=60) as c:
        s = _stepped_session(c)
        good = c.transport.unary("ExportTelemetry", telemetry_pb2.ExportTelemetryRequest(session_id=s.id),
                                 timeout=30).data
        before = _peak_rss(srv)
        with pytest.raises(grpc.RpcError) as e:
            _import(srv, s.id, bomb)
        assert e.value.code() == code and words in e.value.details(), e.value.details()
        assert srv.proc.poll() is None
        grew = _peak_rss(srv) - before  # the bound, plus room for what a fresh server does meanwhile (numba)
        assert grew < (64 if budget_mb else 512) * MIB + 256 * MIB, f"the server grew by {grew / MIB:.0f} MiB"
        # nothing was changed, the server serves, and a real export still imports
        s.step({"w": np.ones(16, np.float32)})
        assert _import(srv, s.id, good).last_step == 1
