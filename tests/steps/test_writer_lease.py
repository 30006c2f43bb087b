"""One writer per single-writer session (issue 27, item 1): a second process stepping the same session
is refused at once, naming the first; a crashed writer's lease passes at once on this host; a
deliberate take-over works. Each writer is a real separate process (the lease names processes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import grpc
import numpy as np
import pytest

from conftest import SOURCE_ROOTS
from optreg.client import Client
from optreg.server.steps import writers
from optreg.v1 import session_pb2, session_pb2_grpc, tensors

# A writer process: attach (creating the session if needed), then obey one command a line on stdin:
# "step" -> one step, its outcome printed as JSON; "exit" -> leave without closing anything.
WRITER = textwrap.dedent("""
    import json, sys
    import numpy as np
    from optreg.client import Client, OptregError
    address, sid, take_over = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    client = Client(address)
    params = {"w": np.zeros(4)}
    session = client.create_session("sgd", params, session_id=sid, resume=True, take_over=take_over, lr=0.1)
    print(json.dumps({"attached": session.step_count}), flush=True)
    for line in sys.stdin:
        if line.strip() == "exit":
            break
        try:
            r = session.step({"w": np.ones(4)})
            print(json.dumps({"step": r.step}), flush=True)
        except OptregError as e:
            print(json.dumps({"error": type(e).__name__, "code": e.code.name if e.code else None,
                              "details": e.details, "holder": getattr(e, "holder", None)}), flush=True)
""")


class Writer:
    def __init__(self, address: str, sid: str, take_over: bool = False):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(SOURCE_ROOTS))
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER, address, sid, "1" if take_over else "0"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.attached = self._read()["attached"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "the writer process died"
        return json.loads(line)

    def step(self) -> dict:
        self.proc.stdin.write("step\n")
        self.proc.stdin.flush()
        return self._read()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("exit\n")
            self.proc.stdin.close()
            self.proc.wait(30)


@pytest.fixture(scope="module")
def server():
    from conftest import ServerProcess
    s = ServerProcess()
    yield s
    s.stop()


def test_second_process_is_refused_at_once_naming_the_first(server):
    a = Writer(server.address, "twice")
    try:
        assert [a.step()["step"] for _ in range(3)] == [1, 2, 3]
        b = Writer(server.address, "twice")  # the same script started again: resume attaches
        try:
            got = b.step()
            assert got["error"] == "WriterConflict" and got["code"] == "FAILED_PRECONDITION"
            assert f"pid {a.proc.pid}" in got["details"] and "take_over=True" in got["details"]
            assert f"pid={a.proc.pid}" in got["holder"]
            assert a.step()["step"] == 4  # the first run goes on, unharmed
            with Client(server.address) as c:
                info, params, _ = c.session("twice", {}).read_state()
            assert info.step == 4
            np.testing.assert_allclose(params["w"], -0.4 * np.ones(4))  # four steps of lr 0.1, not five
        finally:
            b.close()
    finally:
        a.close()


def test_a_crashed_writer_on_this_host_passes_the_lease_at_once(server):
    a = Writer(server.address, "crash")
    assert a.step()["step"] == 1
    a.kill()  # kill -9: it releases nothing
    b = Writer(server.address, "crash")
    try:
        assert b.attached == 1
        assert b.step()["step"] == 2
    finally:
        b.close()


def test_take_over_on_purpose(server):
    a = Writer(server.address, "handover")
    try:
        assert a.step()["step"] == 1
        b = Writer(server.address, "handover", take_over=True)
        try:
            assert b.step()["step"] == 2
            got = a.step()  # the old writer is now the one refused
            assert got["error"] == "WriterConflict" and f"pid {b.proc.pid}" in got["details"]
            assert b.step()["step"] == 3
        finally:
            b.close()
    finally:
        a.close()


def test_calls_naming_no_writer_are_not_fenced_by_the_lease_and_a_bad_header_is_refused(server):
    a = Writer(server.address, "raw")
    try:
        assert a.step()["step"] == 1
        with grpc.insecure_channel(server.address) as ch:
            stub = session_pb2_grpc.SessionServiceStub(ch)
            req = session_pb2.StepRequest(session_id="raw", step=1,
                                          gradients=[tensors.from_numpy("w", np.ones(4))])
            assert stub.Step(req, timeout=30).step == 2  # no header: a raw gRPC client, as before
            with pytest.raises(grpc.RpcError) as e:
                stub.Step(req, timeout=30, metadata=(("optreg-writer", "x" * 600),))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "optreg-writer" in e.value.details()
            assert stub.GetSession(session_pb2.GetSessionRequest(session_id="raw"), timeout=30).session.step == 2
        got = a.step()  # fenced at 1 while the raw client moved the session on: a step mismatch, not the lease
        assert got["error"] == "StepMismatch"
    finally:
        a.close()


class _Session:
    id = "s"
    writer = None


def test_a_quiet_remote_writer_lapses_after_the_lease():
    s = _Session()
    far = writers.Writer("host=elsewhere pid=1 ns=1 id=a", "ipv4:192.0.2.1:5")
    writers.claim(s, far)
    other = writers.Writer("host=elsewhere pid=2 ns=1 id=b", "ipv4:192.0.2.2:5")
    with pytest.raises(writers.FailedPrecondition, match="another writer"):
        writers.claim(s, other)
    s.writer.seen = time.monotonic() - writers.LEASE_SECONDS - 1  # quiet for longer than the lease
    writers.claim(s, other)
    assert s.writer is other


def test_the_lease_checks_a_pid_only_on_this_host_in_this_pid_namespace_over_loopback():
    me = f"host={writers._HOST} pid={1 << 21} ns={writers._NAMESPACE} id=x"
    for peer in ("ipv4:127.0.0.1:5", "ipv6:%5B::1%5D:5", "ipv6:%5B::ffff:127.0.0.1%5D:5", "unix:/tmp/s"):
        assert writers.from_call((("optreg-writer", me),), peer)[0].local, peer
    assert not writers.from_call((("optreg-writer", me),), "ipv4:192.0.2.7:5")[0].local
    other_ns = me.replace(f"ns={writers._NAMESPACE}", "ns=1")  # a container with the host's name and network
    assert not writers.from_call((("optreg-writer", other_ns),), "ipv4:127.0.0.1:5")[0].local
    huge = writers.from_call((("optreg-writer", f"host={writers._HOST} pid={1 << 40} ns=1 id=y"),), "unix:")[0]
    assert huge.pid == 0 and not huge.gone()  # a pid no kernel has: never checked (os.kill would overflow)
    with pytest.raises(writers.InvalidArgument, match="ASCII"):
        writers.from_call((("optreg-writer", "host=h\u00e9 pid=1"),), "unix:")
