"""The write-ahead log (optreg.server.storage.wal): round trips, torn tails, bit flips, kill -9 of
an appending process, group commit, disk full."""
from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time

import ml_dtypes
import numpy as np
import pytest

from optreg.server.storage import wal
from optreg.server.storage.fsync import METHODS, GroupSyncer
from optreg.server.storage.wal import CorruptLog, Log

import disk_helpers
from conftest import SOURCE_ROOTS


def grads(step: int, n: int = 10) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(step)
    return {
        "W": rng.standard_normal((2, n)).astype(np.float32),
        "b16": rng.standard_normal(n).astype(np.float16),
        "bf": rng.standard_normal(3).astype(ml_dtypes.bfloat16),
        "d": rng.standard_normal(4),
        "s": np.array(rng.standard_normal(), dtype=np.float32),       # shape []
        "e": np.zeros((0, 5), np.float32),
        'odd "name"/\\ é\n\u2603': rng.standard_normal(2).astype(np.float32),
    }


def append(lg: Log, step: int, chunks: int = 1, n: int = 10, extras=None, **kw):
    w = lg.begin(step, fence=step - 1, hyperparameters={"lr": 0.01 * step, "beta1": 0.9},
                 extras=extras or {"worker": "w0", "loss": 1.0 / step})
    for name, a in grads(step, n).items():
        flat = a.reshape(-1)
        bounds = np.linspace(0, flat.size, chunks + 1).astype(int)
        order = list(range(chunks))[::-1]  # out of order on purpose: offsets place them
        for i in order:
            w.add(name, a.dtype, a.shape, int(bounds[i]), flat[bounds[i]:bounds[i + 1]].tobytes())
    w.commit(**kw)
    return w


def append_whole(lg: Log, step: int, n: int = 10, extras=None):
    """The record append() above writes with chunks=1, as one Log.append."""
    lg.append(step, step - 1, {"lr": 0.01 * step, "beta1": 0.9}, extras or {"worker": "w0", "loss": 1.0 / step},
              [(name, a.dtype, a.shape, a.tobytes()) for name, a in grads(step, n).items()])


def check(rec: wal.Record, step: int, n: int = 10):
    assert rec.step == step and rec.fence == step - 1
    assert rec.hyperparameters == {"lr": 0.01 * step, "beta1": 0.9}
    want = grads(step, n)
    assert list(rec.tensors) == list(want) or set(rec.tensors) == set(want)
    for k, a in want.items():
        got = rec.tensors[k]
        assert got.dtype == a.dtype and got.shape == a.shape and got.tobytes() == a.tobytes(), k


@pytest.mark.parametrize("sync", ["fsync", "os", "none"])
def test_round_trip(tmp_path, sync):
    p = tmp_path / "a.wal"
    with Log.open(p, "a", sync=sync) as lg:
        assert lg.log_bytes == 0 and lg.last_step == 0
        for s in range(1, 6):
            append(lg, s, chunks=3)
        assert lg.last_step == 5 and lg.log_bytes > 0
        assert [r.step for r in lg.records()] == [1, 2, 3, 4, 5]
    with Log.open(p, "a", sync=sync) as lg:
        recs = list(lg.records())
        assert [r.step for r in recs] == [1, 2, 3, 4, 5]
        for r in recs:
            check(r, r.step)
        assert recs[0].extras == {"worker": "w0", "loss": 1.0} and recs[0].kind == "gradients"
        assert recs[0].tensors["s"].shape == ()
        append(lg, 6)
    with Log.open(p, "a") as lg:
        assert [r.step for r in lg.records(after=4)] == [5, 6]


