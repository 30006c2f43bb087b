"""StepStream over a real socket: chunk reassembly, refusals that leave the session untouched, widening."""
import grpc
import ml_dtypes
import numpy as np
import pytest

from optreg.v1 import session_pb2, session_pb2_grpc, tensors

N = 1000  # elements; chunks of 300 leave an uneven last chunk of 100


def _chunks(name, g, size=300):
    return list(tensors.chunk(name, g, size * g.dtype.itemsize))


def _stream(client, session_id, step, chunk_lists):
    stub = session_pb2_grpc.SessionServiceStub(client.channel)
    msgs = [session_pb2.StepStreamRequest(session_id=session_id, step=step)]
    msgs += [session_pb2.StepStreamRequest(chunks=c) for c in chunk_lists]
    return list(stub.StepStream(iter(msgs), timeout=30))


def _book_adam(p, g, t, lr=0.001, b1=0.9, b2=0.999):
    """One step from zero moments, float64."""
    m = (1 - b1) * g
    v = (1 - b2) * g * g
    lr_t = lr * np.sqrt(1 - b2 ** t) / (1 - b1 ** t)
    return p - lr_t * m / (np.sqrt(v) + 1e-7)


@pytest.fixture
def adam(client):
    rng = np.random.default_rng(5)
    w = rng.standard_normal(N)
    s = client.create_session("adam", {"w": w.copy(), "b": np.zeros(3)})
    yield s, w
    s.delete()


def test_uneven_last_chunk_reassembles(client, adam):
    s, w = adam
    g = np.random.default_rng(6).standard_normal(N)
    chunks = _chunks("w", g)
    assert [c.offset for c in chunks] == [0, 300, 600, 900] and len(chunks[-1].data) == 100 * 8
    replies = _stream(client, s.id, 0, [chunks[:2], chunks[2:], list(tensors.chunk("b", np.ones(3)))])
    got = tensors.Assembler()
    for r in replies:
        for c in r.chunks:
            got.add(c)
    out = got.finish()
    assert replies[-1].step == 1 and not replies[-1].replayed
    np.testing.assert_allclose(out["w"], _book_adam(w, g, 1), rtol=1e-12)
    np.testing.assert_array_equal(s.read_parameters()["w"], out["w"])


@pytest.mark.parametrize("case", ["out_of_order", "missing_middle", "missing_tensor", "truncated", "nan",
                                  "nan_in_first_chunk", "inf_in_last_chunk"])
def test_bad_chunks_refused_and_session_untouched(client, adam, case):
    s, w = adam
    g = np.random.default_rng(7).standard_normal(N)
    good = _chunks("w", g)
    if case == "nan_in_first_chunk":  # a small first chunk of a larger tensor: checked like any chunk
        g[5] = np.nan
    if case == "inf_in_last_chunk":
        g[N - 1] = -np.inf
    chunks = _chunks("w", g)
    b = list(tensors.chunk("b", np.ones(3)))
    lists = {
        "out_of_order": [[chunks[0], chunks[2]], [chunks[1], chunks[3]], b],
        "missing_middle": [[chunks[0], chunks[1]], [chunks[3]], b],
        "missing_tensor": [chunks],
        "truncated": [chunks[:3], b],
        "nan": [chunks[:3], list(tensors.chunk("b", np.array([1.0, np.nan, 0.0])))],
        "nan_in_first_chunk": [chunks[:1], chunks[1:], b],
        "inf_in_last_chunk": [chunks[:3], chunks[3:], b],
    }[case]
    if case == "nan":
        lists[0].append(chunks[3])
    before = s.read_state()
    with pytest.raises(grpc.RpcError) as e:
        _stream(client, s.id, 0, lists)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    assert "not applied" in e.value.details() or "expected" in e.value.details()
    info, params, slots = s.read_state()
    assert info.step == 0
    for n in params:
        np.testing.assert_array_equal(params[n], before[1][n])
    for slot in slots:
        for n in slots[slot]:
            np.testing.assert_array_equal(slots[slot][n], before[2][slot][n])
    # and the next good step applies normally, as step 1
    replies = _stream(client, s.id, 0, [good, b])
    assert replies[-1].step == 1


def test_retry_of_applied_stream_step_is_replayed(client, adam):
    s, w = adam
    g = np.random.default_rng(8).standard_normal(N)
    lists = [_chunks("w", g), list(tensors.chunk("b", np.ones(3)))]
    first = _stream(client, s.id, 0, lists)
    again = _stream(client, s.id, 0, lists)
    assert again[-1].replayed and again[-1].step == 1
    a, b = tensors.Assembler(), tensors.Assembler()
    for r in first:
        for c in r.chunks:
            a.add(c)
    for r in again:
        for c in r.chunks:
            b.add(c)
    np.testing.assert_array_equal(a.finish()["w"], b.finish()["w"])


