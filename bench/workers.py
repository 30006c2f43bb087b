"""Several workers on one session (docs/workers.md), same run:

    python -m bench --only workers

Rows: one 4-worker sync round (each worker sends its contribution, the round closes, every worker
gets the parameters) against one single-writer step of the same size; async aggregate steps/s for
1, 2, 4 and 8 workers against one worker. Workers are threads in the bench process, each with a
channel of its own (on 2 cores the bench's client threads and the server share the CPU).
"""
from __future__ import annotations

import statistics
import threading
import time

import numpy as np


def _round_times(address, session_id, n_workers, g, reps):
    from optreg.client import Client
    clients = [Client(address, timeout=120) for _ in range(n_workers)]
    workers = [c.join(session_id, f"w{i}") for i, c in enumerate(clients)]
    times = []
    barrier = threading.Barrier(n_workers + 1)

    def run(w):
        for _ in range(reps + 2):
            barrier.wait()
            w.step(g)
            barrier.wait()

    ts = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in ts:
        t.start()
    for i in range(reps + 2):
        barrier.wait()
        t0 = time.perf_counter()
        barrier.wait()  # every worker has its reply
        if i >= 2:
            times.append(time.perf_counter() - t0)
    for t in ts:
        t.join()
    for w, c in zip(workers, clients):
        w.leave()
        c.close()
    return times


def _async_rate(address, session_id, n_workers, g, seconds):
    from optreg.client import Client
    counts = [0] * n_workers
    start = threading.Barrier(n_workers)

    def run(i):
        with Client(address, timeout=120) as c:
            w = c.join(session_id, f"a{i}")
            start.wait()
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                w.step(g)
                counts[i] += 1
            w.leave()

    ts = [threading.Thread(target=run, args=(i,)) for i in range(n_workers)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(counts) / seconds


def bench_workers(cfg, server, _echo):
    from bench.run import row
    from optreg.client import Client

    rng = np.random.default_rng(7)
    n = 100_000
    p = {"w": rng.standard_normal(n).astype(np.float32)}
    g = {"w": (rng.standard_normal(n) * 1e-2).astype(np.float32)}
    reps = 20 if cfg.quick else 100
    with Client(server.address, timeout=120) as c:
        single = c.create_session("adam", {"w": p["w"].copy()})
        for _ in range(3):
            single.step(g)
        one = []
        for _ in range(reps):
            t0 = time.perf_counter()
            single.step(g)
            one.append(time.perf_counter() - t0)
        single.delete()
        shared = c.create_session("adam", {"w": p["w"].copy()}, workers=4, mode="sync", round_deadline=60.0)
        rounds = _round_times(server.address, shared.id, 4, g, reps)
        shared.delete()
        row("4-worker sync round, adam 1e5", statistics.median(rounds), "s", "one single-writer step, same size",
            statistics.median(one), note="threads with their own channels; every worker gets the parameters")
        small = {"w": np.zeros(1000, np.float32)}
        gs = {"w": np.full(1000, 1e-3, np.float32)}
        rates = {}
        for k in (1, 2, 4, 8):
            s = c.create_session("sgd", {"w": small["w"].copy()}, workers=k, mode="async")
            rates[k] = _async_rate(server.address, s.id, k, gs, cfg.conc_seconds)
            s.delete()
        for k in (1, 2, 4, 8):
            row(f"async {k} workers aggregate steps/s (sgd 1e3)", rates[k], "steps/s", "1 async worker steps/s",
                rates[1], note="higher is better")
