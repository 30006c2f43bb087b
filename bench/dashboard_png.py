"""docs/dashboard.png: a photograph of the dashboard after `optreg demo --dashboard` has trained.

    PYTHONPATH=proto:plugins:server:client:app python bench/dashboard_png.py docs/dashboard.png

Runs the demo (scikit-learn digits, 300 iterations) with its in-process server's dashboard; once training
is over (the page stays up until Ctrl-C), opens the five training sessions overlaid in Debian's chromium
(Playwright; no browser download), checks that these healthy runs raised no alert, saves a full-page
screenshot and ends the demo with SIGINT, as a user's Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
SESSIONS = "demo-sgd,demo-momentum,demo-adagrad,demo-adam,demo-rmsprop"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--sessions", default=SESSIONS, help=f"sessions to overlay (default: {SESSIONS})")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--chromium", default=os.environ.get("OPTREG_CHROMIUM") or shutil.which("chromium")
                    or "/usr/bin/chromium")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / d) for d in ("proto", "plugins", "server", "client", "app")]
                                        + [env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        demo = subprocess.Popen([sys.executable, "-m", "optreg.app", "demo", "--dashboard", "--dataset", "digits",
                                 "--iterations", str(args.iterations), "--no-progress", "--out", tmp],
                                stdout=subprocess.PIPE, text=True, env=env)
        try:
            url = next(line.split()[1] for line in demo.stdout if "press Ctrl-C to stop" in line)
            with urllib.request.urlopen(url + "api/sessions") as r:
                raised = {s["session_id"]: s["alerts"] for s in json.load(r)["sessions"] if s["alerts"]}
            if raised:
                raise SystemExit(f"the demo's healthy runs raised alerts: {raised}")
            ids = args.sessions.split(",")
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"{url}#session={args.sessions}")
                page.wait_for_function(
                    f"{json.dumps(ids)}.every(id => window.optregDash.runs[id] && "
                    f"window.optregDash.runs[id].steps.length >= {args.iterations})", timeout=300_000)
                page.wait_for_timeout(500)  # the frame after the last step
                page.screenshot(path=args.out, full_page=True)
                browser.close()
        finally:
            demo.send_signal(signal.SIGINT)
            demo.wait(30)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
