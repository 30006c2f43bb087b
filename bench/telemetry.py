"""Telemetry's cost and latency, each against a baseline from the same run:

- the 1e7-parameter float32 Adam update with the four statistics measured in its pass
  (kernels.apply(stats=...)) against the same update without them (target <= 1.03x);
  for reference, a separate numpy pass for the same statistics against the update alone;
- a 1e3-parameter step with telemetry on against off (in-process server);
- from a real step's commit to the point drawn in the dashboard's chart in a real browser
  (Debian's chromium via Playwright), p95 against the 1 s target.

Run alone: PYTHONPATH=proto:plugins:server:client python bench/telemetry.py [--quick]
or as the `telemetry` section of `python -m bench`.
"""
from __future__ import annotations

import os
import pathlib
import shutil
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
for d in ("proto", "plugins", "server", "client"):
    if str(ROOT / d) not in sys.path:
        sys.path.insert(0, str(ROOT / d))


def bench_stats(cfg, row, n: int = 10_000_000) -> None:
    from bench.run import interleaved
    from optreg.plugins.registry import Registry
    from optreg.server.kernels import apply as kernels
    from optreg.server.steps.run import check_finite
    defn = Registry().get("adam").definition
    rng = np.random.default_rng(0)
    param = rng.normal(size=n).astype(np.float32)
    grad = (rng.normal(size=n) * 1e-2).astype(np.float32)
    state = {s.name: np.zeros(n, np.float32) for s in defn.slots}
    hp = {h.name: h.default for h in defn.hyperparameters}
    reps = 5 if cfg.quick else 15
    step = [0]

    def plain():
        step[0] += 1
        kernels.apply(defn, param, grad, state, step[0], hp)

    def second_pass():  # a separate pass over memory for the same figures (BLAS float32 dots, no copies)
        float(np.dot(grad, grad))
        float(np.dot(param, param))
        float(max(grad.max(), -grad.min()))

    from optreg.server.kernels import jit

    from optreg.server.kernels import warmup
    warmup.warm(block=True, definitions=[defn], stats=True)  # Adam's kernel and its statistics variants
    jit.wait_idle(600)  # (the statistics compiles are queued by the jobs warm waited for)
    plain()  # warm up
    stats = np.zeros(4)

    def with_stats():
        step[0] += 1
        kernels.apply(defn, param, grad, state, step[0], hp, stats=stats)

    def checked_plain():  # a step's whole-tensor pass without statistics: the finite check, then the update
        check_finite("w", grad)
        plain()

    with_stats()
    t = interleaved({"plain": plain, "stats": with_stats, "checked": checked_plain}, reps)
    row("adam 1e7 f32 update with statistics", t["stats"], "s", "same update without", t["plain"], 1.03)
    # What a server step pays: with statistics, a whole tensor's finite check rides on the update pass
    # (NaN or Inf shows in its max |g|, pipeline.feed); without them it is a pass of its own.
    row("adam 1e7 f32 update with statistics (the check in it)", t["stats"], "s",
        "finite check pass + update without", t["checked"], note="what a step's update pass costs either way")
    t = interleaved({"plain": plain, "pass": second_pass}, reps)
    row("a separate numpy statistics pass (reference)", t["pass"], "s", "adam 1e7 f32 update", t["plain"],
        note="what measuring in the update pass saves")


