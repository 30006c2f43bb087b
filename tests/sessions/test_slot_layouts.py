"""Contract v2 state through every machinery that handles state, over a real server: slots of their own
shape (torch.adafactor's row and column vectors, a vector's variance, and (0,) where a slot is not kept)
and of their own dtype (adamw-bf16's bfloat16 m and v; schedulefree.adamw's float64 scalars). The memory
budget counts them before allocating; ReadState and CreateSession restore them; snapshots (checksummed)
and the log bring them back after a stop and after a kill -9; an export file carries them to an import;
shared memory, workers and telemetry step them like any other."""
from __future__ import annotations

import threading

import grpc
import ml_dtypes
import numpy as np
import pytest

from cli_helpers import optreg, optreg_env
from optreg.client import Client, InvalidArgument, ResourceExhausted
from optreg.v1 import telemetry_pb2, telemetry_pb2_grpc

F32, F64, BF16 = np.dtype(np.float32), np.dtype(np.float64), np.dtype(ml_dtypes.bfloat16)
LAYOUT = {  # optimizer -> {slot: {parameter: (shape, dtype)}} for params() below
    "torch.adafactor": {"row_var": {"W": ((6, 1), F32), "b": ((0,), F32)},
                        "col_var": {"W": ((1, 5), F32), "b": ((0,), F32)},
                        "variance": {"W": ((0,), F32), "b": ((5,), F32)}},
    "adamw-bf16": {s: {"W": ((6, 5), BF16), "b": ((5,), BF16)} for s in ("m", "v", "max_v")},
    # one float64 number per parameter: the run's lr_max and weight_sum
    "schedulefree.adamw": {"z": {"W": ((6, 5), F32), "b": ((5,), F32)},
                           "exp_avg_sq": {"W": ((6, 5), F32), "b": ((5,), F32)},
                           "lr_max": {"W": ((), F64), "b": ((), F64)},
                           "weight_sum": {"W": ((), F64), "b": ((), F64)}},
}


