"""docs/dashboard.png: a photograph of the dashboard while `optreg demo --dashboard` trains.

    PYTHONPATH=proto:plugins:server:client:app python bench/dashboard_png.py docs/dashboard.png

Runs the demo (scikit-learn digits, 400 iterations) with its in-process server's dashboard, opens the
page on the Adam session in Debian's chromium (Playwright; no browser download) once 300 steps are
in, and saves a full-page screenshot.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--session", default="demo-adam")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--chromium", default=os.environ.get("OPTREG_CHROMIUM") or shutil.which("chromium")
                    or "/usr/bin/chromium")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright
    env = dict(os.environ, MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / d) for d in ("proto", "plugins", "server", "client", "app")]
                                        + [env.get("PYTHONPATH", "")])
    with tempfile.TemporaryDirectory() as tmp:
        demo = subprocess.Popen([sys.executable, "-m", "optreg.app", "demo", "--dashboard", "--dataset", "digits",
                                 "--iterations", str(args.steps + 100), "--no-progress", "--out", tmp],
                                stdout=subprocess.PIPE, text=True, env=env)
        try:
            url = next(line.split()[1] for line in demo.stdout if line.startswith("dashboard: "))
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(f"{url}#session={args.session}")
                page.wait_for_function(f"window.optregDash.steps.length >= {args.steps}", timeout=300_000)
                time.sleep(0.5)
                page.screenshot(path=args.out, full_page=True)
                browser.close()
        finally:
            demo.terminate()
            demo.wait(30)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
