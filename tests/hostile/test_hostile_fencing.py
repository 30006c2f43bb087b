"""Hostile client, fencing family: one answer per fence, however many clients send it and however they send it
(issue 9; issue 22), and what a step carries besides its gradients is applied once.

Issue 22's fencing and stream findings: one answer per fence, provisional stream chunks, fences of a
session created at a later step, cancelled streams, and re-creating an id while its old stream is in flight.

Raw clients here follow the words of the contract (StepStreamResponse.provisional in session.proto):
`answer()` is what such a client takes as a stream's result.
"""
from __future__ import annotations

import textwrap
import threading
import time

import grpc
import numpy as np
import pytest

from conftest import ServerProcess
from optreg.client import Client, StepMismatch
from optreg.v1 import session_pb2, tensors
from hostile_helpers import (PROMPT, Stalled, create, digest, grads_of, params_of, refused, step_messages,
                             stream_params, stub_for)
from hostile_helpers import stalls, stub  # noqa: F401 (fixtures)

LR = 0.5
N = 300_000  # float64: 2.4 MB, a few chunks each way (and over the Python client's stream threshold)


def answer(replies) -> tuple[int, bool, dict[str, bytes], bool]:
    """A StepStream's answer as the contract says to read it: (step, replayed, name -> bytes, whether any
    chunk was provisional). Provisional chunks count only if no later message carries chunks."""
    parts: dict[str, dict[int, bytes]] = {}
    provisional = in_provisional = False
    step = replayed = None
    for r in replies:
        mark = getattr(r, "provisional", False)
        provisional |= mark and bool(r.chunks)
        if in_provisional and not mark and r.chunks:
            parts = {}  # the answer starts over
        in_provisional = mark or (in_provisional and not r.chunks)
        step, replayed = r.step, r.replayed
        for t in r.chunks:
            parts.setdefault(t.name, {})[t.offset] = bytes(t.data)
    return step, replayed, {n: b"".join(v for _, v in sorted(p.items())) for n, p in parts.items()}, provisional


def read_bytes(stub, sid: str) -> bytes:
    r = stub.ReadParametersStream(session_pb2.ReadParametersStreamRequest(session_id=sid), timeout=PROMPT)
    return b"".join(bytes(t.data) for m in r for t in sorted(m.chunks, key=lambda t: t.offset))


@pytest.fixture(scope="module")
def fence_server():
    s = ServerProcess("--memory-only", "--max-streams", "32")
    yield s
    s.stop()


