"""`log` durability with a memory log (issue 28): records go to a log on a tmpfs that outlives the server
process, the disk follows behind (journal.py `_save`).

  1. kill -9 at random moments, 50 kills, a resident session (parameters in the client's shared memory)
     and a streamed one: no acknowledged step lost, the final state bit-identical to the uninterrupted run;
  2. a simulated power loss, 30 times: the server killed, its memory logs removed and the disk logs cut
     back to what the server had fsync'd (OPTREG_FSYNC_TRACE): each session recovers to a step no older
     than --max-exposure-seconds, bit-identical to the uninterrupted run at that step, and says which.
"""
from __future__ import annotations

import os
import pathlib
import random
import re
import threading
import time

import grpc
import numpy as np

from durability_helpers import stub
from hostile_helpers import stream_params
from optreg.client import Client, RetryPolicy
from optreg.v1 import session_pb2, tensors

T = 30  # seconds: the timeout of every call
SHAPES = {"W": (16, 8), "b": (8,)}
LR = 0.01
IDS = {"resident": "mem-resident", "streamed": "mem-streamed"}


def grads(t: int) -> dict:
    """The gradient of step t, the same for every session and attempt."""
    rng = np.random.default_rng(t)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def p0() -> dict:
    rng = np.random.default_rng(28)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES.items()}


def create(address: str) -> None:
    with Client(address) as c:
        for sid in IDS.values():
            c.create_session("adam", p0(), session_id=sid, keep=True, lr=LR)


def state(st, sid) -> tuple[int, dict]:
    """(step, {"params/W": bytes, "state/m/W": bytes, ...}) of a session."""
    r = st.ReadState(session_pb2.ReadStateRequest(session_id=sid), timeout=T)
    out = {f"params/{t.name}": tensors.to_numpy(t).tobytes() for t in r.parameters}
    for slot in r.state:
        out.update({f"state/{slot.slot}/{t.name}": tensors.to_numpy(t).tobytes() for t in slot.tensors})
    return r.session.step, out


def stream_step(st, sid, step: int):
    g = grads(step + 1)
    chunks = [c for n, a in g.items() for c in tensors.chunk(n, a, 128)]  # several chunks: kills land inside
    msgs = [session_pb2.StepStreamRequest(session_id=sid, step=step, chunks=chunks[:1])]
    msgs += [session_pb2.StepStreamRequest(chunks=[c]) for c in chunks[1:]]
    return stream_params(st.StepStream(iter(msgs), timeout=T))[0]


def trainer(address: str, kind: str, rec: dict, killing: threading.Event) -> None:
    """Steps one session (fenced, step t's gradient grads(t)) until the server dies; rec["acked"] and
    rec["times"] (step -> when its reply came) follow the acknowledged steps."""
    sid = IDS[kind]
    try:
        if kind == "streamed":
            channel, st = stub(address)
            try:
                step = rec["acked"]
                while True:
                    got = stream_step(st, sid, step)
                    if got != step + 1:
                        rec["errors"].append(f"{kind}: step {step + 1} answered as {got}")
                        return
                    step = rec["acked"] = got
                    rec["times"][step] = time.monotonic()
            finally:
                channel.close()
        with Client(address, timeout=T, retry=RetryPolicy(total_seconds=0)) as c:
            s = c.session(sid)
            s.enable_shared_memory(resident=True)
            while True:
                t = s.step_count + 1
                for n, g in grads(t).items():
                    s.gradients[n][...] = g
                r = s.step(s.gradients)
                if r.step != t:
                    rec["errors"].append(f"{kind}: step {t} answered as {r.step}")
                    return
                rec["acked"] = r.step
                rec["times"][r.step] = time.monotonic()
    except Exception as e:  # the server died under it (grpc errors, or the client's own)
        if not killing.is_set():
            rec["errors"].append(f"{kind}: {type(e).__name__}: {e}")


