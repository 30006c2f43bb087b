"""StepStream messages encoded directly (tensors.encode_stream_message) are byte for byte protobuf's."""
import ml_dtypes
import numpy as np
import pytest

from optreg.v1 import session_pb2, tensor_pb2, tensors


def _arrays():
    rng = np.random.default_rng(0)
    yield {"w": rng.standard_normal(1000).astype(np.float32)}
    yield {"a": rng.standard_normal((3, 70_000)), "b": np.zeros(0, np.float32), "ü": np.ones((2, 0, 3), np.float16)}
    yield {"bf": rng.standard_normal((5, 7)).astype(ml_dtypes.bfloat16), "s": np.float32(3.5),
           "big": rng.standard_normal(300_001).astype(np.float32)}
    yield {"be": np.arange(10, dtype=">f4")}  # big-endian: converted to little-endian as chunk() does


@pytest.mark.parametrize("arrays", list(_arrays()))
@pytest.mark.parametrize("chunk_bytes", [8, 4096, 1 << 20])
def test_requests_match_protobuf(arrays, chunk_bytes):
    ours = [tensors.encode_stream_message(b"", batch) for batch in tensors.pack_views(
        (c for n, a in arrays.items() for c in tensors.chunk_views(n, a, chunk_bytes)), chunk_bytes)]
    theirs = [session_pb2.StepStreamRequest(chunks=batch).SerializeToString() for batch in tensors.pack(
        (c for n, a in arrays.items() for c in tensors.chunk(n, a, chunk_bytes)), chunk_bytes)]
    assert ours == theirs


@pytest.mark.parametrize("step,replayed", [(0, False), (1, False), (127, True), (128, False), (2**40 + 5, True),
                                           (-3, False)])
def test_responses_match_protobuf(step, replayed):
    a = np.arange(100_000, dtype=np.float64)
    batch = [("p", tensor_pb2.DATA_TYPE_FLOAT64, (4, 25_000), 2**33, a[:1000]),
             ("q", tensor_pb2.DATA_TYPE_FLOAT64, (100_000,), 0, a[5:9])]
    ours = tensors.encode_stream_message(tensors.response_head(step, replayed), batch)
    theirs = session_pb2.StepStreamResponse(step=step, replayed=replayed, chunks=[
        tensor_pb2.Tensor(name=n, dtype=c, shape=s, offset=o, data=d.tobytes()) for n, c, s, o, d in batch])
    assert ours == theirs.SerializeToString()
    assert session_pb2.StepStreamResponse.FromString(ours) == theirs


def _same(ours, theirs):
    assert (ours.step, ours.replayed, len(ours.chunks)) == (theirs.step, theirs.replayed, len(theirs.chunks))
    for a, b in zip(ours.chunks, theirs.chunks):
        assert (a.name, a.dtype, list(a.shape), a.offset, bytes(a.data)) == (b.name, b.dtype, list(b.shape),
                                                                              b.offset, b.data)


@pytest.mark.parametrize("step,replayed", [(0, False), (1, True), (300, False), (-2, True)])
def test_decode_matches_protobuf(step, replayed):
    msg = session_pb2.StepStreamResponse(step=step, replayed=replayed, chunks=[
        tensor_pb2.Tensor(name="wé", dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[3, 2**40, 0], offset=2**35,
                          data=b"\x01\x02\x03\x04" * 3),
        tensor_pb2.Tensor(name="", data=b""), tensor_pb2.Tensor(dtype=-5, shape=[-1], offset=-7)])
    wire = msg.SerializeToString()
    _same(tensors.decode_step_response(wire), msg)
    # unknown fields (every wire type) are skipped; an unpacked shape and repeated scalars (last wins) read
    extra = (b"\x38\x05" + b"\x41" + b"\0" * 8 + b"\x4a\x02hi" + b"\x55" + b"\0" * 4 + wire
             + b"\x1a\x06\x18\x02\x18\x03\x28\x09" + b"\x08\x07")
    _same(tensors.decode_step_response(extra), session_pb2.StepStreamResponse.FromString(extra))


