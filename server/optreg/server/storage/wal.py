"""The write-ahead log of one session: DIR/sessions/<id>.wal holds, after a header naming
the session and the base step (the step of the snapshot it follows), one record per step
applied since: the step, the client's fence, the hyperparameters in force, a small JSON
dict of extras, and the tensors as received (gradients, or for a non-deterministic
optimizer the results: extras {"kind": "result"}, names like "p/W", "s/m/W").

A record is written as it arrives, in frames, so logging overlaps the transfer and no
record is buffered whole:

    BEGIN  JSON {"step", "fence", "hp", "extras"}
    CHUNK  name, dtype, shape, offset (elements), then the raw bytes      (0 or more)
    COMMIT begin offset, frame count, record checksum, JSON {"step", ...} (the record counts)
    ABORT  (the record is void)

Every frame is [magic "OWF\\x01" | kind u8 | 3 pad | txn u64 | payload length u64 | xxh3-64
of the 24 bytes before it and the payload] + payload; the record checksum in COMMIT is the
xxh3-64 of the record's frame checksums in order. Frames of concurrent records (several
streams of one session, issue 10's workers) may interleave; each names its record's txn.

Reading (`Log.open`) checks every frame. Where a frame is bad (short, wrong magic or
kind, a length past the end, a checksum mismatch) the file is cut there, as a torn tail,
when no committed record follows it (or only the COMMIT of the damaged record, as the
file's last frame: a crash can persist a commit frame before the data it covers); any
other damage, and any structural contradiction in checksummed frames (a gap in step
numbers, an unknown txn, a chunk outside its tensor) raises CorruptLog naming the file and
the offset. Opening for append truncates the file after its last COMMIT.
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import itertools
import json
import logging
import math
import mmap
import os
import pathlib
import struct
import threading
import time
from typing import Iterator

import numpy as np
import xxhash

from .fsync import GroupSyncer, default_syncer, fsync_dir
from .snapshot import ALLOWED, CorruptData, dtype_code

log = logging.getLogger("optreg.server.storage.wal")

SUFFIX = ".wal"
FORMAT = "optreg-wal/1"
FILE_MAGIC = b"OPTRWAL\x01"
FRAME_MAGIC = b"OWF\x01"
BEGIN, CHUNK, COMMIT, ABORT = 1, 2, 3, 4
_FRAME = struct.Struct("<4sB3xQQ")     # magic, kind, txn, payload length
_HASH = struct.Struct("<Q")
FRAME_HEAD = _FRAME.size + _HASH.size  # 32
_COMMIT = struct.Struct("<QQQ")        # begin offset, frames, record checksum
_CHUNK_NAME = struct.Struct("<I")
_CHUNK_TYPE = struct.Struct("<BB")     # dtype code, ndim
_U64 = struct.Struct("<Q")
CODES = list(ALLOWED)                  # wire dtype code = index + 1 into safetensors codes
_CODE_OF = {ALLOWED[c]: i + 1 for i, c in enumerate(CODES)}
MAX_NAME = 1 << 16
MAX_NDIM = 64
MAX_JSON = 16 << 20                    # a BEGIN or COMMIT payload larger than this is damage
SYNC_MODES = ("fsync", "os", "none")
_READ_BLOCK = 8 << 20
_CHUNK_HEAD_MAX = 4 + MAX_NAME + 2 + 8 * MAX_NDIM + 8  # a CHUNK payload's description fits in this
# A record's whole small tensors, up to this many bytes with its BEGIN frame, wait (copied) and go
# out with its COMMIT frame: a small unary step's record is one pwritev instead of two. Larger
# tensors, and parts of tensors (a stream's chunks), are written as they arrive.
DEFER_BYTES = 64 << 10
# Frames and writes up to this many bytes are joined into one buffer before they are hashed or
# written: copying a few KiB costs less than a streaming hasher or a vector of buffers does.
SMALL_WRITE = 16 << 10
# A memory log (sync "none", on a tmpfs) may write through a mapping of pages allocated ahead of it
# (Log.map_ahead): a 40 MB chunk copied into mapped, populated pages takes ~4 ms on the project's VM, a
# pwrite of it ~9 ms (over allocated pages) to ~29 ms (allocating them). Chunks this large are copied and
# hashed in parallel, outside the log's lock, in blocks that stay in cache between the copy and the hash.
MAPPED_PARALLEL = 1 << 20
_COPY_BLOCK = 1 << 20
_MADV_POPULATE_WRITE = 23  # Linux 5.14: build the mapping's page tables now, not a fault a page at a step
_POPULATE_PIECE = 16 << 20


class CorruptLog(CorruptData):
    """A log with damage that is not a torn tail; `offset` is where it was found."""

    def __init__(self, path, offset: int, what: str):
        self.offset = offset
        super().__init__(path, f"offset {offset}: {what}")


@dataclasses.dataclass
class Record:
    step: int
    fence: int | None
    hyperparameters: dict
    extras: dict
    tensors: dict[str, np.ndarray]  # wire dtype and shape, reassembled from the chunks
    offset: int                     # of its BEGIN frame in the file

    @property
    def kind(self) -> str:
        return self.extras.get("kind", "gradients")


@dataclasses.dataclass
class _Chunk:
    name: str
    dtype: np.dtype
    shape: tuple
    offset_elems: int
    frame_off: int
    head: bytes      # the frame's first 24 bytes and its chunk description: re-hashed on read
    data_off: int
    nbytes: int
    frame_hash: int


@dataclasses.dataclass
class _Entry:  # a committed record in the index: where its pieces are
    step: int
    fence: int | None
    hyperparameters: dict
    extras: dict
    chunks: list
    offset: int


def path_for(sessions_dir, session_id: str) -> pathlib.Path:
    return pathlib.Path(sessions_dir) / f"{session_id}{SUFFIX}"


# NaN/Infinity allowed: a client's loss may be NaN, and Python reads them back. One encoder for
# every record: json.dumps with arguments builds a new JSONEncoder per call (~3 us of a record's).
_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":")).encode


def _dumps(obj) -> bytes:
    return _ENCODE(obj).encode()


def _file_header(session_id: str, base_step: int, first_txn: int = 0) -> bytes:
    fields = {"format": FORMAT, "session": session_id, "base_step": base_step}
    if first_txn:  # a memory log's file used again (Log.recycle): frames of lower txns are its earlier use's
        fields["first_txn"] = first_txn
    body = _dumps(fields)
    head = FILE_MAGIC + struct.pack("<I", len(body)) + body
    return head + _HASH.pack(xxhash.xxh3_64_intdigest(head))


def _frame(kind: int, txn: int, parts: list) -> tuple[list, int, int]:
    """(buffers to write, total length, frame checksum). `parts`: bytes or byte-cast memoryviews."""
    n = sum(map(len, parts))
    head = _FRAME.pack(FRAME_MAGIC, kind, txn, n)
    if n <= SMALL_WRITE:  # one call on a joined copy costs less than a streaming hasher's three
        digest = xxhash.xxh3_64_intdigest(head + b"".join(parts))
    else:
        h = xxhash.xxh3_64(head)
        for p in parts:
            h.update(p)
        digest = h.intdigest()
    return [head + _HASH.pack(digest), *parts], FRAME_HEAD + n, digest


def _writeback_starter():
    """libc's sync_file_range, to start writing a range back without waiting (Linux), or None."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


