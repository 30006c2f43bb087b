"""Hostile client, names family (issue 22, finding 15): loopback in every spelling is loopback for --host,
--metrics-host and --dashboard-host (one check, app.is_loopback), each tried with a real `optreg serve`;
a mapped address that is not loopback is still refused."""
from __future__ import annotations

import urllib.request

import numpy as np
import pytest

from cli_helpers import free_port
from optreg.client import Client

MAPPED = "::ffff:127.0.0.1"  # 127.0.0.1 as an IPv6 socket carries it
MAPPED_PUBLIC = "::ffff:192.0.2.1"  # TEST-NET-1, mapped: not loopback


@pytest.mark.parametrize("host, metrics_host, dashboard_host, refused", [
    (MAPPED, MAPPED, MAPPED, [("--host", MAPPED_PUBLIC)]),
    ("0:0:0:0:0:0:0:1", "[::ffff:7f00:1]", "127.42.0.1",
     [("--metrics-host", MAPPED_PUBLIC, "--metrics-port", "0"), ("--dashboard-host", MAPPED_PUBLIC)]),
])
def test_loopback_in_every_spelling_serves_on_every_flag(start_server, host, metrics_host, dashboard_host, refused):
    port = free_port()
    s = start_server("--memory-only", "--host", host, "--metrics-host", metrics_host, "--metrics-port", str(port),
                     "--dashboard-host", dashboard_host, "--dashboard-port", "0")
    with Client(s.address, timeout=30) as c:
        session = c.create_session("sgd", {"w": np.zeros(3)}, session_id="loop", lr=0.5)
        session.step({"w": np.ones(3)})
        assert [x.session_id for x in c.list_sessions()] == ["loop"]
    assert "optreg_" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    line = s.proc.stdout.readline()
    assert line.startswith("optreg dashboard on http://"), line
    assert "loop" in urllib.request.urlopen(line.split()[-1] + "api/sessions", timeout=30).read().decode()
    s.stop()
    for args in refused:  # (the dashboard's refusal comes before its port is looked at)
        with pytest.raises(RuntimeError, match="refusing to bind .* to non-loopback address 192.0.2.1 "):
            start_server("--memory-only", *args, "--dashboard-port", "0")
