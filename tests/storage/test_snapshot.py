"""Checked snapshot files (optreg.server.storage.snapshot): round trips, every single-bit flip in a
header, random flips in data, crafted safetensors headers, the crash-before-rename hook."""
from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from optreg.server.storage import snapshot
from optreg.server.storage.snapshot import CorruptFile

import disk_helpers
from conftest import SOURCE_ROOTS

META = {"step": 7, "lr": 0.001, "owner": "ab" * 32, "optimizer": "adam"}


def arrays():
    rng = np.random.default_rng(0)
    return {
        "params/W": rng.standard_normal((4, 5)).astype(np.float32),
        "state/m/W": rng.standard_normal((4, 5)),                       # float64
        "half": rng.standard_normal(7).astype(np.float16),
        "brain": rng.standard_normal(6).astype(ml_dtypes.bfloat16),
        "scalar": np.array(3.25, dtype=np.float32),                     # shape []
        "empty": np.zeros((0, 3), dtype=np.float32),
        "rows": np.arange(5, dtype=np.int64),
        'any "name"/ \\ é\n\u2603 ': np.array([1.5, -2.0]),
        "": np.ones(2, dtype=np.float32),
    }


def assert_same(a: dict, b: dict):
    assert list(a) == list(b) or set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


def test_round_trip(tmp_path):
    p = tmp_path / "s.safetensors"
    src = arrays()
    size = snapshot.write(p, META, src)
    assert size == p.stat().st_size
    meta, got = snapshot.read(p)
    assert meta == META
    assert_same(src, got)
    assert got["scalar"].shape == ()          # finding 7: [] stays []
    for a in got.values():
        assert a.flags.writeable  # the store updates them in place
    assert snapshot.read_meta(p) == META
    _, specs, _ = snapshot.read_header(p)
    assert specs["params/W"].shape == (4, 5)


def test_plain_safetensors_reads_it(tmp_path):
    p = tmp_path / "s.safetensors"
    src = {k: v for k, v in arrays().items() if v.dtype != ml_dtypes.bfloat16}  # numpy's loader lacks BF16
    snapshot.write(p, META, src)
    plain = load_file(str(p))
    assert_same(src, plain)
    assert plain["scalar"].shape == ()


def test_non_contiguous_and_bad_names(tmp_path):
    p = tmp_path / "s.safetensors"
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    snapshot.write(p, {}, {"t": a.T})
    assert snapshot.read(p)[1]["t"].tobytes() == np.ascontiguousarray(a.T).tobytes()
    with pytest.raises(ValueError, match="__metadata__"):
        snapshot.write(p, {}, {"__metadata__": a})
    with pytest.raises(ValueError, match="cannot be stored"):
        snapshot.write(p, {}, {"c": np.zeros(2, np.complex64)})


def _flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


def test_every_bit_of_the_header_flipped(tmp_path):
    """Each of the header's bits (length included) flipped alone: always CorruptFile."""
    src = {"W": np.arange(4, dtype=np.float32), "s": np.array(1.0), "step": np.array([7])}
    good = tmp_path / "good.safetensors"
    snapshot.write(good, META, src)
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    bad = tmp_path / "bad.safetensors"
    for bit in range((8 + n) * 8):
        bad.write_bytes(_flip(data, bit))
        with pytest.raises(CorruptFile):
            snapshot.read(bad)
        with pytest.raises(CorruptFile):
            snapshot.read_meta(bad)


def test_random_bit_flips_in_data(tmp_path):
    src = arrays()
    good = tmp_path / "good.safetensors"
    snapshot.write(good, META, src)
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    rng = random.Random(1)
    bad = tmp_path / "bad.safetensors"
    for _ in range(200):
        bit = rng.randrange((8 + n) * 8, len(data) * 8)
        bad.write_bytes(_flip(data, bit))
        with pytest.raises(CorruptFile, match="checksum mismatch"):
            snapshot.read(bad)


def test_truncated_or_extended_file(tmp_path):
    good = tmp_path / "good.safetensors"
    snapshot.write(good, META, arrays())
    data = good.read_bytes()
    bad = tmp_path / "bad.safetensors"
    for cut in (0, 3, 8, 20, len(data) // 2, len(data) - 1):
        bad.write_bytes(data[:cut])
        with pytest.raises(CorruptFile):
            snapshot.read(bad)
    bad.write_bytes(data + b"\0")
    with pytest.raises(CorruptFile, match="file holds"):
        snapshot.read(bad)


def craft(path, header: dict, table: dict, data: bytes, meta=META, length=None):
    """A safetensors file with a valid metadata checksum but the given tensor entries."""
    meta_json, tensors_json = json.dumps(meta, sort_keys=True), json.dumps(table, sort_keys=True)
    header = dict(header, __metadata__={
        "optreg": meta_json, "optreg_tensors": tensors_json,
        "optreg_check": snapshot.checksum(meta_json.encode() + b"\0" + tensors_json.encode())})
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)


