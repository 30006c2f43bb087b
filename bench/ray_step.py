"""One step through a Ray cluster's front end and its session host actor, against the same step on the
single-process server, both with a data directory (durability `log`), interleaved in the same run.

    python -m bench --only ray              (~6 min; 1e8-parameter sessions: ~12 GB at the peak)
    python -m bench --quick --only ray      (the same rows at small sizes, named in each row)

A plain `--quick` leaves this section out (it starts Ray clusters). Rows: Adam float32 at 1e3
parameters (unary steps: the fixed cost of the extra hop, front end -> actor) and at 1e7 (streamed: the
tensors cross the object store; the front end forwards the stream in 8 MiB groups as it arrives,
cluster/feed.py, and the reply comes back whole). Then sharded sessions (issue 25) on a four-node
ray.cluster_utils.Cluster, through one front end: Adam 5e5 f32 in two tensors over 2 shards (unary
steps), and 1e8 f32 in 8 tensors over 2 and over 4 shards (streamed: the front end gathers the stream,
splits it by shard and merges the replies), each against the same session unsharded on one host
(the 1e8 sessions one after the other, not in turn: two at once held 13 GB here). Last, the time
from a node's death (its raylet and session host SIGKILLed) until a step sent after it is
acknowledged (a client in another thread stepping all along), on a 2-shard session (the head's
health check every 0.5 s, 4 misses: node death found in ~2 s; Ray's default, 3 s x 5, adds ~13 s).
"""
from __future__ import annotations

import os
import signal
import statistics
import tempfile
import threading
import time

import numpy as np

from bench.durability import _interleaved

# node death found within ~2 s, as in tests/cluster (Ray's default is 5 checks 3 s apart)
FAST_HEALTH = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 4}


def _medians(sessions: dict, g: dict, reps: int, per: int) -> dict:
    """{name: median seconds a step} of the sessions stepped in turn, after warm steps (imports, JIT,
    first load)."""
    _interleaved(sessions, g, 2)
    return {k: statistics.median(v) for k, v in _interleaved(sessions, g, reps, per).items()}