@pytest.mark.parametrize("bad", [b"\x08", b"\x1a\x05\x0a\x01", b"\x1a\x02\x22\x09", b"\x0b", b"\x08" + b"\xff" * 11])
def test_decode_refuses_malformed(bad):
    with pytest.raises(ValueError):
        tensors.decode_step_response(bad)


def test_request_chunks_decode_as_protobuf_does():
    """A server's large chunk-only StepStreamRequest (decode_request_chunks): the same tensors as
    protobuf's parse, data as views of the received bytes; its other fields read as defaults."""
    rng = np.random.default_rng(3)
    chunks = [tensor_pb2.Tensor(name="wé", dtype=tensor_pb2.DATA_TYPE_FLOAT32, shape=[3, 2**40, 0], offset=2**35,
                                data=rng.bytes(4 * 1000)),
              tensor_pb2.Tensor(name="", data=b""), tensor_pb2.Tensor(dtype=-5, shape=[-1], offset=-7)]
    wire = session_pb2.StepStreamRequest(chunks=chunks).SerializeToString()
    wire += b"\x1a\x06\x18\x02\x18\x03\x28\x09"  # an unpacked shape; repeated scalars (last wins)
    ours, theirs = tensors.decode_request_chunks(wire), session_pb2.StepStreamRequest.FromString(wire)
    assert len(ours.chunks) == len(theirs.chunks) == 4
    for a, b in zip(ours.chunks, theirs.chunks):
        assert (a.name, a.dtype, list(a.shape), a.offset, bytes(a.data)) == (b.name, b.dtype, list(b.shape),
                                                                              b.offset, b.data)
    assert isinstance(ours.chunks[0].data, memoryview) and ours.chunks[0].data.obj is wire  # not copied
    assert (ours.session_id, ours.worker, ours.round, list(ours.sparse), dict(ours.hyperparameters),
            dict(ours.metrics), ours.HasField("step")) == ("", "", 0, [], {}, {}, False)


@pytest.mark.parametrize("wire", [
    session_pb2.StepStreamRequest(session_id="s", chunks=[tensor_pb2.Tensor(name="w")]).SerializeToString(),
    session_pb2.StepStreamRequest(step=0, chunks=[tensor_pb2.Tensor(name="w")]).SerializeToString(),
    session_pb2.StepStreamRequest(metrics={"loss": 1.0}).SerializeToString(),
    b"\x1a\x05\x0a\x01",  # truncated
    b"\x1a\x03\x0a\x01\xff",  # a name that is not UTF-8
    b"\x1a\x02\x22\x09",  # a data field longer than its tensor
])
def test_request_chunks_leave_anything_else_to_protobuf(wire):
    """Any field but chunks, or bytes that do not decode: None, and protobuf parses (or refuses) them."""
    assert tensors.decode_request_chunks(wire) is None


@pytest.mark.parametrize("wire", [
    b"\x1a\x00" * 500_000,  # a flood of empty chunks: protobuf's C parser takes it, not a Python loop
    b"\x1a\x00" * (1 + 64),  # more chunks than decode_request_chunks decodes itself
    b"\x1a\x07\x00\x05\x22\x03abc",  # a tensor field numbered 0: protobuf refuses it
    b"\x1a\x0c\x80\x80\x80\x80\x80\x01\x05\x22\x03abc",  # a tag of more than 32 bits: refused likewise
    b"\x1a" + tensors.varint(2 + 100) + b"\x1a" + tensors.varint(100) + b"\x01" * 100,  # 100 dimensions
    b"\x1a" + tensors.varint(40) + b"\x28\x01" * 20,  # more fields than a tensor has
])
def test_request_chunks_bounded_and_strict(wire):
    """What the Python decoder would loop over at length, or what protobuf refuses, goes to protobuf."""
    assert tensors.decode_request_chunks(wire) is None


def test_response_decoder_refuses_tags_protobuf_refuses():
    for bad in (b"\x1a\x07\x00\x05\x22\x03abc", b"\x1a\x0c\x80\x80\x80\x80\x80\x01\x05\x22\x03abc"):
        with pytest.raises(ValueError):
            tensors.decode_step_response(bad)
