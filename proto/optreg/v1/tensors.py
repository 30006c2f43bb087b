"""numpy <-> optreg.v1.Tensor: the wire format's one codec, shared by server and clients.

Not generated: hand-written beside the bindings because it belongs to the
contract (dtype table, byte order, chunking) and both sides depend on it.
"""
from __future__ import annotations

import struct
import types
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from optreg.v1 import tensor_pb2

DataType = tensor_pb2.DataType

# Little-endian on the wire whatever the host.
DTYPES: dict[int, np.dtype] = {
    DataType.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    DataType.DATA_TYPE_FLOAT64: np.dtype("<f8"),
    DataType.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    DataType.DATA_TYPE_BFLOAT16: np.dtype(ml_dtypes.bfloat16),
    DataType.DATA_TYPE_INT8: np.dtype(np.int8),  # state slots' quantised codes only (Slot dtype)
    DataType.DATA_TYPE_UINT8: np.dtype(np.uint8),
}
_BY_NUMPY = {dt: code for code, dt in DTYPES.items()}

# Chunks on the streaming RPCs: 1 MiB (256 KiB and 4 MiB measured within noise of it: docs/speed.md,
# "What makes it fast").
CHUNK_BYTES = 1 << 20


def dtype_name(code: int) -> str:
    try:
        return DataType.Name(code)
    except ValueError:
        return str(code)


def to_code(dtype) -> int:
    dt = np.dtype(dtype).newbyteorder("<") if np.dtype(dtype).itemsize > 1 else np.dtype(dtype)
    try:
        return _BY_NUMPY[dt]
    except KeyError:
        raise ValueError(f"dtype {np.dtype(dtype)} has no wire type; use float32, float64, float16 or bfloat16") from None


def numpy_dtype(code: int) -> np.dtype:
    try:
        return DTYPES[code]
    except KeyError:
        raise ValueError(f"dtype {dtype_name(code)} is not supported; use "
                         + ", ".join(DataType.Name(c) for c in DTYPES)) from None


def from_numpy(name: str, array: np.ndarray) -> tensor_pb2.Tensor:
    # Written for the small-step path: one dict lookup for the usual dtypes, no copy before tobytes().
    if type(array) is not np.ndarray:
        array = np.asarray(array)
    code = _BY_NUMPY.get(array.dtype)
    if code is None:  # big-endian or not a wire dtype
        code = to_code(array.dtype)
        array = np.ascontiguousarray(array, dtype=DTYPES[code])
    return tensor_pb2.Tensor(name=name, dtype=code, shape=array.shape, data=array.tobytes())


def to_numpy(tensor: tensor_pb2.Tensor) -> np.ndarray:
    """A whole tensor as a read-only array viewing its bytes; ValueError naming what is wrong."""
    dtype = DTYPES.get(tensor.dtype) or numpy_dtype(tensor.dtype)
    shape = tuple(tensor.shape)
    count = element_count(shape, f"tensor {_quoted(tensor.name)}")
    if tensor.offset:
        raise ValueError(f"tensor {_quoted(tensor.name)}: offset {tensor.offset} given; only the streaming RPCs take chunks")
    data = tensor.data  # one read: each access of a bytes field copies
    want = count * dtype.itemsize
    if len(data) != want:
        raise ValueError(f"tensor {_quoted(tensor.name)}: {len(data)} bytes of data, but shape {list(shape)} of "
                         f"{dtype_name(tensor.dtype)} needs {want}")
    array = np.frombuffer(data, dtype=dtype)
    return array if len(shape) == 1 else array.reshape(shape)


