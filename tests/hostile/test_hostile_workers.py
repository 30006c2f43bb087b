"""Issue 22's hangs 6 and 7, and its idle-timer item, against a real `optreg serve` through the generated stubs.

- WatchSession is admitted up to --max-watchers (each waits holding no thread): 16 and more open
  watchers never stop health checks, GetSession or steps, and the ones beyond are refused at once.
- A sync session with more members than --threads closes its rounds (members wait holding no
  thread); members beyond --max-members are refused at JoinSession.
- A worker StepStream's idle timer resets on data only: a trickle of empty messages is ended after
  --stream-idle-seconds and gives back the worker's turn.
"""
from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
import numpy as np
import pytest

from conftest import ServerProcess
from hostile_helpers import PROMPT, Stalled, create, grads_of, health_ok, refused, stub_for
from hostile_helpers import stalls  # noqa: F401 (a fixture)
from optreg.v1 import session_pb2, telemetry_pb2, telemetry_pb2_grpc, tensor_pb2

MODES = {"sync": session_pb2.WORKER_MODE_SYNC, "async": session_pb2.WORKER_MODE_ASYNC,
         "ssp": session_pb2.WORKER_MODE_SSP}
W = {"w": np.full(4, 0.5, np.float32)}
G = {"w": np.ones(4, np.float32)}


IDLE = 2


@pytest.fixture(scope="module")
def busy():
    """Fewer handler threads than members, one stream slot, a short idle timeout (starts take seconds here)."""
    s = ServerProcess("--memory-only", "--threads", "4", "--max-streams", "1", "--stream-idle-seconds", str(IDLE))
    yield s
    s.stop()


@pytest.fixture
def stub(busy):
    """busy's stub; the shared sessions a test made are deleted after it, so their members leave."""
    stub = stub_for(busy.address)
    stub.made = []
    yield stub
    for sid in stub.made:
        stub.DeleteSession(session_pb2.DeleteSessionRequest(session_id=sid), timeout=PROMPT)


def shared(stub, workers: int, mode="sync") -> str:
    sid = create(stub, W, optimizer="sgd",
                 workers=session_pb2.WorkerConfig(workers=workers, mode=MODES[mode])).session_id
    getattr(stub, "made", []).append(sid)
    return sid


def contribute(stub, sid, worker, round_, timeout=PROMPT):
    return stub.Step(session_pb2.StepRequest(session_id=sid, worker=worker, round=round_, gradients=grads_of(G)),
                     timeout=timeout)


def stream_contribution(stub, sid, worker, round_, timeout=PROMPT):
    """A contribution by StepStream, sent again while the server answers --max-streams' RESOURCE_EXHAUSTED."""
    first = session_pb2.StepStreamRequest(session_id=sid, worker=worker, round=round_, chunks=grads_of(G))
    end = time.monotonic() + timeout
    while True:
        try:
            return list(stub.StepStream(iter([first]), timeout=max(0.1, end - time.monotonic())))[-1]
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() >= end:
                raise
            time.sleep(0.05)


def run_round(stub, sid, workers, round_, send=contribute):
    """Every worker's contribution to `round_` at once, each in a thread of this process."""
    with futures.ThreadPoolExecutor(len(workers)) as pool:
        return list(pool.map(lambda w: send(stub, sid, w, round_), workers))


# -- 6. watchers --------------------------------------------------------------------------------------
class Watch:
    """An open WatchSession call read in a thread: its events, and its error once it ends."""

    def __init__(self, address, sid):
        self.channel = grpc.insecure_channel(address)  # one each: many calls on one channel queue in the client
        self.call = telemetry_pb2_grpc.TelemetryServiceStub(self.channel).WatchSession(
            telemetry_pb2.WatchSessionRequest(session_id=sid))
        self.events, self.error, self.ended = [], None, threading.Event()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            for e in self.call:
                self.events.append(e)
        except grpc.RpcError as e:
            self.error = e
        finally:
            self.ended.set()

    def close(self):
        self.call.cancel()
        self.channel.close()


def test_more_watchers_than_threads_never_stop_health_reads_or_steps(start_server):
    # 16 handler threads, 16 watchers admitted (--max-watchers is an admission limit: 1024 by default)
    srv = start_server("--memory-only", "--max-watchers", "16")
    stub = stub_for(srv.address)
    sid = create(stub, W, optimizer="sgd").session_id
    watches = [Watch(srv.address, sid) for _ in range(20)]
    try:
        deadline = time.monotonic() + PROMPT
        while sum(w.ended.is_set() for w in watches) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health_ok(srv.address)
        assert stub.GetSession(session_pb2.GetSessionRequest(session_id=sid), timeout=PROMPT).session.step == 0
        assert stub.Step(session_pb2.StepRequest(session_id=sid, step=0, gradients=grads_of(G)),
                         timeout=PROMPT).step == 1
        refused_ = [w for w in watches if w.ended.is_set()]
        assert len(refused_) == 4, [w.error for w in refused_]
        for w in refused_:
            assert w.error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, w.error
            assert "--max-watchers" in w.error.details(), w.error.details()
        # The 16 admitted watchers are served: each sees the step.
        admitted = [w for w in watches if not w.ended.is_set()]
        deadline = time.monotonic() + PROMPT
        while not all(w.events for w in admitted) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert all(w.events and w.events[0].step.step == 1 for w in admitted)
        # A closed watch gives its slot back.
        admitted[0].close()
        for _ in range(int(PROMPT / 0.2)):
            again = Watch(srv.address, sid)
            watches.append(again)
            if not again.ended.wait(0.5):
                break
            time.sleep(0.2)
        assert not again.ended.is_set(), again.error
    finally:
        for w in watches:
            w.close()