def test_append_writes_what_begin_add_commit_write(tmp_path):
    """Log.append (a small unary step's record in one write) is the same bytes as the record written
    frame by frame, and reads back the same; refusals leave the file as it was."""
    with Log.open(tmp_path / "frames.wal", "a") as a, Log.open(tmp_path / "once.wal", "a") as b:
        for s in range(1, 5):
            append(a, s)
            append_whole(b, s)
            assert a.log_bytes == b.log_bytes
        size = b.log_bytes
        with pytest.raises(ValueError, match="cannot follow step 4"):
            append_whole(b, 6)
        with pytest.raises(ValueError, match="whole tensors"):
            b.append(5, 4, {}, {}, [("W", "float32", (4,), np.zeros(2, np.float32).tobytes())])
        with pytest.raises(ValueError, match="each tensor once"):
            b.append(5, 4, {}, {}, [("W", "float32", (2,), b"\0" * 8)] * 2)
        with pytest.raises(ValueError, match="not valid"):
            b.append(5, 4, {}, {}, [("W", "float32", (-2,), b"")])
        assert b.log_bytes == size and b.last_step == 4
        assert [r.step for r in b.records()] == [1, 2, 3, 4]  # read from the index it keeps
    raw_a = (tmp_path / "frames.wal").read_bytes()
    raw_b = (tmp_path / "once.wal").read_bytes()
    header = len(wal._file_header("a", 0))
    assert raw_a[header:] == raw_b[header:]
    with Log.open(tmp_path / "once.wal", "a") as b:
        recs = list(b.records())
        assert [r.step for r in recs] == [1, 2, 3, 4]
        for r in recs:
            check(r, r.step)
        assert recs[1].extras == {"worker": "w0", "loss": 0.5}
        append_whole(b, 5)  # and goes on after a reopen
    with Log.open(tmp_path / "once.wal", "a") as b:
        assert [r.step for r in b.records(after=3)] == [4, 5]


@pytest.mark.parametrize("whole", [False, True], ids=["frames", "append"])
def test_a_record_of_many_small_tensors(tmp_path, whole):
    """More buffers than one pwritev takes (IOV_MAX, 1024 on Linux: three a tensor): written in turns."""
    arrays = {f"layer{i}.b": np.full(10, i, np.float32) for i in range(1500)}
    with Log.open(tmp_path / "a.wal", "a") as lg:
        for step in (1, 2):
            if whole:
                lg.append(step, step - 1, {"lr": 0.1}, {}, [(k, a.dtype, a.shape, a.tobytes()) for k, a in arrays.items()])
            else:
                w = lg.begin(step, step - 1, {"lr": 0.1})
                for k, a in arrays.items():
                    w.add(k, a.dtype, a.shape, 0, a)
                w.commit()
    with Log.open(tmp_path / "a.wal", "a") as lg:
        recs = list(lg.records())
        assert [r.step for r in recs] == [1, 2]
        for r in recs:
            assert set(r.tensors) == set(arrays)
            assert all(np.array_equal(r.tensors[k], a) for k, a in arrays.items())


def test_hyperparameters_logged_to_the_bit(tmp_path):
    """-0.0 and 0.0 are equal but not the same hyperparameter: each record holds what it was given."""
    with Log.open(tmp_path / "a.wal", "a") as lg:
        for step, wd in enumerate((0.0, -0.0, 0.0), start=1):
            lg.append(step, step - 1, {"wd": wd}, {}, [("w", "float32", (1,), b"\0" * 4)])
        assert [np.signbit(r.hyperparameters["wd"]) for r in lg.records()] == [False, True, False]
    with Log.open(tmp_path / "a.wal", "a") as lg:
        assert [np.signbit(r.hyperparameters["wd"]) for r in lg.records()] == [False, True, False]


def test_arrays_as_chunks_and_nan_metrics(tmp_path):
    with Log.open(tmp_path / "a.wal", "a") as lg:
        w = lg.begin(1, 0, {"lr": 0.1}, {"loss": float("nan")})
        bf = np.arange(6).astype(ml_dtypes.bfloat16).reshape(2, 3)
        w.add("bf", bf.dtype, bf.shape, 0, bf)             # an array, bfloat16 included
        w.add("s", "float32", (), 0, np.array(2.5, np.float32))
        w.commit()
    with Log.open(tmp_path / "a.wal", "a") as lg:
        (r,) = lg.records()
        assert r.tensors["bf"].tobytes() == bf.tobytes() and r.tensors["bf"].dtype == bf.dtype
        assert r.tensors["s"].shape == () and r.tensors["s"] == 2.5
        assert np.isnan(r.extras["loss"])