def test_raced_streams_with_one_fence_get_the_committed_answer(fence_server):
    # 8 StepStreams with the same fence and different gradients: exactly one is applied; every other one is
    # answered with its reply byte for byte (replayed) or refused as a step mismatch, never with values
    # computed from its own gradient.
    racers = 8
    stubs = [stub_for(fence_server.address) for _ in range(racers)]
    p = np.linspace(-1.0, 1.0, 1 << 17)  # float64: 1 MiB, 8 chunks each way
    sid = create(stubs[0], {"w": p}, optimizer="sgd", hyperparameters={"lr": LR},
                 master_dtype=tensors.to_code(np.float64)).session_id
    for k in range(3):
        barrier, got = threading.Barrier(racers), [None] * racers

        def send(i):
            msgs = step_messages(sid, {"w": np.full(p.size, i + 1.0)}, step=k, chunk_bytes=128 << 10)
            barrier.wait()
            try:
                got[i] = answer(stubs[i].StepStream(iter(msgs), timeout=60))
            except grpc.RpcError as e:
                got[i] = e

        threads = [threading.Thread(target=send, args=(i,)) for i in range(racers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        applied = [i for i, a in enumerate(got) if not isinstance(a, grpc.RpcError) and not a[1]]
        assert len(applied) == 1, (k, got)
        winner = got[applied[0]][2]["w"]
        assert winner == (p - LR * (applied[0] + 1.0)).tobytes(), k
        for i, a in enumerate(got):
            if isinstance(a, grpc.RpcError):
                assert a.code() == grpc.StatusCode.FAILED_PRECONDITION, (k, i, a.code(), a.details())
                assert dict(a.trailing_metadata())["optreg-server-step"] == str(k + 1)
            else:
                assert a[:2] == (k + 1, i != applied[0]), (k, i, a[:2])
                assert a[2]["w"] == winner, f"round {k}: racer {i} (gradient {i + 1}) got values never applied"
        assert read_bytes(stubs[0], sid) == winner
        p = np.frombuffer(winner, np.float64)


def test_raced_python_clients_hold_the_committed_values(fence_server):
    # Two Python clients step one session with the same fence: the loser raises StepMismatch and its
    # arrays then hold the committed step's result (as the message says), not its own gradient's.
    with Client(fence_server.address, timeout=60) as a, Client(fence_server.address, timeout=60) as b:
        sa = a.create_session("sgd", {"w": np.linspace(-1.0, 1.0, N)}, lr=LR, master_dtype="float64")
        sb = b.session(sa.id)
        for k in range(6):
            barrier, outcome = threading.Barrier(2), {}

            def step(name, s, value):
                barrier.wait()
                try:
                    outcome[name] = s.step({"w": np.full(N, value)}).replayed
                except StepMismatch as e:
                    outcome[name] = e

            threads = [threading.Thread(target=step, args=("a", sa, 1.0)),
                       threading.Thread(target=step, args=("b", sb, 2.0))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert sorted(type(v).__name__ for v in outcome.values()) == ["StepMismatch", "bool"], (k, outcome)
            server = sa.read_parameters()["w"]
            for s in (sa, sb):
                assert s.step_count == k + 1
                np.testing.assert_array_equal(s.arrays["w"], server, err_msg=f"round {k}: {outcome}")


def test_stream_refused_at_a_later_chunk_sent_only_provisional_chunks(fence_server):
    # A NaN in the last chunk: the result chunks already sent are marked provisional, the call ends
    # INVALID_ARGUMENT, and a client that reads the contract's words is left with no result at all.
    stub = stub_for(fence_server.address)
    n = 600_000
    sid = create(stub, {"w": np.zeros(n, np.float32)}, optimizer="sgd").session_id
    before = digest(stub, sid)
    g = np.ones(n, np.float32)
    g[n - 1] = np.nan
    replies = []
    with pytest.raises(grpc.RpcError) as e:
        for r in stub.StepStream(iter(step_messages(sid, {"w": g}, step=0, chunk_bytes=1 << 20)), timeout=60):
            replies.append(r)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "599999" in e.value.details() or "NaN" in e.value.details()
    sent = [r for r in replies if r.chunks]
    assert sent, "the server streamed no result chunk before the refusal (the overlap this test is about)"
    assert all(r.provisional for r in sent), [(r.step, r.replayed, r.provisional) for r in sent]
    assert digest(stub, sid) == before


def test_a_session_created_at_a_later_step_replays_nothing_it_did_not_apply(start_server, tmp_path):
    # initial_step=5: fence 4 names a step this session never applied: refused, as other impossible fences
    # are (FAILED_PRECONDITION naming the session's step), also after a restart. Step 5's retry replays.
    server = start_server(env={"OPTREG_DATA_DIR": str(tmp_path)})
    stub = stub_for(server.address)
    w = {"w": np.arange(4, dtype=np.float32)}
    sid = create(stub, w, optimizer="sgd", initial_step=5,
                 durability=session_pb2.DURABILITY_EVERY_STEP).session_id
    before = digest(stub, sid)

    def check_refused():
        details = refused(grpc.StatusCode.FAILED_PRECONDITION, lambda: stub.Step(
            session_pb2.StepRequest(session_id=sid, step=4, gradients=grads_of(w)), timeout=PROMPT),
            "never applied", "step=5")
        assert len(details) < 300, details
        err = refused(grpc.StatusCode.FAILED_PRECONDITION, lambda: list(stub.StepStream(
            iter(step_messages(sid, w, step=4)), timeout=PROMPT)), "never applied")
        assert err == details
        assert digest(stub, sid) == before

    check_refused()
    server.stop()
    server = start_server(env={"OPTREG_DATA_DIR": str(tmp_path)})
    stub = stub_for(server.address)
    check_refused()
    first = stub.Step(session_pb2.StepRequest(session_id=sid, step=5, gradients=grads_of(w)), timeout=PROMPT)
    again = stub.Step(session_pb2.StepRequest(session_id=sid, step=5, gradients=grads_of(w)), timeout=PROMPT)
    assert (first.step, first.replayed, again.step, again.replayed) == (6, False, 6, True)
    assert first.tensors[0].data == again.tensors[0].data


def test_a_client_cancelling_its_stream_is_one_info_line(start_server):
    server = start_server("--memory-only", "--log-level", "info")
    stub = stub_for(server.address)
    w = {"w": np.zeros(100_000, np.float32)}
    sid = create(stub, w, optimizer="sgd").session_id
    calls = [Stalled(stub.StepStream, step_messages(sid, w, step=0, chunk_bytes=64 << 10)[:2]) for _ in range(3)]
    time.sleep(1.0)  # the server is reading each stream
    for c in calls:
        c.release()
        assert c.wait_end(PROMPT).code() == grpc.StatusCode.CANCELLED
    time.sleep(1.0)
    assert stub.GetSession(session_pb2.GetSessionRequest(session_id=sid), timeout=PROMPT).session.step == 0
    server.stop()
    err = server.proc.stderr.read()
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if "StepStream" in line]
    # At most one line a call; a call cancelled before its handler started (a loaded machine) leaves none.
    assert len(lines) <= 3, err[-3000:]
    assert " ERROR " not in err, err[-3000:]
    assert all("INFO" in line and "cancel" in line for line in lines), lines


def test_recreating_a_deleted_id_while_its_old_stream_is_in_flight(start_server, tmp_path, stalls):
    # The old stream's open log record belongs to the deleted session, not to the id: the new session is
    # created and steps; the old stream then ends NOT_FOUND, and nothing of it reaches the new session.
    server = start_server(env={"OPTREG_DATA_DIR": str(tmp_path)})
    stub = stub_for(server.address)
    w = {"w": np.zeros(200_000, np.float32)}
    config = dict(optimizer="sgd", session_id="reborn", durability=session_pb2.DURABILITY_LOG)
    create(stub, w, **config)
    msgs, gate = step_messages("reborn", {"w": np.ones(200_000, np.float32)}, step=0), threading.Event()

    def held():  # two chunks, then the rest once the id is taken again
        yield from msgs[:2]
        gate.wait()
        yield from msgs[2:]

    old = Stalled(stub.StepStream, held())
    stalls.append(old)
    time.sleep(1.0)  # its log record is open
    stub.DeleteSession(session_pb2.DeleteSessionRequest(session_id="reborn"), timeout=PROMPT)
    create(stub, w, **config)
    g = {"w": np.full(200_000, 2.0, np.float32)}
    r = stub.Step(session_pb2.StepRequest(session_id="reborn", step=0, gradients=grads_of(g)), timeout=PROMPT)
    assert r.step == 1
    after = digest(stub, "reborn")
    gate.set()
    old.released.set()
    err = old.wait_end(PROMPT)
    assert err is not None and err.code() == grpc.StatusCode.NOT_FOUND, (err.code(), err.details())
    assert "deleted" in err.details() or "not found" in err.details(), err.details()
    assert digest(stub, "reborn") == after
    server.stop()
    server = start_server(env={"OPTREG_DATA_DIR": str(tmp_path)})  # what the new session's log holds
    assert digest(stub_for(server.address), "reborn") == after


# -- hyperparameters carried by a step ------------------------------------------------------------
def test_step_hyperparameters_apply_from_that_step_and_are_not_reapplied_on_retry(stub):
    p0 = np.array([1.0, -2.0, 3.0, 0.5])
    g = np.array([0.5, 1.0, -1.0, 2.0])
    sid = create(stub, {"w": p0}, optimizer="sgd", hyperparameters={"lr": 0.1}).session_id

    def lr():
        return stub.GetSession(session_pb2.GetSessionRequest(session_id=sid), timeout=PROMPT).session.hyperparameters["lr"]

    r1 = stub.Step(session_pb2.StepRequest(session_id=sid, step=0, gradients=grads_of({"w": g}),
                                           hyperparameters={"lr": 0.5}), timeout=PROMPT)
    p1 = p0 - g * 0.5
    np.testing.assert_array_equal(params_of(r1.tensors)["w"], p1)
    assert lr() == 0.5
    r2 = stub.Step(session_pb2.StepRequest(session_id=sid, step=1, gradients=grads_of({"w": g})), timeout=PROMPT)
    p2 = p1 - g * 0.5  # the new rate stays in force
    np.testing.assert_array_equal(params_of(r2.tensors)["w"], p2)

    before = digest(stub, sid)
    for bad, word in (({"lr": -1.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"nope": 1.0}, "nope")):
        refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.Step(session_pb2.StepRequest(
            session_id=sid, step=2, gradients=grads_of({"w": g}), hyperparameters=bad), timeout=PROMPT), word)
        refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: list(stub.StepStream(iter(step_messages(
            sid, {"w": g}, step=2, hyperparameters=bad)), timeout=PROMPT)), word)
    assert digest(stub, sid) == before

    # A retry of step 2 (fence 1) with other values is answered as the original; nothing changes.
    again = stub.Step(session_pb2.StepRequest(session_id=sid, step=1, gradients=grads_of({"w": g}),
                                              hyperparameters={"lr": 5.0}), timeout=PROMPT)
    assert again.replayed and again.step == 2
    np.testing.assert_array_equal(params_of(again.tensors)["w"], p2)
    assert lr() == 0.5 and digest(stub, sid) == before

    # The streamed step carries them in its first message, the same way.
    step, replayed, out = stream_params(stub.StepStream(iter(step_messages(
        sid, {"w": g}, step=2, hyperparameters={"lr": 0.25})), timeout=PROMPT))
    p3 = p2 - g * 0.25
    assert (step, replayed) == (3, False)
    np.testing.assert_array_equal(out["w"], p3)
    assert lr() == 0.25
    step, replayed, out = stream_params(stub.StepStream(iter(step_messages(
        sid, {"w": g}, step=2, hyperparameters={"lr": 9.0})), timeout=PROMPT))
    assert (step, replayed) == (3, True)
    np.testing.assert_array_equal(out["w"], p3)
    assert lr() == 0.25


