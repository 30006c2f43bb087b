"""Many sessions on one server (issue 23): a default `optreg serve --data-dir D` holding N durable
1e3 float32 Adam sessions against the same server holding 100, measured side by side.

    python -m bench --only sessions             # N = 100,000 (the fill alone takes minutes here)
    python -m bench --only sessions --quick     # N = 2,000
    python -m bench.sessions --n 10000          # this section alone, any N

Rows (ratios big/small, target 1.2 for the p50s): create, a ListSessions page of 100, a step of a
loaded session, GetSession of a random session (mostly unloaded); RSS per idle session after a
restart (every session then on disk only) and before it; the time from starting the server to its
first served step, after a clean stop; and whether a session's step after it was unloaded equals,
bit for bit, the same step of one that never left memory (float32 and float64).

The fill (several client processes creating sessions) is not a figure; its rate is printed.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

SIZE = 1000
SMALL = 100


def _serve(data_dir, *extra):
    from bench.run import start_default
    return start_default(data_dir, *extra)


def _fill_entry(address, count, seed, out_q):
    from optreg.client import Client
    rng = np.random.default_rng(seed)
    w = {"w": rng.standard_normal(SIZE).astype(np.float32)}
    ids = []
    try:
        with Client(address, timeout=120) as c:
            for _ in range(count):
                ids.append(c.create_session("adam", w, step_reply="none").id)
        out_q.put(ids)
    except Exception as e:  # reported to the parent, which raises it
        out_q.put(f"{type(e).__name__}: {e}")


def fill(address, n, procs=4) -> tuple[list[str], float]:
    """Create n durable sessions with `procs` client processes; (their ids, seconds taken)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    t = time.perf_counter()
    per = [n // procs + (i < n % procs) for i in range(procs)]
    ps = [ctx.Process(target=_fill_entry, args=(address, k, i, q)) for i, k in enumerate(per) if k]
    for p in ps:
        p.start()
    got = [q.get(timeout=3600) for _ in ps]
    for p in ps:
        p.join()
    bad = [g for g in got if isinstance(g, str)]
    if bad:
        raise RuntimeError(f"filling the server failed: {bad[0]}")
    return [i for g in got for i in g], time.perf_counter() - t


def _rss(child) -> int:
    return child.rss()


def _restart(child, data_dir, probe_id) -> tuple[object, float, float]:
    """SIGTERM (if it still runs), then start again; (the new child, seconds of the clean stop, seconds
    from the new process's start to the reply of a step on `probe_id`)."""
    from optreg.client import Client
    t = time.perf_counter()
    child.stop()
    stopped = time.perf_counter() - t
    t = time.perf_counter()
    new = _serve(data_dir)
    with Client(new.address) as c:  # (it listens: Child waited for its line)
        s = c.session(probe_id, {})
        s.step({"w": np.ones(SIZE, np.float32)})
    return new, stopped, time.perf_counter() - t


def _timings(address, ids, rounds_out, w):
    """One round of each call on one server: appended to rounds_out[name]."""
    from optreg.client import Client
    from optreg.v1 import session_pb2
    with Client(address) as c:
        stub = c.transport
        t0 = time.perf_counter()
        s = c.create_session("adam", w, step_reply="none")
        rounds_out["create"].append(time.perf_counter() - t0)
        for _ in range(3):  # a whole page on either server (the small one has 100 sessions: one page)
            t0 = time.perf_counter()
            reply = stub.unary("ListSessions", session_pb2.ListSessionsRequest(page_size=100), timeout=60)
            rounds_out["list page"].append(time.perf_counter() - t0)
            assert len(reply.sessions) == 100
        g = {"w": np.ones(SIZE, np.float32)}
        s.step(g)
        for _ in range(5):
            t0 = time.perf_counter()
            s.step(g)
            rounds_out["step"].append(time.perf_counter() - t0)
        for _ in range(5):
            sid = random.choice(ids)
            t0 = time.perf_counter()
            c.get_session(sid)
            rounds_out["get"].append(time.perf_counter() - t0)
        s.delete()


def bit_identity(data_dir, dtype) -> tuple[bool, str]:
    """Two sessions with the same parameters and gradients; A stays loaded, B is left to unload (and
    then crosses a restart): after each, their next steps' states are equal bit for bit."""
    from optreg.client import Client
    srv = _serve(data_dir, "--idle-seconds", "1")
    rng = np.random.default_rng(7)
    w = {"w": rng.standard_normal(SIZE).astype(dtype)}
    grads = [{"w": rng.standard_normal(SIZE).astype(dtype)} for _ in range(8)]
    try:
        with Client(srv.address) as c:
            a, b = c.create_session("adam", w), c.create_session("adam", w)
            for g in grads[:3]:
                a.step(g), b.step(g)
            end = time.monotonic() + 30
            while c.get_session(b.id).loaded and time.monotonic() < end:
                a.read_parameters()  # A is used (so stays in memory), B idles
                time.sleep(0.2)
            if c.get_session(b.id).loaded or not c.get_session(a.id).loaded:
                return False, "B never unloaded (or A did)"
            b.step(grads[4]), a.step(grads[4])
            same = _same(b.read_state(), a.read_state())
            a_id, b_id = a.id, b.id
        srv.stop()
        srv = _serve(data_dir, "--idle-seconds", "1")
        with Client(srv.address) as c:
            a, b = c.session(a_id, {}), c.session(b_id, {})
            a.step(grads[5]), b.step(grads[5])
            same = same and _same(b.read_state(), a.read_state())
        return same, ""
    finally:
        srv.stop()


def _same(x, y) -> bool:
    if x.info.step != y.info.step:
        return False
    if any(x.parameters[n].tobytes() != y.parameters[n].tobytes() for n in x.parameters):
        return False
    return all(x.state[s][n].tobytes() == y.state[s][n].tobytes() for s in x.state for n in x.state[s])


def run(n: int, row, rounds: int = 40, procs: int = 4) -> None:
    from optreg.client import Client
    print(f"# sessions: load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores", flush=True)
    with tempfile.TemporaryDirectory(prefix="optreg-sessions-") as d:
        small_dir, big_dir = os.path.join(d, "small"), os.path.join(d, "big")
        small, big = _serve(small_dir), _serve(big_dir)
        try:
            rss0 = {"small": _rss(small), "big": _rss(big)}
            small_ids, _ = fill(small.address, SMALL, procs=1)
            big_ids, seconds = fill(big.address, n, procs)
            print(f"# filled {n} sessions in {seconds:.1f} s ({n / seconds:.0f}/s, {procs} client processes); "
                  f"server RSS {rss0['big'] >> 20} -> {_rss(big) >> 20} MiB", flush=True)
            w = {"w": np.random.default_rng(1).standard_normal(SIZE).astype(np.float32)}
            times = {"small": {k: [] for k in ("create", "list page", "step", "get")},
                     "big": {k: [] for k in ("create", "list page", "step", "get")}}
            for _ in range(rounds):  # interleaved: the machine's drift hits both alike
                _timings(small.address, small_ids, times["small"], w)
                _timings(big.address, big_ids, times["big"], w)
            for k in times["big"]:
                row(f"{k} p50, {n} sessions", statistics.median(times["big"][k]), "s",
                    f"same server holding {SMALL}", statistics.median(times["small"][k]), 1.2)
            with Client(big.address) as c:
                loaded = sum(i.loaded for i in c.iter_sessions(1000))
            # (no target: a loaded session holds its arrays; --max-loaded-sessions bounds how many are)
            row(f"RSS per session, {n} sessions ({loaded} of them loaded)", (_rss(big) - _rss(small)) / (n - SMALL) / 1024,
                "KiB")
            small, _, _ = _restart(small, small_dir, small_ids[0])
            probe = random.choice(big_ids)
            big, stop_s, first_step = _restart(big, big_dir, probe)
            print(f"# clean stop with {n} sessions: {stop_s:.2f} s", flush=True)
            row(f"restart to first served step, {n} sessions", first_step, "s", "target 5 s", 5.0, 1.0)
            # (every session is on disk only now, but the one probed; the same on the small server)
            per = (_rss(big) - _rss(small)) / (n - SMALL)
            row(f"RSS per idle session, {n} sessions (after restart)", per / 1024, "KiB", "target 10 KiB", 10.0, 1.0,
                note="every session unloaded but one")
            big.proc.kill()  # a crash: the next start checks each index entry against its files
            big.proc.wait()
            big, _, first_step = _restart(big, big_dir, random.choice(big_ids))
            row(f"restart after a crash (SIGKILL) to first served step, {n} sessions", first_step, "s",
                "target 5 s", 5.0, 1.0)
        finally:
            small.stop()
            big.stop()
        for dtype in (np.float32, np.float64):
            same, why = bit_identity(os.path.join(d, f"bits-{np.dtype(dtype).name}"), dtype)
            row(f"unloaded session's next step bit-identical ({np.dtype(dtype).name})", float(same), "bool",
                note=why or "vs a session that never left memory; also across a restart")


def bench_sessions(cfg, server, echo):
    from bench.run import row
    run(2_000 if cfg.quick else 100_000, row, rounds=20 if cfg.quick else 40)


if __name__ == "__main__":
    import argparse
    import bench.run  # noqa: F401 - puts this tree's packages on sys.path
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--procs", type=int, default=4)
    a = ap.parse_args()
    run(a.n, bench.run.row, a.rounds, a.procs)