def test_result_records_and_overrides(tmp_path):
    """A non-deterministic optimizer logs its results; step/hyperparameters known at commit."""
    with Log.open(tmp_path / "a.wal", "a") as lg:
        w = lg.begin(1, None)
        w.add("p/W", "float32", (3,), 0, np.ones(3, np.float32).tobytes())
        w.add("s/m/W", "float32", (3,), 0, np.zeros(3, np.float32).tobytes())
        w.commit(step=1, hyperparameters={"lr": 0.5}, extras={"kind": "result"})
    with Log.open(tmp_path / "a.wal", "a") as lg:
        (r,) = lg.records()
        assert r.kind == "result" and r.fence is None and r.hyperparameters == {"lr": 0.5}
        assert r.tensors["p/W"].tolist() == [1, 1, 1]


def test_writer_refuses_bad_records(tmp_path):
    with Log.open(tmp_path / "a.wal", "a") as lg:
        before = lg.log_bytes
        w = lg.begin(1)
        w.add("W", "float32", (4,), 0, np.ones(2, np.float32).tobytes())
        with pytest.raises(ValueError, match="2 of 4 elements"):
            w.commit()
        with pytest.raises(ValueError, match="outside"):
            w.add("W", "float32", (4,), 3, np.ones(2, np.float32).tobytes())
        with pytest.raises(ValueError, match="earlier ones"):
            w.add("W", "float64", (4,), 2, np.ones(2).tobytes())
        with pytest.raises(ValueError, match="whole"):
            w.add("W", "float32", (4,), 2, b"abc")
        w.abort()
        assert lg.log_bytes == before  # truncated back: the file is as before the record
        w = lg.begin(2)
        with pytest.raises(ValueError, match="cannot follow step 0"):
            w.commit()
        w.abort()
        with lg.begin(1) as w:
            w.add("W", "float32", (4,), 0, np.ones(4, np.float32).tobytes())
            w.commit()
        with pytest.raises(ValueError, match="already finished"):
            w.add("W", "float32", (4,), 0, np.ones(4, np.float32).tobytes())
        with pytest.raises(ZeroDivisionError):  # an exception in the with block aborts the record
            with lg.begin(2) as w:
                w.add("W", "float32", (4,), 0, np.ones(4, np.float32).tobytes())
                1 / 0
    with Log.open(tmp_path / "a.wal", "a") as lg:
        assert [r.step for r in lg.records()] == [1]


def test_interleaved_records(tmp_path):
    """Two streams of one session write at once; one commits, the other aborts."""
    with Log.open(tmp_path / "a.wal", "a") as lg:
        a, b = lg.begin(1, 0), lg.begin(1, 0)
        x = np.arange(8, dtype=np.float32)
        a.add("W", "float32", (8,), 0, x[:4].tobytes())
        b.add("W", "float32", (8,), 0, (x * 2)[:4].tobytes())
        b.add("W", "float32", (8,), 4, (x * 2)[4:].tobytes())
        a.add("W", "float32", (8,), 4, x[4:].tobytes())
        b.commit()
        a.abort()
        c = lg.begin(2, 1)  # a record open when the file is reopened is void
        c.add("W", "float32", (8,), 0, x.tobytes())
    with Log.open(tmp_path / "a.wal", "a") as lg:
        (r,) = lg.records()
        assert r.tensors["W"].tolist() == (x * 2).tolist()
        append(lg, 2)
    with Log.open(tmp_path / "a.wal", "a") as lg:
        assert [r.step for r in lg.records()] == [1, 2]