# In "fsync" mode a large chunk's writeback is started as soon as it is written, so the disk works while
# the rest of the step arrives and the commit's fdatasync waits only for the tail (40 MB written in 1 MiB
# chunks over ~90 ms, this VM's disk: the fdatasync after them 18 ms, 0.2 ms with this). Only a hint:
# the fdatasync still makes the record durable, and reports any error.
_SYNC_FILE_RANGE = _writeback_starter()
_SYNC_FILE_RANGE_WRITE = 2
WRITEBACK_ABOVE = 256 << 10


def _iov_max() -> int:
    try:
        n = os.sysconf("SC_IOV_MAX")
    except (ValueError, OSError, AttributeError):
        n = -1
    return n if n > 0 else 16  # (POSIX's least)


# Buffers a pwritev takes at most (Linux: 1024); a record of many small tensors has three a tensor.
_IOV_MAX = _iov_max()


def _pwrite_all(fd: int, bufs: list, off: int) -> None:
    if len(bufs) > 1 and sum(map(len, bufs)) <= SMALL_WRITE:  # (a small record: joined, one buffer)
        bufs = [b"".join(bufs)]
    views = [memoryview(b).cast("B") for b in bufs if len(b)]
    left, i = sum(v.nbytes for v in views), 0
    while left:
        n = os.pwritev(fd, views[i:i + _IOV_MAX], off)
        left -= n
        if not left:  # the usual case: one call wrote it all
            return
        off += n
        while n >= views[i].nbytes:
            n -= views[i].nbytes
            i += 1
        if n:
            views[i] = views[i][n:]


def _map_write(mm: mmap.mmap, at: int, bufs: list) -> None:
    """Copy `bufs` into the mapping at `at` (a memory log's frames: Log.map_ahead)."""
    dst = np.frombuffer(mm, np.uint8)
    for b in bufs:
        src = np.frombuffer(b, np.uint8)
        dst[at:at + src.size] = src
        at += src.size


def _map_chunk(dst: np.ndarray, at: int, head: bytes, meta: bytes, view) -> int:
    """A CHUNK frame copied into the mapping's bytes `dst` at `at`, its payload in blocks hashed while they are
    in cache (the gradient read from memory once), its header last: until then the frame reads back as a torn
    tail. Returns the frame's checksum."""
    h = xxhash.xxh3_64(head)
    h.update(meta)
    pos = at + FRAME_HEAD
    dst[pos:pos + len(meta)] = np.frombuffer(meta, np.uint8)
    pos += len(meta)
    src = np.frombuffer(view, np.uint8)
    for a in range(0, src.size, _COPY_BLOCK):
        block = src[a:a + _COPY_BLOCK]
        dst[pos + a:pos + a + block.size] = block
        h.update(block)
    digest = h.intdigest()
    dst[at:at + FRAME_HEAD] = np.frombuffer(head + _HASH.pack(digest), np.uint8)
    return digest


def _pread_exact(fd: int, n: int, off: int) -> bytes:
    out = b""
    while len(out) < n:
        piece = os.pread(fd, min(n - len(out), _READ_BLOCK), off + len(out))
        if not piece:
            break
        out += piece
    return out


class _Damage(Exception):
    def __init__(self, offset: int, what: str):
        self.offset, self.what = offset, what
        super().__init__(what)


def _parse_shape_meta(payload: bytes, path, off: int):
    """(name, dtype, shape, offset_elems, meta length) of a CHUNK payload's description."""
    try:
        (nlen,) = _CHUNK_NAME.unpack_from(payload, 0)
        if nlen > MAX_NAME:
            raise ValueError(f"name length {nlen}")
        p = _CHUNK_NAME.size
        name = payload[p:p + nlen].decode("utf-8")
        p += nlen
        code, ndim = _CHUNK_TYPE.unpack_from(payload, p)
        p += _CHUNK_TYPE.size
        if not 1 <= code <= len(CODES) or ndim > MAX_NDIM:
            raise ValueError(f"dtype code {code}, ndim {ndim}")
        shape = struct.unpack_from(f"<{ndim}Q", payload, p)
        p += 8 * ndim
        (elems,) = _U64.unpack_from(payload, p)
        p += 8
    except (struct.error, UnicodeDecodeError, ValueError) as e:
        raise CorruptLog(path, off, f"chunk description does not parse ({e})") from None
    return name, ALLOWED[CODES[code - 1]], tuple(shape), elems, p