def bench_browser(cfg, row) -> None:
    """Real steps (16 tensors, client metrics) at a steady rate; the page records, per step, the time
    from the commit (the observer's wall_time) to the frame that drew it."""
    chromium = os.environ.get("OPTREG_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("commit to browser: not measured: playwright is not installed", flush=True)
        return
    if not pathlib.Path(chromium).exists():
        print("commit to browser: not measured: chromium is not installed", flush=True)
        return
    from optreg.client import Client
    from optreg.server.assembly import OptregServer, Settings
    srv = OptregServer(Settings(port=0, data_dir="", dashboard_port=0))
    srv.start()
    steps, rate = (100, 20) if cfg.quick else (400, 20)
    try:
        with Client(srv.address) as c:
            params = {f"layer{i}.{k}": np.zeros(64 if k == "W" else 8, np.float32) for i in range(8) for k in "Wb"}
            s = c.create_session("adam", params, session_id="bench")
            grads = {k: np.full(v.shape, 0.01, np.float32) for k, v in params.items()}
            s.step(grads, metrics={"loss": 1.0})
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
                page = browser.new_page()
                page.goto(srv.dashboard.url + "#session=bench")
                page.wait_for_function("window.optregDash.steps.length >= 1")
                for k in range(2, steps + 2):
                    s.step(grads, metrics={"loss": 1.0 / k})
                    time.sleep(1.0 / rate)
                page.wait_for_function(f"window.optregDash.steps.length >= {steps + 1}", timeout=30_000)
                lat = page.evaluate("window.optregDash.latencies.filter((e) => e[0] >= 2).map((e) => e[1])")
                browser.close()
    finally:
        srv.stop(0)
    p50, p95 = float(np.percentile(lat, 50)), float(np.percentile(lat, 95))
    row(f"commit to browser chart p95 ({rate} steps/s, 16 tensors)", p95, "s", "target 1 s", 1.0, 1.0,
        note=f"p50 {p50 * 1e3:.1f} ms over {len(lat)} real steps")


def bench_small_step(cfg, row) -> None:
    """A 1e3-parameter Adam step through an in-process server with telemetry (statistics in the
    update pass, the observer, the hub) against the same server with it switched off, interleaved."""
    from bench.run import interleaved
    from optreg.client import Client
    from optreg.server.kernels import apply as kernels
    from optreg.server.steps import run as pipeline
    from optreg.server.assembly import OptregServer, Settings
    from optreg.server.telemetry.hub import TelemetryObserver
    srv = OptregServer(Settings(port=0, data_dir=""))
    srv.start()
    observer = next(o for o in srv.store.observers if isinstance(o, TelemetryObserver))
    with_stats = kernels.apply

    def without_stats(*a, stats=None, **k):
        return with_stats(*a, **k)

    numpy_stats = pipeline.tensor_stats
    no_stats = np.zeros(4)

    def telemetry(on: bool) -> None:
        pipeline.kernels.apply = with_stats if on else without_stats
        pipeline.tensor_stats = numpy_stats if on else (lambda g, old, new: no_stats)
        if on and observer not in srv.store.observers:
            srv.store.observers.append(observer)
        if not on and observer in srv.store.observers:
            srv.store.observers.remove(observer)

    n, reps = (200, 5) if cfg.quick else (300, 11)
    try:
        with Client(srv.address) as c:
            s = c.create_session("adam", {"W": np.zeros((30, 30), np.float32), "b": np.zeros(100, np.float32)})
            g = {"W": np.full((30, 30), 0.1, np.float32), "b": np.full(100, 0.1, np.float32)}

            def run(on):
                def go():
                    telemetry(on)
                    for _ in range(n):
                        s.step(g, metrics={"loss": 1.0})
                return go
            run(True)()
            t = interleaved({"on": run(True), "off": run(False)}, reps)
    finally:
        telemetry(True)
        srv.stop(0)
    row("adam 1e3 step with telemetry (in-process server)", t["on"] / n, "s", "telemetry off", t["off"] / n,
        note="statistics, observer and hub together; client and server share the GIL here")


def bench_telemetry(cfg, server=None, echo=None) -> None:
    from bench.run import row
    bench_stats(cfg, row)
    bench_small_step(cfg, row)
    bench_browser(cfg, row)


if __name__ == "__main__":
    import argparse
    sys.path.insert(0, str(ROOT))
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from bench.run import Config
    bench_telemetry(Config(args.quick))
