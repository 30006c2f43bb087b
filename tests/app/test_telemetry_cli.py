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


def test_export_and_import_carry_the_telemetry_through_a_kill_9(start_server, tmp_path):
    """`optreg sessions export` keeps the session's telemetry ring in the file; `import` into another server
    gives the new session the same steps, scalars and alerts, owned by the importing token, on disk at once
    (a kill -9 right after the import keeps it). A blob that is not a ring is refused, changing nothing."""
    import grpc
    from cli_helpers import optreg
    from optreg.client import Client, InvalidArgument
    from optreg.v1 import telemetry_pb2, telemetry_pb2_grpc

    tokens = tmp_path / "tokens"
    tokens.write_text("alice\nbob\n")
    (tmp_path / "alice").write_text("alice\n")
    a = start_server("--data-dir", str(tmp_path / "a"), "--token-file", str(tokens))
    with Client(a.address, token="alice") as c:
        s = c.create_session("adam", {"W": np.ones(4, np.float32)}, session_id="run")
        for k in range(6):
            s.step({"W": np.full(4, 0.1, np.float32)}, metrics={"loss": 1.0 / (k + 1)})
        with pytest.raises(InvalidArgument):  # a non-finite gradient: refused, leaving a "refused" alert
            s.step({"W": np.array([np.nan, 0, 0, 0], np.float32)})

    def telemetry(address, token):
        stub = telemetry_pb2_grpc.TelemetryServiceStub(grpc.insecure_channel(address))
        return stub.GetTelemetry(telemetry_pb2.GetTelemetryRequest(session_id="run"), timeout=10,
                                 metadata=(("authorization", f"Bearer {token}"),))

    def wait_for(address, token, steps, alerts):
        deadline = time.monotonic() + 10
        while True:  # the ring folds events on its own thread: wait until the last one is in
            got = telemetry(address, token)
            if (len(got.steps), len(got.alerts)) == (steps, alerts) or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    before = wait_for(a.address, "alice", 6, 1)
    assert [st.step for st in before.steps] == [1, 2, 3, 4, 5, 6] and before.alerts[0].kind == "refused"
    exported = tmp_path / "run.safetensors"
    done = optreg("sessions", "export", "run", str(exported), "--address", a.address,
                  "--token-file", str(tmp_path / "alice"))
    assert done.returncode == 0 and "with its telemetry" in done.stdout, done.stderr

    b = start_server("--data-dir", str(tmp_path / "b"), "--token-file", str(tokens))
    done = optreg("sessions", "import", str(exported), "--address", b.address, "--token-file",
                  str(tmp_path / "alice"))
    assert done.returncode == 0 and "with its telemetry" in done.stdout, done.stderr
    b.kill()  # straight after the import: the ring was written before the import answered
    b = start_server("--data-dir", str(tmp_path / "b"), "--token-file", str(tokens))
    after = telemetry(b.address, "alice")
    assert [st.step for st in after.steps] == [1, 2, 3, 4, 5, 6]
    assert [dict(st.metrics) for st in after.steps] == [dict(st.metrics) for st in before.steps]
    assert [st.tensors[0].update_ratio for st in after.steps] == [st.tensors[0].update_ratio for st in before.steps]
    assert [(x.kind, x.step, x.message) for x in after.alerts] == [(x.kind, x.step, x.message) for x in before.alerts]
    with pytest.raises(grpc.RpcError) as e:  # the imported ring is alice's: bob sees nothing
        telemetry(b.address, "bob")
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with Client(b.address, token="alice") as c:
        with pytest.raises(InvalidArgument, match="not a telemetry ring"):
            c.import_telemetry("run", b"not a ring")
        s = c.session("run", {"W": np.zeros(4, np.float32)})
        s.step({"W": np.full(4, 0.1, np.float32)}, metrics={"loss": 0.1})  # the imported session goes on
    got = wait_for(b.address, "alice", 7, 1)
    assert [st.step for st in got.steps] == [1, 2, 3, 4, 5, 6, 7]


def test_demo_workers_dashboard_keeps_the_runs(tmp_path):
    """`optreg demo --workers 2 --dashboard`: once training is over the page still lists both runs, each with
    its rounds and the workers' losses (the sessions were deleted after training, leaving an empty page)."""
    pytest.importorskip("matplotlib", reason="optreg demo needs the demo extra")
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join(SOURCE_ROOTS + [env.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-m", "optreg.app", "demo", "--workers", "2", "--dashboard", "--quick",
                             "--dataset", "digits", "--iterations", "30", "--out", str(tmp_path / "out")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url, lines = None, []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("dashboard: ") and url is None:
                url = line.split()[1]
            if "stays up with every run" in line:
                break
        assert url and lines[-1].startswith("dashboard: "), "".join(lines) + proc.stderr.read()
        sessions = {s["session_id"]: s for s in get(url + "api/sessions")["sessions"]}
        assert {"demo-2-workers", "demo-1-worker"} <= set(sessions), sessions
        assert sessions["demo-2-workers"]["step"] == 30
        steps = get(url + "api/sessions/demo-2-workers/telemetry")["steps"]
        assert steps and all("loss" in st["metrics"] for st in steps)
    finally:
        proc.terminate()
        proc.wait(30)
