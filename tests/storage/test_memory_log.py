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

from disk_helpers import fill, small_tmpfs
from hostile_helpers import stream_params
from optreg.client import Client, ResourceExhausted, RetryPolicy
from optreg.v1 import session_pb2, session_pb2_grpc, tensors

T = 30  # seconds: the timeout of every call
# The streamed session's gradients arrive in many small chunks. The resident one's, in the kill test, are
# large enough (2 MiB records) for mapped memory logs copied by two threads (journal.MAPPED_RECORDS,
# wal.MAPPED_PARALLEL); in the power-loss test, where the memory logs are removed, small (more steps).
SMALL = {"W": (16, 8), "b": (8,)}
LARGE = {"W": (512, 1024), "b": (8,)}
SHAPES = {"resident": LARGE, "streamed": SMALL}
LR = 0.01
IDS = {"resident": "mem-resident", "streamed": "mem-streamed"}


def stub(address: str):
    """durability_helpers.stub, reading states larger than gRPC's default 4 MiB (the resident session's)."""
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
    return channel, session_pb2_grpc.SessionServiceStub(channel)


def grads(t: int, kind: str = "streamed") -> dict:
    """The gradient of step t, the same for every attempt."""
    rng = np.random.default_rng(t)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES[kind].items()}


def p0(kind: str = "streamed") -> dict:
    rng = np.random.default_rng(28)
    return {n: rng.standard_normal(s).astype(np.float32) for n, s in SHAPES[kind].items()}


def create(address: str) -> None:
    with Client(address) as c:
        for kind, sid in IDS.items():
            c.create_session("adam", p0(kind), session_id=sid, keep=True, lr=LR)


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
                for n, g in grads(t, kind).items():
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
                for n, g in grads(s + 1, kind).items():
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


