"""Waiting costs no thread (issue 23), on a default server:

    python -m bench --only waiting

A few client processes hold, at once: the members of one sync session (1,000 in the full run),
closing round after round, each member computing for THINK_SECONDS (0.5-1.5 s at random) before it
sends its next contribution, as training workers do; as many open WatchSession calls (watching that
session: each round is a step they are sent); as many upload streams that sent their first message
and then stall. Meanwhile this process probes, every PROBE_EVERY seconds, a health check and a
1e3-float32 Adam step on another session. The server is a default one (durable, `log`) on a data
directory of its own. Rows: the probe's p50/p99 with the waiters, against the same probe on the same
server before them, and the rounds closed while it ran. The floor: the same probe, at the same
moments, against a second default server that holds no waiters (what the 2-core machine, busy with
the waiters' client processes, leaves any server). The server's thread count is in the note. (Members sending back to back, with no compute between rounds, fill both
cores with their own calls: docs/speed.md has that figure.)
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

PROCESSES = 4
THINK_SECONDS = (0.5, 1.5)
PROBE_EVERY = 0.02


def _threads(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("Threads:"))


def _probe(address: str, session_id: str, seconds: float) -> tuple[list, list]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from optreg.v1 import session_pb2, session_pb2_grpc, tensors
    g = [tensors.from_numpy("w", np.full(1000, 0.1, np.float32))]
    with grpc.insecure_channel(address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        stub = session_pb2_grpc.SessionServiceStub(ch)
        step = stub.GetSession(session_pb2.GetSessionRequest(session_id=session_id)).session.step
        checks, steps = [], []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(PROBE_EVERY)
            t = time.perf_counter()
            health.Check(health_pb2.HealthCheckRequest(), timeout=60)
            checks.append(time.perf_counter() - t)
            t = time.perf_counter()
            stub.Step(session_pb2.StepRequest(session_id=session_id, step=step, gradients=g), timeout=60)
            steps.append(time.perf_counter() - t)
            step += 1
    return checks, steps


async def _client(address: str, shared: str, target: str, first: int, n: int) -> None:
    """One client process: n members of `shared` closing rounds, n watchers of it, n stalled uploads to
    `target`. Prints "ready" once every call is open, then the rounds closed when stdin closes."""
    import grpc
    from optreg.v1 import session_pb2, session_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc, tensors
    ch = grpc.aio.insecure_channel(address)
    stub, watch = session_pb2_grpc.SessionServiceStub(ch), telemetry_pb2_grpc.TelemetryServiceStub(ch)
    g = [tensors.from_numpy("w", np.full(16, 0.5, np.float32))]
    names = [f"w{first + i:04d}" for i in range(n)]
    for w in names:
        await stub.JoinSession(session_pb2.JoinSessionRequest(session_id=shared, worker=w), timeout=120)
    watches = [watch.WatchSession(telemetry_pb2.WatchSessionRequest(session_id=shared), timeout=3600)
               for _ in range(n)]
    stall = asyncio.Event()

    async def stalled():
        yield session_pb2.StepStreamRequest(session_id=target)
        await stall.wait()
    uploads = [stub.StepStream(stalled(), timeout=3600) for _ in range(n)]
    seen = [0]

    async def read(call):
        async for _ in call:
            seen[0] += 1
    readers = [asyncio.ensure_future(read(w)) for w in watches]
    stop = asyncio.Event()
    rounds = [0]
    rng = np.random.default_rng(first)

    async def member(w):
        r = (await stub.JoinSession(session_pb2.JoinSessionRequest(session_id=shared, worker=w), timeout=120)).round
        while not stop.is_set():
            await asyncio.sleep(rng.uniform(*THINK_SECONDS))  # the member computes its gradient
            reply = await stub.Step(session_pb2.StepRequest(session_id=shared, worker=w, round=r, gradients=g),
                                    timeout=600)
            r = reply.step
            if w == names[0]:
                rounds[0] += 1
    members = [asyncio.ensure_future(member(w)) for w in names]
    await asyncio.sleep(2.0)
    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    stop.set()
    print(json.dumps({"rounds": rounds[0], "watched": seen[0],
                      "uploads_open": sum(not u.done() for u in uploads),
                      "watching": sum(not r.done() for r in readers), "members": sum(not m.done() for m in members)}), flush=True)
    os._exit(0)  # the members' last round never closes: leave without waiting for it


def _serve(data_dir, *extra):
    from bench.run import start_default
    return start_default(data_dir, *extra)


def bench_waiting(cfg, _server, _echo):
    from bench.run import ROOT, _env, pct, row
    from optreg.client import Client
    n = 250 if cfg.quick else 1000
    seconds = 10 if cfg.quick else 30
    tmp = tempfile.TemporaryDirectory(prefix="optreg-bench-waiting-")
    server = _serve(f"{tmp.name}/loaded")  # a default server of its own (its limits are what is measured)
    idle = None
    try:
        idle = _serve(f"{tmp.name}/idle")
        with Client(idle.address) as c:
            floor_probe = c.create_session("adam", {"w": np.zeros(1000, np.float32)})
        with Client(server.address) as c:
            probe = c.create_session("adam", {"w": np.zeros(1000, np.float32)})
            shared = c.create_session("adam", {"w": np.zeros(16, np.float32)},
                                      workers=n, round_deadline=600)
            target = c.create_session("adam", {"w": np.zeros(1000, np.float32)})
        _probe(server.address, probe.id, 1)
        base_checks, base_steps = _probe(server.address, probe.id, seconds / 3)
        threads_before = _threads(server.proc.pid)
        per = n // PROCESSES
        clients = [subprocess.Popen(
            [sys.executable, "-m", "bench.waiting", server.address, shared.id, target.id, str(i * per), str(per)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env(), cwd=str(ROOT))
            for i in range(PROCESSES)]
        try:
            for p in clients:
                line = p.stdout.readline()
                if line.strip() != "ready":
                    raise RuntimeError(f"a waiting client did not start: {line!r}")
            floor = []
            beside = threading.Thread(target=lambda: floor.extend(_probe(idle.address, floor_probe.id, seconds)))
            beside.start()
            checks, steps = _probe(server.address, probe.id, seconds)
            beside.join()
            threads = _threads(server.proc.pid)
        finally:
            got = []
            for p in clients:
                p.stdin.close()
            for p in clients:
                got.append(json.loads(p.stdout.readline() or "{}"))
                p.wait(60)
        rounds = min(g.get("rounds", 0) for g in got) if got else 0
        open_uploads = sum(g.get("uploads_open", 0) for g in got)
        watching = sum(g.get("watching", 0) for g in got)
        members = sum(g.get("members", 0) for g in got)
        note = (f"{members} members, {watching} watchers, {open_uploads} stalled uploads open at the end; server "
                f"threads {threads_before} -> {threads}")
        row(f"waiting: health p50 ({n} of each waiting)", pct(checks, 50), "s", "the same, no waiters",
            pct(base_checks, 50), note=note)
        row("waiting: health p99", pct(checks, 99), "s", "the same, no waiters", pct(base_checks, 99),
            note="target: p99 <= 50 ms")
        row("waiting: health p99, floor", pct(checks, 99), "s", "an idle server, same moments", pct(floor[0], 99),
            note="the machine's share: the waiters' clients on 2 cores")
        row("waiting: adam 1e3 step p50", pct(steps, 50), "s", "the same, no waiters", pct(base_steps, 50))
        row("waiting: adam 1e3 step p99", pct(steps, 99), "s", "the same, no waiters", pct(base_steps, 99),
            note="target: p99 <= 50 ms")
        row("waiting: adam 1e3 step p99, floor", pct(steps, 99), "s", "an idle server, same moments",
            pct(floor[1], 99))
        row(f"waiting: sync rounds of {n} members closed", float(rounds), "rounds", note="while the probe ran")
    finally:
        server.stop()
        if idle is not None:
            idle.stop()
        tmp.cleanup()


if __name__ == "__main__":
    asyncio.run(_client(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])))