def test_reset_and_base_step(tmp_path):
    p = tmp_path / "a.wal"
    with Log.open(p, "a", base_step=10) as lg:
        for s in range(11, 16):
            append(lg, s)
        # a snapshot was written at 13 and the server died before the log was cut
        assert [r.step for r in lg.records(after=13)] == [14, 15]
        with pytest.raises(ValueError, match="would lose"):
            lg.reset(14)
        w = lg.begin(16)
        with pytest.raises(ValueError, match="still open"):
            lg.reset(15)
        w.abort()
        lg.reset(15)
        assert lg.log_bytes == 0 and lg.base_step == 15 and list(lg.records()) == []
        with pytest.raises(CorruptLog, match="cannot continue a snapshot at step 13"):
            list(lg.records(after=13))
        append(lg, 16)
    with Log.open(p, "a") as lg:
        assert lg.base_step == 15 and [r.step for r in lg.records()] == [16]
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(CorruptLog, match="belongs to session 'a'"):
        Log.open(p, "b")


def _log_with(tmp_path, steps=3, n=10, chunks=2):
    p = tmp_path / "a.wal"
    ends = []
    with Log.open(p, "a", sync="none") as lg:
        for s in range(1, steps + 1):
            append(lg, s, chunks=chunks, n=n)
            ends.append(lg.log_bytes)
    head = p.stat().st_size - ends[-1]
    return p, p.read_bytes(), [head] + [head + e for e in ends]


def test_torn_tail_at_every_offset(tmp_path):
    """A crash mid-append leaves any prefix of the last record: cut, then appending works."""
    p, data, bounds = _log_with(tmp_path)
    for cut in range(bounds[2], len(data)):
        p.write_bytes(data[:cut])
        with Log.open(p, "a", sync="none") as lg:
            recs = list(lg.records())
            assert [r.step for r in recs] == [1, 2]
            for r in recs:
                check(r, r.step)
            assert p.stat().st_size == bounds[2]  # the torn bytes are gone
            append(lg, 3)
        with Log.open(p, "a") as lg:
            assert [r.step for r in lg.records()] == [1, 2, 3]


def test_garbage_after_the_last_record_is_cut_and_in_the_middle_raises(tmp_path):
    p, data, bounds = _log_with(tmp_path)
    for junk in (b"\0" * 4096, os.urandom(100), wal.FRAME_MAGIC + b"\x03" + os.urandom(60)):
        p.write_bytes(data + junk)
        with Log.open(p, "a") as lg:
            assert [r.step for r in lg.records()] == [1, 2, 3]
        p.write_bytes(data[:bounds[1]] + junk + data[bounds[1]:])
        with pytest.raises(CorruptLog, match=f"offset {bounds[1]}") as e:
            Log.open(p, "a")
        assert str(p) in str(e.value)