class Reference:
    """The uninterrupted run: the same sessions on a memory-only server, stepped as far as asked."""

    def __init__(self, address: str):
        create(address)
        self.channel, self.st = stub(address)
        self.step = {kind: 0 for kind in IDS}
        self.states: dict = {(kind, 0): state(self.st, sid)[1] for kind, sid in IDS.items()}
        self.client = Client(address)
        self.resident = self.client.session(IDS["resident"])
        self.resident.enable_shared_memory(resident=True)

    def at(self, kind: str, t: int) -> dict:
        while self.step[kind] < t:
            s = self.step[kind]
            if kind == "streamed":
                stream_step(self.st, IDS[kind], s)
            else:
                for n, g in grads(s + 1).items():
                    self.resident.gradients[n][...] = g
                self.resident.step(self.resident.gradients)
            self.step[kind] = s + 1
            self.states[kind, s + 1] = state(self.st, IDS[kind])[1]
        return self.states[kind, t]

    def close(self):
        self.resident.disable_shared_memory()
        self.client.close()
        self.channel.close()


def _memory_folder(data: pathlib.Path) -> pathlib.Path:
    return pathlib.Path(os.readlink(data / "memory-log"))


def _cut_to_fsynced(data: pathlib.Path, trace: pathlib.Path) -> int:
    """A power loss on the disk: every disk log cut back to the size its last traced fsync covered (a log
    replaced since, by a reset the trace did not see yet: to its header, all its fsync'd create holds).
    Returns the bytes cut."""
    synced = {}
    if trace.exists():
        for line in trace.read_text().splitlines():
            ino, size, path = line.split(" ", 2)
            synced[path] = (int(ino), int(size))
    cut = 0
    for log in (data / "sessions").glob("*.wal"):
        st = os.stat(log)
        ino, size = synced.get(str(log), (None, None))
        if ino != st.st_ino:
            head = log.read_bytes()[:12]
            size = 12 + int.from_bytes(head[8:12], "little") + 8
        if st.st_size > size:
            os.truncate(log, size)
            cut += st.st_size - size
    return cut


def _run(start_server, tmp_path, lives: int, power_loss: bool, window: float = 1.0):
    data = tmp_path / "data"
    trace = tmp_path / "fsynced"
    env = {"OPTREG_FSYNC_TRACE": str(trace)}
    args = ("--data-dir", str(data), "--max-exposure-seconds", str(window))
    ref_server = start_server("--memory-only")
    ref = Reference(ref_server.address)
    recs = {kind: {"acked": 0, "times": {}, "errors": []} for kind in IDS}
    rng = random.Random(28 + power_loss)
    stats = {"unacknowledged applied": 0, "steps lost to power loss": [], "bytes cut": 0}
    said = []
    for life in range(lives + 1):
        s = start_server(*args, env=env)
        channel, st = stub(s.address)
        if life == 0:
            create(s.address)
            assert (_memory_folder(data) / f"{IDS['resident']}.wal").exists(), "no memory log in use"
        for kind, sid in IDS.items():
            rec = recs[kind]
            step, got = state(st, sid)
            assert step <= rec["acked"] + 1, f"{kind}: the server holds step {step}, beyond {rec['acked']} + 1"
            if power_loss and life:
                # No older than the window: every step acknowledged `window` seconds (and a pass of the
                # writer) before the loss is on disk.
                older = [t for t, at in rec["times"].items() if at <= rec["lost_at"] - window - 0.2]
                assert step >= max(older, default=0), (f"{kind}: recovered to step {step}; step {max(older)} "
                                                       f"was acknowledged more than {window} s before the loss")
                stats["steps lost to power loss"].append(max(0, rec["acked"] - step))
                said.append((sid, step))
            else:
                assert step >= rec["acked"], f"{kind}: acknowledged step {rec['acked']}, the server holds {step}"
                stats["unacknowledged applied"] += step == rec["acked"] + 1
            assert got == ref.at(kind, step), f"{kind}: step {step} is not bit-identical to the uninterrupted run"
            rec["acked"] = step
            rec["times"] = {t: at for t, at in rec["times"].items() if t <= step}
        channel.close()
        if life == lives:
            s.stop()
            break
        killing = threading.Event()
        threads = [threading.Thread(target=trainer, args=(s.address, kind, recs[kind], killing)) for kind in IDS]
        started = {kind: recs[kind]["acked"] for kind in IDS}
        for t in threads:
            t.start()
        end = time.monotonic() + 60  # (a resident registration waits for the kernels a new server compiles)
        while time.monotonic() < end and any(recs[k]["acked"] == started[k] for k in IDS) and not any(
                r["errors"] for r in recs.values()):
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        killing.set()
        s.kill()
        lost_at = time.monotonic()
        for kind in IDS:
            recs[kind]["lost_at"] = lost_at
        for t in threads:
            t.join(60)
        errors = [e for r in recs.values() for e in r["errors"]]
        assert not errors, errors
        stderr = s.proc.stderr.getvalue()
        for sid, step in said:  # the previous power loss: this server said where each session recovered to
            assert f"session {sid}: recovered to step {step} from the disk alone" in stderr, stderr[-3000:]
        said = []
        if power_loss:
            folder = _memory_folder(data)
            for f in folder.iterdir():
                f.unlink()
            folder.rmdir()
            stats["bytes cut"] += _cut_to_fsynced(data, trace)
    ref.close()
    return recs, stats


