"""Open logs are a bounded pool (--max-open-logs): a server under a 1,024-descriptor limit holds and
steps far more durable sessions than that, restarts after a crash with them on disk without opening
their logs, and recovers each exactly."""
from __future__ import annotations

import os

import numpy as np

from durability_helpers import step_request, stub
from optreg.v1 import session_pb2, tensors

N = 1500      # durable sessions: more than the descriptor limit
NOFILE = 1024
KINDS = 5     # sessions i and j with i % KINDS == j % KINDS start alike; their gradients differ by (i // KINDS) % KINDS
T = 60


def _params(i):
    return {"w": np.linspace(-1, 1, 100, dtype=np.float32) * (1 + i % KINDS)}


def _grads(i, step):
    k = (i // KINDS) % KINDS
    return {"w": np.cos(np.arange(100, dtype=np.float32) * (k + 1) + step).astype(np.float32)}


def _create(st, sid, i, durable=True):
    config = session_pb2.SessionConfig(optimizer="adam", session_id=sid,
                                       durability=session_pb2.DURABILITY_LOG if durable else session_pb2.DURABILITY_NONE)
    st.CreateSession(session_pb2.CreateSessionRequest(
        config=config, parameters=[tensors.from_numpy(n, a) for n, a in _params(i).items()]), timeout=T)


def _step(st, sid, i, step) -> bytes:
    reply = st.Step(step_request(sid, step - 1, _grads(i, step)), timeout=T)  # (the step it follows)
    assert reply.step == step
    return tensors.to_numpy(reply.tensors[0]).tobytes()


def _fds(server) -> int:
    return len(os.listdir(f"/proc/{server.proc.pid}/fd"))


def test_more_durable_sessions_than_descriptors_step_restart_and_recover_exactly(start_server, tmp_path):
    # What an uninterrupted in-memory run gives, for each kind of session.
    ref = start_server("--memory-only")
    ch, st = stub(ref.address)
    want = {}
    for kind in range(KINDS * KINDS):
        _create(st, f"ref{kind}", kind, durable=False)
        want[kind] = [_step(st, f"ref{kind}", kind, step) for step in (1, 2)]
    ch.close()

    def kind(i):
        return i % (KINDS * KINDS)

    data = str(tmp_path / "data")
    s = start_server("--data-dir", data, nofile=NOFILE)
    ch, st = stub(s.address)
    for i in range(N):
        _create(st, f"s{i:05d}", i)
        assert _step(st, f"s{i:05d}", i, 1) == want[kind(i)][0], i
    assert _fds(s) < NOFILE - 100
    ch.close()
    s.kill()  # (a crash: every session's last step is in its log, replayed through a reopened descriptor)

    s = start_server("--data-dir", data, nofile=NOFILE)
    assert _fds(s) < 200  # no log is opened at start
    ch, st = stub(s.address)
    for i in range(N):
        assert _step(st, f"s{i:05d}", i, 2) == want[kind(i)][1], i
    assert _fds(s) < NOFILE - 100
    # A new client still connects (the descriptors are not all taken).
    ch2, st2 = stub(s.address)
    assert len(st2.ListSessions(session_pb2.ListSessionsRequest(), timeout=T).sessions) == N
    ch2.close()
    ch.close()


def test_session_gauges_follow_create_unload_load_and_delete(start_server, tmp_path):
    """The loaded/on-disk gauges are counted as sessions come, go, unload and load (not recounted
    over every session): they stay right through each."""
    import socket
    import time
    import urllib.request

    with socket.socket() as so:
        so.bind(("127.0.0.1", 0))
        port = so.getsockname()[1]

    def gauges():
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        found = dict(line.split() for line in text.splitlines()
                     if line.startswith(("optreg_sessions_loaded ", "optreg_sessions_on_disk ")))
        return int(float(found["optreg_sessions_loaded"])), int(float(found["optreg_sessions_on_disk"]))

    def until(want):
        end = time.monotonic() + 60  # a hang guard: the janitor unloads within about a second
        while gauges() != want and time.monotonic() < end:
            time.sleep(0.1)
        assert gauges() == want

    s = start_server("--data-dir", str(tmp_path / "d"), "--metrics-port", str(port), "--idle-seconds", "1")
    ch, st = stub(s.address)
    for i in range(3):
        _create(st, f"d{i}", 0)
    _create(st, "mem", 0, durable=False)
    assert gauges() == (4, 3)
    until((1, 3))  # the durable ones unloaded when idle; "mem" never is
    assert _step(st, "d0", 0, 1) == _step(st, "d1", 0, 1)  # loaded again to step
    assert gauges()[1] == 3 and gauges()[0] >= 2
    st.DeleteSession(session_pb2.DeleteSessionRequest(session_id="d2"), timeout=T)  # (unloaded)
    st.DeleteSession(session_pb2.DeleteSessionRequest(session_id="mem"), timeout=T)  # (loaded)
    until((0, 2))
    ch.close()