class _Scan:
    """Reads and checks a whole log: the header, then every frame."""

    def __init__(self, fd: int, path: pathlib.Path, salvage: bool = False):
        self.fd, self.path, self.salvage = fd, path, salvage
        self.size = os.fstat(fd).st_size
        self._buf = memoryview(bytearray(min(_READ_BLOCK, max(self.size, 1))))
        self.session, self.base_step, self.first_txn, self.header_end = self._header()
        self.entries: list[_Entry] = []
        self.max_txn = 0
        self.good_end = self.header_end  # end of the last COMMIT frame
        self.cut: tuple[int, str] | None = None
        self.damaged = False  # damage that was not a torn tail, cut (salvage)
        self._frames()

    def _header(self):
        fixed = _pread_exact(self.fd, len(FILE_MAGIC) + 4, 0)
        if len(fixed) < len(FILE_MAGIC) + 4 or fixed[:len(FILE_MAGIC)] != FILE_MAGIC:
            raise CorruptLog(self.path, 0, "not an optreg log (bad magic or too short)")
        (n,) = struct.unpack_from("<I", fixed, len(FILE_MAGIC))
        if n > MAX_JSON or len(fixed) + n + 8 > self.size:
            raise CorruptLog(self.path, 0, f"header length {n} does not fit the file")
        rest = _pread_exact(self.fd, n + 8, len(fixed))
        if _HASH.unpack_from(rest, n)[0] != xxhash.xxh3_64_intdigest(fixed + rest[:n]):
            raise CorruptLog(self.path, 0, "header checksum mismatch")
        h = json.loads(rest[:n])
        if (h.get("format") != FORMAT or not isinstance(h.get("session"), str) or type(h.get("base_step")) is not int
                or type(h.get("first_txn", 0)) is not int):
            raise CorruptLog(self.path, 0, f"unknown header {h!r}; this server reads {FORMAT}")
        return h["session"], h["base_step"], h.get("first_txn", 0), len(fixed) + n + 8

    def _read_frame(self, pos: int):
        """(kind, txn, payload or its first bytes for a CHUNK, payload length, frame hash);
        raises _Damage when the frame is not whole and intact."""
        if self.size - pos < FRAME_HEAD:
            raise _Damage(pos, "frame header cut short")
        raw = _pread_exact(self.fd, FRAME_HEAD, pos)
        magic, kind, txn, n = _FRAME.unpack_from(raw)
        (want,) = _HASH.unpack_from(raw, _FRAME.size)
        if magic != FRAME_MAGIC or kind not in (BEGIN, CHUNK, COMMIT, ABORT):
            raise _Damage(pos, "no frame here (bad magic or kind)")
        if n > self.size - pos - FRAME_HEAD:
            raise _Damage(pos, f"frame length {n} runs past the end of the file")
        if kind != CHUNK and n > MAX_JSON:
            raise _Damage(pos, f"frame length {n} too large for its kind")
        h = xxhash.xxh3_64(raw[:_FRAME.size])
        if kind != CHUNK:  # small: read whole
            payload = _pread_exact(self.fd, n, pos + FRAME_HEAD)
            h.update(payload)
            if len(payload) != n or h.intdigest() != want:
                raise _Damage(pos, "frame checksum mismatch")
            return kind, txn, payload, n, want
        first = None
        at, left = pos + FRAME_HEAD, n
        while left:  # through one reused buffer: a 40 MB chunk is not copied into a bytes object
            piece = self._buf[:min(left, _READ_BLOCK)]
            if os.preadv(self.fd, [piece], at) != len(piece):
                raise _Damage(pos, "file shrank while reading")
            h.update(piece)
            if first is None:
                first = bytes(piece[:min(len(piece), _CHUNK_HEAD_MAX)])
            at += len(piece)
            left -= len(piece)
        first = first or b""
        if h.intdigest() != want:
            raise _Damage(pos, "frame checksum mismatch")
        return kind, txn, first, n, want

    def _frames(self):
        pos = self.header_end
        open_txns: dict[int, dict] = {}
        last = self.base_step
        while pos < self.size:
            try:
                kind, txn, payload, n, fh = self._read_frame(pos)
                if txn < self.first_txn:
                    raise _Damage(pos, f"a frame of the file's earlier use (txn {txn})")
            except _Damage as d:
                self._damaged(d)
                return
            self.max_txn = max(self.max_txn, txn)
            end = pos + FRAME_HEAD + n
            if kind == BEGIN:
                if txn in open_txns:
                    raise CorruptLog(self.path, pos, f"record txn {txn} begins twice")
                try:
                    b = json.loads(payload)
                    step, fence, hp, extras = b["step"], b["fence"], b["hp"], b["extras"]
                except (ValueError, KeyError, TypeError) as e:
                    raise CorruptLog(self.path, pos, f"record header does not parse ({e!r})") from None
                open_txns[txn] = {"off": pos, "fence": fence, "hp": hp, "extras": extras, "step": step,
                                  "hashes": [fh], "chunks": []}
            elif kind in (CHUNK, ABORT, COMMIT) and txn not in open_txns:
                raise CorruptLog(self.path, pos, f"frame of record txn {txn} that is not open")
            elif kind == CHUNK:
                name, dtype, shape, elems, mlen = _parse_shape_meta(payload, self.path, pos)
                nbytes = n - mlen
                if nbytes % dtype.itemsize:
                    raise CorruptLog(self.path, pos, f"chunk of {name!r}: {nbytes} bytes is not whole {dtype} items")
                head = _FRAME.pack(FRAME_MAGIC, CHUNK, txn, n) + payload[:mlen]
                open_txns[txn]["chunks"].append(_Chunk(name, dtype, shape, elems, pos, head,
                                                       pos + FRAME_HEAD + mlen, nbytes, fh))
                open_txns[txn]["hashes"].append(fh)
            elif kind == ABORT:
                del open_txns[txn]
            else:  # COMMIT
                t = open_txns.pop(txn)
                try:
                    begin_off, frames, rec_hash = _COMMIT.unpack_from(payload)
                    c = json.loads(payload[_COMMIT.size:])
                    step = c["step"]
                except (struct.error, ValueError, KeyError, TypeError) as e:
                    raise CorruptLog(self.path, pos, f"commit frame does not parse ({e!r})") from None
                if begin_off != t["off"] or frames != len(t["hashes"]) or rec_hash != _record_hash(t["hashes"]):
                    raise CorruptLog(self.path, pos, f"commit of step {step} does not match its record's frames")
                if type(step) is not int or step != last + 1:
                    raise CorruptLog(self.path, pos, f"record for step {step} follows step {last} (steps must be consecutive)")
                _check_cover(self.path, pos, t["chunks"])
                self.entries.append(_Entry(step, t["fence"], c.get("hp", t["hp"]), c.get("extras", t["extras"]),
                                           t["chunks"], t["off"]))
                last = step
                self.good_end = end
            pos = end
        if self.good_end < self.size:
            self.cut = (self.good_end, "records without a commit at the end")

    def _damaged(self, d: _Damage):
        """Damage at d.offset: a torn tail (cut) unless a committed record follows."""
        commits = [c for c in self._commit_frames_after(d.offset)]
        if not commits or (len(commits) == 1 and commits[0][1] == self.size and commits[0][2] <= d.offset):
            self.cut = (self.good_end, f"torn tail: {d.what} at offset {d.offset}")
            return
        if self.salvage:  # (Log.open's salvage: the records before the damage are what is left)
            self.cut = (self.good_end, f"damaged: {d.what} at offset {d.offset}; the {len(commits)} committed "
                                       f"record(s) after it are lost")
            self.damaged = True
            return
        raise CorruptLog(self.path, d.offset, f"{d.what}, and committed records follow it")

    def _commit_frames_after(self, start: int):
        """(offset, end, begin offset) of every intact COMMIT frame after `start`."""
        pattern = FRAME_MAGIC + bytes([COMMIT])
        pos = start + 1
        while pos < self.size:
            block = _pread_exact(self.fd, _READ_BLOCK + len(pattern), pos)
            i = block.find(pattern)
            while i != -1 and i < _READ_BLOCK:
                at = pos + i
                try:
                    kind, txn, payload, n, _fh = self._read_frame(at)
                    if kind == COMMIT and len(payload) >= _COMMIT.size and txn >= self.first_txn:
                        yield at, at + FRAME_HEAD + n, _COMMIT.unpack_from(payload)[0]
                except _Damage:
                    pass
                i = block.find(pattern, i + 1)
            pos += _READ_BLOCK


