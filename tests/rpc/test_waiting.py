"""Waiting costs no thread (issue 23): on a default server, hundreds of open WatchSession calls, stalled
upload streams and members of a sync round waiting for it to close, all at once, while health checks
and another session's steps keep being answered; the server's thread count does not grow with them.

One real server process; the waiters are grpc.aio calls of this (client) process. No wall-time
assertions: every call has a generous timeout as a hang guard.
"""
from __future__ import annotations

import asyncio
import pathlib
import types

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optreg.v1 import session_pb2, session_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc, tensors

WATCHERS, STALLED, MEMBERS = 300, 300, 200
# The server's pool (--threads 16), its loop, gRPC's and its own background threads: a few dozen at
# most, however many calls wait (the thread-pool server needed one thread for each waiter).
THREAD_BOUND = 64


def _threads(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads line")


def _config(**kw) -> session_pb2.SessionConfig:
    return session_pb2.SessionConfig(optimizer="adam", hyperparameters={"lr": 1e-3}, **kw)


def _params(n: int) -> list:
    return [tensors.from_numpy("w", np.zeros(n, np.float32))]


def _grad(n: int, value: float = 1.0) -> list:
    return [tensors.from_numpy("w", np.full(n, value, np.float32))]


async def _waiting(address: str, pid: int) -> dict:
    # Several connections, as several clients would have (one HTTP/2 connection carries them all too).
    channels = [grpc.aio.insecure_channel(address, options=[("optreg.test.connection", i)]) for i in range(8)]
    stubs = [session_pb2_grpc.SessionServiceStub(c) for c in channels]
    watch = [telemetry_pb2_grpc.TelemetryServiceStub(c) for c in channels]
    health = health_pb2_grpc.HealthStub(channels[0])
    s = stubs[0]
    probe = (await s.CreateSession(session_pb2.CreateSessionRequest(config=_config(), parameters=_params(1000)),
                                   timeout=60)).session.session_id
    watched = (await s.CreateSession(session_pb2.CreateSessionRequest(config=_config(), parameters=_params(8)),
                                     timeout=60)).session.session_id
    target = (await s.CreateSession(session_pb2.CreateSessionRequest(config=_config(), parameters=_params(1000)),
                                    timeout=60)).session.session_id
    shared = (await s.CreateSession(session_pb2.CreateSessionRequest(
        config=_config(workers=session_pb2.WorkerConfig(workers=MEMBERS, round_deadline_seconds=600)),
        parameters=_params(16)), timeout=60)).session.session_id
    before = _threads(pid)

    # Watchers of a session, each waiting for its next step.
    watches = [watch[i % 8].WatchSession(telemetry_pb2.WatchSessionRequest(session_id=watched), timeout=300)
               for i in range(WATCHERS)]
    # Uploads that sent their first message and then nothing.
    stalls = [asyncio.Event() for _ in range(STALLED)]

    def stalled(i):
        async def requests():
            yield session_pb2.StepStreamRequest(session_id=target)
            await stalls[i].wait()
        return stubs[i % 8].StepStream(requests(), timeout=300)
    streams = [stalled(i) for i in range(STALLED)]
    # The members of a sync round: each contributes and waits for the others.
    for i in range(MEMBERS):
        await stubs[i % 8].JoinSession(session_pb2.JoinSessionRequest(session_id=shared, worker=f"w{i:03d}"),
                                       timeout=60)
    contributions = [asyncio.ensure_future(stubs[i % 8].Step(session_pb2.StepRequest(
        session_id=shared, worker=f"w{i:03d}", round=0, gradients=_grad(16, i)), timeout=300))
        for i in range(MEMBERS - 1)]
    await asyncio.sleep(1.0)  # every waiter in

    # Meanwhile: health and another session's steps answer.
    for _ in range(3):
        got = await health.Check(health_pb2.HealthCheckRequest(), timeout=60)
        assert got.status == health_pb2.HealthCheckResponse.SERVING
    steps = []
    for k in range(20):
        r = await s.Step(session_pb2.StepRequest(session_id=probe, step=k, gradients=_grad(1000)), timeout=60)
        steps.append(r.step)
    assert steps == list(range(1, 21))
    during = _threads(pid)
    assert not any(c.done() for c in contributions), "a member's call ended before its round closed"

    # The last member closes the round: every member gets the round's answer.
    last = await stubs[0].Step(session_pb2.StepRequest(session_id=shared, worker=f"w{MEMBERS - 1:03d}", round=0,
                                                       gradients=_grad(16, MEMBERS - 1)), timeout=300)
    answers = await asyncio.gather(*contributions)
    assert last.step == 1 and all(a.step == 1 and a.round == 0 for a in answers)
    assert all(len(a.contributors) == MEMBERS for a in answers)
    expected = np.float32(sum(range(MEMBERS)) / MEMBERS)  # the mean gradient went into one Adam step
    assert tensors.to_numpy(last.tensors[0]).shape == (16,) and expected > 0

    # A step of the watched session reaches every watcher.
    await s.Step(session_pb2.StepRequest(session_id=watched, step=0, gradients=_grad(8)), timeout=60)

    async def first(call):
        async for msg in call:
            return msg
    seen = await asyncio.wait_for(asyncio.gather(*(first(w) for w in watches)), 120)
    assert all(m.step.step == 1 for m in seen)

    # Still waiting: the stalled uploads (nothing of them applied to their session).
    assert not any(c.done() for c in streams)
    info = (await s.GetSession(session_pb2.GetSessionRequest(session_id=target), timeout=60)).session
    assert info.step == 0
    for w in watches:
        w.cancel()
    for c in streams:
        c.cancel()
    for c in channels:
        await c.close()
    return {"before": before, "during": during}


def test_waiters_hold_no_thread(start_server):
    srv = start_server("--memory-only", "--stream-idle-seconds", "300")
    got = asyncio.run(asyncio.wait_for(_waiting(srv.address, srv.proc.pid), 600))
    assert got["during"] <= THREAD_BOUND, got
    assert srv.proc.poll() is None


def test_a_watcher_is_queued_once_however_fast_its_session_steps():
    """Watchers are woken at the waker's pace (rpc/aio.py WAKE_SLICE every WAKE_PACE); a session stepping
    faster than that pace (each step wakes every watcher) must not grow the queue: one entry per watcher."""
    from optreg.server.rpc.aio import AioTelemetry
    from optreg.server.telemetry.hub import TelemetryHub

    async def main():
        telemetry = AioTelemetry(types.SimpleNamespace(hub=TelemetryHub()))
        telemetry.loop = asyncio.get_running_loop()
        watchers = [asyncio.Event() for _ in range(100)]
        telemetry.waiting["s"] = set(watchers)
        for _ in range(50):  # 50 steps before the waker's first turn
            telemetry._wake("s")
        assert len(telemetry.waker.queue) == 100
        while telemetry.waker.queue:
            await asyncio.sleep(0.005)
        assert all(e.is_set() for e in watchers) and not telemetry.queued
        telemetry._wake("s")  # once drained, the next step queues each watcher again
        assert len(telemetry.waker.queue) == 100

    asyncio.run(main())
