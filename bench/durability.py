"""Steps/s of one session in each durability mode, against a real server on loopback,
as ratios to the `none` mode measured in the same run (absolute times drift on shared
machines; ratios much less).

Run: PYTHONPATH=proto:plugins:server:client python bench/durability.py [--params N] [--steps N]
"""
from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / d) for d in ("proto", "plugins", "server", "client")]

from optreg.client import Client  # noqa: E402

MODES = [("none", {}), ("periodic (100 steps)", {"durability": "periodic", "periodic_steps": 100,
                                                  "periodic_seconds": 3600}),
         ("every-step", {"durability": "every-step"})]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, nargs="+", default=[1_000, 100_000, 1_000_000])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path[:4]))
    with tempfile.TemporaryDirectory(prefix="optreg-bench-", dir=os.environ.get("OPTREG_BENCH_DIR")) as d:
        proc = subprocess.Popen([sys.executable, "-m", "optreg.server", "serve", "--port", "0", "--data-dir", d,
                                 "--log-level", "warning"], stdout=subprocess.PIPE, text=True, env=env)
        address = proc.stdout.readline().split()[-1]
        try:
            print(f"data dir on {d}; adam float32, reply=none, {args.steps} steps, best of {args.repeats}")
            print(f"{'params':>10}  {'mode':<22} {'steps/s':>9}  {'vs none':>7}")
            with Client(address) as c:
                for n in args.params:
                    base = None
                    for label, kw in MODES:
                        best = 0.0
                        for r in range(args.repeats):
                            s = c.create_session("adam", {"w": np.zeros(n, np.float32)}, step_reply="none",
                                                 durability=kw.get("durability", "none"),
                                                 **{k: v for k, v in kw.items() if k != "durability"})
                            g = {"w": np.full(n, 1e-3, np.float32)}
                            s.step(g)
                            t0 = time.perf_counter()
                            for _ in range(args.steps):
                                s.step(g)
                            best = max(best, args.steps / (time.perf_counter() - t0))
                            s.delete()
                        base = base or best
                        print(f"{n:>10}  {label:<22} {best:>9.0f}  {best / base:>7.3f}", flush=True)
        finally:
            proc.terminate()
            proc.wait()


if __name__ == "__main__":
    main()
