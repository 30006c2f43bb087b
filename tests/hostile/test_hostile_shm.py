"""Issue 22, finding 4: no client can crash the server through shared memory.

A client that shrank its segment under the server and then stepped killed the server with SIGBUS
(every session gone). Each attacker here is a separate process; the server must survive, keep
serving another client's session, and answer the attacker as the contract says: a segment that
could shrink is refused FAILED_PRECONDITION, and the sealed memfd the Python client registers
cannot be shrunk at all, so its steps go on.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, SOURCE_ROOTS
from optreg.client import Client

# The exact probe: the Python client's segment, truncated (by name, and through its descriptor), then a step.
CLIENT_ATTACK = textwrap.dedent("""
    import json, os, sys, numpy as np
    from optreg.client import Client
    from optreg.client.errors import OptregError
    addr, resident, cut = sys.argv[1], sys.argv[2] == "1", sys.argv[3]
    s = Client(addr, timeout=20).create_session("sgd", {"w": np.ones(4096, np.float32)}, lr=0.5)
    s.enable_shared_memory(resident=resident)
    s.gradients["w"][...] = 1  # stepped from the segment: after the cut only the server reads it
    s.step(s.gradients)
    size = s._shm.size
    out = {"shrunk": []}
    for path in (f"/dev/shm/{s._shm.key}", f"/proc/self/fd/{getattr(s._shm, 'fd', -1)}"):
        try:
            os.truncate(path, 0 if cut == "zero" else size // 2)
            out["shrunk"].append(path)
        except OSError:
            pass
    try:
        s.step(s.gradients)
        out["step"] = "OK"
        out["w"] = float(s.read_parameters()["w"][0])
    except OptregError as e:
        out["step"] = e.code.name
    print(json.dumps(out), flush=True)
""")

# Raw clients with segments that can shrink: a /dev/shm file (by name, as before the fix, and handed over as
# a descriptor) and an unsealed memfd. Each is registered, truncated, then stepped through.
RAW_ATTACK = textwrap.dedent("""
    import json, mmap, os, sys, uuid, grpc
    from optreg.v1 import session_pb2, session_pb2_grpc, tensor_pb2
    addr, sid, cut = sys.argv[1], sys.argv[2], sys.argv[3]
    stub = session_pb2_grpc.SessionServiceStub(grpc.insecure_channel(addr))
    size, out = 8192, {}

    def devshm(key):
        fd = os.open(f"/dev/shm/{key}", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        return fd, f"/dev/shm/{key}"

    def unsealed(key):
        return os.memfd_create(key, os.MFD_ALLOW_SEALING), None

    for how, make, handed in [("devshm-name", devshm, False), ("devshm-fd", devshm, True),
                              ("unsealed-memfd", unsealed, True)]:
        key = f"optreg-hostile{uuid.uuid4().hex}"
        fd, path = make(key)
        os.ftruncate(fd, size)
        mm = mmap.mmap(fd, size)
        where = {"pid": os.getpid(), "fd": fd} if handed else {}
        codes = []
        try:
            call = stub.RegisterSharedMemory(session_pb2.RegisterSharedMemoryRequest(session_id=sid, key=key, **where))
            next(call)
            codes.append("OK")
        except grpc.RpcError as e:
            codes.append(e.code().name)
        os.ftruncate(fd, 0 if cut == "zero" else size // 2)
        w = session_pb2.SharedMemoryTensor(name="w", dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[2048], byte_offset=0)
        try:
            stub.StepSharedMemory(session_pb2.StepSharedMemoryRequest(session_id=sid, key=key, gradients=[w]),
                                  timeout=20)
            codes.append("OK")
        except grpc.RpcError as e:
            codes.append(e.code().name)
        out[how] = codes
        if path:
            os.unlink(path)
    print(json.dumps(out), flush=True)
""")


def _attack(server, script: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(SOURCE_ROOTS + [os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                          cwd=str(ROOT), timeout=120)
    assert server.proc.poll() is None, f"the server died (exit {server.proc.returncode})"
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _still_serving(server, client, bystander) -> None:
    assert server.proc.poll() is None, f"the server died (exit {server.proc.returncode})"
    before = bystander.step_count
    bystander.step({"w": np.ones(8, np.float32)})
    assert bystander.step_count == before + 1


@pytest.fixture
def bystander(client):
    s = client.create_session("sgd", {"w": np.zeros(8, np.float32)}, lr=1.0)
    yield s
    s.delete()


@pytest.mark.parametrize("resident", [False, True], ids=["plain", "resident"])
@pytest.mark.parametrize("cut", ["zero", "half"])
def test_client_segment_cannot_be_shrunk(server, client, bystander, resident, cut):
    out = _attack(server, CLIENT_ATTACK, server.address, "1" if resident else "0", cut)
    _still_serving(server, client, bystander)
    assert out["shrunk"] == []  # no name in /dev/shm, and the memfd is sealed: EPERM
    assert out["step"] == "OK" and out["w"] == 0.0  # 1 - 0.5 - 0.5: both steps applied in the segment


@pytest.mark.parametrize("cut", ["zero", "half"])
def test_shrinkable_segments_refused(server, client, bystander, cut):
    victim = Client(server.address).create_session("sgd", {"w": np.ones(2048, np.float32)}, lr=1.0)
    try:
        out = _attack(server, RAW_ATTACK, server.address, victim.id, cut)
        _still_serving(server, client, bystander)
        for how, codes in out.items():
            assert codes == ["FAILED_PRECONDITION", "FAILED_PRECONDITION"], how
        assert victim.step_count == 0
        victim.step({"w": np.ones(2048, np.float32)})  # the attacked session is served as before
        np.testing.assert_array_equal(victim.read_parameters()["w"], 0.0)
    finally:
        victim.delete()
