"""The dashboard in a real browser: Debian's chromium driven by Playwright (no browser download).

A real server (in this process, so the test can break the dashboard's streams) with tokens and the
dashboard on a free loopback port; a real session of alice's; its telemetry fed through the hub.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import time

import numpy as np
import pytest

CHROMIUM = os.environ.get("OPTREG_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not pathlib.Path(CHROMIUM).exists():
    pytest.skip("chromium not installed (.ci/run installs it: apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (the test extra has it)")

from optreg.server.auth import token_hash  # noqa: E402
from optreg.server.telemetry import StepEvent  # noqa: E402


def step_event(step, owner, session="run-1"):
    rng = np.random.default_rng(step)
    w = np.array([4.0 + rng.random(), 100.0, (0.1 * (1 + rng.random())) ** 2, 1.5])
    v = {"W1": rng.random(8) * 1e-4 / step, "b1": rng.random(2) * 1e-3 / step}
    return StepEvent(session, step, time.time(), owner=owner, optimizer="adam",
                     hyperparameters={"lr": 1e-3, "beta1": 0.9, "beta2": 0.999},
                     tensors={"W1": w, "b1": np.array([1.0, 4.0, 1e-5, 1.0])},
                     metrics={"loss": 2.0 / (1 + 0.05 * step), "accuracy": min(1.0, 0.1 + 0.01 * step)},
                     state_sample={"v": v, "m": v})


@pytest.fixture
def dashboard_server(tmp_path):
    from optreg.client import Client
    from optreg.server.app import OptregServer, Settings
    tokens = tmp_path / "tokens"
    tokens.write_text("alice-token\nbob-token\n")
    srv = OptregServer(Settings(port=0, data_dir="", token_file=str(tokens), dashboard_port=0))
    srv.start()
    with Client(srv.address, token="alice-token") as c:
        c.create_session("adam", {"W1": np.zeros(8, np.float32), "b1": np.zeros(2, np.float32)},
                         session_id="run-1")
    yield srv
    srv.stop(0)


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
    srv, hub = dashboard_server, dashboard_server.telemetry
    alice = token_hash("alice-token")
    page.goto(srv.dashboard.url)
    page.wait_for_selector("#login", state="visible")

    # a wrong token sees nothing
    login(page, "mallory")
    page.wait_for_function("document.querySelector('#login-error').textContent.includes('not one this server')")
    assert page.evaluate("document.querySelectorAll('#sessions li').length") == 0
    # another valid token sees none of alice's sessions
    hub.on_step(step_event(1, alice))
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
    for s in range(2, n + 1):
        hub.on_step(step_event(s, alice))
    page.wait_for_function(f"window.optregDash.charts.ratio && window.optregDash.charts.ratio.data[0].length == {n}")
    assert points_in_charts(page) == {"metrics": n, "ratio": n, "grad": n, "elr": n}
    assert steps_in_page(page) == list(range(1, n + 1))

    # an injected non-finite gradient (refused by the server) shows its alert within 1 s
    hub.on_refused("run-1", alice, n, "gradient 'W1' holds NaN at index 7: the step was not applied")
    page.wait_for_selector("#alerts li.refused", timeout=10_000)
    latency = page.evaluate("Date.now() / 1000 - window.optregDash.alerts.find(a => a.kind == 'refused').wall_time")
    assert latency < 1.0, f"alert shown {latency:.3f} s after it was raised"
    assert "NaN" in page.inner_text("#alerts")

    # a forced reconnect: the server breaks the stream while steps keep coming; none is missing
    srv.dashboard.drop_streams()
    for s in range(n + 1, n + 41):
        hub.on_step(step_event(s, alice))
        time.sleep(0.01)
    page.wait_for_function("window.optregDash.connects >= 2")
    page.wait_for_function(f"window.optregDash.steps.length >= {n + 40}")
    assert steps_in_page(page) == list(range(1, n + 41))
    page.wait_for_function(f"window.optregDash.charts.ratio.data[0].length == {n + 40}")
    # alerts are resent on reconnect and shown once: the refused step, and W1's ratio above 1e-2 for 20 steps
    kinds = page.evaluate("window.optregDash.alerts.map(a => a.kind + ':' + a.tensor)")
    assert sorted(kinds) == ["refused:", "update_ratio:W1"]
    assert page.evaluate("document.querySelectorAll('#alerts li').length") == 2

    out = pathlib.Path(os.environ.get("OPTREG_SCREENSHOT", tmp_path / "dashboard.png"))
    page.screenshot(path=str(out), full_page=True)
    assert out.stat().st_size > 10_000
