"""Same-host shared-memory steps against a real server: numbers, fencing, validation, life cycle."""
from __future__ import annotations

import fcntl
import mmap
import os
import subprocess
import sys
import textwrap
import time
import uuid

import grpc
import ml_dtypes
import numpy as np
import pytest

from conftest import ROOT, SOURCE_ROOTS
from optreg.client import Client
from optreg.client.errors import OptregError
from optreg.v1 import session_pb2, session_pb2_grpc, tensor_pb2

F32, F16, BF16 = tensor_pb2.DATA_TYPE_FLOAT32, tensor_pb2.DATA_TYPE_FLOAT16, tensor_pb2.DATA_TYPE_BFLOAT16


def shm_exists(key: str) -> bool:
    """Whether a process other than this one (the server, a child client) still maps the memfd named `key`."""
    mark = f"/memfd:{key} "
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                if mark in f.read():
                    return True
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return False


def wait_gone(key: str, seconds: float = 30.0) -> bool:
    """Polls until no other process maps the segment (a bounded wait, not a timing assertion)."""
    end = time.monotonic() + seconds
    while shm_exists(key):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def sealed_memfd(key: str, size: int) -> int:
    """What a client registers: a memfd named `key` that can never shrink (nor grow)."""
    fd = os.memfd_create(key, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    return fd


class Segment:
    """A sealed memfd made by hand, registered with the raw stub (what a non-Python client does)."""

    def __init__(self, stub, session_id: str, size: int, resident: bool = False, places=(), key: str = ""):
        """`resident`, `places`: a resident registration with the parameters at those regions; `self.ack`
        is the server's answer (the constructor raises grpc.RpcError when it refuses)."""
        self.key = key or f"optreg-test{uuid.uuid4().hex}"
        self.fd = sealed_memfd(self.key, size)
        self.mm = mmap.mmap(self.fd, size)
        try:
            self.call = stub.RegisterSharedMemory(session_pb2.RegisterSharedMemoryRequest(
                session_id=session_id, key=self.key, resident=resident, parameters=places, pid=os.getpid(),
                fd=self.fd))
            self.ack = next(self.call)
        except BaseException:
            os.close(self.fd)
            raise
        assert self.ack.byte_size == size

    def array(self, offset, dtype, shape):
        return np.frombuffer(self.mm, dtype, int(np.prod(shape)), offset).reshape(shape)

    def close(self):
        self.call.cancel()
        os.close(self.fd)


def region(name, shape, offset, dtype=F32):
    return session_pb2.SharedMemoryTensor(name=name, dtype=dtype, shape=shape, byte_offset=offset)


@pytest.mark.parametrize("optimizer,master,reply,shape", [
    ("adam", "float32", "parameters", (30, 7)),
    ("momentum", "float64", "delta", (5,)),
    ("rmsprop", "float32", "none", (300_001,)),  # above the kernels' parallel threshold: sliced copy path
    ("adagrad", "float32", "parameters", (3, 4, 5)),
])
def test_numbers_equal_step(client, optimizer, master, reply, shape):
    rng = np.random.default_rng(0)
    dt = np.dtype(master)
    init = {"w": rng.standard_normal(shape).astype(dt), "b": rng.standard_normal(3).astype(dt)}
    plain = client.create_session(optimizer, {k: v.copy() for k, v in init.items()}, step_reply=reply)
    shared = client.create_session(optimizer, {k: v.copy() for k, v in init.items()}, step_reply=reply)
    arrays = shared.enable_shared_memory()
    assert arrays is shared.arrays and np.array_equal(arrays["w"], init["w"])
    for i in range(4):
        g = {k: (rng.standard_normal(v.shape) * 0.1).astype(dt) for k, v in init.items()}
        plain.step(g)
        if i % 2:  # gradients written straight into the segment, or copied there by step()
            shared.gradients["w"][...] = g["w"]
            shared.step({"w": shared.gradients["w"], "b": g["b"]})
        else:
            shared.step(g)
    server_params = shared.read_parameters()
    want = plain.read_parameters()
    for k in init:
        assert np.array_equal(arrays[k], server_params[k])
        assert np.array_equal(arrays[k], want[k])
    assert shared.step_count == plain.step_count == 4
    key = shared._shm.key
    shared.delete()
    assert wait_gone(key)  # delete unmaps


def test_narrow_gradients_and_replay(server, client):
    s = client.create_session("adam", {"w": np.arange(6, dtype=np.float32)})
    ref = client.create_session("adam", {"w": np.arange(6, dtype=np.float32)})
    g = np.linspace(-1, 1, 6)
    with grpc.insecure_channel(server.address) as ch:
        stub = session_pb2_grpc.SessionServiceStub(ch)
        seg = Segment(stub, s.id, 4096)
        try:
            params = seg.array(0, np.float32, (6,))
            seg.array(1024, np.float16, (6,))[...] = g
            seg.array(2048, ml_dtypes.bfloat16, (6,))[...] = g
            for step, (off, code, dt) in enumerate([(1024, F16, np.float16), (2048, BF16, ml_dtypes.bfloat16)]):
                req = session_pb2.StepSharedMemoryRequest(
                    session_id=s.id, step=step, key=seg.key, gradients=[region("w", [6], off, code)],
                    parameters=[region("w", [6], 0, tensor_pb2.DATA_TYPE_UNSPECIFIED)])
                first = stub.StepSharedMemory(req)
                ref.step({"w": g.astype(dt)})
                assert (first.step, first.replayed) == (step + 1, False)
                assert np.array_equal(params, ref.arrays["w"])
                params[...] = -99  # the reply was "lost" and the client's copy garbled: a retry rewrites it
                again = stub.StepSharedMemory(req)
                assert (again.step, again.replayed) == (step + 1, True)
                assert np.array_equal(params, ref.arrays["w"])  # not applied twice
            assert s.refresh().step == 2
            with pytest.raises(grpc.RpcError) as e:  # a gap is refused as for Step
                stub.StepSharedMemory(session_pb2.StepSharedMemoryRequest(
                    session_id=s.id, step=5, key=seg.key, gradients=[region("w", [6], 1024, F16)]))
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        finally:
            seg.close()


def test_bad_regions_refused_session_untouched(server, client):
    s = client.create_session("adam", {"w": np.ones((4, 4), np.float32), "b": np.ones(2, np.float32)})
    s.step({"w": np.full((4, 4), 0.5, np.float32), "b": np.ones(2, np.float32)})
    before = s.read_state()
    with grpc.insecure_channel(server.address) as ch:
        stub = session_pb2_grpc.SessionServiceStub(ch)
        seg = Segment(stub, s.id, 1024)
        try:
            seg.array(0, np.float32, (1024 // 4,))[...] = 0.25
            params_out = seg.array(512, np.float32, (16,))
            params_out[...] = 7.0
            good_w, good_b = region("w", [4, 4], 0), region("b", [2], 64)
            nan_seg_b = region("b", [2], 128)
            seg.array(128, np.float32, (2,))[...] = [1.0, np.nan]
            bad = {
                "past the end": [region("w", [4, 4], 1024 - 32), good_b],
                "negative offset": [region("w", [4, 4], -4), good_b],
                "misaligned": [region("w", [4, 4], 2), good_b],
                "wrong shape": [region("w", [16], 0), good_b],
                "wrong dtype": [region("w", [4, 4], 0, tensor_pb2.DATA_TYPE_FLOAT64), good_b],
                "unknown name": [good_w, good_b, region("x", [2], 0)],
                "twice": [good_w, good_b, good_b],
                "missing": [good_w],
                "NaN": [good_w, nan_seg_b],
            }
            for what, grads in bad.items():
                with pytest.raises(grpc.RpcError) as e:
                    stub.StepSharedMemory(session_pb2.StepSharedMemoryRequest(
                        session_id=s.id, step=1, key=seg.key, gradients=grads,
                        parameters=[region("w", [4, 4], 512)]))
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
            for what, out in {"output past the end": [region("w", [4, 4], 1000)],
                              "output narrower dtype": [region("w", [4, 4], 512, F16)]}.items():
                with pytest.raises(grpc.RpcError) as e:
                    stub.StepSharedMemory(session_pb2.StepSharedMemoryRequest(
                        session_id=s.id, step=1, key=seg.key, gradients=[good_w, good_b], parameters=out))
                assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
            with pytest.raises(grpc.RpcError) as e:  # a key not registered for this session
                stub.StepSharedMemory(session_pb2.StepSharedMemoryRequest(
                    session_id=s.id, step=1, key="optreg-notregistered", gradients=[good_w, good_b]))
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert np.all(params_out == 7.0)  # nothing written into the segment either
        finally:
            seg.close()
    after = s.read_state()
    assert after[0].step == before[0].step == 1
    for k in before[1]:
        assert np.array_equal(after[1][k], before[1][k])
    for slot in before[2]:
        for k in before[2][slot]:
            assert np.array_equal(after[2][slot][k], before[2][slot][k])


def test_bad_keys_refused(server, client):
    s = client.create_session("sgd", {"w": np.ones(2)})
    with grpc.insecure_channel(server.address) as ch:
        stub = session_pb2_grpc.SessionServiceStub(ch)
        for key, code in [("../etc/passwd", grpc.StatusCode.INVALID_ARGUMENT),
                          ("optreg-../../x", grpc.StatusCode.INVALID_ARGUMENT),
                          ("other-segment1234", grpc.StatusCode.INVALID_ARGUMENT),
                          (f"optreg-missing{uuid.uuid4().hex}", grpc.StatusCode.NOT_FOUND)]:
            with pytest.raises(grpc.RpcError) as e:  # descriptor 999999: none
                next(stub.RegisterSharedMemory(session_pb2.RegisterSharedMemoryRequest(
                    session_id=s.id, key=key, pid=os.getpid(), fd=999999)))
            assert e.value.code() == code, key
        with pytest.raises(grpc.RpcError) as e:
            next(stub.RegisterSharedMemory(session_pb2.RegisterSharedMemoryRequest(session_id="nope", key="x")))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_disable_and_unregister_release(client):
    s = client.create_session("sgd", {"w": np.ones(3, np.float32)}, lr=1.0)
    s.enable_shared_memory()
    key = s._shm.key
    s.step({"w": np.ones(3, np.float32)})
    s.disable_shared_memory()
    assert wait_gone(key)
    s.step({"w": np.ones(3, np.float32)})  # over gRPC again
    np.testing.assert_array_equal(s.arrays["w"], [-1, -1, -1])
    # enabling again makes a fresh segment; cancelling the registration call releases it too
    s.enable_shared_memory()
    key2 = s._shm.key
    assert key2 != key and shm_exists(key2)
    s._shm.call.cancel()
    assert wait_gone(key2)
    with pytest.raises(OptregError) as e:
        s.step({"w": np.ones(3, np.float32)})
    assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
    s.delete()


CHILD = textwrap.dedent("""
    import sys, time, numpy as np
    from optreg.client import Client
    c = Client(sys.argv[1])
    s = c.create_session("adam", {"w": np.ones(1000, np.float32)}, session_id=sys.argv[2])
    s.enable_shared_memory()
    s.step({"w": np.ones(1000, np.float32)})
    print(s._shm.key, flush=True)
    time.sleep(600)
""")


def test_client_killed_leaks_nothing(server, client):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(SOURCE_ROOTS + [os.environ.get("PYTHONPATH", "")]))
    sid = f"killed-{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen([sys.executable, "-c", CHILD, server.address, sid], stdout=subprocess.PIPE,
                            text=True, env=env, cwd=str(ROOT))
    try:
        key = proc.stdout.readline().strip()
        assert key.startswith("optreg-") and shm_exists(key)
        proc.kill()  # SIGKILL: no atexit, no finally, no resource tracker of ours
        proc.wait()
        assert wait_gone(key), f"segment {key} leaked"
    finally:
        if proc.poll() is None:
            proc.kill()
    # the session itself stays (its owner may come back); it steps over gRPC as before
    s = client.session(sid)
    assert s.step_count == 1
    s.step({"w": np.ones(1000, np.float32)})
    s.delete()


def test_only_owner(start_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice-token\nbob-token\n")
    srv = start_server("--token-file", str(tokens))
    with Client(srv.address, token="alice-token") as alice, Client(srv.address, token="bob-token") as bob:
        a = alice.create_session("sgd", {"w": np.ones(3, np.float32)})
        a.enable_shared_memory()
        with pytest.raises(OptregError) as e:
            bob.session(a.id)
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
        bob_rpc = bob.transport  # the raw RPCs, as another program holding bob's token would send them
        with pytest.raises(OptregError) as e:
            next(bob_rpc.stream_out("RegisterSharedMemory", session_pb2.RegisterSharedMemoryRequest(
                session_id=a.id, key=a._shm.key), timeout=10))
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(OptregError) as e:
            bob_rpc.unary("StepSharedMemory", session_pb2.StepSharedMemoryRequest(
                session_id=a.id, key=a._shm.key, gradients=[region("w", [3], 64)]), timeout=10)
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
        b = bob.create_session("sgd", {"w": np.ones(3, np.float32)})
        with pytest.raises(OptregError) as e:  # alice's segment is not registered for bob's session
            bob_rpc.unary("StepSharedMemory", session_pb2.StepSharedMemoryRequest(
                session_id=b.id, key=a._shm.key, gradients=[region("w", [3], 64)]), timeout=10)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION
        a.step({"w": np.ones(3, np.float32)})
        np.testing.assert_allclose(a.arrays["w"], 0.99)
        key = a._shm.key
        a.delete()
        assert wait_gone(key)
