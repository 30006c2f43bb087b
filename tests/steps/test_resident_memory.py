"""Resident sessions: the master parameters live in the client's shared-memory segment (real servers).

Numbers equal plain steps bit for bit (in place and staged); a failed step leaves the segment, the
state and the step as they were; fencing; the registration's end copies the parameters back (the
client disabling it, or killed); durability through the log: the server killed, restarted on the
same data directory, the segment registered again and refilled from the recovered session.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
import uuid

import grpc
import numpy as np
import pytest

from cli_helpers import free_port
from conftest import ROOT, SOURCE_ROOTS
from disk_helpers import small_tmpfs
from optreg.client import Client
from optreg.client.errors import OptregError, UsageError
from optreg.v1 import session_pb2, session_pb2_grpc, tensor_pb2
from test_shared_memory import Segment, region, shm_exists, wait_gone

F32, F16 = tensor_pb2.DATA_TYPE_FLOAT32, tensor_pb2.DATA_TYPE_FLOAT16


def pair(client, optimizer, init, **kw):
    plain = client.create_session(optimizer, {k: v.copy() for k, v in init.items()}, **kw)
    res = client.create_session(optimizer, {k: v.copy() for k, v in init.items()}, **kw)
    return plain, res


@pytest.mark.parametrize("optimizer,master,shape", [
    ("adam", "float32", (300_001,)),  # built-in compiled kernel: in place, threaded
    ("momentum", "float64", (7, 5)),
    ("rmsprop", "float32", (3, 4, 5)),
    ("lion", "float32", (1000,)),  # a third party's update: staged, then copied over
    ("torch.adam", "float32", (64,)),
])
def test_numbers_equal_plain_steps(client, optimizer, master, shape):
    rng = np.random.default_rng(1)
    dt = np.dtype(master)
    init = {"w": rng.standard_normal(shape).astype(dt), "b": rng.standard_normal(3).astype(dt)}
    plain, res = pair(client, optimizer, init)
    arrays = res.enable_shared_memory(resident=True)
    assert np.array_equal(arrays["w"], init["w"])  # the server filled the segment
    for i in range(4):
        g = {k: (rng.standard_normal(v.shape) * 0.1).astype(dt) for k, v in init.items()}
        if i == 2:  # the step's own change applies from that step on
            plain.set_hyperparameters(lr=0.01)
        plain.step(g)
        res.gradients["w"][...] = g["w"]
        res.step({"w": res.gradients["w"], "b": g["b"]}, hyperparameters={"lr": 0.01} if i == 2 else None)
    for k in init:
        assert np.array_equal(arrays[k], plain.arrays[k]), k
    _, p_state, slots = res.read_state()
    _, q_state, q_slots = plain.read_state()
    for k in init:
        assert np.array_equal(p_state[k], arrays[k])
        for slot in slots:
            assert np.array_equal(slots[slot][k], q_slots[slot][k])
    assert res.step_count == plain.step_count == 4
    res.disable_shared_memory()  # parameters back in the server's memory: steps over gRPC go on
    g = {k: np.full(v.shape, 0.5, dt) for k, v in init.items()}
    plain.step(g)
    res.step(g)
    for k in init:
        assert np.array_equal(res.arrays[k], plain.arrays[k])
    plain.delete()
    res.delete()


def test_fp16_gradients_in_place(server, client):
    rng = np.random.default_rng(2)
    init = {"w": rng.standard_normal(70_000).astype(np.float32)}
    plain, res = pair(client, "adam", init)
    with grpc.insecure_channel(server.address) as ch:
        stub = session_pb2_grpc.SessionServiceStub(ch)
        seg = Segment(stub, res.id, 70_000 * 4 + 70_000 * 2, resident=True, places=[region("w", [70_000], 0)])
        try:
            g = (rng.standard_normal(70_000) * 0.1).astype(np.float16)
            seg.array(280_000, np.float16, (70_000,))[...] = g
            req = session_pb2.StepSharedMemoryRequest(session_id=res.id, step=0, key=seg.key,
                                                      gradients=[region("w", [70_000], 280_000, F16)])
            assert stub.StepSharedMemory(req).step == 1
            plain.step({"w": g})
            assert np.array_equal(seg.array(0, np.float32, (70_000,)), plain.arrays["w"])
            again = stub.StepSharedMemory(req)  # a retry: answered, not applied again
            assert (again.step, again.replayed) == (1, True)
            assert np.array_equal(seg.array(0, np.float32, (70_000,)), plain.arrays["w"])
            with pytest.raises(grpc.RpcError) as e:  # a gradient in the parameters' bytes: refused
                stub.StepSharedMemory(session_pb2.StepSharedMemoryRequest(
                    session_id=res.id, step=1, key=seg.key, gradients=[region("w", [70_000], 0)]))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "overlap" in e.value.details()
            assert np.array_equal(seg.array(0, np.float32, (70_000,)), plain.arrays["w"])
            with pytest.raises(grpc.RpcError) as e:  # a parameters list has no place in a resident step
                stub.StepSharedMemory(session_pb2.StepSharedMemoryRequest(
                    session_id=res.id, step=1, key=seg.key, gradients=[region("w", [70_000], 280_000, F16)],
                    parameters=[region("w", [70_000], 0)]))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "resident" in e.value.details()
        finally:
            seg.close()
    plain.delete()
    res.delete()


def test_failed_step_leaves_everything(client):
    """A NaN in the last element of the last gradient: refused before anything is touched."""
    rng = np.random.default_rng(3)
    init = {"a": rng.standard_normal(200_000).astype(np.float32), "b": rng.standard_normal(50).astype(np.float32)}
    s = client.create_session("adam", {k: v.copy() for k, v in init.items()})
    arrays = s.enable_shared_memory(resident=True)
    s.step({k: np.full(v.shape, 0.1, np.float32) for k, v in init.items()})
    before = {k: a.copy() for k, a in arrays.items()}
    _, _, state_before = s.read_state()
    bad = {"a": np.full(200_000, 0.2, np.float32), "b": np.full(50, 0.2, np.float32)}
    bad["b"][-1] = np.nan
    with pytest.raises(OptregError) as e:
        s.step(bad)
    assert "NaN" in str(e.value)
    for k in init:
        assert np.array_equal(arrays[k], before[k])
    info, _, state_after = s.read_state()
    assert info.step == 1
    for slot in state_before:
        for k in init:
            assert np.array_equal(state_after[slot][k], state_before[slot][k])
    # an unknown hyperparameter value is refused before anything is touched as well
    with pytest.raises(OptregError):
        s.step({k: np.full(v.shape, 0.1, np.float32) for k, v in init.items()}, hyperparameters={"lr": -1.0})
    assert all(np.array_equal(arrays[k], before[k]) for k in init)
    s.delete()


@pytest.mark.parametrize("resident", [False, True])
def test_wrong_shape_gradient_refused(client, resident):
    """A gradient whose shape differs is refused as over gRPC, never broadcast into the segment's buffer
    ((1,), () and (1, n) used to be accepted and stepped with; (n-1,) gave numpy's ValueError)."""
    init = np.linspace(-1, 1, 1000, dtype=np.float32)
    s = client.create_session("adam", {"w": init.copy()})
    arrays = s.enable_shared_memory(resident=resident)
    s.step({"w": np.full(1000, 0.1, np.float32)})
    before, grad_before = arrays["w"].copy(), s.gradients["w"].copy()
    for g in (np.ones(999, np.float32), np.ones(1, np.float32), np.float32(1.0), np.ones((1, 1000), np.float32)):
        with pytest.raises(UsageError, match=r"gradient 'w': shape .* but the session's is \[1000\]"):
            s.step({"w": g})
    assert s.step_count == 1 and client.get_session(s.id).step == 1
    assert np.array_equal(arrays["w"], before) and np.array_equal(s.gradients["w"], grad_before)
    s.step({"w": np.full(1000, 0.1, np.float32)})  # still serving
    assert s.step_count == 2
    s.delete()


@pytest.mark.parametrize("resident", [False, True])
def test_gradient_dtype_as_over_grpc(client, resident):
    """The segment takes what Step takes: the master dtype or a narrower float. A float64 gradient for a
    float32 session (rounded) or an int32 one used to be cast into the segment and stepped with."""
    s = client.create_session("adam", {"w": np.linspace(-1, 1, 1000, dtype=np.float32)})
    arrays = s.enable_shared_memory(resident=resident)
    before = arrays["w"].copy()
    for dt in (np.float64, np.int32, np.complex64):
        with pytest.raises(UsageError, match=r"gradient 'w': dtype .* not accepted here; send float32"):
            s.step({"w": np.ones(1000, dt)})
    assert s.step_count == 0 and np.array_equal(arrays["w"], before)
    s.step({"w": np.full(1000, 0.5, np.float16)})  # narrower: accepted, as over gRPC
    assert s.step_count == 1
    s.delete()


def test_steps_over_grpc_refused_while_resident(client):
    s = client.create_session("sgd", {"w": np.ones(10, np.float32)})
    s.enable_shared_memory(resident=True)
    with pytest.raises(OptregError) as e:  # the same session object, over the plain path
        s.client.session(s.id).step({"w": np.ones(10, np.float32)})
    assert "StepSharedMemory" in str(e.value)
    s.delete()


def test_bad_resident_registrations(server, client):
    s = client.create_session("adam", {"w": np.ones(100, np.float32), "b": np.ones(4, np.float32)})
    with grpc.insecure_channel(server.address) as ch:
        stub = session_pb2_grpc.SessionServiceStub(ch)
        cases = [
            ([region("w", [100], 0)], "every parameter"),  # b missing
            ([region("w", [100], 0), region("b", [4], 64)], "overlap"),
            ([region("w", [100], 0), region("b", [4], 4088)], "outside"),
            ([region("w", [100], 0), region("b", [4], 402)], "multiple"),
            ([region("w", [100], 0), region("b", [4], 512, tensor_pb2.DATA_TYPE_FLOAT64)], "master dtype"),
        ]
        for places, words in cases:
            key = f"optreg-test{uuid.uuid4().hex}"
            with pytest.raises(grpc.RpcError) as e:
                Segment(stub, s.id, 4096, resident=True, places=places, key=key)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, words
            assert words in e.value.details(), (words, e.value.details())
            assert wait_gone(key)  # refused after it was registered: unmapped by the server
        key = f"optreg-test{uuid.uuid4().hex}"
        with pytest.raises(grpc.RpcError) as e:  # parameters without resident
            Segment(stub, s.id, 4096, places=[region("w", [100], 0)], key=key)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    # the session was never touched
    assert np.array_equal(s.read_parameters()["w"], np.ones(100, np.float32))
    s.delete()


CHILD = textwrap.dedent("""
    import sys, time, numpy as np
    from optreg.client import Client
    c = Client(sys.argv[1])
    s = c.create_session("adam", {"w": np.ones(1000, np.float32)}, session_id=sys.argv[2])
    s.enable_shared_memory(resident=True)
    s.step({"w": np.full(1000, 0.5, np.float32)})
    np.save(sys.argv[3], s.arrays["w"])
    print(s._shm.key, flush=True)
    time.sleep(600)
""")


def test_client_killed_parameters_kept(server, client, tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(SOURCE_ROOTS + [os.environ.get("PYTHONPATH", "")]))
    sid = f"resident-killed-{uuid.uuid4().hex[:8]}"
    saved = tmp_path / "w.npy"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, server.address, sid, str(saved)],
                            stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    try:
        key = proc.stdout.readline().strip()
        assert key.startswith("optreg-") and shm_exists(key)
        proc.kill()
        proc.wait()
        assert shm_exists(key)  # the server's mapping is the parameters' home now (nothing else holds it)
    finally:
        if proc.poll() is None:
            proc.kill()
    s = client.session(sid)  # it steps over gRPC as before
    assert s.step_count == 1
    assert np.array_equal(s.read_parameters()["w"], np.load(saved))
    s.step({"w": np.ones(1000, np.float32)})
    s.delete()


