"""numpy <-> optreg.v1.Tensor: the wire format's one codec, shared by server and clients.

Not generated: hand-written beside the bindings because it belongs to the
contract (dtype table, byte order, chunking) and both sides depend on it.
"""
from __future__ import annotations

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
}
_BY_NUMPY = {dt: code for code, dt in DTYPES.items()}

# Chunks on the streaming RPCs: DESIGN measured 1 MiB chunks on one stream at
# about 5x faster than one large message.
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
    count = 1
    for d in shape:
        if d < 0:
            raise ValueError(f"tensor {tensor.name!r}: shape {list(shape)} has a negative dimension")
        count *= d  # Python ints: no overflow
    if tensor.offset:
        raise ValueError(f"tensor {tensor.name!r}: offset {tensor.offset} given; only the streaming RPCs take chunks")
    data = tensor.data  # one read: each access of a bytes field copies
    want = count * dtype.itemsize
    if len(data) != want:
        raise ValueError(f"tensor {tensor.name!r}: {len(data)} bytes of data, but shape {list(shape)} of "
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


class Assembler:
    """Reassembles chunked tensors; refuses chunks out of order, overlapping, or past the end.

    `expect` (name -> (shape, dtypes allowed)) restricts what may arrive; without
    it any name and shape is accepted. `max_bytes` refuses (ValueError) a tensor
    whose declared size exceeds it before allocating it. ValueError messages name
    the tensor.
    """

    def __init__(self, expect: dict[str, tuple[tuple, tuple]] | None = None, max_bytes: int | None = None):
        self.expect = expect
        self.max_bytes = max_bytes
        self.arrays: dict[str, np.ndarray] = {}
        self.filled: dict[str, int] = {}

    def add(self, t: tensor_pb2.Tensor) -> None:
        name, shape = t.name, tuple(t.shape)
        dtype = numpy_dtype(t.dtype)
        if name not in self.arrays:
            if self.expect is not None:
                if name not in self.expect:
                    raise ValueError(f"unknown tensor {name!r}; expected: {', '.join(self.expect)}")
                want_shape, allowed = self.expect[name]
                if shape != tuple(want_shape):
                    raise ValueError(f"tensor {name!r}: shape {list(shape)}, expected {list(want_shape)}")
                if t.dtype not in allowed:
                    raise ValueError(f"tensor {name!r}: dtype {dtype_name(t.dtype)} not accepted here; use "
                                     + " or ".join(dtype_name(a) for a in allowed))
            if any(d < 0 for d in shape):
                raise ValueError(f"tensor {name!r}: shape {list(shape)} has a negative dimension")
            if t.offset != 0:
                raise ValueError(f"tensor {name!r}: first chunk has offset {t.offset}, expected 0 "
                                 "(chunks out of order or missing)")
            size = 1
            for d in shape:
                size *= d  # Python ints: no overflow
            if self.max_bytes is not None and size * dtype.itemsize > self.max_bytes:
                raise ValueError(f"tensor {name!r}: shape {list(shape)} is {size * dtype.itemsize} bytes, "
                                 f"more than the {self.max_bytes} this server accepts")
            self.arrays[name] = np.empty(shape, dtype=dtype)
            self.filled[name] = 0
        arr = self.arrays[name]
        if shape != arr.shape or dtype != arr.dtype:
            raise ValueError(f"tensor {name!r}: a chunk changed shape or dtype mid-stream")
        data = t.data
        if len(data) % dtype.itemsize:
            raise ValueError(f"tensor {name!r}: chunk of {len(data)} bytes is not a whole number of elements")
        n = len(data) // dtype.itemsize
        start = self.filled[name]
        if t.offset != start:
            raise ValueError(f"tensor {name!r}: chunk at offset {t.offset}, expected {start} "
                             "(chunks out of order, repeated or missing)")
        if start + n > arr.size:
            raise ValueError(f"tensor {name!r}: chunks run past the end ({start + n} of {arr.size} elements)")
        arr.reshape(-1)[start:start + n] = np.frombuffer(data, dtype=dtype)
        self.filled[name] = start + n

    def finish(self) -> dict[str, np.ndarray]:
        for name, arr in self.arrays.items():
            if self.filled[name] != arr.size:
                raise ValueError(f"tensor {name!r}: stream ended after {self.filled[name]} of {arr.size} elements")
        return self.arrays


# -- streamed messages encoded directly -----------------------------------------
# StepStream moves tens of MB per step. Building a Tensor per chunk copies its bytes
# (tobytes, then into the message, then out again when serialized), each copy into
# fresh memory that the kernel must fault in; encoding the wire format directly
# copies each chunk once. The bytes are exactly what SerializeToString gives for
# the same message (tests compare them), so the receiving side cannot tell.

def _varint(n: int) -> bytes:
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
        head += b"\x0a" + _varint(len(nb)) + nb
    if code:
        head += b"\x10" + _varint(code)
    if len(shape):
        packed = b"".join(_varint(int(d)) for d in shape)
        head += b"\x1a" + _varint(len(packed)) + packed
    nbytes = data.nbytes
    if nbytes:
        head += b"\x22" + _varint(nbytes)
    tail = b"\x28" + _varint(offset) if offset else b""
    parts.append(b"\x1a" + _varint(len(head) + nbytes + len(tail)))
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


def response_head(step: int, replayed: bool = False) -> bytes:
    """Fields 1-2 of a StepStreamResponse, encoded (a request's later messages have none)."""
    return (b"\x08" + _varint(step) if step else b"") + (b"\x10\x01" if replayed else b"")


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
    """A decoded StepStreamResponse (step, replayed, chunks) whose chunks' data are not copied."""
    __slots__ = ("step", "replayed", "chunks")

    def __init__(self):
        self.step, self.replayed, self.chunks = 0, False, []


def _read_varint(buf: memoryview, i: int, end: int) -> tuple[int, int]:
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


def _skip(buf: memoryview, i: int, end: int, wire: int) -> int:
    if wire == 0:
        return _read_varint(buf, i, end)[1]
    if wire == 1:
        i += 8
    elif wire == 5:
        i += 4
    elif wire == 2:
        n, i = _read_varint(buf, i, end)
        i += n
    else:
        raise ValueError(f"unsupported wire type {wire}")
    if i > end:
        raise ValueError("truncated field")
    return i


def _decode_tensor(buf: memoryview, i: int, end: int) -> StreamTensor:
    t = StreamTensor()
    shape = []
    while i < end:
        key, i = _read_varint(buf, i, end)
        field, wire = key >> 3, key & 7
        if wire == 2:
            n, i = _read_varint(buf, i, end)
            if i + n > end:
                raise ValueError("truncated field")
            if field == 1:
                t.name = str(buf[i:i + n], "utf-8")
            elif field == 4:
                t.data = buf[i:i + n]
            elif field == 3:  # packed shape
                j, stop = i, i + n
                while j < stop:
                    v, j = _read_varint(buf, j, stop)
                    shape.append(_int64(v))
            i += n
        elif wire == 0 and field in (2, 3, 5):
            v, i = _read_varint(buf, i, end)
            if field == 2:
                v &= 0xFFFFFFFF  # an enum is an int32
                t.dtype = v - (1 << 32) if v >= 1 << 31 else v
            elif field == 3:  # unpacked shape
                shape.append(_int64(v))
            else:
                t.offset = _int64(v)
        else:
            i = _skip(buf, i, end, wire)
    t.shape = shape
    return t


def decode_step_response(data: bytes) -> StreamResponse:
    """StepStreamResponse.FromString without copying the chunks' bytes (a gRPC response deserializer).
    Unknown fields are skipped as protobuf does; malformed input raises ValueError."""
    buf = memoryview(data)
    msg = StreamResponse()
    i, end = 0, len(buf)
    while i < end:
        key, i = _read_varint(buf, i, end)
        field, wire = key >> 3, key & 7
        if field == 3 and wire == 2:
            n, i = _read_varint(buf, i, end)
            if i + n > end:
                raise ValueError("truncated field")
            msg.chunks.append(_decode_tensor(buf, i, i + n))
            i += n
        elif field in (1, 2) and wire == 0:
            v, i = _read_varint(buf, i, end)
            if field == 1:
                msg.step = _int64(v)
            else:
                msg.replayed = v != 0
        else:
            i = _skip(buf, i, end, wire)
    return msg