def _mapped(path: pathlib.Path) -> bool:
    """Whether a memory log is written through a mapping (wal.Log.map_ahead): its file runs on past its
    records in zeros (a log written by pwrite ends with a COMMIT frame)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4096))
            tail = f.read()
    except FileNotFoundError:
        return False
    return size > 4096 and not tail.strip(b"\0")


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
    SHAPES["resident"] = SMALL if power_loss else LARGE
    try:
        return _lives(start_server, tmp_path, lives, power_loss, window)
    finally:
        SHAPES["resident"] = LARGE


def _lives(start_server, tmp_path, lives: int, power_loss: bool, window: float):
    data = tmp_path / "data"
    trace = tmp_path / "fsynced"
    env = {"OPTREG_FSYNC_TRACE": str(trace)}
    args = ("--data-dir", str(data), "--max-exposure-seconds", str(window))
    ref_server = start_server("--memory-only")
    ref = Reference(ref_server.address)
    recs = {kind: {"acked": 0, "times": {}, "errors": []} for kind in IDS}
    rng = random.Random(28 + power_loss)
    stats = {"unacknowledged applied": 0, "steps lost to power loss": [], "bytes cut": 0, "mapped": 0}
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
        stats["mapped"] += _mapped(_memory_folder(data) / f"{IDS['resident']}.wal")
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
    assert stats["mapped"] >= 10, f"the resident session's memory log was seldom mapped: {stats}"


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


def _steps_until_refused(sess, first: int, seconds: float) -> tuple[int, Exception | None]:
    """Step `sess` from step `first` (gradient grads(t)) until a step is refused or `seconds` pass: (the
    last step acknowledged, the refusal)."""
    t, end = first, time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            sess.step(grads(t))
        except ResourceExhausted as e:
            return t - 1, e
        t += 1
    return t - 1, None


def _reference(address: str, steps: int, kind: str = "streamed") -> dict:
    """The uninterrupted run on a memory-only server: step -> its state."""
    out = {}
    with Client(address) as c:
        c.create_session("adam", p0(kind), session_id="ref", lr=LR)
        channel, st = stub(address)
        out[0] = state(st, "ref")[1]
        for t in range(1, steps + 1):
            c.session("ref").step(grads(t, kind))
            out[t] = state(st, "ref")[1]
        channel.close()
    return out


def test_full_disk_with_memory_log_waits_or_refuses_and_loses_nothing(start_server, tmp_path):
    """The disk is full: steps are acknowledged from the memory log while the window allows, then refused with
    RESOURCE_EXHAUSTED naming the full disk (never acknowledged without a record). A kill -9 then, and a start
    on the still-full disk: every acknowledged step is there, bit-identical; once space is freed the disk
    catches up and the session steps on."""
    with small_tmpfs("4m") as mnt:
        data = mnt / "data"
        args = ("--data-dir", str(data), "--max-exposure-seconds", "1")
        s = start_server(*args)
        with Client(s.address, timeout=T, retry=RetryPolicy(total_seconds=0)) as c:
            sess = c.create_session("adam", p0(), session_id="f", lr=LR)
            sess.step(grads(1))
            filler = fill(mnt)
            acked, refusal = _steps_until_refused(sess, 2, 30)
        assert refusal is not None, "steps were acknowledged for 30 s with the disk full and a 1 s window"
        assert "disk is full" in str(refusal) and "session f" in str(refusal), refusal
        assert acked >= 2, "no step was acknowledged from the memory log with the disk full"
        s.kill()
        s = start_server(*args)  # the disk still full: recovery only reads
        ref = _reference(start_server("--memory-only").address, acked + 1)
        channel, st = stub(s.address)
        step, got = state(st, "f")
        assert step == acked and got == ref[acked], f"acknowledged step {acked}, recovered {step}"
        filler.unlink()
        with Client(s.address, timeout=T) as c:
            c.session("f").step(grads(acked + 1))
            end = time.monotonic() + 30
            while c.get_session("f").persisted_step != acked + 1 and time.monotonic() < end:
                time.sleep(0.02)
            assert c.get_session("f").persisted_step == acked + 1
        assert state(st, "f")[1] == ref[acked + 1]
        channel.close()
        s.stop()


def _records(path: pathlib.Path) -> list[tuple[int, int]]:
    """(offset of its BEGIN frame, step) of each record committed in a log file, in order (wal.py's frames:
    32-byte heads [magic, kind, txn, payload length, checksum], then the payload)."""
    raw = path.read_bytes()
    out, pos = [], 12 + int.from_bytes(raw[8:12], "little") + 8
    begins = {}
    while pos + 32 <= len(raw) and raw[pos:pos + 4] == b"OWF\x01":
        kind, txn, n = raw[pos + 4], int.from_bytes(raw[pos + 8:pos + 16], "little"), \
            int.from_bytes(raw[pos + 16:pos + 24], "little")
        if kind == 1:
            begins[txn] = pos
        elif kind == 3:
            body = raw[pos + 32 + 24:pos + 32 + n]
            out.append((begins[txn], int(re.search(rb'"step":(\d+)', body).group(1))))
        pos += 32 + n
    return out


def test_a_bit_flip_in_the_memory_log_stops_recovery_at_the_last_good_record(start_server, tmp_path):
    """A memory log damaged in the middle (a bit flipped in a record's gradient): recovery keeps every step
    before it (the disk's and the memory log's), says which step it stopped at and why, and serves the
    session from there, bit-identical; the records from the damaged one on are lost, nothing the disk held.
    (2 MiB records: a full disk takes none of them, and the memory log is mapped.)"""
    with small_tmpfs("16m") as mnt:
        data = mnt / "data"
        args = ("--data-dir", str(data), "--max-exposure-seconds", "30")
        s = start_server(*args)
        with Client(s.address, timeout=T, retry=RetryPolicy(total_seconds=0)) as c:
            sess = c.create_session("adam", p0("resident"), session_id="x", lr=LR)
            sess.step(grads(1, "resident"))
            end = time.monotonic() + 30
            while c.get_session("x").persisted_step != 1 and time.monotonic() < end:
                time.sleep(0.02)
            filler = fill(mnt)  # from here the steps are in the memory log alone
            for t in range(2, 9):
                sess.step(grads(t, "resident"))
            on_disk = c.get_session("x").persisted_step
        s.kill()
        assert on_disk == 1
        logs = [p for p in (_memory_folder(data) / "x.wal.prev", _memory_folder(data) / "x.wal") if p.exists()]
        records = [(p, off, step) for p in logs for off, step in _records(p)]
        assert [step for _, _, step in records][-1] == 8, records
        path, off, flipped = next(r for r in records if r[2] == 5)
        with open(path, "r+b") as f:  # a bit of step 5's gradient (its CHUNK frame follows the BEGIN frame)
            raw = f.read()
            at = raw.index(b"OWF\x01\x02", off) + 32 + 40
            f.seek(at)
            f.write(bytes([raw[at] ^ 0x10]))
        filler.unlink()
        s = start_server(*args, "--log-level", "info")
        ref = _reference(start_server("--memory-only").address, 5, "resident")
        channel, st = stub(s.address)
        step, got = state(st, "x")
        assert step == 4 and got == ref[4], f"recovered step {step}, want 4 (the record of step 5 is damaged)"
        with Client(s.address, timeout=T) as c:
            c.session("x").step(grads(5, "resident"))
        assert state(st, "x")[1] == ref[5]
        channel.close()
        s.stop()
        err = s.proc.stderr.getvalue()
        assert "damaged: frame checksum mismatch" in err and "it ends at step 4" in err, err[-3000:]
        assert "session x: recovered to step 4" in err, err[-3000:]
