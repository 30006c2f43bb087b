"""Many sessions on one server (issue 23): idle durable sessions leave memory (by count as well as by
idle time) and come back bit for bit; a start reads the data directory's index (storage/index.py),
not every session's files, and a session whose files changed after the index was written (a crash),
or a damaged or missing index, is read from its files: what a restart serves never depends on it."""
from __future__ import annotations

import ctypes
import os
import struct
import time

import grpc
import numpy as np
import pytest

from durability_helpers import digest, step_request, stub
from optreg.v1 import session_pb2, tensors

T = 60


def _create(st, sid, p, dtype=np.float32):
    config = session_pb2.SessionConfig(optimizer="adam", session_id=sid)  # ("log" with a data dir, else "none")
    st.CreateSession(session_pb2.CreateSessionRequest(
        config=config, parameters=[tensors.from_numpy("w", p.astype(dtype))]), timeout=T)


def _step(st, sid, step, g):
    return st.Step(step_request(sid, step, {"w": g}), timeout=T)


def _grad(k, dtype=np.float32):
    return np.cos(np.arange(64) * (k + 1)).astype(dtype)


def _info(st, sid):
    return st.GetSession(session_pb2.GetSessionRequest(session_id=sid), timeout=T).session


def _state(st, sid) -> tuple:
    """(step, parameters and state, serialized): what a step changes."""
    r = st.ReadState(session_pb2.ReadStateRequest(session_id=sid), timeout=T)
    return r.session.step, [t.SerializeToString() for t in r.parameters], [x.SerializeToString() for x in r.state]


def _fill(address, n) -> dict:
    """n sessions, each stepped once; their digests."""
    ch, st = stub(address)
    for i in range(n):
        _create(st, f"s{i}", np.linspace(-1, 1, 64) * (i + 1))
        _step(st, f"s{i}", 0, _grad(i))
    want = {f"s{i}": digest(st, f"s{i}") for i in range(n)}
    ch.close()
    return want


class Opened:
    """What is opened in (or as) a folder, seen by the kernel (inotify IN_OPEN): listing it opens it."""

    def __init__(self, folder):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0 and self.libc.inotify_add_watch(self.fd, str(folder).encode(), 0x20) >= 0  # IN_OPEN

    def names(self) -> list[str]:
        """The names opened since the last call ("." for the folder itself)."""
        out = []
        while True:
            try:
                data = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return out
            i = 0
            while i < len(data):
                _, _, _, n = struct.unpack_from("iIII", data, i)
                out.append(data[i + 16:i + 16 + n].rstrip(b"\0").decode() or ".")
                i += 16 + n

    def close(self):
        os.close(self.fd)


def _until(what, timeout=60):
    end = time.monotonic() + timeout  # a hang guard only
    while not what():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_a_session_unloaded_past_max_loaded_steps_as_if_it_never_left(start_server, tmp_path, dtype):
    """--max-loaded-sessions 1: of two sessions the one not in use is unloaded (to its files, its log
    closed); its next steps equal, bit for bit, those of a twin on a memory-only server (never unloaded)."""
    ref = start_server("--memory-only")
    s = start_server("--data-dir", str(tmp_path), "--max-loaded-sessions", "1")
    (ch, st), (rch, ref_st) = stub(s.address), stub(ref.address)
    p = np.linspace(-1, 1, 64)
    for x in (st, ref_st):
        _create(x, "a", p, dtype)
        for k in range(3):
            _step(x, "a", k, _grad(k, dtype))
    _create(st, "b", p, dtype)
    _until(lambda: not _info(st, "a").loaded)  # "b" was used last
    for k in (3, 4):  # "a" read back from its files
        ra, rr = _step(st, "a", k, _grad(k, dtype)), _step(ref_st, "a", k, _grad(k, dtype))
        assert ra.step == rr.step == k + 1
        assert [t.SerializeToString() for t in ra.tensors] == [t.SerializeToString() for t in rr.tensors]
        _step(st, "b", k - 3, _grad(k, dtype))  # "a" unloaded again
        _until(lambda: not _info(st, "a").loaded)
    assert _state(st, "a") == _state(ref_st, "a")
    ch.close()
    rch.close()


def test_a_start_reads_the_index_and_checks_a_file_only_when_it_loads(start_server, tmp_path):
    """After a clean stop the next start takes each session from the index, without reading its files:
    a snapshot damaged in place (same inode, size and time) goes unseen until the session is used,
    and is then refused DATA_LOSS, never served. A session the index does not know is read from its files."""
    data = str(tmp_path)
    s = start_server("--data-dir", data)
    want = _fill(s.address, 5)
    assert s.stop() == 0
    assert (tmp_path / "index").exists()
    path = tmp_path / "sessions" / "s3.safetensors"
    st0 = os.stat(path)
    with open(path, "r+b") as f:  # its header's checksum no longer holds: a read would find it corrupt
        f.seek(20)
        byte = f.read(1)
        f.seek(20)
        f.write(bytes([byte[0] ^ 0x20]))
    os.utime(path, ns=(st0.st_atime_ns, st0.st_mtime_ns))
    s = start_server("--data-dir", data)
    ch, st = stub(s.address)
    assert _info(st, "s3").step == 1 and not _info(st, "s3").quarantined  # from the index
    assert {f"s{i}": digest(st, f"s{i}") for i in (0, 1, 2, 4)} == {k: v for k, v in want.items() if k != "s3"}
    with pytest.raises(grpc.RpcError) as e:
        _step(st, "s3", 1, _grad(9))
    assert e.value.code() == grpc.StatusCode.DATA_LOSS
    ch.close()


