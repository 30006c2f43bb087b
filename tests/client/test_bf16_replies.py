"""Step replies as bf16 deltas with the residual kept on the server (issue 26, step_reply "bf16_delta"): the
server answers bfloat16(parameters - the client's copy) and adds exactly that to its record of the copy, so the
client's arrays never drift more than one reply's rounding from the master."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

import contextlib
from concurrent.futures import ThreadPoolExecutor

from conftest import ServerProcess
from optreg.client import Client, InvalidArgument
from optreg.v1 import session_pb2, session_pb2_grpc, tensor_pb2, tensors


def test_no_drift_over_2000_steps_and_the_master_is_untouched(client):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(300).astype(np.float32)
    s = client.create_session("adam", {"w": p0.copy()}, step_reply="bf16_delta", lr=1e-3)
    twin = client.create_session("adam", {"w": p0.copy()}, lr=1e-3)
    worst = 0.0
    for i in range(2000):
        g = {"w": rng.standard_normal(300).astype(np.float32)}
        before = s.arrays["w"].copy()
        s.step(g)
        twin.step(g)
        if i % 250 == 249 or i == 1999:
            master = s.read_parameters()["w"]
            np.testing.assert_array_equal(master, twin.arrays["w"])  # the reply mode leaves the step alone
            moved = np.abs(s.arrays["w"] - before)  # the last reply, as added
            err = np.abs(master - s.arrays["w"])
            # one reply's bf16 rounding (8 significant bits) and the float32 add: no more, however many steps
            assert np.all(err <= moved * 2.0 ** -8 + 2 * np.spacing(np.abs(master))), i
            worst = max(worst, float(err.max()))
    assert worst < 1e-4


def test_answers_bf16_after_a_first_float32_one_and_a_retry_gets_the_same(server, client):
    s = client.create_session("sgd", {"w": np.ones(1000, np.float32)}, step_reply="bf16_delta", lr=0.01)
    stub = session_pb2_grpc.SessionServiceStub(grpc.insecure_channel(server.address))
    g = [tensors.from_numpy("w", np.full(1000, 0.3, np.float32))]
    first = stub.Step(session_pb2.StepRequest(session_id=s.id, step=0, gradients=g))
    assert first.tensors[0].dtype == tensor_pb2.DATA_TYPE_FLOAT32  # the copy starts from the parameters
    second = stub.Step(session_pb2.StepRequest(session_id=s.id, step=1, gradients=g))
    assert second.tensors[0].dtype == tensor_pb2.DATA_TYPE_BFLOAT16
    assert len(second.tensors[0].data) == 2000  # half the float32 reply's bytes
    again = stub.Step(session_pb2.StepRequest(session_id=s.id, step=1, gradients=g))
    assert again.replayed and again.tensors[0].data == second.tensors[0].data


@contextlib.contextmanager
def _serving(data: str, kill: bool = False):
    """A server on the data directory `data`, killed (-9) or stopped at the end."""
    srv = ServerProcess("--data-dir", data, env={"OPTREG_DATA_DIR": data})
    try:
        yield srv
    finally:
        srv.kill() if kill else srv.stop()


def test_a_restarted_server_answers_the_parameters_once(tmp_path):
    data = str(tmp_path / "data")
    rng = np.random.default_rng(1)
    with _serving(data, kill=True) as srv, Client(srv.address, timeout=60) as c:
        s = c.create_session("adam", {"w": rng.standard_normal(50).astype(np.float32)}, session_id="r",
                             step_reply="bf16_delta", durability="log", lr=0.01)
        for _ in range(20):
            s.step({"w": rng.standard_normal(50).astype(np.float32)})
        arrays = s.arrays
    with _serving(data) as srv, Client(srv.address, timeout=60) as c:
        s = c.session("r")
        s.arrays = arrays  # the client's copy from before the restart, which the server no longer knows
        s.step({"w": rng.standard_normal(50).astype(np.float32)})
        np.testing.assert_array_equal(s.arrays["w"], s.read_parameters()["w"])  # replaced, not added
        s.step({"w": rng.standard_normal(50).astype(np.float32)})
        assert np.abs(s.arrays["w"] - s.read_parameters()["w"]).max() < 1e-3


def test_refused_for_async_sessions_and_sparse_steps(client):
    with pytest.raises(InvalidArgument, match="step_reply bf16_delta with config.workers.mode async"):
        client.create_session("sgd", {"w": np.ones(4, np.float32)}, step_reply="bf16_delta", workers=2,
                              mode="async")
    s = client.create_session("sgd", {"E": np.ones((5, 3), np.float32)}, step_reply="bf16_delta")
    with pytest.raises(InvalidArgument, match="sparse steps do not"):
        s.step_sparse("E", [1], np.ones((1, 3), np.float32))
    assert s.refresh().step == 0


@pytest.mark.parametrize("resident", [False, True])
def test_shared_memory_steps_leave_the_client_exact(client, resident):
    """A step through shared memory writes the client's arrays whole: the next gRPC step answers with the
    parameters (the server's record of the copy would be wrong otherwise), then bf16 deltas again."""
    rng = np.random.default_rng(2)
    s = client.create_session("adam", {"w": rng.standard_normal(64).astype(np.float32)}, step_reply="bf16_delta",
                              lr=0.01)
    for _ in range(3):
        s.step({"w": rng.standard_normal(64).astype(np.float32)})
    s.enable_shared_memory(resident=resident)
    for _ in range(3):
        s.step({"w": rng.standard_normal(64).astype(np.float32)})
    s.disable_shared_memory()
    s.step({"w": rng.standard_normal(64).astype(np.float32)})
    np.testing.assert_array_equal(s.arrays["w"], s.read_parameters()["w"])
    for _ in range(5):
        s.step({"w": rng.standard_normal(64).astype(np.float32)})
    assert np.abs(s.arrays["w"] - s.read_parameters()["w"]).max() < 1e-3


def test_streamed_steps_answer_bf16_deltas_too(client):
    """A session whose answer exceeds a unary message's comfort (STREAM_ABOVE_BYTES) steps over StepStream;
    its bf16 deltas arrive in chunks and are added the same way."""
    rng = np.random.default_rng(3)
    s = client.create_session("sgd", {"w": rng.standard_normal(700_000).astype(np.float32)}, step_reply="bf16_delta",
                              lr=0.01)
    for _ in range(3):
        s.step({"w": rng.standard_normal(700_000).astype(np.float32)})
    err = np.abs(s.arrays["w"] - s.read_parameters()["w"])
    assert 0 < err.max() < 1e-3


class _Members:
    """Members of a sync session stepping over a raw stub, each keeping its copy of the parameters as the
    answers make it (bf16: added; float32: replaced)."""

    def __init__(self, address, session_id, copy, names=("a", "b"), n=500):
        self.stub = session_pb2_grpc.SessionServiceStub(grpc.insecure_channel(address))
        self.id, self.n, self.rng = session_id, n, np.random.default_rng(3)
        self.copies = {w: copy.copy() for w in names}

    def join(self, worker):
        self.stub.JoinSession(session_pb2.JoinSessionRequest(session_id=self.id, worker=worker))

    def contribute(self, worker, number):
        g = [tensors.from_numpy("w", self.rng.standard_normal(self.n).astype(np.float32) * 0.01)]
        reply = self.stub.Step(session_pb2.StepRequest(session_id=self.id, worker=worker, round=number, gradients=g),
                               timeout=60)
        answer = tensors.to_numpy(reply.tensors[0])
        if answer.dtype == np.float32:
            self.copies[worker] = answer.copy()
        else:
            self.copies[worker] += answer.astype(np.float32)
        return reply.tensors[0].dtype

    def round(self, number, workers):
        """The answers' dtypes, in `workers` order."""
        with ThreadPoolExecutor(len(workers)) as pool:
            return list(pool.map(self.contribute, workers, [number] * len(workers)))


BF16, F32 = tensor_pb2.DATA_TYPE_BFLOAT16, tensor_pb2.DATA_TYPE_FLOAT32


def _near(master, copy):
    assert np.abs(master - copy).max() < 1e-3 * np.abs(master).max()


def test_sync_rounds_answer_bf16_deltas_and_a_member_that_missed_one_gets_the_copy_whole(server, client):
    """A sync session (DiLoCo's outer one) answers every round's contributors bf16 deltas from one copy of the
    members' parameters: they all hold it bit for bit, within one reply's rounding of the master. A member that
    missed an answer (it left, read the parameters, and came back) is answered that copy whole, in float32,
    and holds it again."""
    rng = np.random.default_rng(3)
    s = client.create_session("nesterov", {"w": rng.standard_normal(500).astype(np.float32)}, lr=0.7, momentum=0.9,
                              step_reply="bf16_delta", workers=2, round_deadline=60.0)
    m = _Members(server.address, s.id, s.read_parameters()["w"])
    for w in m.copies:  # a round closes with the members it has: both, from the first
        m.join(w)
    assert m.round(0, ["a", "b"]) == [F32, F32]  # the copy starts from the parameters
    for r in range(1, 30):
        assert m.round(r, ["a", "b"]) == [BF16, BF16]
    np.testing.assert_array_equal(m.copies["a"], m.copies["b"])
    master = s.read_parameters()["w"]
    assert np.abs(master - m.copies["a"]).max() > 0
    _near(master, m.copies["a"])
    m.stub.LeaveSession(session_pb2.LeaveSessionRequest(session_id=s.id, worker="b"))
    for r in range(30, 33):
        assert m.round(r, ["a"]) == [BF16]
    m.copies["b"] = s.read_parameters()["w"]  # b reads the master: not the copy a's answers left
    m.join("b")
    assert m.round(33, ["a", "b"]) == [BF16, F32]
    np.testing.assert_array_equal(m.copies["a"], m.copies["b"])  # b holds the copy again
    assert m.round(34, ["a", "b"]) == [BF16, BF16]
    np.testing.assert_array_equal(m.copies["a"], m.copies["b"])
    _near(s.read_parameters()["w"], m.copies["a"])


def test_sync_rounds_after_a_kill_answer_the_parameters_once(tmp_path):
    """kill -9 mid-training: the master replays from the log bit for bit; the server no longer knows the
    members' copy (nor which member holds it), so the next round answers every contributor the parameters in
    float32, and bf16 deltas again from there."""
    data = str(tmp_path / "data")
    rng = np.random.default_rng(5)
    with _serving(data, kill=True) as srv, Client(srv.address, timeout=60) as c:
        s = c.create_session("nesterov", {"w": rng.standard_normal(500).astype(np.float32)}, session_id="k",
                             lr=0.7, momentum=0.9, step_reply="bf16_delta", workers=2, round_deadline=60.0,
                             durability="log")
        m = _Members(srv.address, s.id, s.read_parameters()["w"])
        for w in m.copies:
            m.join(w)
        for r in range(6):
            m.round(r, ["a", "b"])
        assert m.round(6, ["a", "b"]) == [BF16, BF16]
        before = s.read_parameters()["w"]
    with _serving(data) as srv, Client(srv.address, timeout=60) as c:
        s = c.session("k")
        np.testing.assert_array_equal(s.read_parameters()["w"], before)
        m2 = _Members(srv.address, s.id, before)
        m2.copies = m.copies  # the members' copies from before the kill, which the server no longer knows
        assert m2.round(7, ["a", "b"]) == [F32, F32]
        np.testing.assert_array_equal(m2.copies["a"], s.read_parameters()["w"])
        np.testing.assert_array_equal(m2.copies["b"], m2.copies["a"])
        assert m2.round(8, ["a", "b"]) == [BF16, BF16]
        np.testing.assert_array_equal(m2.copies["a"], m2.copies["b"])
        _near(s.read_parameters()["w"], m2.copies["a"])