def chunk(name: str, array: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tensor_pb2.Tensor]:
    """Split one array into Tensor chunks of at most chunk_bytes (at least one, even when empty)."""
    array = np.asarray(array)
    code = to_code(array.dtype)
    flat = np.ascontiguousarray(array, dtype=DTYPES[code]).reshape(-1)
    step = max(1, chunk_bytes // flat.itemsize)
    shape = array.shape
    for start in range(0, max(flat.size, 1), step):
        yield tensor_pb2.Tensor(name=name, dtype=code, shape=shape, offset=start,
                                data=flat[start:start + step].tobytes())


def pack(items: Iterable, chunk_bytes: int = CHUNK_BYTES, size=lambda t: len(t.data)) -> Iterator[list]:
    """Group chunks into lists of about chunk_bytes, one list per streamed message; `size(item)` is its bytes."""
    batch, total = [], 0
    for item in items:
        n = size(item)
        if batch and total + n > chunk_bytes:
            yield batch
            batch, total = [], 0
        batch.append(item)
        total += n
    if batch:
        yield batch


def _quoted(name: str, limit: int = 80) -> str:
    """A client-given name for an error message, cut so no message grows with the input."""
    text = repr(name)
    return text if len(text) <= limit else f"{text[:limit]}...({len(name)} characters)"


def element_count(shape, what: str = "tensor") -> int:
    """The number of elements of `shape`; ValueError for a negative dimension."""
    count = 1
    for d in shape:
        if d < 0:
            raise ValueError(f"{what}: shape {list(shape)} has a negative dimension")
        count *= d  # Python ints: no overflow
    return count


class ChunkTracker:
    """The one check of tensors arriving whole or in chunks: name, dtype, shape, whole
    elements, chunks in order with no gap, overlap or overrun, and (finish) every tensor
    complete. Used by every source of the server's steps and by the client's reassembly.

    `expect`: name -> (shape, dtypes allowed); without it any name and shape is taken,
    up to `max_tensors` names and `max_bytes` a tensor (checked before anything is
    allocated). `what` names the tensors in messages ("gradient", "parameter").
    ValueError messages name the tensor and say what to send instead.
    """

    def __init__(self, expect: dict[str, tuple[tuple, tuple]] | None = None, what: str = "tensor",
                 max_bytes: int | None = None, max_tensors: int | None = None, max_name: int = 256):
        self.expect = expect
        self.what = what
        self.max_bytes = max_bytes
        self.max_tensors = max_tensors
        self.max_name = max_name
        self.filled: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        self.kinds: dict[str, tuple] = {}  # name -> (shape, dtype code)

    def _first(self, t) -> None:
        name, shape, what = t.name, tuple(t.shape), self.what
        if not name:
            raise ValueError(f"a {what} has an empty name")
        if len(name) > self.max_name:
            raise ValueError(f"{what} name {_quoted(name)} is longer than {self.max_name} characters")
        dtype = numpy_dtype(t.dtype)
        if self.expect is not None:
            if name not in self.expect:
                known = ", ".join(_quoted(n, 40) for n in list(self.expect)[:20])
                raise ValueError(f"unknown {what} {_quoted(name)}; the session's are: {known}"
                                 + (" ..." if len(self.expect) > 20 else ""))
            want_shape, allowed = self.expect[name]
            if t.dtype not in allowed:
                raise ValueError(f"{what} {_quoted(name)}: dtype {dtype_name(t.dtype)} is not accepted here; send "
                                 + " or ".join(dtype_name(a) for a in allowed))
            if shape != tuple(want_shape):
                raise ValueError(f"{what} {_quoted(name)}: shape {list(shape)}, but the session's is "
                                 f"{list(want_shape)}")
        elif self.max_tensors is not None and len(self.sizes) >= self.max_tensors:
            raise ValueError(f"more than {self.max_tensors} {what}s: the server's limit (--max-tensors)")
        size = element_count(shape, f"{what} {_quoted(name)}")
        if self.max_bytes is not None and size * dtype.itemsize > self.max_bytes:
            raise ValueError(f"{what} {_quoted(name)}: shape {list(shape)} is {size * dtype.itemsize} bytes, "
                             f"more than the {self.max_bytes} accepted here")
        if t.offset != 0:
            raise ValueError(f"{what} {_quoted(name)}: first chunk at offset {t.offset}, expected 0 "
                             "(chunks out of order or missing)")
        self.filled[name] = 0
        self.sizes[name] = size
        self.kinds[name] = (shape, t.dtype)

    def accept(self, t) -> tuple[int, np.ndarray]:
        """Check one chunk (or whole tensor); returns (its first element, a flat read-only view of its data)."""
        name = t.name
        if name not in self.kinds:
            self._first(t)
        elif (tuple(t.shape), t.dtype) != self.kinds[name]:
            raise ValueError(f"{self.what} {_quoted(name)}: a chunk changed shape or dtype mid-stream")
        dtype = DTYPES[t.dtype]
        data = t.data  # read once: each access of a protobuf bytes field copies
        if len(data) % dtype.itemsize:
            raise ValueError(f"{self.what} {_quoted(name)}: {len(data)} bytes is not a whole number of "
                             f"{dtype_name(t.dtype)} elements ({self._needs(name)})")
        n = len(data) // dtype.itemsize
        start = self.filled[name]
        if t.offset != start:
            raise ValueError(f"{self.what} {_quoted(name)}: chunk at offset {t.offset}, expected {start} "
                             "(chunks out of order, repeated or missing)")
        if start + n > self.sizes[name]:
            raise ValueError(f"{self.what} {_quoted(name)}: {(start + n) * dtype.itemsize} bytes sent, but "
                             f"{self._needs(name)}")
        self.filled[name] = start + n
        return start, np.frombuffer(data, dtype=dtype)

    def finish(self) -> None:
        """Every tensor complete, and with `expect` every expected one present."""
        for name in (self.expect if self.expect is not None else self.sizes):
            got = self.filled.get(name)
            if got is None:
                raise ValueError(f"missing {self.what} for {_quoted(name)}: send one for every parameter")
            if got != self.sizes[name]:
                itemsize = DTYPES[self.kinds[name][1]].itemsize
                raise ValueError(f"{self.what} {_quoted(name)}: {got} of {self.sizes[name]} elements "
                                 f"({got * itemsize} bytes) arrived: {self._needs(name)}; the stream ended early")

    def _needs(self, name: str) -> str:
        shape, code = self.kinds[name]
        return f"shape {list(shape)} of {dtype_name(code)} needs {self.sizes[name] * DTYPES[code].itemsize} bytes"


class Assembler:
    """Reassembles chunked tensors into arrays, checked by a ChunkTracker (same arguments)."""

    def __init__(self, expect: dict[str, tuple[tuple, tuple]] | None = None, max_bytes: int | None = None,
                 what: str = "tensor", max_tensors: int | None = None, reserve=None):
        """`reserve(name, nbytes)` is called before each tensor's array is allocated (it may raise)."""
        self.tracker = ChunkTracker(expect, what, max_bytes, max_tensors)
        self.arrays: dict[str, np.ndarray] = {}
        self.reserve = reserve

    def add(self, t: tensor_pb2.Tensor) -> None:
        start, data = self.tracker.accept(t)
        arr = self.arrays.get(t.name)
        if arr is None:
            shape, code = self.tracker.kinds[t.name]
            if self.reserve is not None:
                self.reserve(t.name, self.tracker.sizes[t.name] * DTYPES[code].itemsize)
            arr = self.arrays[t.name] = np.empty(shape, dtype=DTYPES[code])
        arr.reshape(-1)[start:start + data.size] = data

    def finish(self) -> dict[str, np.ndarray]:
        self.tracker.finish()
        return self.arrays


# -- streamed messages encoded directly -----------------------------------------
# StepStream moves tens of MB per step. Building a Tensor per chunk copies its bytes
# (tobytes, then into the message, then out again when serialized), each copy into
# fresh memory that the kernel must fault in; encoding the wire format directly
# copies each chunk once. The bytes are exactly what SerializeToString gives for
# the same message (tests compare them), so the receiving side cannot tell.

def varint(n: int) -> bytes:
    if n < 0:
        n += 1 << 64  # int64: ten bytes, two's complement
    if n < 0x80:
        return bytes((n,))
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _append_tensor(parts: list, name: str, code: int, shape, offset: int, data: np.ndarray) -> None:
    """Append one Tensor, as field 3 of a StepStream message, to `parts` (fields in number order)."""
    head = bytearray()
    if name:
        nb = name.encode()
        head += b"\x0a" + varint(len(nb)) + nb
    if code:
        head += b"\x10" + varint(code)
    if len(shape):
        packed = b"".join(varint(int(d)) for d in shape)
        head += b"\x1a" + varint(len(packed)) + packed
    nbytes = data.nbytes
    if nbytes:
        head += b"\x22" + varint(nbytes)
    tail = b"\x28" + varint(offset) if offset else b""
    parts.append(b"\x1a" + varint(len(head) + nbytes + len(tail)))
    parts.append(bytes(head))
    if nbytes:
        parts.append(data.reshape(-1).view(np.uint8))
    if tail:
        parts.append(tail)


def encode_stream_message(head: bytes, chunks) -> bytes:
    """One StepStreamRequest/StepStreamResponse: `head` (its fields 1-2, encoded) and
    chunks as (name, code, shape, offset, contiguous array); one copy of the data."""
    parts = [head]
    for name, code, shape, offset, data in chunks:
        _append_tensor(parts, name, code, shape, offset, data)
    return b"".join(parts)


def chunk_views(name: str, array: np.ndarray, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple]:
    """chunk() without the copies: (name, code, shape, offset, view of the slice) for each chunk."""
    array = np.asarray(array)
    code = to_code(array.dtype)
    flat = np.ascontiguousarray(array, dtype=DTYPES[code]).reshape(-1)
    step = max(1, chunk_bytes // flat.itemsize)
    shape = array.shape
    for start in range(0, max(flat.size, 1), step):
        yield name, code, shape, start, flat[start:start + step]


def pack_views(chunks: Iterable[tuple], chunk_bytes: int = CHUNK_BYTES) -> Iterator[list]:
    """pack() for chunk_views() tuples: the same grouping."""
    return pack(chunks, chunk_bytes, size=lambda c: c[4].nbytes)


def response_head(step: int, replayed: bool = False, provisional: bool = False, lr: float = 0.0) -> bytes:
    """Fields 1-2 (and 9, 10) of a StepStreamResponse, encoded (a request's later messages have none);
    fields 1-2 of a StepResponse too (its lr, field 9, is encoded after the tensors)."""
    return ((b"\x08" + varint(step) if step else b"") + (b"\x10\x01" if replayed else b"")
            + (b"\x48\x01" if provisional else b"") + (b"\x51" + struct.pack("<d", lr) if lr else b""))


def serialize_passthrough(serialize):
    """A gRPC serializer taking messages and already-encoded bytes alike."""
    def ser(m):
        return m if type(m) is bytes else serialize(m)
    return ser


class StreamTensor:
    """A Tensor of a decoded StepStreamResponse; `data` is a memoryview into the received bytes."""
    __slots__ = ("name", "dtype", "shape", "offset", "data")

    def __init__(self):
        self.name, self.dtype, self.shape, self.offset, self.data = "", 0, [], 0, memoryview(b"")


class StreamResponse:
    """A decoded StepStreamResponse (step, replayed, chunks; and a shared session's round, staleness and
    contributors) whose chunks' data are not copied."""
    __slots__ = ("step", "replayed", "chunks", "round", "staleness", "contributors", "provisional", "lr")

    def __init__(self):
        self.step, self.replayed, self.chunks, self.provisional, self.lr = 0, False, [], False, 0.0
        self.round, self.staleness, self.contributors = 0, 0, []


def read_varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= end or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result & 0xFFFFFFFFFFFFFFFF, i
        shift += 7


def _int64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def skip_field(buf: memoryview, i: int, end: int, wire: int) -> int:
    if wire == 0:
        return read_varint(buf, i, end)[1]
    if wire == 1:
        i += 8
    elif wire == 5:
        i += 4
    elif wire == 2:
        n, i = read_varint(buf, i, end)
        i += n
    else:
        raise ValueError(f"unsupported wire type {wire}")
    if i > end:
        raise ValueError("truncated field")
    return i


def _decode_tensor(buf: memoryview, i: int, end: int, max_fields: int | None = None,
                   max_dims: int | None = None) -> StreamTensor:
    """One Tensor; with `max_fields`/`max_dims`, ValueError past that many fields or shape entries
    (a request's decoder then leaves the message to protobuf's C parser rather than loop in Python)."""
    t = StreamTensor()
    shape = []
    fields = 0
    while i < end:
        key, i = read_varint(buf, i, end)
        field, wire = key >> 3, key & 7
        fields += 1
        if field == 0 or key > 0xFFFFFFFF:  # protobuf refuses these tags
            raise ValueError(f"invalid tag {key}")
        if max_fields is not None and (fields > max_fields or len(shape) > max_dims):
            raise ValueError("more fields than a tensor of this decoder has")
        if wire == 2:
            n, i = read_varint(buf, i, end)
            if i + n > end:
                raise ValueError("truncated field")
            if field == 1:
                t.name = str(buf[i:i + n], "utf-8")
            elif field == 4:
                t.data = buf[i:i + n]
            elif field == 3:  # packed shape
                j, stop = i, i + n
                while j < stop:
                    v, j = read_varint(buf, j, stop)
                    shape.append(_int64(v))
                    if max_dims is not None and len(shape) > max_dims:
                        raise ValueError("more dimensions than this decoder takes")
            i += n
        elif wire == 0 and field in (2, 3, 5):
            v, i = read_varint(buf, i, end)
            if field == 2:
                v &= 0xFFFFFFFF  # an enum is an int32
                t.dtype = v - (1 << 32) if v >= 1 << 31 else v
            elif field == 3:  # unpacked shape
                shape.append(_int64(v))
            else:
                t.offset = _int64(v)
        else:
            i = skip_field(buf, i, end, wire)
    t.shape = shape
    return t


def decode_step_response(data: bytes) -> StreamResponse:
    """StepStreamResponse.FromString without copying the chunks' bytes (a gRPC response deserializer).
    Unknown fields are skipped as protobuf does; malformed input raises ValueError."""
    buf = memoryview(data)
    msg = StreamResponse()
    i, end = 0, len(buf)
    while i < end:
        key, i = read_varint(buf, i, end)
        field, wire = key >> 3, key & 7
        if field == 3 and wire == 2:
            n, i = read_varint(buf, i, end)
            if i + n > end:
                raise ValueError("truncated field")
            msg.chunks.append(_decode_tensor(buf, i, i + n))
            i += n
        elif field in (1, 2, 4, 5, 9) and wire == 0:
            v, i = read_varint(buf, i, end)
            if field == 1:
                msg.step = _int64(v)
            elif field == 2:
                msg.replayed = v != 0
            elif field == 4:
                msg.round = _int64(v)
            elif field == 5:
                msg.staleness = _int64(v)
            else:
                msg.provisional = v != 0
        elif field == 10 and wire == 1:
            if i + 8 > end:
                raise ValueError("truncated field")
            msg.lr = struct.unpack_from("<d", buf, i)[0]
            i += 8
        elif field == 6 and wire == 2:
            n, i = read_varint(buf, i, end)
            if i + n > end:
                raise ValueError("truncated field")
            msg.contributors.append(bytes(buf[i:i + n]).decode("utf-8"))
            i += n
        else:
            i = skip_field(buf, i, end, wire)
    return msg


class StreamRequestChunks:
    """A StepStreamRequest that holds only chunks (a stream's later messages), decoded without copying
    the chunks' bytes; its other fields read as protobuf's defaults."""
    __slots__ = ("chunks",)
    session_id = worker = ""
    round = 0
    sparse = ()
    hyperparameters = metrics = types.MappingProxyType({})

    def __init__(self, chunks: list):
        self.chunks = chunks

    def HasField(self, name: str) -> bool:  # noqa: N802 - protobuf's name
        return False


# A message of more chunks than this (many small tensors packed together, or a flood of empty ones)
# goes to protobuf: decoding each in Python costs more than the copies it saves.
REQUEST_CHUNKS_MAX = 64


def decode_request_chunks(data: bytes) -> StreamRequestChunks | None:
    """A StepStreamRequest of chunks only (field 3), its tensors' data views of `data`; None when it holds
    anything else or does not decode here (protobuf then parses it, and reports what is wrong)."""
    buf = memoryview(data)
    i, end, chunks = 0, len(buf), []
    try:
        while i < end:
            key, i = read_varint(buf, i, end)
            if key != 0x1A or len(chunks) == REQUEST_CHUNKS_MAX:  # field 3, length-delimited
                return None
            n, i = read_varint(buf, i, end)
            if i + n > end:
                return None
            chunks.append(_decode_tensor(buf, i, i + n, max_fields=16, max_dims=64))
            i += n
    except ValueError:  # UnicodeDecodeError included
        return None
    return StreamRequestChunks(chunks)