# -- 7. sync members waiting for their round ------------------------------------------------------------
@pytest.mark.parametrize("members", [6, 12])
def test_sync_session_with_more_members_than_workers_closes_its_rounds(busy, stub, members):
    sid = shared(stub, members)  # on --workers 4
    names = [f"w{i}" for i in range(members)]
    for w in names:
        stub.JoinSession(session_pb2.JoinSessionRequest(session_id=sid, worker=w), timeout=PROMPT)
    for r in range(2):
        replies = run_round(stub, sid, names, r)
        assert {x.step for x in replies} == {r + 1}
        assert all(sorted(x.contributors) == sorted(names) for x in replies)
    assert health_ok(busy.address)


def test_sync_members_streaming_their_contributions_close_rounds_beyond_max_streams(stub):
    sid = shared(stub, 3)
    names = ["a", "b", "c"]
    for w in names:
        stub.JoinSession(session_pb2.JoinSessionRequest(session_id=sid, worker=w), timeout=PROMPT)
    # Each stream holds the one stream slot only while it is received, not while it waits for the round,
    # so the members' retries get it.
    replies = run_round(stub, sid, names, 0, send=stream_contribution)
    assert {x.step for x in replies} == {1} and all(sorted(x.contributors) == names for x in replies)


def test_members_beyond_max_members_are_refused_at_join_and_the_others_close_rounds(start_server):
    srv = start_server("--memory-only", "--threads", "2", "--max-members", "4")
    stub = stub_for(srv.address)
    sid = shared(stub, 6)
    other = shared(stub, 2)
    for w in ("a", "b", "c"):
        stub.JoinSession(session_pb2.JoinSessionRequest(session_id=sid, worker=w), timeout=PROMPT)
    stub.JoinSession(session_pb2.JoinSessionRequest(session_id=other, worker="x"), timeout=PROMPT)
    # The server's members count across sessions: a fifth is refused, by JoinSession and by a contribution.
    refused(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: stub.JoinSession(
        session_pb2.JoinSessionRequest(session_id=sid, worker="d"), timeout=PROMPT), "--max-members", "4")
    refused(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: contribute(stub, other, "y", 0), "--max-members")
    assert stub.GetSession(session_pb2.GetSessionRequest(session_id=other), timeout=PROMPT).session.step == 0
    # Within the limit, rounds close (4 members waiting on a server of 2 handler threads), and a member
    # that floods the server with the same contribution holds two calls (a call and a retry), not the
    # slots of the others: they still get in.
    with futures.ThreadPoolExecutor(10) as pool:
        flood = [pool.submit(contribute, stub, sid, "a", 0) for _ in range(10)]
        end = time.monotonic() + PROMPT
        while sum(f.done() for f in flood) < 8 and time.monotonic() < end:
            time.sleep(0.05)
        replies = run_round(stub, sid, ["b", "c"], 0)
        floods = [f.exception() or f.result() for f in flood]
    too_many = [e for e in floods if isinstance(e, grpc.RpcError)]
    assert len(too_many) == 8 and all(e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED for e in too_many)
    assert "calls in flight" in too_many[0].details(), too_many[0].details()
    replies += [r for r in floods if not isinstance(r, grpc.RpcError)]
    assert len(replies) == 4 and {x.step for x in replies} == {1}
    assert all(sorted(x.contributors) == ["a", "b", "c"] for x in replies)
    assert contribute(stub, other, "x", 0).step == 1
    # A member that leaves gives its seat back, and so do the members of a deleted session.
    stub.LeaveSession(session_pb2.LeaveSessionRequest(session_id=other, worker="x"), timeout=PROMPT)
    stub.JoinSession(session_pb2.JoinSessionRequest(session_id=sid, worker="d"), timeout=PROMPT)
    replies = run_round(stub, sid, ["a", "b", "c", "d"], 1)
    assert {x.step for x in replies} == {2} and len(replies[0].contributors) == 4
    ssp = shared(stub, 4, mode="ssp")
    refused(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: stub.JoinSession(
        session_pb2.JoinSessionRequest(session_id=ssp, worker="a"), timeout=PROMPT), "--max-members")
    stub.DeleteSession(session_pb2.DeleteSessionRequest(session_id=sid), timeout=PROMPT)
    for w in ("a", "b", "c", "d"):
        stub.JoinSession(session_pb2.JoinSessionRequest(session_id=ssp, worker=w), timeout=PROMPT)


# -- read along: idle timers reset on progress only -------------------------------------------------
@pytest.mark.parametrize("mode", ["sync", "async", "ssp"])
def test_empty_message_trickle_on_a_worker_stream_ends_after_the_idle_timeout(stub, stalls, mode):
    sid = shared(stub, 1, mode)
    stub.JoinSession(session_pb2.JoinSessionRequest(session_id=sid, worker="a"), timeout=PROMPT)
    empty = tensor_pb2.Tensor(name="w", dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[4], offset=0, data=b"")
    first = session_pb2.StepStreamRequest(session_id=sid, worker="a", round=0)
    trickle = Stalled(stub.StepStream, [first], keep=session_pb2.StepStreamRequest(chunks=[empty]), period=0.2)
    stalls.append(trickle)
    err = trickle.wait_end(PROMPT + 4 * IDLE)
    assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
    assert "--stream-idle-seconds" in err.details(), err.details()
    # Its stream slot and the worker's turn are free: the worker's contribution applies, streamed or not.
    assert stream_contribution(stub, sid, "a", 0).step == 1
    assert contribute(stub, sid, "a", 1).step == 2
