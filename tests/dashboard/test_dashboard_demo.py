"""`optreg demo --dashboard` keeps its page up after training until Ctrl-C (issue 27): a URL that died with
the demo was the first thing a newcomer clicked."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import pytest

from conftest import SOURCE_ROOTS


def test_the_demo_page_answers_after_training_and_ctrl_c_ends_it_cleanly(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("sklearn")
    env = dict(os.environ, MPLBACKEND="Agg", PYTHONPATH=os.pathsep.join(SOURCE_ROOTS + [os.environ.get("PYTHONPATH", "")]))
    demo = subprocess.Popen([sys.executable, "-m", "optreg.app", "demo", "--dashboard", "--quick", "--dataset", "digits",
                             "--iterations", "5", "--no-progress", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        for line in demo.stdout:  # training runs to its end; then the demo says the page stays
            lines.append(line)
            if "press Ctrl-C to stop" in line:
                break
        assert lines and "press Ctrl-C to stop" in lines[-1], "".join(lines) + demo.stderr.read()
        assert any(line.startswith("wrote ") for line in lines)  # the figures and summary are written first
        url = lines[-1].split()[1]
        assert demo.poll() is None
        with urllib.request.urlopen(url, timeout=30) as r:
            assert r.status == 200 and b"optreg dashboard" in r.read()
        with urllib.request.urlopen(url + "api/sessions", timeout=30) as r:
            sessions = json.load(r)["sessions"]
        assert {s["session_id"] for s in sessions} == {"demo-sgd", "demo-momentum", "demo-adagrad", "demo-adam",
                                                       "demo-rmsprop"}
        assert all(s["step"] == 5 and s["alerts"] == 0 for s in sessions), sessions
        demo.send_signal(signal.SIGINT)
        assert demo.wait(60) == 0
        assert "stopped" in demo.stdout.read()
        assert "Traceback" not in demo.stderr.read()
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()
        demo.stdout.close()
        demo.stderr.close()