def params():
    rng = np.random.default_rng(0)
    return {"W": rng.standard_normal((6, 5)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}


def grads(i):
    rng = np.random.default_rng(100 + i)
    return {"W": rng.standard_normal((6, 5)).astype(np.float32), "b": rng.standard_normal(5).astype(np.float32)}


def assert_layout(optimizer, state):
    got = {slot: {n: (a.shape, a.dtype) for n, a in arrays.items()} for slot, arrays in state.items()}
    assert got == LAYOUT[optimizer]


def same_bits(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            same_bits(a[k], b[k])
        else:
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
            assert a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize("optimizer", sorted(LAYOUT))
def test_read_state_and_restore_keep_each_slots_shape_and_dtype(client, optimizer):
    s = client.create_session(optimizer, params(), lr=0.01)
    for i in range(3):
        s.step(grads(i))
    st = s.read_state()
    assert_layout(optimizer, st.state)
    restored = client.create_session(optimizer, st.parameters, state=st.state, initial_step=st.info.step, lr=0.01)
    s.step(grads(3))
    restored.step(grads(3))
    a, b = s.read_state(), restored.read_state()
    same_bits(a.parameters, b.parameters)
    same_bits(a.state, b.state)
    # a slot given in the parameter's shape is refused, naming the declared one; nothing is created
    bad = {slot: {n: np.zeros(p.shape, np.float32) for n, p in params().items()} for slot in st.state}
    if optimizer == "torch.adafactor":
        with pytest.raises(InvalidArgument, match=r"state \w+/'W': shape \[6, 5\], expected \[6, 1\]"
                                                  r"|state col_var/'W': shape \[6, 5\], expected \[1, 5\]"
                                                  r"|state variance/'W': shape \[6, 5\], expected \[0\]"):
            client.create_session(optimizer, params(), state=bad, initial_step=3)
    for x in (s, restored):
        x.delete()


@pytest.mark.parametrize("optimizer", sorted(LAYOUT))
def test_size_bytes_counts_each_slot_in_its_declared_layout(client, optimizer):
    s = client.create_session(optimizer, params(), lr=0.01)
    want = sum(p.nbytes for p in params().values()) + sum(
        int(np.prod(shape)) * dtype.itemsize for per_param in LAYOUT[optimizer].values() for shape, dtype in per_param.values())
    listed = next(i for i in client.list_sessions() if i.session_id == s.id)
    assert s.info.size_bytes == client.get_session(s.id).size_bytes == listed.size_bytes == want
    s.delete()


def test_memory_budget_counts_declared_slots_before_allocating(start_server):
    srv = start_server("--memory-only", "--memory-budget-mb", "15")  # (an upload is counted too, while it lasts)
    w = {"W": np.zeros((1024, 1024), np.float32)}  # 4 MiB
    g = {"W": np.ones((1024, 1024), np.float32)}
    with Client(srv.address) as c:
        with pytest.raises(ResourceExhausted, match=r"session \S+ needs 16\.0 MiB"):  # adamw: 4 + 3 x 4 MiB
            c.create_session("adamw", w)
        bf16 = c.create_session("adamw-bf16", w)  # bfloat16 state: 4 + 3 x 2 MiB held
        with pytest.raises(ResourceExhausted, match=r"staging copy of session \S+ needs 10\.0 MiB"):
            bf16.step(g)  # a step's staging set is one more of those 10 MiB
        assert bf16.read_state().info.step == 0
    with Client(start_server("--memory-only", "--memory-budget-mb", "13").address) as c:
        s = c.create_session("torch.adafactor", w)  # 4 MiB + 8 KiB of row and column vectors
        s.step(g)  # its staging set, 4 MiB + 8 KiB, and the gradient's 4 MiB fit
        assert s.read_state().info.step == 1


def _durable(c, optimizer, sid):
    s = c.create_session(optimizer, params(), session_id=sid, durability="every-step", lr=0.01)
    for i in range(4):
        s.step(grads(i))
    return s.read_state()


def test_snapshot_and_log_bring_the_slots_back_after_a_stop_and_a_kill_9(start_server, tmp_path):
    srv = start_server("--data-dir", str(tmp_path))
    with Client(srv.address) as c:
        before = {o: _durable(c, o, o.replace(".", "-")) for o in LAYOUT}
    srv.stop()  # a clean stop snapshots: the state comes back from the checksummed snapshot
    srv = start_server("--data-dir", str(tmp_path))
    with Client(srv.address) as c:
        for o, st in before.items():
            got = c.session(o.replace(".", "-")).read_state()
            assert got.info.step == 4
            same_bits(got.state, st.state)
            same_bits(got.parameters, st.parameters)
            s = c.session(o.replace(".", "-"), got.parameters)
            s.step(grads(9))  # logged
            before[o] = s.read_state()
    srv.kill()  # kill -9: the step after the snapshot comes back from the log, replayed bit for bit
    srv = start_server("--data-dir", str(tmp_path))
    with Client(srv.address) as c:
        for o, st in before.items():
            got = c.session(o.replace(".", "-")).read_state()
            assert got.info.step == 5
            same_bits(got.state, st.state)
            same_bits(got.parameters, st.parameters)


def test_export_and_import_carry_the_slots(start_server, tmp_path):
    srv = start_server("--memory-only")
    env = optreg_env()
    with Client(srv.address) as c:
        s = c.create_session("torch.adafactor", params(), session_id="fac", lr=0.01)
        s.step(grads(0))
        want = s.read_state()
        path = tmp_path / "fac.optreg"
        done = optreg("sessions", "export", "fac", str(path), "--address", srv.address, env=env)
        assert done.returncode == 0, done.stderr
        done = optreg("sessions", "import", str(path), "--session-id", "fac2", "--address", srv.address, env=env)
        assert done.returncode == 0, done.stderr
        got = c.session("fac2").read_state()
        same_bits(got.state, want.state)
        assert_layout("torch.adafactor", got.state)


@pytest.mark.parametrize("optimizer", sorted(LAYOUT) + ["torch.muon"])
def test_shared_memory_steps_like_unary(client, optimizer):
    init = {"W": params()["W"]} if optimizer == "torch.muon" else params()
    plain = client.create_session(optimizer, {k: v.copy() for k, v in init.items()})
    shared = client.create_session(optimizer, {k: v.copy() for k, v in init.items()})
    arrays = shared.enable_shared_memory()
    for i in range(3):
        g = {k: v for k, v in grads(i).items() if k in init}
        plain.step(g)
        shared.step(g)
    a, b = plain.read_state(), shared.read_state()
    same_bits(a.state, b.state)
    same_bits(a.parameters, b.parameters)
    for k in init:
        assert arrays[k].tobytes() == a.parameters[k].tobytes()
    plain.delete()
    shared.delete()


def test_workers_of_a_shared_adafactor_session_step_the_mean(server):
    with Client(server.address, timeout=30) as c:
        s = c.create_session("torch.adafactor", params(), workers=2, mode="sync", durability="none")
        alone = c.create_session("torch.adafactor", params(), durability="none")
        clients = [Client(server.address, timeout=30) for _ in range(2)]
        ws = [cl.join(s.id, f"w{i}") for i, cl in enumerate(clients)]
        for rnd in range(3):
            gs = [grads(10 * rnd + i) for i in range(2)]
            threads = [threading.Thread(target=w.step, args=(g,)) for w, g in zip(ws, gs)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            alone.step({k: (gs[0][k] + gs[1][k]) / np.float32(2) for k in gs[0]})
        a, b = s.read_state(), alone.read_state()
        assert a.info.step == 3
        np.testing.assert_allclose(a.parameters["W"], b.parameters["W"], rtol=1e-6)
        for slot in a.state:
            for n in a.state[slot]:
                np.testing.assert_allclose(a.state[slot][n], b.state[slot][n], rtol=1e-5)
        for cl in clients:
            cl.close()


def test_telemetry_of_a_whole_matrix_step(start_server):
    srv = start_server()
    with Client(srv.address) as c:
        s = c.create_session("torch.muon", {"W": params()["W"]}, session_id="mu", lr=0.02)
        for i in range(3):
            s.step({"W": grads(i)["W"]}, metrics={"loss": 1.0 / (i + 1)})
    with grpc.insecure_channel(srv.address) as channel:
        got = telemetry_pb2_grpc.TelemetryServiceStub(channel).GetTelemetry(
            telemetry_pb2.GetTelemetryRequest(session_id="mu"))
    assert [x.step for x in got.steps] == [1, 2, 3]
    (t,) = got.steps[-1].tensors
    assert t.name == "W" and t.grad_norm > 0 and t.update_norm > 0 and t.param_norm > 0
    assert got.steps[-1].hyperparameters["lr"] == 0.02
