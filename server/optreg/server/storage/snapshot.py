"""Checked snapshot files: a session's tensors in one safetensors file whose header also
holds a checksum of every tensor and of the metadata itself.

The file is plain safetensors (8-byte little-endian header length, a JSON header padded
with spaces to a multiple of 8, then the tensors' bytes back to back), so
`safetensors.numpy.load_file` and torch's loader read it. Its `__metadata__` holds three
strings:

    "optreg"          the caller's metadata, JSON (sorted keys)
    "optreg_tensors"  JSON {name: {"dtype": "F32", "shape": [...], "xxh3": "<16 hex>"}}
    "optreg_check"    xxh3-64 (hex) of the two strings above, so an edited step, lr or
                      owner in the metadata is detected like a flipped bit in a tensor

The file is written by this module rather than `safetensors.numpy.save` so that a tensor
of shape [] stays [] (`np.ascontiguousarray`, which safetensors' numpy `save` calls, turns a
0-d array into shape [1]), so bfloat16 can be stored, and so that a large session is
written from its arrays without first building the whole file in memory.

Reading checks everything the header says before a byte of tensor data is trusted: the
header length against the file size, the JSON, every tensor's dtype among ALLOWED, its
shape, its byte range (inside the data, contiguous, no overlap or hole, length =
prod(shape) * itemsize), the agreement of safetensors' own entries with the checksummed
table, and finally each tensor's checksum. Anything wrong raises CorruptFile naming the
file, the tensor and what is wrong. OSError (missing file, I/O error) propagates as is.

Checksum: xxh3-64 (package `xxhash`), chosen by measurement on the project's VM against
crc32c, google-crc32c and zlib.crc32; see docs/durability.md.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import struct

import ml_dtypes
import numpy as np
import xxhash

from .fsync import fsync_dir

# Test-only: exit the process between writing the temporary file and renaming it, on
# the N-th snapshot write of this process.
CRASH_ENV = "OPTREG_TEST_CRASH_BEFORE_RENAME"
MAX_HEADER = 100 << 20  # a header larger than this is refused before it is read
KEY_META, KEY_TENSORS, KEY_CHECK = "optreg", "optreg_tensors", "optreg_check"

# safetensors dtype code -> numpy dtype; every dtype a session can hold.
ALLOWED = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64), "U32": np.dtype(np.uint32), "U16": np.dtype(np.uint16), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
CODE = {dt: code for code, dt in ALLOWED.items()}


class CorruptData(Exception):
    """A file that does not hold what it claims; the message names the file and the spot."""

    def __init__(self, path, what: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {what}")


class CorruptFile(CorruptData):
    """A snapshot file whose header or tensors fail a check."""


def checksum(data) -> str:
    return xxhash.xxh3_64_hexdigest(data)


def dtype_code(dtype) -> str:
    dt = np.dtype(dtype)
    if dt not in CODE:
        raise ValueError(f"dtype {dt} cannot be stored; allowed: {sorted(str(d) for d in CODE)}")
    return CODE[dt]


def _meta_check(meta_json: str, tensors_json: str) -> str:
    return checksum(meta_json.encode() + b"\0" + tensors_json.encode())


def encode_header(meta: dict, arrays: dict[str, np.ndarray]) -> tuple[bytes, list[np.ndarray]]:
    """(the 8-byte length + padded JSON header, the arrays in file order, C-contiguous)."""
    table, st_header, ordered, offset = {}, {}, [], 0
    for name, a in arrays.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} cannot be stored (must be a str other than __metadata__)")
        a = np.asarray(a)
        if not a.flags.c_contiguous:
            a = np.ascontiguousarray(a).reshape(a.shape)  # reshape keeps a 0-d array 0-d
        code = dtype_code(a.dtype)
        shape = [int(d) for d in a.shape]
        table[name] = {"dtype": code, "shape": shape, "xxh3": checksum(_bytes_view(a))}
        st_header[name] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        ordered.append(a)
    meta_json = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    tensors_json = json.dumps(table, sort_keys=True, separators=(",", ":"))
    st_header["__metadata__"] = {KEY_META: meta_json, KEY_TENSORS: tensors_json,
                                 KEY_CHECK: _meta_check(meta_json, tensors_json)}
    raw = json.dumps(st_header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, ordered


def _bytes_view(a: np.ndarray) -> memoryview:
    return memoryview(a.reshape(-1).view(np.uint8)) if a.size else memoryview(b"")


def write(path, meta: dict, arrays: dict[str, np.ndarray]) -> int:
    """Write the snapshot atomically (temporary file in the same directory, fsync, rename,
    directory fsync); returns the file's size. A crash at any point leaves the previous
    file whole."""
    path = pathlib.Path(path)
    head, ordered = encode_header(meta, arrays)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        size = _write_all(fd, head)
        for a in ordered:
            size += _write_all(fd, _bytes_view(a))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    _crash_hook()
    os.replace(tmp, path)
    try:
        fsync_dir(path.parent)
    except OSError as e:
        raise RenameNotDurable(e.errno, f"{path} is written and in place, but its directory's fsync failed "
                                        f"({e.strerror}): a power loss may bring back the previous file") from e
    return size


class RenameNotDurable(OSError):
    """The new snapshot is in place (every reader sees it) but the rename may not survive a power
    loss: the state it holds is the session's, and the log must keep covering the previous file."""


def _write_all(fd: int, data) -> int:
    view, n = memoryview(data), 0
    while n < len(view):
        n += os.write(fd, view[n:n + (1 << 30)])
    return n


_writes = 0