def bench_ray(cfg, _server, _echo):
    from bench.run import Child, row
    from optreg.client import Client

    if cfg.quick and "ray" not in getattr(cfg, "selected", ()):
        print("(ray: skipped in --quick; python -m bench [--quick] --only ray)", flush=True)
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
            large = 1_000_000 if cfg.quick else 10_000_000
            for n, reps, per in ((1_000, 10 if cfg.quick else 30, 20), (large, cfg.large_reps, 1)):
                w = rng.standard_normal(n).astype(np.float32)
                g = {"w": rng.standard_normal(n).astype(np.float32)}
                with Client(addresses["single"], timeout=300) as c1, Client(addresses["cluster"], timeout=300) as c2:
                    sessions = {"single": c1.create_session("adam", {"w": w.copy()}, keep=False),
                                "cluster": c2.create_session("adam", {"w": w.copy()}, keep=False)}
                    med = _medians(sessions, g, reps, per)
                    label = f"{n:.0e} f32" + (" (--quick)" if cfg.quick and n > 1000 else "")
                    row(f"Ray front end + actor step, Adam {label}", med["cluster"], "s",
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

    ray_cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                                "_system_config": FAST_HEALTH})
    for _ in range(3):
        ray_cluster.add_node(num_cpus=1)
    ray_cluster.wait_for_nodes()
    front = None
    try:
        front = Child(["-m", "optreg.server", "serve", "--ray", ray_cluster.address, "--port", "0", "--log-level",
                       "warning", "--data-dir", f"{d}/sharded"], "optreg serving on ")
        rng = np.random.default_rng(25)
        params = {name: rng.standard_normal(250_000).astype(np.float32) for name in ("a", "b")}
        _sharded_rows(cfg, front, params, "5e5 f32 in 2 tensors", (2,), per=5)
        total = 1_000_000 if cfg.quick else 100_000_000  # (--quick: 1e6, named in the row)
        params = {f"t{k}": rng.standard_normal(total // 8).astype(np.float32) for k in range(8)}
        label = f"{total:.0e} f32 in 8 tensors" + (" (--quick; full run 1e+08)" if cfg.quick else "")
        _sharded_rows(cfg, front, params, label, (2, 4), per=1, interleave=cfg.quick)
        del params
        _node_death(cfg, front, ray_cluster, f"{d}/sharded")
    finally:
        if front is not None:
            front.stop()
        ray_cluster.shutdown()


def _sharded_rows(cfg, front, params, label, shard_counts, per, interleave=True):
    """The session over each number of shards against the same session whole on one host, through
    the same front end. interleave: stepped in turn (the whole one made once, one sharded session at
    a time); else (1e8: two sessions at once took 13 GB here) one session at a time, whole first."""
    from bench.run import row
    from optreg.client import Client

    rng = np.random.default_rng(26)
    g = {name: rng.standard_normal(v.size).astype(np.float32) for name, v in params.items()}
    reps = max(3, cfg.large_reps // 2)
    with Client(front.line[3], timeout=600) as c:
        # (every session writes its replies into these arrays: no matter for timing, and 400 MB less)
        if interleave:
            whole = c.create_session("adam", params, keep=False)
            med = {}
            for n in shard_counts:
                sharded = c.create_session("adam", params, shards=n, keep=False)
                got = _medians({"sharded": sharded, "whole": whole}, g, reps, per)
                med[n], med[0] = got["sharded"], got["whole"]
                sharded.delete()
            whole.delete()
        else:
            med = {}
            for n in (0, *shard_counts):
                s = c.create_session("adam", params, shards=n, keep=False)
                med[n] = _medians({n: s}, g, reps, per)[n]
                s.delete()
    for n in shard_counts:
        row(f"Ray sharded step ({n} shards of a 4-node cluster), Adam {label}", med[n], "s",
            "the same session on one host, same front end" + ("" if interleave else ", one after the other"),
            med[0])


def _node_death(cfg, front, ray_cluster, root):
    """A 2-shard session stepped by a thread; the node of a shard (not the head) killed: its raylet
    and session host, SIGKILL. Seconds from the kill to the next acknowledged step, per kill."""
    from bench.run import row
    from optreg.client import Client, RetryPolicy
    from optreg.server.cluster.ownership import Ownership, shard_id

    owners, head = Ownership(root), ray_cluster.head_node.node_id
    params = {name: np.linspace(-1, 1, 1000, dtype=np.float32) for name in ("a", "b", "c")}
    g = {name: np.full(1000, 0.01, np.float32) for name in params}
    acks, stop, gaps = [], threading.Event(), []
    with Client(front.line[3], timeout=120, retry=RetryPolicy(total_seconds=120)) as c:
        s = c.create_session("adam", params, session_id="bench-node-death", shards=2)

        def steps():
            while not stop.is_set():
                sent = time.monotonic()
                s.step(g)
                acks.append((sent, time.monotonic()))
                time.sleep(0.01)

        stepper = threading.Thread(target=steps, daemon=True)
        stepper.start()
        try:
            for _ in range(1 if cfg.quick else 3):
                time.sleep(1.0)
                holders = [owners.current(shard_id("bench-node-death", i))[1] for i in range(2)]
                victim = next(h for h in holders if h["node"] != head)
                node = next(n for n in ray_cluster.worker_nodes if n.node_id == victim["node"])
                ray_cluster.remove_node(node, allow_graceful=False)
                try:
                    os.kill(victim["pid"], signal.SIGKILL)  # (a worker outlives its raylet for a moment)
                except ProcessLookupError:
                    pass
                killed, seen = time.monotonic(), len(acks)
                end = killed + 120  # (a step in flight at the kill may be answered before the node is found dead)
                while not any(sent > killed for sent, _ in acks[seen:]) and time.monotonic() < end \
                        and stepper.is_alive():
                    time.sleep(0.01)
                gaps.append(next(t for sent, t in acks[seen:] if sent > killed) - killed)
                ray_cluster.add_node(num_cpus=1)
        finally:
            stop.set()
            stepper.join(120)
        s.delete()
    row("Ray node killed -> a step sent after it acknowledged (2 shards; health check 0.5 s x 4)",
        statistics.median(gaps),
        "s", note=f"{len(gaps)} kills: " + ", ".join(f"{x:.1f} s" for x in gaps))
