"""The dashboard page a newcomer meets (issue 27), in Debian's chromium through Playwright: the landing page
lists the sessions with their state; the loss is on a log axis with a smoothing control; SGD's effective
learning rate is its lr; every chart says what it shows; several sessions overlay on the same charts.

A real server in this process with its dashboard on a free loopback port, real sessions stepped through the
client with the gradients of a small network (tests/dashboard/test_dashboard_alerts.py's Regression).
"""
from __future__ import annotations

import os
import pathlib

import pytest

from test_dashboard_alerts import Regression
from test_dashboard_browser import page  # noqa: F401 - the fixture; skips without chromium or playwright

STEPS = 40


@pytest.fixture
def trained(tmp_path):
    from optreg.client import Client
    from optreg.server.assembly import OptregServer, Settings
    srv = OptregServer(Settings(port=0, data_dir="", dashboard_port=0))
    srv.start()
    with Client(srv.address, timeout=60) as c:
        sessions = {}
        for session_id, optimizer, lr in (("run-sgd", "sgd", 0.05), ("run-adam", "adam", 0.001)):
            task = Regression()
            sessions[session_id] = s = c.create_session(optimizer, task.params, session_id=session_id, lr=lr)
            task.train(s, STEPS)
        srv.trained, srv.task = sessions, task
        yield srv
    srv.stop(0)


def shot(page, tmp_path, name):
    out = pathlib.Path(os.environ.get("OPTREG_SCREENSHOT_DIR", tmp_path)) / name
    page.screenshot(path=str(out), full_page=True)
    assert out.stat().st_size > 10_000


def chart(page, key, what):
    return page.evaluate(f"(() => {{ const u = window.optregDash.charts[{key!r}]; return {what}; }})()")


def test_landing_page_single_session_panels_and_comparison(trained, page, tmp_path):
    page.goto(trained.dashboard.url)
    # the landing page: every session with its optimizer, step, last loss, state and alerts
    page.wait_for_function("document.querySelectorAll('#overview tbody tr').length == 2")
    rows = {r[0]: r for r in page.evaluate(
        "[...document.querySelectorAll('#overview tbody tr')].map(tr => [...tr.cells].map(td => td.textContent))")}
    assert set(rows) == {"run-sgd", "run-adam"}
    assert rows["run-sgd"][1:3] == ["sgd", str(STEPS)] and rows["run-adam"][1:3] == ["adam", str(STEPS)]
    assert float(rows["run-sgd"][3]) > 0  # the last loss
    assert all(r[5] == "no alerts" for r in rows.values()), rows
    assert all(r[4] == "training" or r[4].startswith("idle, last step") for r in rows.values()), rows
    trained.task.train(trained.trained["run-sgd"], 1)  # a session that steps is shown training (the list polls)
    page.wait_for_function("document.querySelector(\"#overview tr[data-id='run-sgd']\").cells[2].textContent"
                           f" == '{STEPS + 1}'")
    assert page.inner_text("#overview tr[data-id='run-sgd'] td:nth-child(5)") == "training"
    assert "Choose a session" not in page.inner_text("main")
    shot(page, tmp_path, "landing.png")

    # one session: the loss on a log axis, smoothed; SGD's effective lr is its lr
    page.click("#overview tr[data-id='run-sgd']")
    page.wait_for_function(f"window.optregDash.steps.length == {STEPS + 1} && window.optregDash.charts.elr")
    assert chart(page, "metrics", "u.scales.y.distr") == 3  # log
    assert chart(page, "metrics", "u.series.map(s => s.label)") == ["step", "loss (each step)", "loss"]
    raw, smoothed = chart(page, "metrics", "[u.data[1], u.data[2]]")
    assert smoothed[0] == pytest.approx(raw[0]) and smoothed[-1] > raw[-1]  # a falling loss: the average lags
    elr = chart(page, "elr", "u.data.slice(1).flat().filter(v => v !== null)")
    assert elr and all(v == pytest.approx(0.05) for v in elr)
    assert "lr itself" in page.inner_text("#explain-elr")
    for key in ("metrics", "ratio", "grad", "elr"):  # every chart has data and a sentence saying what it is
        assert chart(page, key, "u.data[0].length") == STEPS + 1
    assert page.evaluate("[...document.querySelectorAll('figure .explain')].every(p => p.textContent.length > 40)")
    assert "none" in page.inner_text("#alert-count")
    # the smoothing control: 0 draws the steps alone, and the log axis can be turned off
    page.evaluate("const r = document.querySelector('#smoothing'); r.value = 0; r.dispatchEvent(new Event('input'))")
    page.wait_for_function("window.optregDash.charts.metrics.series.length == 2")
    page.click("#loss-log")
    page.wait_for_function("window.optregDash.charts.metrics.scales.y.distr == 1")
    page.click("#loss-log")
    page.evaluate("const r = document.querySelector('#smoothing'); r.value = 0.8; r.dispatchEvent(new Event('input'))")
    shot(page, tmp_path, "sgd.png")

    # tick a second session in the list: both on the same charts, one line each
    page.click("#sessions li[data-id='run-adam'] input[type=checkbox]")
    page.wait_for_function("window.optregDash.selected.length == 2 && window.optregDash.charts.grad"
                           " && window.optregDash.charts.grad.series.length == 3")
    for key in ("metrics", "ratio", "grad", "elr"):  # the loss, and the whole model's figures
        assert chart(page, key, "u.series.map(s => s.label)")[:3] == ["step", "run-sgd", "run-adam"], key
    assert chart(page, "elr", "u.data[2].filter(v => v !== null).length") > 0  # Adam's, beside SGD's
    assert "comparing 2 sessions" in page.inner_text("#title")
    text = page.inner_text("#explain-elr")
    assert "lr itself" in text and "Adam" in text and "0.001" in text
    assert "#session=run-sgd,run-adam" in page.url
    shot(page, tmp_path, "compare.png")

    # the link back home shows the landing page again; a reload of a comparison's URL restores it
    page.click("#home")
    page.wait_for_selector("#overview", state="visible")
    page.goto(trained.dashboard.url + "#session=run-sgd,run-adam")
    page.wait_for_function("window.optregDash.selected.length == 2 && window.optregDash.charts.grad"
                           " && window.optregDash.charts.grad.series.length == 3")