def entry(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def tab(data: bytes, dtype, shape, lo=0, hi=None):
    return {"dtype": dtype, "shape": shape, "xxh3": snapshot.checksum(data[lo:hi])}


W64 = np.arange(64, dtype=np.float32).tobytes()


@pytest.mark.parametrize("case,match", [
    # finding 11: a well-formed file whose m/W has 2 elements for a 64-element W
    (lambda: ({"W": entry("F32", [64], 0, 256), "m/W": entry("F32", [64], 256, 264)},
              {"W": tab(W64, "F32", [64]), "m/W": tab(W64, "F32", [64], 0, 8)}, W64 + W64[:8]),
     "needs 256"),
    (lambda: ({"W": entry("F32", [8, 8], 0, 256)}, {"W": tab(W64, "F32", [64])}, W64), "safetensors header says"),
    (lambda: ({"W": entry("F64", [64], 0, 256)}, {"W": tab(W64, "F32", [64])}, W64), "safetensors header says"),
    (lambda: ({"W": entry("C64", [32], 0, 256)}, {"W": tab(W64, "C64", [32])}, W64), "dtype 'C64'"),
    (lambda: ({"W": entry("F32", [-64], 0, 256)}, {"W": tab(W64, "F32", [-64])}, W64), "non-negative"),
    (lambda: ({"W": entry("F32", [64.0], 0, 256)}, {"W": tab(W64, "F32", [64.0])}, W64), "non-negative"),
    (lambda: ({"W": entry("F32", [64], 0, 1 << 40)}, {"W": tab(W64, "F32", [64])}, W64), "outside the data"),
    (lambda: ({"W": entry("F32", [64], -8, 248)}, {"W": tab(W64, "F32", [64])}, W64), "outside the data"),
    (lambda: ({"W": entry("F32", [64], 0, 256), "V": entry("F32", [32], 128, 256)},
              {"W": tab(W64, "F32", [64]), "V": tab(W64, "F32", [32], 128)}, W64), "overlaps"),
    (lambda: ({"W": entry("F32", [32], 128, 256)}, {"W": tab(W64, "F32", [32], 128)}, W64), "hole"),
    (lambda: ({"W": entry("F32", [64], 0, 256), "X": entry("F32", [0], 256, 256)},
              {"W": tab(W64, "F32", [64])}, W64), "differ"),
    (lambda: ({"W": {"dtype": "F32", "shape": [64]}}, {"W": tab(W64, "F32", [64])}, W64), "data_offsets"),
    (lambda: ({"W": entry("F32", [64], 0, 256)}, {"W": {"dtype": "F32", "shape": [64]}}, W64), "no checksum"),
    (lambda: ({"W": entry("F32", [64], 0, 256)}, {"W": tab(W64[:-4] + b"\0\0\0\0", "F32", [64])}, W64),
     "checksum mismatch"),
    (lambda: ({"W": entry("F32", [1 << 40, 1 << 40], 0, 256)}, {"W": tab(W64, "F32", [1 << 40, 1 << 40])}, W64),
     "needs"),
])
def test_crafted_headers(tmp_path, case, match):
    header, table, data = case()
    p = tmp_path / "crafted.safetensors"
    craft(p, header, table, data)
    with pytest.raises(CorruptFile, match=match) as e:
        snapshot.read(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("length", [2**63, 2**64 - 1, 10**9, 101 << 20])
def test_huge_header_length(tmp_path, length):
    p = tmp_path / "crafted.safetensors"
    craft(p, {"W": entry("F32", [64], 0, 256)}, {"W": tab(W64, "F32", [64])}, W64, length=length)
    with pytest.raises(CorruptFile, match="header length"):
        snapshot.read_meta(p)


@pytest.mark.parametrize("raw", [b"not json", b"[1,2]", b'{"W": 1}', b'{"__metadata__": {"optreg": "{}"}}',
                                 b"\xff\xfe{}"])
def test_headers_that_are_not_snapshots(tmp_path, raw):
    p = tmp_path / "x.safetensors"
    p.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(CorruptFile):
        snapshot.read(p)


def test_edited_metadata_is_detected(tmp_path):
    p = tmp_path / "s.safetensors"
    snapshot.write(p, META, {"W": np.ones(3, np.float32)})
    data = p.read_bytes()
    for old, new in ((b'\\"step\\":7', b'\\"step\\":8'), (b'\\"lr\\":0.001', b'\\"lr\\":0.101'),
                     (b'\\"owner\\":\\"abab', b'\\"owner\\":\\"cdcd')):
        assert old in data, old
        p.write_bytes(data.replace(old, new))
        with pytest.raises(CorruptFile, match="metadata checksum"):
            snapshot.read_meta(p)


def test_missing_file_is_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        snapshot.read(tmp_path / "nope.safetensors")


def test_crash_before_rename_keeps_the_old_file(tmp_path):
    p = tmp_path / "s.safetensors"
    snapshot.write(p, META, {"W": np.ones(3, np.float32)})
    code = textwrap.dedent(f"""
        import numpy as np
        from optreg.server.storage import snapshot
        snapshot.write({str(p)!r}, {{"step": 8}}, {{"W": np.zeros(3, np.float32)}})
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(SOURCE_ROOTS), OPTREG_TEST_CRASH_BEFORE_RENAME="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 87, r.stderr
    meta, got = snapshot.read(p)
    assert meta == META and got["W"].tolist() == [1, 1, 1]
    assert (tmp_path / ".s.safetensors.tmp").exists()  # left for the store's startup sweep


def test_disk_full_leaves_the_old_file(small_tmpfs):
    p = small_tmpfs / "s.safetensors"
    snapshot.write(p, META, {"W": np.ones(1000, np.float32)})
    with pytest.raises(OSError) as e:
        snapshot.write(p, {"step": 8}, {"W": np.ones(1 << 20, np.float32)})  # 4 MB on a 1 MB tmpfs
    assert e.value.errno == 28
    assert snapshot.read(p)[0] == META
    assert not (small_tmpfs / ".s.safetensors.tmp").exists()


@pytest.fixture
def small_tmpfs():
    with disk_helpers.small_tmpfs("1m") as d:
        yield d


def test_a_failed_directory_fsync_after_the_rename_keeps_memory_file_and_log_alike(tmp_path, monkeypatch):
    """The rename is done when the directory's fsync fails: the new file is what every reader (and a
    restart) sees, so the hyperparameter change it holds is the session's, and the log is kept (it
    still covers the previous file, should a power loss bring that back)."""
    import errno

    from optreg.client import Client
    from optreg.server.storage import snapshot as snap
    from optreg.server.storage import wal
    from optreg.server.assembly import OptregServer, Settings

    def failing(path):
        raise OSError(errno.EIO, "Input/output error")

    # (records to the disk log before the reply: the disk log is what this test reads; no memory log)
    srv = OptregServer(Settings(port=0, data_dir=str(tmp_path), memory_log_dir=""))
    srv.start()
    try:
        with Client(srv.address) as c:
            s = c.create_session("adam", {"w": np.ones(8, np.float32)}, session_id="s1")
            for _ in range(3):
                s.step({"w": np.full(8, 0.1, np.float32)})
            monkeypatch.setattr(snap, "fsync_dir", failing)
            s.set_hyperparameters(lr=0.5)
            monkeypatch.undo()
            assert c.get_session("s1").hyperparameters["lr"] == 0.5
            log_path = wal.path_for(tmp_path / "sessions", "s1")
            with wal.Log.open(log_path, "s1") as lg:
                assert lg.last_step == 3  # not emptied
            s.step({"w": np.full(8, 0.1, np.float32)})
            want = s.read_parameters()["w"]
    finally:
        srv.stop(0)
    meta = snap.read_meta(tmp_path / "sessions" / "s1.safetensors")
    assert meta["hyperparameters"]["lr"] == 0.5
    srv = OptregServer(Settings(port=0, data_dir=str(tmp_path)))
    srv.start()
    try:
        with Client(srv.address) as c:
            got = c.get_session("s1")
            assert got.step == 4 and got.hyperparameters["lr"] == 0.5
            np.testing.assert_array_equal(c.session("s1").read_parameters()["w"], want)
    finally:
        srv.stop(0)


@pytest.mark.parametrize("mode", ["every-step", "log"])
def test_a_log_whose_sync_failed_is_replaced_by_a_snapshot_at_the_next_step(tmp_path, monkeypatch, mode):
    """A failed fdatasync (EIO: the kernel may have dropped the log's pages) leaves the log refusing
    records. The next step writes a snapshot of memory (every acknowledged step, nothing else) and
    starts a new log, without a restart; the refused step is not in it; a restart agrees."""
    import errno
    import time

    from optreg.client import Client, RetryPolicy
    from optreg.client.errors import OptregError
    from optreg.server.storage import fsync
    from optreg.server.assembly import OptregServer, Settings

    def failing(fd):
        return OSError(errno.EIO, "Input/output error")

    g = {"w": np.full(8, 0.1, np.float32)}
    srv = OptregServer(Settings(port=0, data_dir=str(tmp_path)))
    srv.start()
    try:
        with Client(srv.address, retry=RetryPolicy(total_seconds=0)) as c:
            s = c.create_session("adam", {"w": np.ones(8, np.float32)}, session_id="s1", durability=mode)
            for _ in range(3):
                s.step(g)
            monkeypatch.setattr(fsync, "_fdatasync", failing)
            if mode == "every-step":
                with pytest.raises(OptregError, match="could not be written"):
                    s.step(g)  # refused: its record may or may not be on disk
            else:
                s.step(g)  # acknowledged when written to the OS; the background sync fails after
                deadline = time.monotonic() + 10
                while srv.store.journal._logs["s1"].broken is None and time.monotonic() < deadline:
                    time.sleep(0.05)
            monkeypatch.undo()
            s.step(g)  # no restart needed
            s.step(g)
            want_step = 5 if mode == "every-step" else 6
            assert c.get_session("s1").step == want_step
            want = s.read_parameters()["w"]
    finally:
        srv.stop(0)
    srv = OptregServer(Settings(port=0, data_dir=str(tmp_path)))
    srv.start()
    try:
        with Client(srv.address) as c:
            assert c.get_session("s1").step == want_step
            np.testing.assert_array_equal(c.session("s1").read_parameters()["w"], want)
    finally:
        srv.stop(0)
