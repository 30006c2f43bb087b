"""Step replies as bf16 deltas with the residual kept on the server (issue 26, step_reply "bf16_delta"): the
server answers bfloat16(parameters - the client's copy) and adds exactly that to its record of the copy, so the
client's arrays never drift more than one reply's rounding from the master."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

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


def test_a_restarted_server_answers_the_parameters_once(tmp_path):
    data = str(tmp_path / "data")
    env = {"OPTREG_DATA_DIR": data}
    rng = np.random.default_rng(1)
    srv = ServerProcess("--data-dir", data, env=env)
    try:
        with Client(srv.address, timeout=60) as c:
            s = c.create_session("adam", {"w": rng.standard_normal(50).astype(np.float32)}, session_id="r",
                                 step_reply="bf16_delta", durability="log", lr=0.01)
            for _ in range(20):
                s.step({"w": rng.standard_normal(50).astype(np.float32)})
            arrays = s.arrays
    finally:
        srv.kill()
    srv = ServerProcess("--data-dir", data, env=env)
    try:
        with Client(srv.address, timeout=60) as c:
            s = c.session("r")
            s.arrays = arrays  # the client's copy from before the restart, which the server no longer knows
            s.step({"w": rng.standard_normal(50).astype(np.float32)})
            np.testing.assert_array_equal(s.arrays["w"], s.read_parameters()["w"])  # replaced, not added
            s.step({"w": rng.standard_normal(50).astype(np.float32)})
            assert np.abs(s.arrays["w"] - s.read_parameters()["w"]).max() < 1e-3
    finally:
        srv.stop()


def test_refused_for_shared_sessions_and_sparse_steps(client):
    with pytest.raises(InvalidArgument, match="step_reply bf16_delta with config.workers"):
        client.create_session("sgd", {"w": np.ones(4, np.float32)}, step_reply="bf16_delta", workers=2)
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