def test_every_bit_flipped(tmp_path):
    """Each bit of a 3-record log flipped alone (thousands of cases): CorruptLog, or for a
    flip inside the last record a clean cut to the first two; never other numbers."""
    p, data, bounds = _log_with(tmp_path, n=3, chunks=1)
    outcomes = {"corrupt": 0, "cut": 0}
    for bit in range(len(data) * 8):
        b = bytearray(data)
        b[bit // 8] ^= 1 << (bit % 8)
        p.write_bytes(b)
        try:
            with Log.open(p, "a", sync="none") as lg:
                recs = list(lg.records())
        except CorruptLog:
            outcomes["corrupt"] += 1
            continue
        assert bit // 8 >= bounds[2], f"flip at byte {bit // 8} (before the last record) was not detected"
        assert [r.step for r in recs] == [1, 2]
        for r in recs:
            check(r, r.step, n=3)
        outcomes["cut"] += 1
    assert outcomes["corrupt"] > 0 and outcomes["cut"] > 0


def test_random_bit_flips_in_large_records(tmp_path):
    p, data, bounds = _log_with(tmp_path, steps=4, n=5000, chunks=4)
    rng = random.Random(7)
    for _ in range(60):
        bit = rng.randrange(bounds[0] * 8, len(data) * 8)
        b = bytearray(data)
        b[bit // 8] ^= 1 << (bit % 8)
        p.write_bytes(b)
        try:
            with Log.open(p, "a", sync="none") as lg:
                recs = list(lg.records())
        except CorruptLog:
            continue
        assert bit // 8 >= bounds[3] and [r.step for r in recs] == [1, 2, 3]
        for r in recs:
            check(r, r.step, n=5000)


def test_step_gap_raises(tmp_path):
    p = tmp_path / "a.wal"
    with Log.open(p, "a", sync="none") as lg:
        append(lg, 1)
        lg.last_step = 2  # as if step 2's record had vanished
        append(lg, 3)
    with pytest.raises(CorruptLog, match="record for step 3 follows step 1"):
        Log.open(p, "a")


def test_bad_file_header(tmp_path):
    p = tmp_path / "a.wal"
    Log.open(p, "a").close()
    data = p.read_bytes()
    for cut in (0, 5, 12, len(data) - 1):
        p.write_bytes(data[:cut])
        with pytest.raises(CorruptLog, match="offset 0"):
            Log.open(p, "a")
    p.write_bytes(data.replace(b'"base_step":0', b'"base_step":9'))
    with pytest.raises(CorruptLog, match="header checksum"):
        Log.open(p, "a")


# -- kill -9 of an appending process ---------------------------------------------------------
CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from optreg.server.storage.wal import Log
    from test_wal import append
    lg = Log.open({path!r}, "a", sync={sync!r})
    s = lg.last_step
    while True:
        s += 1
        append(lg, s, chunks=4, n={n})
        print(s, flush=True)   # acknowledged: commit() returned
""")


@pytest.mark.parametrize("sync", ["fsync", "os"])
def test_kill9_while_appending(tmp_path, sync):
    p, n = tmp_path / "a.wal", 20000
    code = CHILD.format(tests=os.path.dirname(__file__), path=str(p), sync=sync, n=n)
    helpers = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/: disk_helpers
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(SOURCE_ROOTS + [helpers]))
    rng = random.Random(3)
    acked = 0
    for kill in range(22):
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
        first = proc.stdout.readline()  # it has started appending
        assert first, "child died before its first record"
        acked = max(acked, int(first))
        time.sleep(rng.uniform(0.0, 0.15))
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        for line in out.split():
            acked = max(acked, int(line))
        with Log.open(p, "a", sync="none") as lg:
            recs = list(lg.records())
        steps = [r.step for r in recs]
        assert steps == list(range(1, len(steps) + 1))
        assert len(steps) >= acked, f"kill {kill}: acknowledged step {acked} lost (log has {len(steps)})"
        for r in recs[-3:]:
            check(r, r.step, n=n)
    assert acked >= 22


# -- group commit ----------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_group_commit_concurrent_appenders(tmp_path, method):
    syncer = GroupSyncer(method=method)
    logs = [Log.open(tmp_path / f"s{i}.wal", f"s{i}", sync="fsync", syncer=syncer) for i in range(16)]
    errors = []

    def run(lg):
        try:
            for s in range(1, 21):
                append(lg, s, n=1000)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(lg,)) for lg in logs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert syncer.synced >= 16 * 20  # every commit was in a sync batch ...
    assert syncer.batches < 16 * 20  # ... and batches were shared
    for i, lg in enumerate(logs):
        lg.close()
        with Log.open(tmp_path / f"s{i}.wal", f"s{i}") as again:
            assert [r.step for r in again.records()] == list(range(1, 21))
    syncer.close()


def test_os_mode_syncs_in_the_background(tmp_path):
    syncer = GroupSyncer(interval=0.05)
    with Log.open(tmp_path / "a.wal", "a", sync="os", syncer=syncer) as lg:
        append(lg, 1)
        assert syncer.batches == 0  # commit did not wait for a sync
        deadline = time.monotonic() + 10
        while syncer.batches == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert syncer.synced == 1
    syncer.close()


def test_wait_durable_after_commit(tmp_path):
    syncer = GroupSyncer()
    with Log.open(tmp_path / "a.wal", "a", sync="fsync", syncer=syncer) as lg:
        w = append(lg, 1, wait=False)
        assert syncer.batches == 0
        w.wait_durable()
        assert syncer.batches == 1
    syncer.close()


# -- disk full -------------------------------------------------------------------------------
@pytest.mark.parametrize("whole", [False, True], ids=["frames", "append"])
@pytest.mark.parametrize("sync", ["fsync", "os"])
def test_disk_full(sync, whole):
    with disk_helpers.small_tmpfs("1m") as d:
        filler = d / "filler"
        filler.write_bytes(b"x" * (600 << 10))
        p = d / "a.wal"
        syncer = GroupSyncer()
        lg = Log.open(p, "a", sync=sync, syncer=syncer)
        s, failed = 0, None
        while failed is None:
            try:
                if whole:
                    append_whole(lg, s + 1, n=3000)
                else:
                    append(lg, s + 1, chunks=3, n=3000)
                s += 1
            except OSError as e:
                failed = e
        assert failed.errno == errno.ENOSPC and s >= 1
        assert lg.last_step == s
        with Log.open(p, "a", sync="none") as other:  # what is on disk is every record before it
            assert [r.step for r in other.records()] == list(range(1, s + 1))
        filler.unlink()
        append(lg, s + 1, chunks=3, n=3000)  # the same log goes on once space is freed
        lg.close()
        with Log.open(p, "a") as again:
            recs = list(again.records())
            assert [r.step for r in recs] == list(range(1, s + 2))
            for r in recs:
                check(r, r.step, n=3000)
        syncer.close()


def test_random_interleavings_against_a_model(tmp_path):
    """Random sequences of begin/add/commit/abort over several open records, reopens and
    resets: the log always reads back exactly the committed records since its base."""
    rng = random.Random(11)
    p = tmp_path / "m.wal"
    lg = Log.open(p, "m", sync="none")
    model: dict[int, dict] = {}  # step -> tensors
    open_w: list = []            # [writer, tensors, remaining chunks]

    def compare(log_):
        got = {r.step: r.tensors for r in log_.records()}
        want = {s: t for s, t in model.items() if s > log_.base_step}
        assert sorted(got) == sorted(want)
        for s, t in want.items():
            assert set(got[s]) == set(t)
            for k in t:
                assert got[s][k].dtype == t[k].dtype and got[s][k].tobytes() == t[k].tobytes()

    for _ in range(1500):
        op = rng.random()
        if op < 0.2 and len(open_w) < 3:
            tensors = {f"t{i}": np.random.default_rng(rng.randrange(1 << 30)).standard_normal(
                rng.randrange(0, 40)).astype(rng.choice([np.float32, np.float16, ml_dtypes.bfloat16]))
                for i in range(rng.randrange(1, 4))}
            chunks = []
            for name, a in tensors.items():
                cuts = sorted({0, a.size, *(rng.randrange(a.size + 1) for _ in range(2))})
                chunks += [(name, lo, hi) for lo, hi in zip(cuts, cuts[1:])] or [(name, 0, 0)]
            rng.shuffle(chunks)
            open_w.append([lg.begin(0, None, {"lr": 0.1}), tensors, chunks])
        elif op < 0.75 and open_w:
            w, tensors, chunks = rng.choice(open_w)
            if chunks:
                name, lo, hi = chunks.pop()
                a = tensors[name]
                w.add(name, a.dtype, a.shape, lo, a[lo:hi])
        elif op < 0.93 and open_w:
            entry = rng.choice(open_w)
            w, tensors, chunks = entry
            if not chunks:
                w.commit(step=lg.last_step + 1)
                model[lg.last_step] = tensors
                open_w.remove(entry)
        elif op < 0.96 and open_w:
            entry = open_w.pop(rng.randrange(len(open_w)))
            entry[0].abort()
        elif op < 0.985:
            lg.close()  # records still open are void
            open_w.clear()
            lg = Log.open(p, "m", sync="none")
            compare(lg)
        elif not open_w:
            lg.reset(lg.last_step)
            compare(lg)
    lg.close()
    with Log.open(p, "m") as again:
        compare(again)
    assert len(model) > 50


# -- mapped memory logs ---------------------------------------------------------------------------
MAP_RACE_CHILD = textwrap.dedent("""
    import time
    import numpy as np
    from optreg.server.storage import wal

    lg = wal.Log.open({path!r}, "m", sync="none")
    sleep, cut = time.sleep, []

    def cut_while_populating(seconds):
        # map_ahead has mapped the grown file and is building its page tables, outside the log's lock: a
        # record aborted now (a step refused for a NaN) cuts the file back to where the record began
        if not cut:
            cut.append(1)
            w = lg.begin(1)
            w.add("w", np.float32, (2000,), 0, np.ones(1000, np.float32))  # part of a tensor: written at once
            w.abort()
        sleep(seconds)

    time.sleep = cut_while_populating
    lg.map_ahead(8 << 20)
    time.sleep = sleep
    assert cut
    print("mapped after the cut:", lg.mapped, flush=True)
    big = np.arange(1 << 20, dtype=np.float32)  # 4 MiB: above wal.MAPPED_PARALLEL, copied into a mapping
    for step in (1, 2):
        if step == 2:
            lg.map_ahead(16 << 20)
            assert lg.mapped
        with lg.begin(step) as w:
            w.add("w", np.float32, big.shape, 0, big + step)
            w.commit()
    lg.close()
    with wal.Log.open({path!r}, "m", sync="none") as again:
        got = [(r.step, np.array_equal(r.tensors["w"], big + r.step)) for r in again.records()]
    assert got == [(1, True), (2, True)], got
    print("ok", flush=True)
""")


def test_a_cut_while_a_memory_log_is_being_mapped_never_maps_past_its_end(tmp_path):
    """A record aborted (its frames cut off the file) while map_ahead was building the page tables of a
    mapping it had not installed yet: the mapping reached past the file's end, and the next large record's copy into
    it killed the server with SIGBUS. The mapping made before the cut is dropped; the next one is used."""
    helpers = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(SOURCE_ROOTS + [helpers]))
    got = subprocess.run([sys.executable, "-X", "faulthandler", "-c", MAP_RACE_CHILD.format(path=str(tmp_path / "m.wal"))],
                         env=env, capture_output=True, text=True, timeout=120)
    assert got.returncode == 0, f"child died ({got.returncode}): {got.stdout}{got.stderr[-2000:]}"
    assert got.stdout.splitlines() == ["mapped after the cut: False", "ok"]


def test_a_larger_mapping_put_in_while_a_chunk_is_copied(tmp_path, monkeypatch):
    """The disk writer's map_ahead puts a larger mapping in while a step's chunk is being copied into the old
    one (outside the log's lock): the old mapping stays open until the copy is done, and the record reads back."""
    lg = Log.open(tmp_path / "m.wal", "m", sync="none")
    lg.map_ahead(8 << 20)
    copy = wal._map_chunk

    def grow_then_copy(*args):
        lg.map_ahead(32 << 20)
        return copy(*args)

    monkeypatch.setattr(wal, "_map_chunk", grow_then_copy)
    big = np.arange(1 << 20, dtype=np.float32)
    for step in (1, 2):
        with lg.begin(step) as w:
            w.add("w", np.float32, big.shape, 0, big + step)
            w.commit()
    assert lg.mapped
    lg.close()
    with Log.open(tmp_path / "m.wal", "m", sync="none") as again:
        assert [(r.step, np.array_equal(r.tensors["w"], big + r.step)) for r in again.records()] == [(1, True), (2, True)]