def _chunk_parts(name: str, dtype, shape, offset_elems: int, data):
    """A CHUNK frame's description and data, checked: (meta, data as bytes, dtype, shape, elements, the
    tensor's size)."""
    if not isinstance(name, str):
        raise ValueError(f"tensor name must be a str, not {type(name).__name__}")
    raw_name = name.encode("utf-8")
    if len(raw_name) > MAX_NAME:
        raise ValueError(f"tensor name of {len(raw_name)} bytes exceeds {MAX_NAME}")
    dt = np.dtype(dtype)
    code = _CODE_OF.get(dt) or CODES.index(dtype_code(dt)) + 1
    shape = tuple(map(int, shape))
    if len(shape) > MAX_NDIM or (shape and min(shape) < 0):
        raise ValueError(f"tensor {name!r}: shape {list(shape)} is not valid")
    try:
        view = memoryview(data).cast("B")
    except (TypeError, ValueError):  # not contiguous, or no buffer (numpy exports none for ml_dtypes' bfloat16)
        view = memoryview(np.ascontiguousarray(data).reshape(-1).view(np.uint8))
    if view.nbytes % dt.itemsize:
        raise ValueError(f"tensor {name!r}: {view.nbytes} bytes is not whole {dt} items")
    elems, size = view.nbytes // dt.itemsize, math.prod(shape)
    if offset_elems < 0 or offset_elems + elems > size:
        raise ValueError(f"tensor {name!r}: chunk [{offset_elems}, {offset_elems + elems}) outside its {size} elements")
    meta = (_CHUNK_NAME.pack(len(raw_name)) + raw_name + _CHUNK_TYPE.pack(code, len(shape))
            + struct.pack(f"<{len(shape)}Q", *shape) + _U64.pack(offset_elems))
    return meta, view, dt, shape, elems, size


def _commit_payload(begin_off: int, hashes: list[int], body: dict) -> bytes:
    """A COMMIT frame's payload: where the record begins, its frame count and checksum, then its JSON
    (a bare {"step"} formatted directly: it is every small record's)."""
    head = _COMMIT.pack(begin_off, len(hashes), _record_hash(hashes))
    return head + (b'{"step":%d}' % body["step"] if len(body) == 1 else _dumps(body))


def _record_hash(hashes: list[int]) -> int:
    return xxhash.xxh3_64_intdigest(struct.pack(f"<{len(hashes)}Q", *hashes))


