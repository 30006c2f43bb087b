"""The dashboard in a real browser: Debian's chromium driven by Playwright (no browser download).

A real server (in this process, so the test can break the dashboard's streams) with tokens and the
dashboard on a free loopback port; a real session of alice's stepped through the client with metrics.
"""
from __future__ import annotations

import os
import pathlib
import shutil

import numpy as np
import pytest

CHROMIUM = os.environ.get("OPTREG_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not pathlib.Path(CHROMIUM).exists():
    pytest.skip("chromium not installed (.ci/run installs it: apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (the test extra has it)")



@pytest.fixture
def dashboard_server(tmp_path):
    from optreg.server.assembly import OptregServer, Settings
    tokens = tmp_path / "tokens"
    tokens.write_text("alice-token\nbob-token\n")
    srv = OptregServer(Settings(port=0, data_dir="", token_file=str(tokens), dashboard_port=0))
    srv.start()
    yield srv
    srv.stop(0)


class Trainer:
    """Real steps: a torch.adam session of alice's, each step carrying the loss and an accuracy."""

    def __init__(self, address):
        from optreg.client import Client
        self.client = Client(address, token="alice-token")
        self.rng = np.random.default_rng(0)
        self.session = self.client.create_session(
            "torch.adam", {"W1": self.rng.normal(size=(16, 8)).astype(np.float32),
                           "b1": np.zeros(8, np.float32)}, session_id="run-1", lr=1e-2)

    def step(self, n=1):
        for _ in range(n):
            k = self.session.step_count + 1
            grads = {name: self.rng.normal(size=a.shape).astype(np.float32) for name, a in self.session.arrays.items()}
            self.session.step(grads, metrics={"loss": 2.0 / (1 + 0.05 * k), "accuracy": min(1.0, 0.1 + 0.01 * k)})

    def poisoned_step(self):
        grads = {name: np.zeros(a.shape, np.float32) for name, a in self.session.arrays.items()}
        grads["W1"][3, 5] = np.nan
        with pytest.raises(Exception) as e:
            self.session.step(grads)
        assert "NaN" in str(e.value)


@pytest.fixture
def page():
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        yield pg
        browser.close()


def steps_in_page(page):
    return page.evaluate("window.optregDash.steps.slice()")


def points_in_charts(page):
    return page.evaluate("Object.fromEntries(Object.entries(window.optregDash.charts)"
                         ".map(([k, c]) => [k, c.data[0].length]))")


def login(page, token):
    page.fill("#token", token)
    page.click("#login button[type=submit]")


def test_dashboard_live_alerts_reconnect_and_tokens(dashboard_server, page, tmp_path):
    srv = dashboard_server
    trainer = Trainer(srv.address)
    trainer.step()
    page.goto(srv.dashboard.url)
    page.wait_for_selector("#login", state="visible")

    # a wrong token sees nothing
    login(page, "mallory")
    page.wait_for_function("document.querySelector('#login-error').textContent.includes('not one this server')")
    assert page.evaluate("document.querySelectorAll('#sessions li').length") == 0
    # another valid token sees none of alice's sessions
    login(page, "bob-token")
    page.wait_for_selector("#no-sessions", state="visible")
    assert page.evaluate("document.querySelectorAll('#sessions li').length") == 0
    # nor its events
    status = page.evaluate("fetch('api/sessions/run-1/events?token=bob-token').then(r => r.status)")
    assert status == 404

    # alice sees her session and its live charts
    page.click("#logout")
    page.wait_for_selector("#login", state="visible")
    login(page, "alice-token")
    page.click("#sessions li[data-id='run-1']")
    page.wait_for_function("window.optregDash.connects >= 1")
    n = 60
    trainer.step(n - 1)
    page.wait_for_function(f"window.optregDash.charts.metrics && window.optregDash.charts.metrics.data[0].length == {n}")
    charts = points_in_charts(page)
    assert charts == {"metrics": n, "ratio": n, "grad": n, "elr": n}, charts
    assert steps_in_page(page) == list(range(1, n + 1))

    # an injected non-finite gradient (refused by the server) shows its alert within 1 s
    trainer.poisoned_step()
    page.wait_for_selector("#alerts li.refused", timeout=10_000)
    latency = page.evaluate("Date.now() / 1000 - window.optregDash.alerts.find(a => a.kind == 'refused').wall_time")
    assert latency < 1.0, f"alert shown {latency:.3f} s after it was raised"
    assert "NaN" in page.inner_text("#alerts")

    # a forced reconnect: the server breaks the stream while steps keep coming; none is missing
    srv.dashboard.drop_streams()
    trainer.step(40)
    page.wait_for_function("window.optregDash.connects >= 2")
    page.wait_for_function(f"window.optregDash.steps.length >= {n + 40}")
    assert steps_in_page(page) == list(range(1, n + 41))
    page.wait_for_function(f"window.optregDash.charts.metrics.data[0].length == {n + 40}")
    # alerts are resent on reconnect and shown once
    refused = page.evaluate("window.optregDash.alerts.filter(a => a.kind == 'refused').length")
    assert refused == 1
    shown = page.evaluate("document.querySelectorAll('#alerts li').length")
    assert shown == page.evaluate("new Set(window.optregDash.alerts.map(a => a.seq)).size")
    trainer.client.close()

    out = pathlib.Path(os.environ.get("OPTREG_SCREENSHOT", tmp_path / "dashboard.png"))
    page.screenshot(path=str(out), full_page=True)
    assert out.stat().st_size > 10_000


def test_dashboard_shows_a_worker_that_stopped_contributing(dashboard_server, page):
    """A shared session of alice's: worker "w1" joins and goes silent while "w0" trains; when w1's lease runs
    out the alerts panel shows "worker_stopped" naming it, live (no reload)."""
    from optreg.client import Client
    srv = dashboard_server
    with Client(srv.address, token="alice-token") as c:
        c.create_session("sgd", {"w": np.zeros(8, np.float32)}, session_id="shared-1", workers=2, mode="async",
                         lease=1.0, lr=0.1)
        w0 = Client(srv.address, token="alice-token").join("shared-1", "w0", heartbeat_every=0.2)
        w0.step({"w": np.ones(8, np.float32)}, metrics={"loss": 1.0})
        page.goto(srv.dashboard.url)
        login(page, "alice-token")
        page.click("#sessions li[data-id='shared-1']")
        page.wait_for_function("window.optregDash.connects >= 1")
        Client(srv.address, token="alice-token").join("shared-1", "w1")  # and never calls again
        for k in range(2, 8):
            w0.step({"w": np.ones(8, np.float32)}, metrics={"loss": 1.0 / k})
        page.wait_for_selector("#alerts li.worker_stopped", timeout=15_000)
        text = page.inner_text("#alerts li.worker_stopped")
        assert "worker w1 stopped contributing" in text and "lease ran out" in text
        assert page.evaluate("window.optregDash.alerts.filter(a => a.kind == 'worker_stopped').length") == 1
        w0.leave()  # leaving is not stopping: no alert when w0's lease would have run out
        import time
        time.sleep(2.5)  # past w0's 1 s lease and several of the server's lease checks
        w0.client.close()
    assert page.evaluate("window.optregDash.alerts.filter(a => a.kind == 'worker_stopped').length") == 1
