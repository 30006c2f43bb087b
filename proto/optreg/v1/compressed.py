"""numpy <-> optreg.v1.CompressedTensor: compressed gradients' one codec, shared by server and clients.

The rules are tensor.proto's (CompressedTensor, TopK, Int8Blocks). `decode` is what the server
steps (and logs); the encoders return the message and the same decoded tensor, so a client's
error-feedback residual is exactly gradient - what the server applied.
"""
from __future__ import annotations

import numpy as np

from optreg.v1 import tensor_pb2
from optreg.v1.tensors import DTYPES, StreamTensor, _quoted, element_count, numpy_dtype, to_code

INDEX = np.dtype("<i4")
SCALE = np.dtype("<f4")
INT8_MAX = 127


def top_k(name: str, g: np.ndarray, k: int) -> tuple[tensor_pb2.CompressedTensor, np.ndarray]:
    """The k elements of largest magnitude (k clipped to [1, size]); (message, decoded tensor)."""
    flat = np.ascontiguousarray(g).reshape(-1)
    code = to_code(flat.dtype)
    flat = flat.astype(DTYPES[code], copy=False)
    k = min(max(int(k), 1), flat.size)
    idx = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:] if k < flat.size else np.arange(flat.size)
    idx = np.sort(idx).astype(INDEX)
    values = flat[idx]
    decoded = np.zeros(flat.size, flat.dtype)
    decoded[idx] = values
    msg = tensor_pb2.CompressedTensor(name=name, shape=g.shape, top_k=tensor_pb2.TopK(
        indices=idx.tobytes(), dtype=code, values=values.tobytes()))
    return msg, decoded.reshape(g.shape)


def int8_blocks(name: str, g: np.ndarray, block: int = 256) -> tuple[tensor_pb2.CompressedTensor, np.ndarray]:
    """int8 with a float32 scale per `block` elements (max |g| / 127 of the block); (message, decoded float32)."""
    flat = np.ascontiguousarray(g, dtype=np.float32).reshape(-1)
    n, block = flat.size, max(int(block), 1)
    blocks = -(-n // block)
    padded = np.zeros(blocks * block, np.float32)
    padded[:n] = flat
    scales = (np.abs(padded.reshape(blocks, block)).max(axis=1) / INT8_MAX).astype(SCALE)
    safe = np.where(scales > 0, scales, 1).astype(np.float32)
    q = np.clip(np.rint(padded.reshape(blocks, block) / safe[:, None]), -INT8_MAX, INT8_MAX).astype(np.int8)
    data = q.reshape(-1)[:n]
    msg = tensor_pb2.CompressedTensor(name=name, shape=g.shape, int8_blocks=tensor_pb2.Int8Blocks(
        data=data.tobytes(), block=block, scales=scales.tobytes()))
    return msg, _int8_decoded(data, block, scales).reshape(g.shape)


def _int8_decoded(data: np.ndarray, block: int, scales: np.ndarray) -> np.ndarray:
    # each scale repeated over its block (at most the tensor's size: a block beyond it is one block)
    return data.astype(np.float32) * np.repeat(scales.astype(np.float32), min(block, max(data.size, 1)))[:data.size]


def decode(msg, expect: dict | None = None, where: str = "compressed") -> StreamTensor:
    """The dense tensor a CompressedTensor stands for, as a whole Tensor-like for the step's checks
    (ChunkTracker). `expect`: name -> (shape, ...), the session's, checked before anything is allocated.
    ValueError naming the field (`where`.top_k.indices, ...) and what to send."""
    name, shape = msg.name, tuple(msg.shape)
    if expect is not None:
        if name not in expect:
            raise ValueError(f"{where}.name: unknown parameter {_quoted(name)}")
        if shape != tuple(expect[name][0]):
            raise ValueError(f"{where}.shape: {list(shape)} for {_quoted(name)}, but the session's is "
                             f"{list(expect[name][0])}")
    size = element_count(shape, f"{where}.shape")
    kind = msg.WhichOneof("encoding")
    if kind == "top_k":
        dense = _top_k_decoded(msg.top_k, size, f"{where}.top_k")
    elif kind == "int8_blocks":
        dense = _int8_blocks_decoded(msg.int8_blocks, size, f"{where}.int8_blocks")
    else:
        raise ValueError(f"{where}: no encoding set; set top_k or int8_blocks")
    t = StreamTensor()
    t.name, t.dtype, t.shape, t.data = name, to_code(dense.dtype), list(shape), memoryview(dense).cast("B")
    return t


def _top_k_decoded(m, size: int, where: str) -> np.ndarray:
    indices = m.indices
    if len(indices) % INDEX.itemsize:
        raise ValueError(f"{where}.indices: {len(indices)} bytes is not a whole number of int32")
    idx = np.frombuffer(indices, INDEX)
    try:
        dtype = numpy_dtype(m.dtype)
    except ValueError as e:
        raise ValueError(f"{where}.dtype: {e}") from None
    values = m.values
    if len(values) != idx.size * dtype.itemsize:
        raise ValueError(f"{where}.values: {len(values)} bytes, but {idx.size} indices of "
                         f"{tensor_pb2.DataType.Name(m.dtype)} need {idx.size * dtype.itemsize}")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= size):
        bad = int(idx.min()) if int(idx.min()) < 0 else int(idx.max())
        raise ValueError(f"{where}.indices: index {bad} is out of range [0, {size})")
    dense = np.zeros(size, dtype)
    np.add.at(dense, idx, np.frombuffer(values, dtype))  # an index given twice: summed, in order
    return dense


def _int8_blocks_decoded(m, size: int, where: str) -> np.ndarray:
    if m.block < 1:
        raise ValueError(f"{where}.block: {m.block}; give the elements per block, at least 1")
    data = m.data
    if len(data) != size:
        raise ValueError(f"{where}.data: {len(data)} bytes, but the shape has {size} elements (one int8 each)")
    blocks = -(-size // m.block)
    scales = m.scales
    if len(scales) != blocks * SCALE.itemsize:
        raise ValueError(f"{where}.scales: {len(scales) // SCALE.itemsize} float32 given ({len(scales)} bytes), "
                         f"but {size} elements in blocks of {m.block} need {blocks}")
    return _int8_decoded(np.frombuffer(data, np.int8), m.block, np.frombuffer(scales, SCALE))