def test_a_clean_restart_opens_no_session_file_nor_lists_the_folder_until_a_session_is_used(start_server, tmp_path):
    """After a clean stop the next start takes every session from the index alone: DIR/sessions is not
    even listed (the kernel sees nothing opened in it), so start-up does not grow with the sessions on
    disk beyond reading the index. A session's first use checks its files (a stat): one changed while
    no server ran (rewritten in place: same names, so the folder looks the same) is then read from its
    files, and served as they have it; the others' files are not opened."""
    data = tmp_path / "d"
    ref = start_server("--memory-only")
    rch, ref_st = stub(ref.address)
    s = start_server("--data-dir", str(data))
    ch, st = stub(s.address)
    for x in (st, ref_st):
        for i in range(12):
            _create(x, f"s{i}", np.linspace(-1, 1, 64) * (i + 1))
            _step(x, f"s{i}", 0, _grad(i))
    ch.close()
    assert s.stop() == 0
    folder = data / "sessions"
    old = {p: p.read_bytes() for p in (folder / "s5.safetensors", folder / "s5.wal")}
    s = start_server("--data-dir", str(data))
    ch, st = stub(s.address)
    for k in (1, 2):
        _step(st, "s5", k, _grad(k))
    ch.close()
    assert s.stop() == 0
    for p, body in old.items():  # s5 back at step 1 while no server runs, its files rewritten in place
        with open(p, "r+b") as f:
            f.truncate(0)
            f.write(body)
    opened = Opened(folder)
    try:
        s = start_server("--data-dir", str(data))
        ch, st = stub(s.address)
        assert _info(st, "s3").step == 1
        assert opened.names() == []  # not listed at start; s3's files not opened (a stat: as the index says)
        listed = st.ListSessions(session_pb2.ListSessionsRequest(), timeout=T).sessions
        assert [(x.session_id, x.step) for x in listed] == sorted((f"s{i}", 1) for i in range(12))
        assert sorted(set(opened.names())) == ["s5.safetensors", "s5.wal"]  # changed: read from its files
        assert _state(st, "s5") == _state(ref_st, "s5")
        ch.close()
    finally:
        opened.close()
    rch.close()


def test_sessions_changed_after_the_index_was_written_survive_a_kill(start_server, tmp_path):
    """The index is written at a clean stop; then the server steps, creates, deletes and re-creates
    sessions and is killed (SIGKILL) before writing it again. The next start serves each as a server
    that never stopped would: every change after the index was written is read from the files."""
    data = str(tmp_path / "d")
    ref = start_server("--memory-only")
    rch, ref_st = stub(ref.address)
    s = start_server("--data-dir", data)
    ch, st = stub(s.address)

    def both(fn):
        fn(st)
        fn(ref_st)

    for i in range(6):
        both(lambda x: _create(x, f"s{i}", np.linspace(-1, 1, 64) * (i + 1)))
        both(lambda x: _step(x, f"s{i}", 0, _grad(i)))
    ch.close()
    assert s.stop() == 0
    assert (tmp_path / "d" / "index").exists()
    s = start_server("--data-dir", data)
    ch, st = stub(s.address)
    both(lambda x: _step(x, "s1", 1, _grad(11)))  # its log grows
    both(lambda x: _step(x, "s1", 2, _grad(12)))
    both(lambda x: x.DeleteSession(session_pb2.DeleteSessionRequest(session_id="s2"), timeout=T))
    both(lambda x: x.DeleteSession(session_pb2.DeleteSessionRequest(session_id="s3"), timeout=T))
    both(lambda x: _create(x, "s3", np.linspace(5, 6, 64)))  # the same id, other files
    both(lambda x: _create(x, "new", np.linspace(0, 1, 64)))  # created after the index
    both(lambda x: _step(x, "new", 0, _grad(5)))
    ch.close()
    s.kill()
    s = start_server("--data-dir", data)
    ch, st = stub(s.address)
    ids = [x.session_id for x in st.ListSessions(session_pb2.ListSessionsRequest(), timeout=T).sessions]
    assert ids == ["new", "s0", "s1", "s3", "s4", "s5"]
    assert [_info(st, x).step for x in ids] == [1, 1, 3, 0, 1, 1]  # before any is loaded
    for sid in ids:
        assert _state(st, sid) == _state(ref_st, sid), sid
    both(lambda x: _step(x, "s1", 3, _grad(13)))
    assert _state(st, "s1") == _state(ref_st, "s1")
    ch.close()
    rch.close()


@pytest.mark.parametrize("damage", ["torn", "garbage", "missing"])
def test_a_damaged_or_missing_index_is_rebuilt_from_the_files(start_server, tmp_path, damage):
    data = str(tmp_path)
    s = start_server("--data-dir", data)
    want = _fill(s.address, 4)
    assert s.stop() == 0
    index = tmp_path / "index"
    body = index.read_bytes()
    if damage == "torn":  # (a crash during its write leaves the previous one whole: this is worse)
        index.write_bytes(body[:len(body) // 2])
    elif damage == "garbage":  # a whole-looking file whose checksum does not hold
        body = bytearray(body)
        body[len(body) // 2] ^= 1
        index.write_bytes(bytes(body))
    else:
        index.unlink()
    (tmp_path / ".index.tmp").write_bytes(b"half a write")  # left by a crash: removed
    (tmp_path / "sessions" / ".s1.safetensors.tmp").write_bytes(b"half a write")
    s = start_server("--data-dir", data)
    ch, st = stub(s.address)
    assert {f"s{i}": digest(st, f"s{i}") for i in range(4)} == want
    assert not (tmp_path / ".index.tmp").exists() and not (tmp_path / "sessions" / ".s1.safetensors.tmp").exists()
    ch.close()
    assert s.stop() == 0
    assert index.read_bytes().startswith(b"optreg-index/1 ")  # written again at the clean stop
