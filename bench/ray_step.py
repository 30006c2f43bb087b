"""One step through a Ray cluster's front end and its session host actor, against the same step on the
single-process server, both with a data directory (durability `log`), interleaved in the same run.

    python -m bench --only ray      (left out of --quick: it starts a local Ray, ~30 s)

Rows: Adam float32 at 1e3 parameters (unary steps: the fixed cost of the extra hop, front end -> actor)
and at 1e7 (streamed: the tensors cross the object store; the front end forwards the stream in 8 MiB
groups as it arrives, cluster/feed.py, and the reply comes back whole).
"""
from __future__ import annotations

import statistics
import tempfile
import time

import numpy as np


def bench_ray(cfg, _server, _echo):
    from bench.run import Child, row
    from optreg.client import Client

    if cfg.quick:
        print("(ray: skipped in --quick; python -m bench --only ray)", flush=True)
        return
    try:
        import ray  # noqa: F401
    except ImportError:
        print("(ray: skipped, Ray is not installed: pip install 'optreg[ray]')", flush=True)
        return
    with tempfile.TemporaryDirectory(prefix="optreg-bench-ray-") as d:
        single = Child(["-m", "optreg.server", "serve", "--port", "0", "--log-level", "warning",
                        "--data-dir", f"{d}/single"], "optreg serving on ")
        cluster = Child(["-m", "optreg.server", "serve", "--ray", "--port", "0", "--log-level", "warning",
                         "--data-dir", f"{d}/cluster"], "optreg serving on ")
        try:
            addresses = {"single": single.line[3], "cluster": cluster.line[3]}
            rng = np.random.default_rng(5)
            for n, reps, per in ((1_000, 30, 20), (10_000_000, cfg.large_reps, 1)):
                w = rng.standard_normal(n).astype(np.float32)
                g = {"w": rng.standard_normal(n).astype(np.float32)}
                with Client(addresses["single"], timeout=300) as c1, Client(addresses["cluster"], timeout=300) as c2:
                    sessions = {"single": c1.create_session("adam", {"w": w.copy()}, keep=False),
                                "cluster": c2.create_session("adam", {"w": w.copy()}, keep=False)}
                    for s in sessions.values():  # warm: imports, JIT, first load
                        for _ in range(3):
                            s.step(g)
                    times = {k: [] for k in sessions}
                    for _ in range(reps):
                        for k, s in sessions.items():
                            t = time.perf_counter()
                            for _ in range(per):
                                s.step(g)
                            times[k].append((time.perf_counter() - t) / per)
                    med = {k: statistics.median(v) for k, v in times.items()}
                    label = "1e3" if n == 1_000 else "1e7"
                    row(f"Ray front end + actor step, Adam {label} f32", med["cluster"], "s",
                        "the single-process server's step", med["single"])
                    for s in sessions.values():
                        s.delete()
        finally:
            cluster.stop()
            single.stop()
