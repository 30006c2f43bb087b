"""The dashboard from the command line: `optreg serve --dashboard-port` behind tokens, and
`optreg demo --dashboard` whose page shows the demo's sessions while it trains."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import SOURCE_ROOTS

pytest.importorskip("aiohttp", reason="the dashboard needs the dashboard extra: pip install 'optreg[dashboard]'")


def get(url, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10) as r:
        return json.loads(r.read())


def test_serve_dashboard_port_with_tokens(start_server, tmp_path):
    from optreg.client import Client
    tokens = tmp_path / "tokens"
    tokens.write_text("alice\nbob\n")
    srv = start_server("--dashboard-port", "0", "--token-file", str(tokens))
    line = srv.proc.stdout.readline()
    assert line.startswith("optreg dashboard on http://127.0.0.1:"), line
    url = line.split()[-1]
    with Client(srv.address, token="alice") as c:
        s = c.create_session("adam", {"W": np.ones(4, np.float32)}, session_id="cli-run")
        for k in range(5):
            s.step({"W": np.full(4, 0.1, np.float32)}, metrics={"loss": 1.0 / (k + 1)})
    got = get(url + "api/sessions/cli-run/telemetry", "alice")
    assert [st["step"] for st in got["steps"]] == [1, 2, 3, 4, 5]
    assert got["steps"][-1]["metrics"]["loss"] == 0.2
    assert [x["session_id"] for x in get(url + "api/sessions", "alice")["sessions"]] == ["cli-run"]
    assert get(url + "api/sessions", "bob")["sessions"] == []
    with pytest.raises(urllib.error.HTTPError) as e:
        get(url + "api/sessions/cli-run/telemetry", "bob")
    assert e.value.code == 404
    with pytest.raises(urllib.error.HTTPError) as e:
        get(url + "api/sessions", "mallory")
    assert e.value.code == 401


def test_serve_dashboard_refuses_a_public_host_without_tls(start_server):
    with pytest.raises(RuntimeError, match="dashboard to non-loopback address 0.0.0.0"):
        start_server("--dashboard-port", "0", "--dashboard-host", "0.0.0.0")


def test_demo_dashboard_shows_the_demo_training(tmp_path):
    pytest.importorskip("matplotlib", reason="optreg demo needs the demo extra")
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(SOURCE_ROOTS + [env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-m", "optreg.app", "demo", "--dashboard", "--quick", "--no-progress",
                             "--dataset", "digits", "--iterations", "3000", "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = None
        for line in proc.stdout:
            if line.startswith("dashboard: "):
                url = line.split()[1]
                break
        assert url, proc.stderr.read()
        deadline = time.monotonic() + 120
        while True:
            sessions = {s["session_id"]: s for s in get(url + "api/sessions")["sessions"]}
            if sessions.get("demo-adam", {}).get("step", 0) >= 20:
                break
            assert time.monotonic() < deadline, sessions
            time.sleep(0.2)
        assert {"demo-sgd", "demo-momentum", "demo-adagrad", "demo-adam", "demo-rmsprop"} <= set(sessions)
        steps = get(url + "api/sessions/demo-adam/telemetry")["steps"]
        assert len(steps) >= 19 and all("loss" in st["metrics"] for st in steps)
        assert 0 < steps[-1]["metrics"]["loss"] < 5
    finally:
        proc.terminate()
        proc.wait(30)
