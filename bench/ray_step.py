"""One step through a Ray cluster's front end and its session host actor, against the same step on the
single-process server, both with a data directory (durability `log`), interleaved in the same run.

    python -m bench --only ray      (left out of --quick: it starts a local Ray, ~30 s)

Rows: Adam float32 at 1e3 parameters (unary steps: the fixed cost of the extra hop, front end -> actor)
and at 1e7 (streamed: the tensors cross the object store; the front end forwards the stream in 8 MiB
groups as it arrives, cluster/feed.py, and the reply comes back whole). Then a sharded session
(issue 25: 2 shards on a two-node ray.cluster_utils.Cluster, a step fanned out to both and committed by
a record) against the same session unsharded on one host, through the same front end: Adam 5e5 f32 in
two tensors (unary steps) and 1e7 f32 in two tensors (streamed: the front end gathers the stream,
splits it by shard, and merges the replies).
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
                    med = _interleaved(sessions, g, reps, per)
                    label = "1e3" if n == 1_000 else "1e7"
                    row(f"Ray front end + actor step, Adam {label} f32", med["cluster"], "s",
                        "the single-process server's step", med["single"])
                    for s in sessions.values():
                        s.delete()
        finally:
            cluster.stop()
            single.stop()
        _sharded(cfg, d)


def _sharded(cfg, d):
    from ray.cluster_utils import Cluster

    from bench.run import Child

    ray_cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    ray_cluster.add_node(num_cpus=1)
    ray_cluster.wait_for_nodes()
    front = None
    try:
        front = Child(["-m", "optreg.server", "serve", "--ray", ray_cluster.address, "--port", "0", "--log-level",
                       "warning", "--data-dir", f"{d}/sharded"], "optreg serving on ")
        rng = np.random.default_rng(25)
        for half, label, per in ((250_000, "5e5", 5), (5_000_000, "1e7", 1)):
            params = {name: rng.standard_normal(half).astype(np.float32) for name in ("a", "b")}
            g = {name: rng.standard_normal(half).astype(np.float32) for name in params}
            _sharded_row(cfg, front, params, g, label, per)
    finally:
        if front is not None:
            front.stop()
        ray_cluster.shutdown()


def _sharded_row(cfg, front, params, g, label, per):
    from bench.run import row
    from optreg.client import Client

    with Client(front.line[3], timeout=300) as c:
        sessions = {"sharded": c.create_session("adam", {k: v.copy() for k, v in params.items()}, shards=2,
                                                keep=False),
                    "whole": c.create_session("adam", {k: v.copy() for k, v in params.items()}, keep=False)}
        med = _interleaved(sessions, g, max(5, cfg.large_reps), per)
        row(f"Ray sharded step (2 shards, 2 nodes), Adam {label} f32 in 2 tensors", med["sharded"], "s",
            "the same session on one host, same front end", med["whole"])
        for s in sessions.values():
            s.delete()


def _interleaved(sessions: dict, g: dict, reps: int, per: int) -> dict:
    """{name: median seconds a step} of the sessions stepped in turn (`per` steps each, `reps` rounds),
    after 3 warm steps each (imports, JIT, first load)."""
    for s in sessions.values():
        for _ in range(3):
            s.step(g)
    times = {k: [] for k in sessions}
    for _ in range(reps):
        for k, s in sessions.items():
            t = time.perf_counter()
            for _ in range(per):
                s.step(g)
            times[k].append((time.perf_counter() - t) / per)
    return {k: statistics.median(v) for k, v in times.items()}