CHILD_OUTLIVES_SERVER = textwrap.dedent("""
    import sys, numpy as np
    from optreg.client import Client
    c = Client(sys.argv[1])
    s = c.create_session("adam", {"w": np.ones(1000, np.float32)}, durability="log")
    s.enable_shared_memory(resident=True)
    s.step({"w": np.full(1000, 0.5, np.float32)})
    print(s._shm.key, flush=True)
    sys.stdin.readline()  # the server is killed meanwhile; then this process ends normally
""")


def test_client_exit_after_server_killed_frees(start_server, tmp_path):
    """The server killed first: the client keeps its segment (for register_again); a client that then ends
    without re-registering leaves nothing behind (a /dev/shm segment used to stay with all the parameters)."""
    srv = start_server("--data-dir", str(tmp_path / "data"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(SOURCE_ROOTS + [os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", CHILD_OUTLIVES_SERVER, srv.address], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
    key = None
    try:
        key = proc.stdout.readline().strip()
        assert key.startswith("optreg-") and shm_exists(key)
        srv.kill()
        assert shm_exists(key)  # the client could still register it again
        proc.communicate("\n", timeout=60)
        assert proc.returncode == 0
        assert not shm_exists(key), f"segment {key} leaked"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_recovered_after_server_restart(start_server, tmp_path, how):
    """kill -9 with resident steps in the log: a restart replays them; the client registers the same segment
    again and finds it refilled from the recovered session; steps go on equal to an uninterrupted run.
    A clean stop writes the session from the segment (the server keeps its mapping, no copy) and unmaps it:
    the client registers the same segment again, refilled the same way."""
    port = free_port()
    env = {"OPTREG_DATA_DIR": str(tmp_path / "data")}
    srv = start_server("--port", str(port), env=env)
    rng = np.random.default_rng(4)
    init = {"w": rng.standard_normal(40_000).astype(np.float32)}
    grads = [{"w": (rng.standard_normal(40_000) * 0.1).astype(np.float32)} for _ in range(6)]
    with Client(srv.address, timeout=60) as c:
        ref = c.create_session("adam", {k: v.copy() for k, v in init.items()}, durability="none")
        for g in grads:
            ref.step(g)
        want3, want6 = None, ref.read_parameters()["w"]
        ref.delete()
    c = Client(f"127.0.0.1:{port}", timeout=60)
    key = s = None
    try:
        s = c.create_session("adam", {k: v.copy() for k, v in init.items()}, durability="log")
        arrays = s.enable_shared_memory(resident=True)
        for g in grads[:3]:
            s.step(g)
        want3 = arrays["w"].copy()
        key = s._shm.key
        if how == "kill":
            srv.kill()
            arrays["w"][...] = 0  # what a crash could leave in the segment: the log must win
        else:
            assert srv.stop() == 0
            assert not shm_exists(key)
        srv = start_server("--port", str(port), env=env)
        again = s.enable_shared_memory(resident=True)
        assert s._shm.key == key and again["w"] is arrays["w"]  # the same segment, the client's same arrays
        assert np.array_equal(arrays["w"], want3) and s.step_count == 3
        for g in grads[3:]:
            s.step(g)
        assert np.array_equal(arrays["w"], want6)
        s.delete()
    finally:
        c.close()


def test_disk_full_leaves_segment(start_server):
    """A log write that fails (the disk full) refuses the step: the segment's parameters are as before.
    (The log on the disk: no memory log, whose records the disk takes later; test_memory_log.py.)"""
    with small_tmpfs("3m") as mnt:
        srv = start_server("--data-dir", str(mnt / "data"), "--memory-log-dir", "")
        with Client(srv.address, timeout=60) as c:
            s = c.create_session("adam", {"w": np.linspace(-1, 1, 100_000).astype(np.float32)}, durability="log")
            arrays = s.enable_shared_memory(resident=True)
            filler = pathlib.Path(mnt) / "filler"
            with open(filler, "wb") as f:  # fill what is left
                try:
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                except OSError:
                    pass
            before = arrays["w"].copy()
            with pytest.raises(OptregError) as e:
                s.step({"w": np.full(100_000, 0.3, np.float32)})
            assert "disk is full" in str(e.value) or "could not be written" in str(e.value)
            assert np.array_equal(arrays["w"], before) and s.refresh().step == 0
            filler.unlink()
            s.step({"w": np.full(100_000, 0.3, np.float32)})  # space again: the step goes through
            assert s.step_count == 1 and not np.array_equal(arrays["w"], before)
            s.delete()


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_rows_owed_by_sparse_steps_are_brought_current_in_the_segment(client, optimizer):
    """Sparse steps leave untouched rows owing steps (lazy); a resident registration then fills the
    segment with every row current, and the session steps on equal to one that stayed plain."""
    rng = np.random.default_rng(5)
    init = {"emb": rng.standard_normal((6, 3))}
    plain, res = pair(client, optimizer, init)
    for rows in ([0, 1], [1, 4], [2]):
        values = rng.standard_normal((len(rows), 3))
        for s in (plain, res):
            s.step_sparse("emb", np.array(rows, np.int64), values.copy())
    arrays = res.enable_shared_memory(resident=True)
    assert np.array_equal(arrays["emb"], plain.read_parameters()["emb"])
    for _ in range(3):
        g = rng.standard_normal((6, 3))
        plain.step({"emb": g})
        res.gradients["emb"][...] = g
        res.step({"emb": res.gradients["emb"]})
    assert np.array_equal(arrays["emb"], plain.read_parameters()["emb"])


def test_statistics_and_refusals_of_large_resident_steps(server, client):
    """A resident step takes max |g| from its finite check (split over threads) and the rest from the
    update: the reported figures equal a numpy recomputation; a NaN or Inf in the second thread's share
    of a large gradient is refused with nothing touched."""
    from optreg.server.kernels.stats import reference_stats as numpy_stats
    from optreg.v1 import telemetry_pb2, telemetry_pb2_grpc
    rng = np.random.default_rng(13)
    n = (1 << 21) + 5  # above resident.PARALLEL_FINITE: the check is split
    s = client.create_session("adam", {"w": rng.standard_normal(n).astype(np.float32)})
    arrays = s.enable_shared_memory(resident=True)
    expected = []
    for _ in range(2):
        before = arrays["w"].copy()
        s.gradients["w"][...] = (rng.standard_normal(n) * 0.1).astype(np.float32)
        s.step({"w": s.gradients["w"]})
        expected.append(numpy_stats(s.gradients["w"], before, arrays["w"]))
    before = arrays["w"].copy()
    for bad in (np.nan, np.inf):
        s.gradients["w"][n - 3] = bad
        with pytest.raises(OptregError, match="1 NaN or Inf"):
            s.step({"w": s.gradients["w"]})
        assert np.array_equal(arrays["w"], before)
    with grpc.insecure_channel(server.address) as ch:
        got = telemetry_pb2_grpc.TelemetryServiceStub(ch).GetTelemetry(
            telemetry_pb2.GetTelemetryRequest(session_id=s.id))
    steps = [st for st in got.steps if st.tensors]
    assert [st.step for st in steps] == [1, 2]
    for e, st in zip(expected, steps):
        (t,) = st.tensors
        np.testing.assert_allclose([t.grad_norm ** 2, t.param_norm ** 2, t.update_norm ** 2], e[:3], rtol=4e-5)
        assert t.grad_max_abs == e[3]
    s.delete()
