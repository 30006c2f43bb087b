"""examples/node/watch.js against a real server: a live update/param ratio over WatchSession, resumed
from a step, behind tokens."""
from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest

from test_node_client import NODE, NODE_DIR, ROOT, _ensure_node_modules
from optreg.server.rpc.auth import token_hash
from optreg.server.telemetry.hub import StepEvent

pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


def test_watch_js_prints_live_ratios_from_a_step(tmp_path):
    from optreg.client import Client
    from optreg.server.assembly import OptregServer, Settings
    _ensure_node_modules()
    tokens = tmp_path / "tokens"
    tokens.write_text("alice\n")
    srv = OptregServer(Settings(port=0, data_dir="", token_file=str(tokens)))
    srv.start()
    try:
        with Client(srv.address, token="alice") as c:
            c.create_session("sgd", {"W": np.zeros(4, np.float32)}, session_id="n1")
        owner = token_hash("alice")

        def step(s, ratio):
            srv.telemetry.on_step(StepEvent("n1", s, time.time(), owner=owner, optimizer="sgd",
                                            tensors={"W": np.array([1.0, 100.0, (10 * ratio) ** 2, 1.0])},
                                            metrics={"loss": 1.0 / s}))

        for s in range(1, 4):
            step(s, 1e-3)
        proc = subprocess.Popen([NODE, str(NODE_DIR / "watch.js"), "n1", "--address", srv.address, "--from", "2",
                                 "--steps", "5", "--token", "alice"], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)  # steps 4..6 arrive while it watches (and would be as well if it connected later)
        for s, r in ((4, 1e-5), (5, 5e-2), (6, 1e-3)):
            step(s, r)
        out, err = proc.communicate(timeout=60)
    finally:
        srv.stop(0)
    assert proc.returncode == 0, err
    lines = [l for l in out.splitlines() if l.startswith("step ")]
    assert [l.split()[1] for l in lines] == ["2", "3", "4", "5", "6"]
    assert "loss 0.5000" in lines[0] and "W 1.00e-3 ok" in lines[0]
    assert "W 1.00e-5 LOW" in lines[2] and "W 5.00e-2 HIGH" in lines[3]

    bad = subprocess.run([NODE, str(NODE_DIR / "watch.js"), "n1", "--address", "127.0.0.1:1", "--steps", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "WatchSession failed" in bad.stderr