def test_kill9_with_memory_log_loses_nothing_acknowledged(start_server, tmp_path):
    t0 = time.monotonic()
    recs, stats = _run(start_server, tmp_path, lives=50, power_loss=False)
    print(f"\nkill -9 with memory logs: 50 kills in {time.monotonic() - t0:.0f} s; steps "
          f"{ {k: r['acked'] for k, r in recs.items()} }; {stats}")
    assert min(r["acked"] for r in recs.values()) >= 50, "too few steps between the kills to test anything"


def test_power_loss_loses_at_most_the_window(start_server, tmp_path):
    t0 = time.monotonic()
    recs, stats = _run(start_server, tmp_path, lives=30, power_loss=True)
    lost = stats["steps lost to power loss"]
    print(f"\npower loss: 30 in {time.monotonic() - t0:.0f} s; steps {({k: r['acked'] for k, r in recs.items()})}; "
          f"steps lost each time: max {max(lost)}, median {sorted(lost)[len(lost) // 2]}; "
          f"disk bytes cut {stats['bytes cut']}")
    assert min(r["acked"] for r in recs.values()) >= 30, "too few steps between the losses to test anything"


def test_the_window_is_shown_and_closes(start_server, tmp_path):
    """SessionInfo and `optreg sessions show` say how many steps, and how old, are not on disk yet; the disk
    writer catches up (persisted_step reaches the step) without another step."""
    from cli_helpers import optreg

    s = start_server("--data-dir", str(tmp_path / "data"))
    with Client(s.address) as c:
        sess = c.create_session("adam", p0(), session_id="w", lr=LR)
        for t in range(1, 6):
            sess.step(grads(t))
        info = c.get_session("w")
        assert 0 <= info.unsaved_steps <= 5 and info.unsaved_seconds >= 0
        end = time.monotonic() + 30
        while (c.get_session("w").persisted_step != 5) and time.monotonic() < end:
            time.sleep(0.02)
        info = c.get_session("w")
        assert (info.persisted_step, info.unsaved_steps, info.unsaved_seconds) == (5, 0, 0.0)
    out = optreg("sessions", "show", "w", "--address", s.address)
    assert out.returncode == 0, out.stderr
    assert re.search(r"on disk: +step 5 \(0 steps, 0\.0 s not yet on disk\)", out.stdout), out.stdout


def test_without_a_memory_file_system_the_log_goes_to_the_disk(start_server, tmp_path):
    """--memory-log-dir on a disk: the server says so at start and writes each record to the disk log before
    the reply, as before; a kill -9 loses nothing acknowledged."""
    disk = tmp_path / "not-tmpfs"
    disk.mkdir()
    data = tmp_path / "data"
    s = start_server("--data-dir", str(data), "--memory-log-dir", str(disk), "--log-level", "info")
    with Client(s.address) as c:
        sess = c.create_session("adam", p0(), session_id="d", lr=LR)
        for t in range(1, 4):
            sess.step(grads(t))
    assert not (data / "memory-log").exists() and not list(disk.iterdir())
    s.kill()
    assert "without a memory log" in s.proc.stderr.getvalue() and "is not a memory file system" in \
        s.proc.stderr.getvalue()
    s = start_server("--data-dir", str(data))
    with Client(s.address) as c:
        assert c.get_session("d").step == 3