def _crash_hook() -> None:
    global _writes
    at = os.environ.get(CRASH_ENV)
    if at:
        _writes += 1
        if _writes >= int(at):
            os.write(2, f"{CRASH_ENV}: exiting before rename (write {_writes})\n".encode())
            os._exit(87)


class TensorSpec:
    __slots__ = ("name", "dtype", "shape", "begin", "end", "xxh3")

    def __init__(self, name, dtype, shape, begin, end, xxh3):
        self.name, self.dtype, self.shape, self.begin, self.end, self.xxh3 = name, dtype, shape, begin, end, xxh3

    def __repr__(self):
        return f"TensorSpec({self.name!r}, {self.dtype}, {list(self.shape)}, [{self.begin}, {self.end}))"


def read_header(path) -> tuple[dict, dict[str, TensorSpec], int]:
    """(meta, {name: TensorSpec}, offset of the data in the file), every check but the
    tensors' checksums done; reads only the header."""
    with open(path, "rb") as f:
        return _read_header(f, path)


def read_meta(path) -> dict:
    """The caller's metadata alone, from a validated header (tensor data not read)."""
    return read_header(path)[0]


def _read_header(f, path):
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise CorruptFile(path, f"{size} bytes is too short for a safetensors file")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER or n > size - 8:
        raise CorruptFile(path, f"header length {n} does not fit the file ({size} bytes; limit {MAX_HEADER})")
    raw = f.read(n)
    if len(raw) != n:
        raise CorruptFile(path, "header truncated while reading")
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptFile(path, f"header is not JSON ({e})") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise CorruptFile(path, "header has no __metadata__ object (not an optreg snapshot)")
    md = header.pop("__metadata__")
    meta_json, tensors_json, check = md.get(KEY_META), md.get(KEY_TENSORS), md.get(KEY_CHECK)
    if not all(isinstance(s, str) for s in (meta_json, tensors_json, check)):
        raise CorruptFile(path, f"__metadata__ lacks the strings {KEY_META}, {KEY_TENSORS}, {KEY_CHECK}")
    if _meta_check(meta_json, tensors_json) != check:
        raise CorruptFile(path, "metadata checksum mismatch: the metadata or the tensor table was altered")
    try:
        meta, table = json.loads(meta_json), json.loads(tensors_json)
    except ValueError as e:  # cannot happen for a file this module wrote, checksum and all
        raise CorruptFile(path, f"checksummed metadata is not JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(table, dict):
        raise CorruptFile(path, "metadata or tensor table is not a JSON object")
    if set(table) != set(header):
        odd = sorted(set(table) ^ set(header))[:3]
        raise CorruptFile(path, f"tensors in the header and in the checksummed table differ: {odd!r}")
    data_len = size - 8 - n
    specs = {}
    for name, t in table.items():
        specs[name] = _check_tensor(path, name, t, header[name], data_len)
    pos = 0
    for s in sorted(specs.values(), key=lambda s: (s.begin, s.end)):
        if s.begin != pos:
            what = "overlaps the previous tensor" if s.begin < pos else f"leaves a hole at byte {pos}"
            raise CorruptFile(path, f"tensor {s.name!r}: byte range [{s.begin}, {s.end}) {what}")
        pos = s.end
    if pos != data_len:
        raise CorruptFile(path, f"tensors cover {pos} bytes of data but the file holds {data_len}")
    return meta, specs, 8 + n


def _check_tensor(path, name, t, entry, data_len) -> TensorSpec:
    def bad(what):
        return CorruptFile(path, f"tensor {name!r}: {what}")
    if not isinstance(t, dict) or not isinstance(entry, dict):
        raise bad("table entry is not an object")
    code, shape, xxh3 = t.get("dtype"), t.get("shape"), t.get("xxh3")
    if code not in ALLOWED:
        raise bad(f"dtype {code!r} is not one of {sorted(ALLOWED)}")
    if (not isinstance(shape, list) or len(shape) > 64
            or not all(type(d) is int and 0 <= d < 1 << 62 for d in shape)):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not isinstance(xxh3, str):
        raise bad("no checksum")
    if entry.get("dtype") != code or entry.get("shape") != shape:
        raise bad(f"safetensors header says {entry.get('dtype')!r} {entry.get('shape')!r}, "
                  f"the checksummed table {code} {shape}")
    offs = entry.get("data_offsets")
    if not (isinstance(offs, list) and len(offs) == 2 and all(type(o) is int for o in offs)):
        raise bad(f"data_offsets {offs!r} is not two integers")
    begin, end = offs
    if not 0 <= begin <= end <= data_len:
        raise bad(f"byte range [{begin}, {end}) is outside the data (0 to {data_len})")
    want = math.prod(shape) * ALLOWED[code].itemsize
    if end - begin != want:
        raise bad(f"byte range holds {end - begin} bytes, shape {shape} of {code} needs {want}")
    return TensorSpec(name, ALLOWED[code], tuple(shape), begin, end, xxh3)


def read(path) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, {name: array}) with every check done; each array is fresh, owned and writable."""
    with open(path, "rb") as f:
        meta, specs, data_at = _read_header(f, path)
        arrays = {}
        for s in sorted(specs.values(), key=lambda s: s.begin):
            buf = bytearray(s.end - s.begin)
            f.seek(data_at + s.begin)
            if f.readinto(buf) != len(buf):
                raise CorruptFile(path, f"tensor {s.name!r}: file shrank while reading")
            if checksum(buf) != s.xxh3:
                raise CorruptFile(path, f"tensor {s.name!r}: checksum mismatch (data altered)")
            arrays[s.name] = np.frombuffer(buf, dtype=s.dtype).reshape(s.shape)
    return meta, {name: arrays[name] for name in specs}