# -- one fence, two clients ---------------------------------------------------------------------------
WHOLE_TENSOR_PLUGIN = textwrap.dedent('''
    import numpy as np
    from optreg.plugins import Hyperparameter, Optimizer, hookimpl

    def update(param, grad, state, step, hp, scratch):
        param -= hp["lr"] * grad / (np.sqrt(np.sum(grad * grad)) + 1e-12)

    @hookimpl
    def optreg_optimizers():
        return [Optimizer(name="normsgd", summary="SGD on the tensor's normalized gradient.", update=update,
                          hyperparameters=(Hyperparameter("lr", 0.1, "step size", minimum=0.0),),
                          elementwise=False)]
''')


@pytest.fixture(scope="module")
def race_server(tmp_path_factory):
    """A server that also has a whole-tensor optimizer (elementwise=False), installed as a real plugin."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "optreg_normsgd.py").write_text(WHOLE_TENSOR_PLUGIN)
    info = root / "optreg_normsgd-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: optreg-normsgd\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[optreg]\nnormsgd = optreg_normsgd\n")
    s = ServerProcess("--memory-only", "--stream-idle-seconds", "60", env={"PYTHONPATH": str(root)})
    yield s
    s.stop()


@pytest.mark.parametrize("optimizer", ["adam"])
def test_same_fence_from_two_clients_while_one_streams_applies_once(race_server, stalls, optimizer):
    check_same_fence_while_one_streams(race_server, stalls, optimizer)


def check_same_fence_while_one_streams(race_server, stalls, optimizer):
    """Client A streams step 0 and holds the stream open before its end; client B sends step 0 whole.
    One of them is applied; the other is answered as its replay, with the same parameters."""
    a_stub, b_stub = stub_for(race_server.address), stub_for(race_server.address)
    rng = np.random.default_rng(7)
    p = {"w": rng.standard_normal(5000).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    g = {"w": rng.standard_normal(5000).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    sid = create(a_stub, p, optimizer=optimizer).session_id
    twin = create(a_stub, p, optimizer=optimizer).session_id  # stepped once, alone: the expected result
    expected = params_of(b_stub.Step(session_pb2.StepRequest(session_id=twin, step=0, gradients=grads_of(g)),
                                     timeout=PROMPT).tensors)

    a = Stalled(a_stub.StepStream, step_messages(sid, g, step=0, chunk_bytes=4096))
    stalls.append(a)
    time.sleep(1.0)  # every chunk of A reaches the server; its end does not
    b = b_stub.Step(session_pb2.StepRequest(session_id=sid, step=0, gradients=grads_of(g)), timeout=PROMPT)
    a.released.set()  # A's generator returns: the stream ends and A's step can finish
    assert a.wait_end(PROMPT) is None, a.error
    a_step, a_replayed, a_params = stream_params(a.replies)

    assert (b.step, a_step) == (1, 1)
    assert sorted([b.replayed, a_replayed]) == [False, True]
    for name in p:
        np.testing.assert_array_equal(params_of(b.tensors)[name], a_params[name])
        np.testing.assert_array_equal(a_params[name], expected[name])
    info = a_stub.GetSession(session_pb2.GetSessionRequest(session_id=sid), timeout=PROMPT).session
    assert info.step == 1


@pytest.mark.parametrize("optimizer", ["adam"])
def test_same_fence_from_two_clients_at_once_applies_once(race_server, optimizer):
    check_same_fence_at_once(race_server, optimizer)


def check_same_fence_at_once(race_server, optimizer):
    stubs = [stub_for(race_server.address), stub_for(race_server.address)]
    rng = np.random.default_rng(8)
    p = {"w": rng.standard_normal(20000).astype(np.float32)}
    sid = create(stubs[0], p, optimizer=optimizer).session_id
    rounds = 15
    for k in range(rounds):
        g = {"w": rng.standard_normal(20000).astype(np.float32)}
        barrier, answers = threading.Barrier(2), [None, None]

        def send(i):
            barrier.wait()
            try:
                answers[i] = stubs[i].Step(session_pb2.StepRequest(session_id=sid, step=k, gradients=grads_of(g)),
                                           timeout=PROMPT)
            except grpc.RpcError as e:
                answers[i] = e

        threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for ans in answers:
            assert not isinstance(ans, grpc.RpcError), (k, ans.code(), ans.details())
        assert [a.step for a in answers] == [k + 1, k + 1], (k, answers[0].step, answers[1].step)
        assert sorted(a.replayed for a in answers) == [False, True], k
        assert answers[0].tensors[0].data == answers[1].tensors[0].data, k
    assert stubs[0].GetSession(session_pb2.GetSessionRequest(session_id=sid), timeout=PROMPT).session.step == rounds


def test_whole_tensor_optimizer_same_fence_while_one_streams_applies_once(race_server, stalls):
    # StepRun.finish re-checks the fence for whole-tensor steps too: the loser is answered as a replay.
    check_same_fence_while_one_streams(race_server, stalls, "normsgd")


def test_whole_tensor_optimizer_same_fence_at_once_applies_once(race_server):
    check_same_fence_at_once(race_server, "normsgd")