@pytest.mark.parametrize("wire", [np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("master", [np.float32, np.float64])
def test_low_precision_stream_gradients_are_widened_exactly(client, wire, master):
    rng = np.random.default_rng(9)
    w = rng.standard_normal(N).astype(master)
    g = rng.standard_normal(N).astype(wire)
    s = client.create_session("sgd", {"w": w.copy()}, lr=0.5)
    replies = _stream(client, s.id, 0, [_chunks("w", g)])
    asm = tensors.Assembler()
    for r in replies:
        for c in r.chunks:
            asm.add(c)
    out = asm.finish()["w"]
    expect = w - (g.astype(master) * master(0.5))  # the widened value, exactly
    np.testing.assert_array_equal(out, expect)
    s.delete()


def test_large_client_step_uses_stream_and_reuses_buffers(client):
    rng = np.random.default_rng(10)
    n = 700_000  # 2.8 MB: above the client's streaming threshold, several chunks
    w = rng.standard_normal(n).astype(np.float32)
    s = client.create_session("adam", {"w": w})
    from optreg.client._step_transport.stream import StreamStep
    assert isinstance(s._sender({"w": w}), StreamStep)
    g = rng.standard_normal(n).astype(np.float32)
    s.step(g_dict := {"w": g})
    rx = s._stream.rx["w"]
    ref = s.read_parameters()["w"]
    np.testing.assert_array_equal(w, ref)
    s.step({"w": g.astype(np.float16)})
    assert s._stream.rx["w"] is rx  # the same receive buffer, not a fresh 2.8 MB array
    np.testing.assert_array_equal(w, s.read_parameters()["w"])
    assert s.step_count == 2
    s.delete()


@pytest.mark.parametrize("dtype,gdtype", [(np.float32, None), (np.float64, None), (np.float32, np.float16),
                                          (np.float32, ml_dtypes.bfloat16)])
@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_non_finite_in_a_large_later_chunk_refused_untouched(dtype, gdtype, bad):
    """Chunks large enough that a built-in's update pass measures max |g| (the check rides on it, the
    chunk computed into staging only; a float16/bfloat16 gradient widened in that pass): a NaN or Inf in a
    later chunk refuses the whole step with its
    element range, the session keeps its values, and the next good step applies. The server runs in
    this process so the test can wait for the statistics kernel that path needs."""
    from optreg.client import Client
    from optreg.server.kernels import jit
    from optreg.server.kernels import stats as kernelstats
    from optreg.server.kernels import widen as widenkernels
    from optreg.server.assembly import OptregServer, Settings
    server = OptregServer(Settings(port=0, data_dir=None))
    server.start()
    size, count = 1 << 15, 5
    rng = np.random.default_rng(9)
    w = rng.standard_normal(size * count).astype(dtype)
    try:
        with Client(server.address, timeout=120) as c:
            s = c.create_session("adam", {"w": w})
            g = (rng.standard_normal(w.size) * 0.01).astype(gdtype or dtype)
            # the first queues the kernel's compile, the next ones its statistics and widening variants'
            for step in range(4):
                _stream(c, s.id, step, [_chunks("w", g, size)])
                assert jit.wait_idle(300)
            defn = server.registry.optimizers["adam"].definition
            assert kernelstats.stats_status(defn) == "fused"
            if gdtype is not None:
                assert widenkernels.lookup(defn, np.dtype(dtype), np.dtype(gdtype)).copying is not None
            before = s.read_state()
            bad_g = g.copy()
            bad_g[3 * size + 17] = bad
            with pytest.raises(grpc.RpcError) as e:
                _stream(c, s.id, 4, [[ch] for ch in _chunks("w", bad_g, size)])
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert f"1 NaN or Inf value(s) in elements {3 * size}..{4 * size}" in e.value.details(), e.value.details()
            info, params, slots = s.read_state()
            assert info.step == 4
            np.testing.assert_array_equal(params["w"], before[1]["w"])
            for slot in slots:
                np.testing.assert_array_equal(slots[slot]["w"], before[2][slot]["w"])
            replies = _stream(c, s.id, 4, [_chunks("w", g, size)])
            assert replies[-1].step == 5
    finally:
        server.stop(0)
