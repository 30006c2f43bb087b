"""Persistence against real server processes and a real data directory: restart, kill -9,
a crash between a checkpoint's write and its rename, retries across restarts, export/import,
idle unloading and the memory budget."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import SOURCE_ROOTS
from durability_helpers import adam_replay, assert_state, step_request, stub
from optreg.client import Client, RetryPolicy
from optreg.client.errors import OptregError
from optreg.v1 import session_pb2, tensors

SHAPES = {"W": (3, 4), "b": (4,)}


def _p0(seed):
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(s) for n, s in SHAPES.items()}


def _grads(rng):
    return {n: rng.standard_normal(s) for n, s in SHAPES.items()}


def test_restart_keeps_every_session(start_server, tmp_path):
    s = start_server("--data-dir", str(tmp_path))
    with Client(s.address) as c:
        p0 = _p0(1)
        sess = {mode: c.create_session("adam", {n: a.copy() for n, a in p0.items()}, lr=0.01,
                                       session_id=f"s-{mode}", durability=mode,
                                       periodic_steps=1000, periodic_seconds=1000)
                for mode in ("every-step", "periodic", "none")}
        rng = np.random.default_rng(2)
        grads = [_grads(rng) for _ in range(7)]
        for g in grads:
            for x in sess.values():
                x.step(g)
        info = c.get_session("s-periodic")
        assert info.durability == "periodic"
        assert (info.periodic_steps, info.periodic_seconds) == (1000, 1000)
        assert info.persisted_step == 0  # the window has not closed: only the create is on disk
    assert s.stop() == 0  # SIGTERM flushes the periodic session
    s2 = start_server("--data-dir", str(tmp_path))
    with Client(s2.address) as c:
        assert sorted(i.session_id for i in c.list_sessions()) == ["s-every-step", "s-periodic"]
        _, st = stub(s2.address)
        for sid in ("s-every-step", "s-periodic"):
            assert c.get_session(sid).loaded is False  # read from disk on first use
            assert_state(st, sid, p0, grads, lr=0.01)
    files = sorted(p.name for p in (tmp_path / "sessions").iterdir())
    assert files == ["s-every-step.safetensors", "s-every-step.wal", "s-periodic.safetensors"]
    assert (tmp_path / "index").is_file()  # (beside the folder: writing it leaves the folder's time alone)
    arrays = load_file(str(tmp_path / "sessions" / "s-every-step.safetensors"))  # plain safetensors
    np.testing.assert_allclose(arrays["params/W"], adam_replay(p0, grads, lr=0.01)[0]["W"], rtol=1e-12)


def _trainer(address, sid, seed, log, stop):
    """Steps until the server dies; log: (acked steps, grads sent per step number)."""
    rng = np.random.default_rng(seed)
    with Client(address, retry=RetryPolicy(total_seconds=0), timeout=10) as c:
        s = c.session(sid, params={n: np.zeros(shape) for n, shape in SHAPES.items()})
        while not stop.is_set():
            g = _grads(rng)
            log["sent"].append(g)  # step number len(sent) may be applied even if never acknowledged
            try:
                s.step(g)
            except OptregError:
                return
            log["acked"] = s.step_count


def test_kill9_mid_training_every_step_loses_no_acknowledged_step(start_server, tmp_path):
    s = start_server("--data-dir", str(tmp_path), "--threads", "8")
    ids = [f"k{i}" for i in range(6)]
    with Client(s.address) as c:
        for i, sid in enumerate(ids):
            c.create_session("adam", _p0(i), lr=0.01, session_id=sid, durability="every-step")
    logs = {sid: {"sent": [], "acked": 0} for sid in ids}
    stop = threading.Event()
    threads = [threading.Thread(target=_trainer, args=(s.address, sid, 100 + i, logs[sid], stop))
               for i, sid in enumerate(ids)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while min(l["acked"] for l in logs.values()) < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    s.kill()  # SIGKILL with steps in flight
    stop.set()
    for t in threads:
        t.join()
    assert min(l["acked"] for l in logs.values()) >= 20, "the trainers made too little progress to test anything"
    s2 = start_server("--data-dir", str(tmp_path))
    _, st = stub(s2.address)
    in_flight_applied = 0
    for i, sid in enumerate(ids):
        log = logs[sid]
        step = st.GetSession(session_pb2.GetSessionRequest(session_id=sid), timeout=10).session.step
        # Every acknowledged step is there; one more only if it was sent and applied but its ack was lost.
        assert log["acked"] <= step <= min(log["acked"] + 1, len(log["sent"])), (sid, log["acked"], step)
        in_flight_applied += step - log["acked"]
        assert_state(st, sid, _p0(i), log["sent"][:step], lr=0.01)
    print(f"acknowledged steps: {sorted(l['acked'] for l in logs.values())}; "
          f"applied but unacknowledged at the kill: {in_flight_applied}")


def test_kill9_periodic_loses_at_most_the_window(start_server, tmp_path):
    s = start_server("--data-dir", str(tmp_path))
    p0, rng = _p0(5), np.random.default_rng(6)
    grads = [_grads(rng) for _ in range(23)]
    with Client(s.address) as c:
        sess = c.create_session("adam", {n: a.copy() for n, a in p0.items()}, lr=0.01, session_id="per",
                                durability="periodic", periodic_steps=5, periodic_seconds=3600)
        for g in grads:
            sess.step(g)
        window = c.get_session("per").periodic_steps
    s.kill()
    s2 = start_server("--data-dir", str(tmp_path))
    _, st = stub(s2.address)
    step = st.GetSession(session_pb2.GetSessionRequest(session_id="per"), timeout=10).session.step
    assert 23 - window < step <= 23
    assert step == 20  # written at 5, 10, 15, 20
    assert_state(st, "per", p0, grads[:step], lr=0.01)


def test_crash_between_write_and_rename_keeps_previous_checkpoint(start_server, tmp_path):
    # Snapshot writes (periodic, every step): the create (1), step 1 (2), step 2 (3); the 4th (step 3) exits
    # before its rename.
    s = start_server("--data-dir", str(tmp_path), env={"OPTREG_TEST_CRASH_BEFORE_RENAME": "4"})
    p0, rng = _p0(7), np.random.default_rng(8)
    grads = [_grads(rng) for _ in range(3)]
    with Client(s.address, retry=RetryPolicy(total_seconds=0)) as c:
        sess = c.create_session("adam", {n: a.copy() for n, a in p0.items()}, lr=0.01, session_id="crash",
                                durability="periodic", periodic_steps=1)
        sess.step(grads[0])
        sess.step(grads[1])
        with pytest.raises(OptregError):
            sess.step(grads[2])
    assert s.proc.wait(10) == 87
    leftovers = [p.name for p in (tmp_path / "sessions").iterdir()]
    assert ".crash.safetensors.tmp" in leftovers  # the interrupted write
    # The previous checkpoint is whole and readable by plain safetensors.
    arrays = load_file(str(tmp_path / "sessions" / "crash.safetensors"))
    np.testing.assert_allclose(arrays["params/W"], adam_replay(p0, grads[:2], lr=0.01)[0]["W"], rtol=1e-12)
    s2 = start_server("--data-dir", str(tmp_path))
    _, st = stub(s2.address)
    assert_state(st, "crash", p0, grads[:2], lr=0.01)
    assert [p.name for p in (tmp_path / "sessions").iterdir()] == ["crash.safetensors"]


@pytest.mark.parametrize("reply", ["parameters", "delta"])
def test_retried_step_applied_once_across_restart(start_server, tmp_path, reply):
    s = start_server("--data-dir", str(tmp_path))
    p0, rng = _p0(9), np.random.default_rng(10)
    g1, g2 = _grads(rng), _grads(rng)
    with Client(s.address) as c:
        c.create_session("adam", {n: a.copy() for n, a in p0.items()}, lr=0.01, session_id="rt", step_reply=reply)
    _, st = stub(s.address)
    first = st.Step(step_request("rt", 0, g1), timeout=10)
    dup = st.Step(step_request("rt", 0, g1), timeout=10)  # duplicate delivery
    assert (first.step, first.replayed, dup.step, dup.replayed) == (1, False, 1, True)
    assert list(first.tensors) == list(dup.tensors)
    s.kill()  # as if the reply had been lost: the client retries against the restarted server
    s2 = start_server("--data-dir", str(tmp_path))
    _, st = stub(s2.address)
    again = st.Step(step_request("rt", 0, g1), timeout=10)
    assert (again.step, again.replayed) == (1, True)
    assert [t.SerializeToString() for t in again.tensors] == [t.SerializeToString() for t in first.tensors]
    assert_state(st, "rt", p0, [g1], lr=0.01)
    nxt = st.Step(step_request("rt", 1, g2), timeout=10)
    assert (nxt.step, nxt.replayed) == (2, False)
    with pytest.raises(grpc.RpcError) as e:
        st.Step(step_request("rt", 0, g1), timeout=10)  # too old to be a retry
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert_state(st, "rt", p0, [g1, g2], lr=0.01)


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(SOURCE_ROOTS))
    return subprocess.run([sys.executable, "-m", "optreg.app", "sessions", *args], capture_output=True, text=True,
                          env=env, timeout=60)


def test_export_import_cli(start_server, tmp_path):
    a = start_server("--data-dir", str(tmp_path / "a"))
    b = start_server("--memory-only")
    p0, rng = _p0(11), np.random.default_rng(12)
    grads = [_grads(rng) for _ in range(4)]
    with Client(a.address) as c:
        sess = c.create_session("adam", {n: x.copy() for n, x in p0.items()}, lr=0.01, session_id="exp")
        for g in grads:
            sess.step(g)
    out = tmp_path / "exp.safetensors"
    r = _cli("export", "exp", str(out), "--address", a.address)
    assert r.returncode == 0, r.stderr
    assert set(load_file(str(out))) == {"params/W", "params/b", "state/m/W", "state/m/b", "state/v/W", "state/v/b",
                                        "telemetry/ring"}  # the steps' telemetry (tests/app/test_telemetry_cli.py)
    r = _cli("import", str(out), "--address", b.address, "--durability", "none")
    assert r.returncode == 0, r.stderr
    _, sa = stub(a.address)
    _, sb = stub(b.address)
    info = sb.GetSession(session_pb2.GetSessionRequest(session_id="exp"), timeout=10).session
    assert info.durability == session_pb2.DURABILITY_NONE
    assert_state(sb, "exp", p0, grads, lr=0.01)
    # The imported session goes on exactly like the original.
    g = _grads(rng)
    ra, rb = sa.Step(step_request("exp", 4, g), timeout=10), sb.Step(step_request("exp", 4, g), timeout=10)
    assert [t.SerializeToString() for t in ra.tensors] == [t.SerializeToString() for t in rb.tensors]
    r = _cli("import", str(out), "--address", b.address, "--durability", "none")  # the id exists now
    assert r.returncode == 1 and "already exists" in r.stderr
    r = _cli("export", "nope", str(tmp_path / "x"), "--address", a.address)
    assert r.returncode == 1 and "not found" in r.stderr


def test_idle_session_unloaded_and_reloaded(start_server, tmp_path):
    s = start_server("--data-dir", str(tmp_path), "--idle-seconds", "0.2")
    p0, rng = _p0(13), np.random.default_rng(14)
    grads = [_grads(rng) for _ in range(4)]
    with Client(s.address) as c:
        sess = c.create_session("adam", {n: x.copy() for n, x in p0.items()}, lr=0.01, session_id="idle",
                                step_reply="delta")
        for g in grads[:2]:
            sess.step(g)
        for _ in range(200):
            if not c.get_session("idle").loaded:
                break
            time.sleep(0.05)
        assert not c.get_session("idle").loaded
        for g in grads[2:]:
            sess.step(g)  # reloaded transparently
        assert c.get_session("idle").step == 4
        np.testing.assert_allclose(sess.arrays["W"], adam_replay(p0, grads, lr=0.01)[0]["W"], rtol=1e-9)
    _, st = stub(s.address)
    assert_state(st, "idle", p0, grads, lr=0.01)


def test_memory_budget(start_server, tmp_path):
    # adam keeps 3 copies: a 128x128 float64 session holds 384 KiB; the budget is 1 MiB.
    s = start_server("--data-dir", str(tmp_path), "--memory-budget-mb", "1")
    big = {"W": np.zeros((128, 128))}
    with Client(s.address) as c:
        for i in range(2):
            c.create_session("adam", big, session_id=f"mem{i}", durability="none")
        with pytest.raises(OptregError) as e:
            c.create_session("adam", big, session_id="mem2", durability="none")
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "memory budget of 1.0 MiB (--memory-budget-mb)" in e.value.details
        c.delete_session("mem1")
        c.delete_session("mem0")
        # Durable sessions make room for each other: the least recently used is unloaded.
        for i in range(3):
            c.create_session("adam", big, session_id=f"dur{i}", durability="every-step")
        loaded = [x.session_id for x in c.list_sessions() if x.loaded]
        assert len(loaded) == 2
        # Reloads dur0 and takes a staging copy for the step (both counted), unloading the others.
        c.session("dur0").step({"W": np.ones((128, 128))})
        assert c.get_session("dur0").step == 1
        # A streamed tensor larger than the whole budget is refused before it is allocated.
        _, st = stub(s.address)
        huge = session_pb2.CreateSessionStreamRequest(config=session_pb2.SessionConfig(optimizer="sgd"))
        chunk = session_pb2.CreateSessionStreamRequest(chunks=[tensors.from_numpy("W", np.zeros(1))])
        chunk.chunks[0].shape[:] = [1 << 40]
        with pytest.raises(grpc.RpcError) as e:
            st.CreateSessionStream(iter([huge, chunk]), timeout=10)
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "needs 8388608.0 MiB" in e.value.details() and "memory budget of 1.0 MiB" in e.value.details()


def test_memory_only_server_refuses_durable_sessions(start_server):
    s = start_server("--memory-only")
    with Client(s.address) as c:
        with pytest.raises(OptregError) as e:
            c.create_session("sgd", {"W": np.zeros(3)}, durability="every-step")
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "--data-dir" in e.value.details
        assert c.create_session("sgd", {"W": np.zeros(3)}).info.durability == "none"
        with pytest.raises(OptregError) as e:
            c.create_session("sgd", {"W": np.zeros(3)}, session_id="../etc/passwd")
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_streamed_steps_are_durable_before_acknowledged(start_server, tmp_path):
    """The overlapped StepStream path checkpoints before its commit message: kill -9 loses nothing acked."""
    n = 1_500_000  # 6 MB of float32: the client streams it
    rng = np.random.default_rng(5)
    p = {"W": rng.standard_normal(n).astype(np.float32)}
    expect = p["W"].copy()
    s = start_server("--data-dir", str(tmp_path))
    with Client(s.address) as c:
        sess = c.create_session("sgd", p, lr=0.5, session_id="streamed", durability="every-step")
        for _ in range(3):
            g = rng.standard_normal(n).astype(np.float32)
            sess.step({"W": g})
            expect -= np.float32(0.5) * g
        np.testing.assert_array_equal(p["W"], expect)
    s.kill()
    s2 = start_server("--data-dir", str(tmp_path))
    with Client(s2.address) as c:
        assert c.get_session("streamed").step == 3
        np.testing.assert_array_equal(c.session("streamed").read_parameters()["W"], expect)


def test_unloadable_session_file_is_kept_and_its_id_stays_taken(start_server, tmp_path):
    """A checkpoint whose optimizer is missing at start is listed, not overwritten by a new session."""
    s = start_server("--data-dir", str(tmp_path))
    with Client(s.address) as c:
        c.create_session("adam", {"w": np.ones(3)}, session_id="keep-me", durability="every-step")
    assert s.stop() == 0
    before = (tmp_path / "sessions" / "keep-me.safetensors").read_bytes()
    s2 = start_server("--data-dir", str(tmp_path), env={"OPTREG_BLOCK_PLUGINS": "optreg.plugins.builtins.adam"})
    with Client(s2.address) as c:
        with pytest.raises(OptregError) as e:
            c.create_session("sgd", {"w": np.zeros(3)}, session_id="keep-me", durability="every-step")
        assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and "not installed" in e.value.details and "adam" in e.value.details
    assert (tmp_path / "sessions" / "keep-me.safetensors").read_bytes() == before


def test_many_parameters_logged_and_recovered(start_server, tmp_path):
    """A model of many small tensors (1000 biases here: a record of 3000 buffers, more than one pwritev
    takes) steps under the default durability and comes back from the log after a restart."""
    s = start_server("--data-dir", str(tmp_path))
    rng = np.random.default_rng(7)
    p0 = {f"layer{i}.b": rng.standard_normal(8).astype(np.float32) for i in range(1000)}
    grads = [{k: rng.standard_normal(8).astype(np.float32) for k in p0} for _ in range(3)]
    with Client(s.address) as c:
        sess = c.create_session("sgd", {k: a.copy() for k, a in p0.items()}, lr=0.1, session_id="many")
        assert sess.info.durability == "log"
        for g in grads:
            sess.step(g)
    s.kill()  # no clean stop: what comes back is the snapshot at create and the log after it
    s2 = start_server("--data-dir", str(tmp_path))
    with Client(s2.address) as c:
        got = c.session("many").read_parameters()
    want = {k: a.copy() for k, a in p0.items()}
    for g in grads:
        for k in want:
            want[k] = want[k] - np.float32(0.1) * g[k]
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