def _check_cover(path, off, chunks: list):
    """Every tensor of a record: one dtype and shape, chunks tiling it exactly."""
    spans: dict[str, list] = {}
    for c in chunks:
        first = spans.setdefault(c.name, [c.dtype, c.shape, []])
        if (first[0], first[1]) != (c.dtype, c.shape):
            raise CorruptLog(path, off, f"tensor {c.name!r}: chunks disagree on dtype/shape")
        first[2].append((c.offset_elems, c.nbytes // c.dtype.itemsize))
    for name, (dtype, shape, parts) in spans.items():
        pos = 0
        for start, n in sorted(parts):
            if start != pos:
                raise CorruptLog(path, off, f"tensor {name!r}: chunks leave a gap or overlap at element {pos}")
            pos += n
        if pos != math.prod(shape):
            raise CorruptLog(path, off, f"tensor {name!r}: chunks hold {pos} of {math.prod(shape)} elements")


class Log:
    """One session's log, open for reading its records and appending new ones.

    Thread-safe: several records may be open at once (their frames interleave), commits
    are ordered by step."""

    def __init__(self, path, fd, scan: _Scan, sync: str, syncer: GroupSyncer | None,
                 pool: "LogPool | None" = None):
        self.path = pathlib.Path(path)
        self.session_id = scan.session
        self.base_step = scan.base_step
        self.sync = sync
        self._syncer = syncer or default_syncer()
        self._fd = fd
        self._header_end = scan.header_end
        self._end = scan.good_end
        self._entries = scan.entries
        self.last_step = scan.entries[-1].step if scan.entries else scan.base_step
        self._first_txn = scan.first_txn
        self._next_txn = max(scan.max_txn + 1, scan.first_txn)
        self._open: dict[int, RecordWriter] = {}
        self._lock = threading.Lock()
        self._broken: OSError | None = None
        self._closed = False
        self._hp_json: tuple | None = None  # (hyperparameters' items, their JSON): _begin_payload
        # With a pool the descriptor is open only while the log is in use (None: detached; what was read
        # stays, so reattaching costs an open, not a rescan). `_pins`: uses of the descriptor outside
        # the lock (a sync, a read of records), which keep it open.
        self._pool = pool
        self._pins = 0
        self._map: mmap.mmap | None = None  # map_ahead(): pages allocated past the end, written by copying
        self._resets = 0
        self._cuts = 0  # ftruncates of the file: a mapping made meanwhile may reach past its end (map_ahead)
        self._extended = False  # map_ahead() grew the file past its end (in zeros): its size is not the end

    # -- opening --------------------------------------------------------------------------
    @classmethod
    def open(cls, path, session_id: str, *, base_step: int = 0, sync: str = "os",
             syncer: GroupSyncer | None = None, pool: "LogPool | None" = None, salvage: bool = False) -> "Log":
        """Open the log at `path`, creating it (empty, based at `base_step`) if missing.
        Checks every record; cuts a torn tail; raises CorruptLog for other damage, or with `salvage` (a
        memory log, whose records the disk log does not hold) cuts there too: the records before it are
        all there is. With a `pool`, the descriptor is closed once read and reopened on first use (as the
        pool allows)."""
        if sync not in SYNC_MODES:
            raise ValueError(f"sync {sync!r}: choose one of {SYNC_MODES}")
        path = pathlib.Path(path)
        path.with_name(f".{path.name}.tmp").unlink(missing_ok=True)  # a create or reset cut short by a crash
        if not path.exists():
            _create(path, session_id, base_step)
        fd = os.open(path, os.O_RDWR)
        try:
            scan = _Scan(fd, path, salvage)
            if scan.session != session_id:
                raise CorruptLog(path, 0, f"log belongs to session {scan.session!r}, not {session_id!r}")
            if scan.cut is not None:
                at, why = scan.cut
                (log.error if scan.damaged else log.warning)(
                    "%s: cutting %d bytes at offset %d (%s); it ends at step %d", path, scan.size - at, at, why,
                    scan.entries[-1].step if scan.entries else scan.base_step)
                os.ftruncate(fd, at)
                os.fdatasync(fd)
        except BaseException:
            os.close(fd)
            raise
        if pool is not None:
            os.close(fd)
            fd = None
        return cls(path, fd, scan, sync, syncer, pool)

    # -- the descriptor (LogPool) ------------------------------------------------------------
    def _fd_now(self) -> int:
        """Caller holds the lock: the descriptor, reopened if the pool closed it (the file must be as
        this log left it: CorruptLog otherwise); marked most recently used in the pool. An OSError
        (EMFILE) leaves the log as it was: nothing is broken, the call may be retried."""
        if self._fd is None:
            if self._closed:
                raise ValueError(f"log {self.path} is closed")
            fd = os.open(self.path, os.O_RDWR)
            try:
                size = os.fstat(fd).st_size
                if ((size < self._end if self._extended else size != self._end)
                        or _pread_exact(fd, self._header_end, 0) != _file_header(self.session_id, self.base_step,
                                                                                      self._first_txn)):
                    raise CorruptLog(self.path, 0, "the file changed on disk while the server had it closed")
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
        if self._pool is not None:
            self._pool.touch(self)
        return self._fd

    def _unpin(self) -> None:
        with self._lock:
            self._pins -= 1

    def detach(self) -> bool:
        """Close the descriptor (synced first if a sync of it is owed: "os" mode's promise of a sync
        within its interval), keeping what was read. False, doing nothing, while the log is in use: its lock held,
        records open, the descriptor lent out."""
        if not self._lock.acquire(blocking=False):
            return False
        try:
            if self._open or self._pins:
                return False
            fd, self._fd = self._fd, None
            if fd is not None:
                try:
                    err = self._syncer.release(fd)  # (syncs only when a sync of it is still owed)
                    if err is not None and self._broken is None:
                        self._broken = err  # the data may be lost (fsyncgate): it stays refused
                finally:
                    os.close(fd)
        finally:
            self._lock.release()
        if self._pool is not None:
            self._pool.closed(self)
        return True

    # -- reading --------------------------------------------------------------------------
    def records(self, after: int | None = None) -> Iterator[Record]:
        """The committed records with step > `after` (default: the log's base step), in
        order, each read and checked again as it is yielded. CorruptLog if the log cannot
        continue a snapshot at step `after` (it starts later)."""
        after = self.base_step if after is None else after
        if after < self.base_step:
            raise CorruptLog(self.path, 0, f"the log starts after step {self.base_step}, so it cannot continue "
                                           f"a snapshot at step {after} (steps {after + 1}..{self.base_step} are lost)")
        with self._lock:
            entries = [e for e in self._entries if e.step > after]
            if not entries:  # (nothing to read: the descriptor stays as it is)
                return
            self._fd_now()
            self._pins += 1
        try:
            for e in entries:
                yield self._load(e)
        finally:
            self._unpin()

    def last_settings(self) -> tuple[dict, dict] | None:
        """(hyperparameters, extras) of the last committed record, without reading its tensors;
        None when the log has no record."""
        with self._lock:
            if not self._entries:
                return None
            e = self._entries[-1]
            return dict(e.hyperparameters), dict(e.extras)

    def _load(self, e: _Entry) -> Record:
        tensors: dict[str, np.ndarray] = {}
        for c in e.chunks:
            a = tensors.get(c.name)
            if a is None:
                a = tensors[c.name] = np.empty(c.shape, dtype=c.dtype)
            flat = a.reshape(-1).view(np.uint8)
            start = c.offset_elems * c.dtype.itemsize
            dest = memoryview(flat[start:start + c.nbytes])
            got = os.preadv(self._fd, [dest], c.data_off) if c.nbytes else 0
            h = xxhash.xxh3_64(c.head)
            h.update(dest)
            if got != c.nbytes or h.intdigest() != c.frame_hash:
                raise CorruptLog(self.path, c.frame_off, f"chunk of {c.name!r} changed on disk since the log was opened")
        return Record(e.step, e.fence, e.hyperparameters, e.extras, tensors, e.offset)

    # -- appending ------------------------------------------------------------------------
    def begin(self, step: int, fence: int | None = None, hyperparameters: dict | None = None,
              extras: dict | None = None) -> "RecordWriter":
        """Start the record of `step`; its BEGIN frame is written now."""
        hp = {k: float(v) for k, v in (hyperparameters or {}).items()}
        fence = None if fence is None else int(fence)
        extras = dict(extras or {})
        payload = self._begin_payload(int(step), fence, hp, extras)
        with self._lock:
            self._check_usable()
            w = RecordWriter(self, self._next_txn, int(step))
            w._begin_meta = {"fence": fence, "hp": hp, "extras": extras}
            self._next_txn += 1
            # The BEGIN frame goes out with the record's first chunk (or its commit): one
            # write less per record.
            bufs, n, digest = _frame(BEGIN, w.txn, [payload])
            w.pending = (bufs, n)
            w.hashes.append(digest)
            self._open[w.txn] = w
        return w

    def append(self, step: int, fence: int | None, hyperparameters: dict, extras: dict | None,
               tensors: list) -> None:
        """Write a whole record at once: the frames begin(), add() and commit() would write, in one write
        and one pass under the lock (a small unary step's record, whose every tensor came in one message).
        `tensors`: (name, dtype, shape, data) of whole tensors. Durable as commit() makes it; on OSError
        nothing of the record counts and the file is as before it."""
        step = int(step)
        hp = {k: float(v) for k, v in hyperparameters.items()}
        fence = None if fence is None else int(fence)
        extras = dict(extras or {})
        begin = self._begin_payload(step, fence, hp, extras)
        parts = []
        for name, dtype, shape, data in tensors:
            meta, view, dt, shape, elems, size = _chunk_parts(name, dtype, shape, 0, data)
            if elems != size:
                raise ValueError(f"tensor {name!r}: {elems} of {size} elements given; append takes whole tensors")
            parts.append((name, dt, shape, meta, view))
        if len({name for name, *_ in parts}) != len(parts):
            raise ValueError("a record names each tensor once")
        with self._lock:
            self._check_usable()
            if step != self.last_step + 1:
                raise ValueError(f"record of step {step} cannot follow step {self.last_step} in {self.path}")
            txn, at = self._next_txn, self._end
            self._next_txn += 1
            out, pos, digest = _frame(BEGIN, txn, [begin])
            hashes, chunks = [digest], []
            for name, dt, shape, meta, view in parts:
                bufs, n, digest = _frame(CHUNK, txn, [meta, view])
                chunks.append(_Chunk(name, dt, shape, 0, at + pos, bufs[0][:_FRAME.size] + meta,
                                     at + pos + FRAME_HEAD + len(meta), view.nbytes, digest))
                out += bufs
                hashes.append(digest)
                pos += n
            bufs, n, _ = _frame(COMMIT, txn, [_commit_payload(at, hashes, {"step": step})])
            out += bufs
            fd = self._fd_now()
            try:
                if self._map is not None and at + pos + n <= len(self._map):
                    _map_write(self._map, at, out)
                else:
                    _pwrite_all(fd, out, at)
            except OSError:
                self._truncate(at)
                raise
            self._end = at + pos + n
            self._others_interleaved()
            self.last_step = step
            self._entries.append(_Entry(step, fence, hp, extras, chunks, at))
            self._pins += 1
        try:
            self._durable(fd)
        finally:
            self._unpin()

    def _durable(self, fd: int) -> None:
        """After a commit: "fsync" waits for a group sync, "os" has the syncer sync within its interval."""
        if self.sync == "fsync":
            try:
                self._syncer.sync(fd)
            except OSError as e:
                self._broken = e  # the record may or may not be on disk: reopen to know
                raise
        elif self.sync == "os":
            self._syncer.dirty(fd)

    def _begin_payload(self, step: int, fence: int | None, hp: dict, extras: dict) -> bytes:
        """_dumps({"step", "fence", "hp", "extras"}), byte for byte, with the hyperparameters' JSON
        kept from the last record (they seldom change; encoding them was most of a small record's JSON)."""
        key = tuple((k, v.hex()) for k, v in hp.items())  # (by bits: -0.0 == 0.0, and both are logged as given)
        cached = self._hp_json
        if cached is None or cached[0] != key:
            cached = self._hp_json = (key, _dumps(hp))
        return b'{"extras":%s,"fence":%s,"hp":%s,"step":%d}' % (
            _dumps(extras) if extras else b"{}", b"null" if fence is None else b"%d" % fence, cached[1], step)

    def _check_usable(self, background: bool = True):
        if self._closed:
            raise ValueError(f"log {self.path} is closed")
        if self._broken is not None:
            raise self._broken
        err = self._syncer.error(self._fd) if background and self._fd is not None else None
        if err is not None:  # a background sync failed: the data may be gone (fsyncgate)
            self._broken = err
            raise err

    def _write_frame(self, w: "RecordWriter", kind: int, parts: list) -> None:
        """Under the lock: append one frame of `w`; on OSError make `w` void and leave the
        file as before it (or before the frame, if other records' frames follow `w`'s)."""
        bufs, n, digest = _frame(kind, w.txn, parts)
        at = frame_at = self._end
        if w.pending is not None:
            w.begin_off = at
            frame_at += w.pending[1]
            bufs = w.pending[0] + bufs
        try:
            if self._map is not None and frame_at + n <= len(self._map):
                _map_write(self._map, at, bufs)
            else:
                _pwrite_all(self._fd_now(), bufs, at)
        except OSError:
            w.failed = True
            self._open.pop(w.txn, None)
            self._truncate(w.begin_off if not w.interleaved else at)
            raise
        self._end = frame_at + n
        if w.pending is not None:
            for c in w._chunks:  # deferred chunks: their offsets were relative to the record's start
                c.frame_off += at
                c.data_off += at
        w.pending = None
        self._others_interleaved(w)
        w.hashes.append(digest)
        w.last_frame = (frame_at, bufs[-len(parts) - 1][:_FRAME.size], n, digest)

    def _others_interleaved(self, writer: "RecordWriter | None" = None) -> None:
        """Under the lock, after a write: open records already in the file are no longer its last frames
        (an abort of theirs then writes an ABORT frame rather than cutting the file)."""
        for other in self._open.values():
            if other is not writer and other.pending is None:
                other.interleaved = True

    def _truncate(self, at: int):
        try:
            if self._map is not None:  # the file keeps its mapped pages: what follows `at` is zeroed instead
                mapped = len(self._map)
                if at < mapped:
                    np.frombuffer(self._map, np.uint8)[at:min(self._end, mapped)] = 0
                if self._end > mapped:
                    self._cuts += 1
                    os.ftruncate(self._fd_now(), max(at, mapped))
            else:
                self._cuts += 1
                os.ftruncate(self._fd_now(), at)
            self._end = at
        except OSError as e:
            self._broken = e

    def reset(self, base_step: int) -> None:
        """Empty the log after a snapshot at `base_step` (atomically: a new file renamed
        over this one, then the directory fsync'd)."""
        with self._lock:
            self._check_usable()
            if self._open:
                raise ValueError(f"log {self.path}: {len(self._open)} record(s) still open")
            if base_step < self.last_step:
                raise ValueError(f"log {self.path} holds steps up to {self.last_step}; "
                                 f"a reset to {base_step} would lose them")
            _create(self.path, self.session_id, base_step)
            self._unmap()
            self._resets += 1
            self._extended = False
            fd, self._fd = self._fd, None  # the new file is opened on its first use
            if fd is not None:
                self._syncer.forget(fd)
                os.close(fd)
                if self._pool is not None:
                    self._pool.closed(self)
            self.base_step = self.last_step = base_step
            self._end = self._header_end = len(_file_header(self.session_id, base_step))
            self._first_txn = 0
            self._entries = []

    def recycle(self, path, base_step: int) -> None:
        """A mapped memory log whose records are all on disk, used again for the steps after `base_step`:
        emptied in place and moved to `path` (same file system), keeping its pages and mapping (none
        allocated, zeroed and freed a cycle). Its earlier frames stay in the file, told apart by their txns
        (the header's first_txn), and the first frame's place is zeroed: it reads as empty until written."""
        path = pathlib.Path(path)
        with self._lock:
            self._check_usable()
            if self._open or self._map is None:
                raise ValueError(f"log {self.path}: {'records still open' if self._open else 'not mapped'}")
            head = _file_header(self.session_id, int(base_step), self._next_txn)
            if len(head) + FRAME_HEAD > len(self._map):
                raise ValueError(f"log {self.path}: its mapping is smaller than a header")
            _map_write(self._map, 0, [head, bytes(FRAME_HEAD)])
            os.rename(self.path, path)
            self.path = path
            self._first_txn = self._next_txn
            self.base_step = self.last_step = int(base_step)
            self._end = self._header_end = len(head)
            self._entries = []

    def map_ahead(self, nbytes: int) -> None:
        """A memory log (sync "none", on a tmpfs): allocate the pages of the next `nbytes` past its end (the
        file grows by zeros, which read back as a torn tail), map them and build their page tables, so the
        frames that follow are copied in at memory speed. Off the steps' path (the disk writer); a hint:
        nothing when it fails, and frames past the mapping are written as before."""
        with self._lock:
            end, resets, cuts, path, old = self._end, self._resets, self._cuts, self.path, self._map
            size = -(-(end + int(nbytes)) // mmap.PAGESIZE) * mmap.PAGESIZE
            if self.sync != "none" or nbytes <= 0 or self._closed or (old is not None and len(old) >= size):
                return
            try:  # (under the lock: the file this log writes now, not one a reset puts in its place later)
                fd = os.open(path, os.O_RDWR)
            except OSError:
                return
            self._extended = True
        try:
            os.posix_fallocate(fd, 0, size)
            mm = mmap.mmap(fd, size)
        except (OSError, ValueError):
            return
        finally:
            os.close(fd)
        try:  # in pieces: populating holds the process's mmap lock, which the steps' page faults and allocations need
            for at in range(0, size, _POPULATE_PIECE):
                mm.madvise(_MADV_POPULATE_WRITE, at, min(_POPULATE_PIECE, size - at))
                time.sleep(0)
        except (OSError, AttributeError):
            pass  # (an older kernel: the pages fault in at the first write)
        with self._lock:
            # Not when the file was cut meanwhile (an aborted record, before any mapping was installed): pages
            # past its end would raise SIGBUS at the first copy into them.
            if (self._map is old and not self._closed and self._resets == resets and self._cuts == cuts
                    and self.path == path):
                self._map, mm = mm, old  # (a larger mapping of the same file replaces the old one)
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a copy still holds a view of the old mapping: it goes with the view
                pass

    def _unmap(self) -> None:
        mm, self._map = self._map, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a copy still holds a view: the mapping goes with it
                pass

    @property
    def mapped(self) -> bool:
        return self._map is not None

    def rename(self, path) -> None:
        """Move the file to `path` (same file system) and keep using it there: a memory log set aside
        whole, without a rescan, while a new one takes its place (storage/journal.py `_rotate`)."""
        path = pathlib.Path(path)
        with self._lock:
            os.rename(self.path, path)
            self.path = path

    @property
    def broken(self) -> OSError | None:
        """The error that made this log unusable (a failed sync or cut), if any: its data may be lost."""
        if self._broken is None and not self._closed and self._fd is not None:
            self._broken = self._syncer.error(self._fd)
        return self._broken

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def log_bytes(self) -> int:
        """Bytes after the header (records since the base step, and any open ones)."""
        return self._end - self._header_end

    def sync_now(self) -> None:
        """Make every record written so far durable (a clean stop in "os" mode)."""
        with self._lock:
            self._check_usable()
            fd = self._fd  # None: detached, which synced it
            if fd is None or self.sync == "none":
                return
            self._pins += 1
        try:
            self._syncer.sync(fd)
        finally:
            self._unpin()

    def close(self) -> None:
        """Sync ("fsync" and "os" modes) and close; records still open are void."""
        if self._closed:
            return
        with self._lock:
            fd = self._fd
            self._pins += 1  # (not detached meanwhile)
        try:
            if fd is not None and self.sync != "none" and self._broken is None:
                try:
                    self._syncer.sync(fd)
                except OSError as e:
                    log.error("%s: final sync failed: %s", self.path, e)
                    self._broken = e  # (what it holds may be lost: `broken` tells the closer)
        finally:
            if fd is not None:
                self._syncer.forget(fd)
            with self._lock:
                self._pins -= 1
                self._closed = True
                self._open.clear()
                self._unmap()
                if fd is not None:
                    os.close(fd)
                self._fd = None
            if self._pool is not None:
                self._pool.closed(self)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class LogPool:
    """Bounds the logs holding an open descriptor to `max_open` (--max-open-logs): a log opens its
    file on use and, past the bound, the least recently used idle logs are closed (Log.detach), to be
    reopened on their next use. A log in use (its lock held, a record open, a sync under way) is
    skipped, so with more logs in use at once than `max_open` the pool runs over by that many."""

    def __init__(self, max_open: int):
        if max_open < 1:
            raise ValueError(f"max_open {max_open}: give at least 1")
        self.max_open = max_open
        self._lock = threading.Lock()
        self._open: collections.OrderedDict[Log, None] = collections.OrderedDict()  # LRU first

    def __len__(self) -> int:
        return len(self._open)

    def touch(self, lg: Log) -> None:
        """`lg` (its lock held by the caller) has its descriptor open and is being used."""
        with self._lock:
            self._open[lg] = None
            self._open.move_to_end(lg)
            excess = len(self._open) - self.max_open
            if excess <= 0:
                return
            # A few more candidates than needed: some may be in use.
            candidates = [v for v in itertools.islice(self._open, excess + 8) if v is not lg]
        for v in candidates:  # (outside the pool's lock: a detach syncs; it only tries v's lock)
            if excess <= 0:
                break
            excess -= v.detach()

    def closed(self, lg: Log) -> None:
        with self._lock:
            self._open.pop(lg, None)


class RecordWriter:
    """One record being written: add() its chunks as they arrive, then commit() or abort()."""

    def __init__(self, log_: Log, txn: int, step: int):
        self.log, self.txn, self.step = log_, txn, step
        self.begin_off = 0
        self.hashes: list[int] = []
        self.failed = self.done = self.interleaved = False
        self.last_frame = None
        self._tensors: dict[str, list] = {}  # name -> [dtype, shape, [(offset, elems)]]
        self._chunks: list[_Chunk] = []
        self._durable_fd: int | None = None
        self._begin_meta: dict = {}
        self.pending = None  # the BEGIN frame, until the first write

    def add(self, name: str, dtype, shape, offset_elems: int, data) -> None:
        """Append one chunk of tensor `name` (dtype and shape of the whole tensor as received;
        `data` is raw bytes of items offset_elems, offset_elems+1, ...)."""
        meta, view, dt, shape, elems, size = _chunk_parts(name, dtype, shape, offset_elems, data)
        t = self._tensors.setdefault(name, [dt, shape, []])
        if (t[0], t[1]) != (dt, shape):
            raise ValueError(f"tensor {name!r}: chunk says {dt} {list(shape)}, earlier ones {t[0]} {list(t[1])}")
        if view.nbytes >= MAPPED_PARALLEL and self.log._map is not None and self._add_mapped(
                name, t, meta, view, dt, shape, offset_elems, elems):
            return
        with self.log._lock:
            self._check_open(background=False)
            if (self.pending is not None and elems == size
                    and self.pending[1] + FRAME_HEAD + len(meta) + view.nbytes <= DEFER_BYTES):
                # a whole small tensor while nothing of the record is in the file yet: it waits for
                # the commit, copied (the caller may reuse its buffer); offsets relative to the
                # record's first byte. Part of a tensor (a stream's chunk) is written as it arrives.
                bufs, n, digest = _frame(CHUNK, self.txn, [meta, bytes(view)])
                at = self.pending[1]
                self.pending = (self.pending[0] + bufs, at + n)
                self.hashes.append(digest)
                t[2].append((offset_elems, elems))
                self._chunks.append(_Chunk(name, dt, shape, offset_elems, at, bufs[0][:_FRAME.size] + meta,
                                           at + FRAME_HEAD + len(meta), view.nbytes, digest))
                return
            self.log._write_frame(self, CHUNK, [meta, view])  # (open, the record keeps the log attached)
            at, head, n, digest = self.last_frame
            t[2].append((offset_elems, elems))
            self._chunks.append(_Chunk(name, dt, shape, offset_elems, at, head + meta,
                                       at + FRAME_HEAD + len(meta), view.nbytes, digest))
            fd = self.log._fd
        if self.log.sync == "fsync" and n >= WRITEBACK_ABOVE and _SYNC_FILE_RANGE is not None:
            _SYNC_FILE_RANGE(fd, at, n, _SYNC_FILE_RANGE_WRITE)  # (a hint: its errors come back at the sync)

    def _add_mapped(self, name: str, t: list, meta: bytes, view, dt, shape, offset_elems: int, elems: int) -> bool:
        """A large chunk into the log's mapping: its place taken under the lock, then copied and hashed
        outside it, so chunks of one record (the halves of a resident step's gradient) go in in parallel.
        False when it does not fit the mapping (add() writes it as before)."""
        lg = self.log
        n = FRAME_HEAD + len(meta) + view.nbytes
        with lg._lock:
            self._check_open(background=False)
            mm = lg._map
            at = frame_at = lg._end
            if self.pending is not None:
                frame_at += self.pending[1]
            if mm is None or frame_at + n > len(mm):
                return False
            dst = np.frombuffer(mm, np.uint8)  # (taken under the lock: a larger mapping put in meanwhile cannot close it)
            if self.pending is not None:  # the BEGIN frame (and small tensors that waited) first
                _map_write(mm, at, self.pending[0])
                self.begin_off = at
                for c in self._chunks:
                    c.frame_off += at
                    c.data_off += at
                self.pending = None
            lg._end = frame_at + n
            lg._others_interleaved(self)
            head = _FRAME.pack(FRAME_MAGIC, CHUNK, self.txn, n - FRAME_HEAD)
            chunk = _Chunk(name, dt, shape, offset_elems, frame_at, head + meta,
                           frame_at + FRAME_HEAD + len(meta), view.nbytes, 0)
            slot = len(self.hashes)
            self.hashes.append(None)  # (commit refuses while a chunk is still being copied)
            t[2].append((offset_elems, elems))
            self._chunks.append(chunk)
        digest = _map_chunk(dst, frame_at, head, meta, view)
        with lg._lock:
            self.hashes[slot] = chunk.frame_hash = digest
        return True

    def _check_open(self, background: bool = True):
        if self.done or self.failed:
            raise ValueError(f"record of step {self.step} is already {'failed' if self.failed else 'finished'}")
        self.log._check_usable(background)

    def commit(self, step: int | None = None, *, hyperparameters: dict | None = None,
               extras: dict | None = None, wait: bool = True) -> None:
        """Write the commit frame: the record counts from now on. `step` (and the
        hyperparameters/extras, when given) override those given to begin(). Durability
        follows the log's mode: "fsync" waits for a group sync (unless wait=False: then
        call wait_durable()), "os" leaves it to the syncer (within its interval), "none"
        does nothing. On OSError the record is void and the file as before it."""
        step = self.step if step is None else int(step)
        for name, (dt, shape, parts) in self._tensors.items():
            pos = 0
            for start, n in sorted(parts):
                if start != pos:
                    raise ValueError(f"tensor {name!r}: chunks leave a gap or overlap at element {pos}")
                pos += n
            if pos != math.prod(shape):
                raise ValueError(f"tensor {name!r}: {pos} of {math.prod(shape)} elements received")
        body = {"step": step}
        if hyperparameters is not None:
            body["hp"] = {k: float(v) for k, v in hyperparameters.items()}
        if extras is not None:
            body["extras"] = dict(extras)
        lg = self.log
        with lg._lock:
            self._check_open()
            if None in self.hashes:
                raise ValueError(f"record of step {step}: a chunk is still being written")
            if step != lg.last_step + 1:
                raise ValueError(f"record of step {step} cannot follow step {lg.last_step} in {lg.path}")
            begin_off = lg._end if self.pending is not None else self.begin_off
            lg._write_frame(self, COMMIT, [_commit_payload(begin_off, self.hashes, body)])
            self.done = True
            lg._open.pop(self.txn, None)
            lg.last_step = step
            begin_meta = self._begin_meta
            lg._entries.append(_Entry(step, begin_meta["fence"], body.get("hp", begin_meta["hp"]),
                                      body.get("extras", begin_meta["extras"]), self._chunks, self.begin_off))
            fd = lg._fd
            lg._pins += 1  # until the sync below (wait_durable)
        if lg.sync == "fsync":
            self._durable_fd = fd
            if wait:
                self.wait_durable()
        else:
            try:
                lg._durable(fd)
            finally:
                lg._unpin()

    def wait_durable(self) -> None:
        """In "fsync" mode, block until the committed record is on disk (group commit)."""
        if not self.done:
            raise ValueError(f"record of step {self.step} is not committed")
        fd, self._durable_fd = self._durable_fd, None
        if fd is not None:
            try:
                self.log._durable(fd)
            finally:
                self.log._unpin()

    def abort(self) -> None:
        """The record is void: the file goes back to before it when no other record's
        frames follow it, else an ABORT frame marks it. Idempotent."""
        lg = self.log
        with lg._lock:
            if self.done or self.failed or lg._closed:
                return
            self.failed = True
            lg._open.pop(self.txn, None)
            if self.pending is not None:  # nothing of it reached the file
                return
            if not self.interleaved:
                lg._truncate(self.begin_off)
                return
            try:
                lg._write_frame(self, ABORT, [])
            except OSError:
                pass  # an uncommitted record is void anyway

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if not self.done:
            self.abort()


def _create(path: pathlib.Path, session_id: str, base_step: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        _pwrite_all(fd, [_file_header(session_id, int(base_step))], 0)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
