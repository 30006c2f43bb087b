"""The small step's cheaper parts: pooled staging sets, the finite check fused into the statistics
pass, Step's directly encoded answer, the step metrics' own collector, per-tensor effective-lr
quantiles. Each against what it replaced or against a local recomputation."""
import math
import socket
import urllib.request

import numpy as np
import pytest

from optreg.client import Client, InvalidArgument
from optreg.server.kernels import stats as kstats
from optreg.server.telemetry import hub as tm
from optreg.server.model.budget import MemoryBudget
from optreg.server.telemetry.metrics import LATENCY_BUCKETS, Metrics
from optreg.server.rpc.service import _step_reply, _step_response
from optreg.server.model.session import Arrays, SetPool, StepResult


def _local_adam(p, grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):
    """The reference Adam (built-in defaults), float64 math, to compare the server's float32 steps."""
    p = p.astype(np.float64)
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, g in enumerate(grads, 1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p - lr * (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p


def test_sessions_of_one_layout_share_pooled_staging_and_stay_exact(server):
    """Two sessions shaped alike step in turns, so each step's staging is the other's old set from the
    pool (holding the other session's numbers): every result still equals a local recomputation."""
    rng = np.random.default_rng(1)
    with Client(server.address) as c:
        p0 = {k: rng.standard_normal(300).astype(np.float32) for k in "ab"}
        sa = c.create_session("adam", {"w": p0["a"].copy()}, durability="none")
        sb = c.create_session("adam", {"w": p0["b"].copy()}, durability="none")
        grads = {k: [rng.standard_normal(300).astype(np.float32) for _ in range(12)] for k in "ab"}
        for i in range(12):
            sa.step({"w": grads["a"][i]})
            sb.step({"w": grads["b"][i]})
        for k, s in (("a", sa), ("b", sb)):
            want = _local_adam(p0[k], [g.astype(np.float64) for g in grads[k]])
            np.testing.assert_allclose(s.read_parameters()["w"], want, rtol=2e-5, atol=1e-6)
            np.testing.assert_array_equal(s.arrays["w"], s.read_parameters()["w"])
        sa.delete()
        sb.delete()


def test_set_pool_is_bounded_and_budgeted():
    budget = MemoryBudget(1 << 20)

    def make():
        return budget.allocate("a set", 4000, lambda: Arrays({"w": np.empty(1000, np.float32)}, {}))

    pool = SetPool(max_bytes=10_000, per_layout=2)
    sets = [make() for _ in range(3)]
    assert budget.held == 12_000
    for s in sets:
        pool.give(("<f4",), s, 4000)
    assert pool.held == 8000  # per_layout bounds it: the third was left to the collector
    del sets, s
    assert budget.held == 8000  # the pooled sets stay counted, the dropped one is released
    assert pool.take(("<f8",)) is None  # another layout gets nothing
    got = pool.take(("<f4",))
    assert got is not None and pool.held == 4000
    assert pool.clear() and pool.held == 0
    assert not pool.clear()
    del got
    assert budget.held == 0


def test_budget_pressure_empties_the_pool_first(start_server):
    """A 4 MiB budget: a small session's steps leave a 252 KB set in the pool; a large session's create
    and step need 2 x 2.04 MB, which fits only once make_room has dropped the pooled set."""
    srv = start_server("--memory-only", "--memory-budget-mb", "4")
    rng = np.random.default_rng(2)
    with Client(srv.address) as c:
        small = c.create_session("adam", {"w": rng.standard_normal(21_000).astype(np.float32)}, durability="none")
        for _ in range(3):
            small.step({"w": rng.standard_normal(21_000).astype(np.float32)})
        small.delete()  # its live set goes; the pooled staging set stays counted until it is needed
        big = c.create_session("adam", {"w": np.zeros(170_000, np.float32)}, durability="none")
        big.step({"w": np.ones(170_000, np.float32)})
        assert big.step_count == 1
        big.delete()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_small_non_finite_gradient_refused_and_nothing_applied(server, dtype, bad):
    with Client(server.address) as c:
        p0 = np.linspace(-1, 1, 64).astype(dtype)
        s = c.create_session("adam", {"w": p0.copy()}, durability="none")
        s.step({"w": np.ones(64, dtype)})
        before = s.read_parameters()["w"].copy()
        g = np.ones(64, dtype)
        g[[3, 40]] = bad
        with pytest.raises(InvalidArgument, match=r"gradient 'w' has 2 NaN or Inf value"):
            s.step({"w": g})
        assert c.session(s.id).step_count == 1
        np.testing.assert_array_equal(s.read_parameters()["w"], before)
        s.step({"w": np.ones(64, dtype)})  # and the session steps on
        assert s.step_count == 2
        s.delete()


def test_huge_finite_float64_gradient_is_not_taken_for_non_finite(server):
    """sum g^2 overflows float64 for |g| ~ 1e300: the exact check decides, and the step is applied."""
    with Client(server.address) as c:
        s = c.create_session("sgd", {"w": np.zeros(8)}, lr=1e-3, durability="none")
        s.step({"w": np.full(8, 1e300)})
        np.testing.assert_array_equal(s.arrays["w"], np.full(8, -1e297))
        s.delete()


@pytest.mark.parametrize("tensors", [
    {"w": np.arange(5, dtype=np.float32)},
    {"w": np.ones((3, 4)), "b": np.float64(2.5).reshape(())},  # float64, 2-D and a scalar
    {},  # step_reply none
    {"empty": np.zeros((0, 3), np.float32)},
])
@pytest.mark.parametrize("step,replayed", [(0, False), (1, False), (1 << 40, True)])
@pytest.mark.parametrize("lr", [0.0, 0.1, 3.0517578125e-05])  # the lr the step ran with (StepResponse.lr)
def test_step_reply_bytes_equal_the_serialized_message(tensors, step, replayed, lr):
    result = StepResult(step, replayed, tensors, lr=lr)
    assert _step_reply(result) == _step_response(result).SerializeToString()


def test_step_counts_expose_counter_and_histogram_form():
    from prometheus_client import generate_latest
    m = Metrics()
    for s in (0.00005, 0.0003, 0.001, 0.001, 99.0):
        m.step(s, False)
    m.step(0.2, True)
    text = generate_latest(m.registry).decode()
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(samples['optreg_steps_total{replayed="false"}']) == 5
    assert float(samples['optreg_steps_total{replayed="true"}']) == 1
    assert float(samples["optreg_step_seconds_count"]) == 5
    assert math.isclose(float(samples["optreg_step_seconds_sum"]), 0.00005 + 0.0003 + 0.002 + 99.0)
    # cumulative, le inclusive, as prometheus_client's Histogram gives them
    assert float(samples['optreg_step_seconds_bucket{le="0.0001"}']) == 1
    assert float(samples['optreg_step_seconds_bucket{le="0.0005"}']) == 2
    assert float(samples['optreg_step_seconds_bucket{le="0.001"}']) == 4
    assert float(samples['optreg_step_seconds_bucket{le="10.0"}']) == 4
    assert float(samples['optreg_step_seconds_bucket{le="+Inf"}']) == 5
    assert len([k for k in samples if k.startswith("optreg_step_seconds_bucket")]) == len(LATENCY_BUCKETS) + 1


def test_metrics_endpoint_counts_steps(start_server):
    with socket.socket() as probe:  # a free port for the metrics endpoint
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    srv = start_server("--memory-only", "--metrics-port", str(port))
    with Client(srv.address) as c:
        s = c.create_session("adam", {"w": np.zeros(10, np.float32)}, durability="none")
        for _ in range(7):
            s.step({"w": np.ones(10, np.float32)})
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert 'optreg_steps_total{replayed="false"} 7.0' in text
    assert "optreg_step_seconds_count 7.0" in text


def _adam_lr(state, hp, step):
    return hp["lr"] * math.sqrt(1.0 - hp["beta2"] ** step) / (np.sqrt(state["v"]) + 1e-8)


@pytest.mark.parametrize("sizes", [[64], [5], [64, 3, 1], [64, 64, 64, 64, 64, 2]])
def test_effective_lr_per_tensor_equals_batched(monkeypatch, sizes):
    rng = np.random.default_rng(3)
    names = [f"t{i}" for i in range(len(sizes))]
    sample = {"v": {n: rng.random(k) for n, k in zip(names, sizes)}, "m": {n: rng.random(k) for n, k in zip(names, sizes)}}
    event = tm.StepEvent("s", 7, 0.0, "", "adam", {"lr": 0.01, "beta2": 0.999},
                         {n: np.zeros(4) for n in names}, {}, sample)
    hub = tm.TelemetryHub(None, effective_lr=lambda name: _adam_lr)
    each = hub._effective_lr(event)
    monkeypatch.setattr(tm, "FEW_TENSORS", 0)  # the batched path for any count
    batched = hub._effective_lr(event)
    assert each.keys() == batched.keys() == set(names)
    for n in names:
        assert each[n] == batched[n]
        np.testing.assert_allclose(each[n], np.quantile(_adam_lr({"v": sample["v"][n]}, event.hyperparameters, 7),
                                                        tm.QUANTILES), rtol=1e-12)


def test_small_sums_equal_numpy_reference():
    rng = np.random.default_rng(4)
    for dt in (np.float32, np.float64):
        g, old = rng.standard_normal(777).astype(dt), rng.standard_normal(777).astype(dt)
        new = (old - 0.01 * g).astype(dt)
        out = np.empty(4)
        kstats.small_sums(new, old, g, out)  # the plain-Python body numba compiles
        np.testing.assert_allclose(out, kstats.reference_stats(g, old, new), rtol=1e-12)
        g[5] = np.nan
        kstats.small_sums(new, old, g, out)
        assert math.isnan(out[0]) and math.isnan(out[3])


@pytest.mark.parametrize("tensors", [1, 3, 4])
def test_ring_merge_of_few_tensors_equals_the_numpy_loop_bit_for_bit(monkeypatch, tensors):
    rng = np.random.default_rng(5)
    records = []
    for k in range(9):
        stats = rng.standard_normal((tensors, 4)) * 10.0 ** rng.integers(-8, 8)
        stats[:, 3] = np.abs(stats[:, 3])
        if k == 4:
            stats[0, 3] = np.nan  # a non-finite max |g| stays visible in the bucket
        records.append(tm.Record(k + 1, int(rng.integers(1, 5)), float(k), stats, {"loss": float(k)}, {"lr": 0.1},
                                 {}))
    for part in (records[:2], records[:5], records):
        few = tm._merge(part)
        monkeypatch.setattr(tm, "FEW_TENSORS", 0)
        loop = tm._merge(part)
        monkeypatch.undo()
        assert few.steps == loop.steps and few.stats.shape == loop.stats.shape == (tensors, 4)
        np.testing.assert_array_equal(few.stats, loop.stats)  # NaN compares equal here; every bit otherwise
        assert few.stats.tobytes() == loop.stats.tobytes()


@pytest.mark.parametrize("where", [0, 450, 999])  # in the first chunk (starts at 0, not whole), a middle one, the last
def test_non_finite_in_any_chunk_of_a_streamed_tensor_is_refused(server, where):
    """The fused check covers whole small tensors only: a first chunk (offset 0 but not the whole tensor)
    is checked on arrival like every other chunk."""
    import grpc
    from optreg.v1 import session_pb2, session_pb2_grpc, tensors as tz
    with Client(server.address) as c:
        s = c.create_session("adam", {"w": np.linspace(-1, 1, 1000)}, durability="none")
        g = np.ones(1000)
        g[where] = np.nan
        chunks = list(tz.chunk("w", g, 300 * 8))
        msgs = [session_pb2.StepStreamRequest(session_id=s.id, step=0)]
        msgs += [session_pb2.StepStreamRequest(chunks=[ch]) for ch in chunks]
        stub = session_pb2_grpc.SessionServiceStub(c.transport.channel)
        with pytest.raises(grpc.RpcError) as e:
            list(stub.StepStream(iter(msgs), timeout=30))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "NaN or Inf" in e.value.details()
        info, params, _ = s.read_state()
        assert info.step == 0
        np.testing.assert_array_equal(params["w"], np.linspace(-1, 1, 1000))
        s.delete()
