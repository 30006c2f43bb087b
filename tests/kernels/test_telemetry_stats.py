"""The statistics a real server reports equal a numpy recomputation from the gradients sent and the
parameters before and after, for every built-in in float32 and float64, in the fused (numba) and the
numpy paths."""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from optreg.client import Client
from optreg.plugins.registry import Registry
from optreg.plugins.testing import problem_shape
from optreg.server.kernels.stats import reference_stats as tensor_stats  # the plain numpy reference
from optreg.v1 import session_pb2, session_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc, tensors

BUILTINS = sorted(Registry().optimizers)
# float32 tensors' fused sums are float32 within blocks of kernelstats.BLOCK32 (512) elements:
# relative error at most ~(512 + 2) * 2^-24 = 3.1e-5 against float64 (kernelstats._accumulate32).
RTOL = {"float32": 4e-5, "float64": 1e-9}


@pytest.fixture(scope="module", params=["fused", "numpy"])
def path_server(request):
    from conftest import ServerProcess
    env = {"OPTREG_JIT_BLOCK": "1"} if request.param == "fused" else {"OPTREG_KERNELS": "numpy"}
    s = ServerProcess(env=env)
    yield s
    s.stop()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", BUILTINS)
def test_statistics_equal_numpy(path_server, name, dtype):
    rng = np.random.default_rng(abs(hash((name, dtype))) % 2**32)
    # one tensor large enough to be sliced and threaded, one small
    small = problem_shape(Registry().get(name).definition, 7)  # (1, 7) for a method of matrices (Muon)
    params = {"big": rng.normal(size=(700, 1000)).astype(dtype), "small": rng.normal(size=small).astype(dtype)}
    sid = f"stats-{name}-{dtype}".replace(".", "-")
    with Client(path_server.address) as c:
        c.create_session(name, params, session_id=sid)
    channel = grpc.insecure_channel(path_server.address, options=[("grpc.max_receive_message_length", 64 << 20),
                                                                    ("grpc.max_send_message_length", 64 << 20)])
    stub = session_pb2_grpc.SessionServiceStub(channel)
    before = {k: v.copy() for k, v in params.items()}
    expected = []
    for step in range(3):
        grads = {k: (rng.normal(size=v.shape) * 10 ** rng.uniform(-3, 1)).astype(dtype) for k, v in params.items()}
        reply = stub.Step(session_pb2.StepRequest(session_id=sid, step=step,
                                                  gradients=[tensors.from_numpy(k, g) for k, g in grads.items()]))
        after = {t.name: tensors.to_numpy(t) for t in reply.tensors}
        expected.append({k: tensor_stats(grads[k], before[k], after[k]) for k in params})
        before = after
    got = telemetry_pb2_grpc.TelemetryServiceStub(channel).GetTelemetry(
        telemetry_pb2.GetTelemetryRequest(session_id=sid))
    channel.close()
    assert [s.step for s in got.steps] == [1, 2, 3]
    for exp, st in zip(expected, got.steps):
        for t in st.tensors:
            e = exp[t.name]
            np.testing.assert_allclose([t.grad_norm ** 2, t.param_norm ** 2, t.update_norm ** 2],
                                       e[:3], rtol=RTOL[dtype], atol=0, err_msg=f"{name} {dtype} {t.name}")
            assert t.grad_max_abs == e[3]


def test_statistics_of_a_streamed_step_fold_every_chunk(path_server):
    """A step large enough to stream in chunks: the chunks' figures fold into the tensor's."""
    rng = np.random.default_rng(7)
    params = {"emb": rng.normal(size=(3000, 1000)).astype(np.float32)}
    with Client(path_server.address) as c:
        s = c.create_session("torch.adam", params, session_id="stats-streamed")
        before = s.arrays["emb"].copy()
        grads = {"emb": rng.normal(size=(3000, 1000)).astype(np.float32)}
        s.step(grads)
        after = s.arrays["emb"].copy()
    channel = grpc.insecure_channel(path_server.address)
    got = telemetry_pb2_grpc.TelemetryServiceStub(channel).GetTelemetry(
        telemetry_pb2.GetTelemetryRequest(session_id="stats-streamed"))
    channel.close()
    (t,) = got.steps[0].tensors
    e = tensor_stats(grads["emb"], before, after)
    np.testing.assert_allclose([t.grad_norm ** 2, t.param_norm ** 2, t.update_norm ** 2], e[:3],
                               rtol=RTOL["float32"])
    assert t.grad_max_abs == e[3]
    assert len(t.effective_lr) == 3 and 0 < t.effective_lr[0] <= t.effective_lr[1] <= t.effective_lr[2]


@pytest.mark.parametrize("bad", [np.nan, -np.inf])
def test_non_finite_whole_tensor_refused_from_the_update_pass(path_server, bad):
    """A large whole tensor's finite check comes from the kernel's own max |g| (fused path) or the explicit
    check (numpy path): either way the step is refused with the count, nothing changes, and the next step's
    figures are a clean recomputation (the staging copy the refused update wrote is not reused as is)."""
    rng = np.random.default_rng(21)
    n = 100_000  # above pipeline.SMALL_STATS: measured in the update pass
    init = rng.normal(size=n).astype(np.float32)
    sid = f"nonfinite-{'nan' if np.isnan(bad) else 'inf'}"
    with Client(path_server.address) as c:
        s = c.create_session("adam", {"w": init.copy()}, session_id=sid)
        g = (rng.normal(size=n) * 0.1).astype(np.float32)
        s.step({"w": g})
        before = s.arrays["w"].copy()
        worse = g.copy()
        worse[[7, n - 2]] = bad
        with pytest.raises(Exception, match="2 NaN or Inf"):
            s.step({"w": worse})
        info, params, _ = s.read_state()
        assert info.step == 1 and np.array_equal(params["w"], before)
        s.step({"w": g})
        after = s.arrays["w"].copy()
    ref = Client(path_server.address)
    with ref:
        r = ref.create_session("adam", {"w": init.copy()}, session_id=sid + "-ref")
        r.step({"w": g})
        r.step({"w": g})
        assert np.array_equal(r.arrays["w"], after)
    channel = grpc.insecure_channel(path_server.address)
    got = telemetry_pb2_grpc.TelemetryServiceStub(channel).GetTelemetry(
        telemetry_pb2.GetTelemetryRequest(session_id=sid))
    channel.close()
    last = [st for st in got.steps if st.tensors][-1]
    (t,) = last.tensors
    e = tensor_stats(g, before, after)
    np.testing.assert_allclose([t.grad_norm ** 2, t.param_norm ** 2, t.update_norm ** 2], e[:3], rtol=RTOL["float32"])
    assert t.grad_max_abs == e[3]


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_whole_tensor_finite_check_is_the_update_pass(monkeypatch, bad):
    """With a built-in's compiled statistics kernel, a large whole tensor makes no separate finite check
    pass over g: the explicit check runs only to count what the update pass's max |g| found."""
    from optreg.server.kernels import jit
    from optreg.server.kernels import warmup
    from optreg.server.kernels import stats as kernelstats
    from optreg.server.steps import run as pipeline
    from optreg.server.assembly import OptregServer, Settings
    if not jit.available():
        pytest.skip("numba not installed")
    defn = Registry().get("adam").definition
    warmup.warm(block=True, definitions=[defn], stats=True)
    assert jit.wait_idle(300)
    assert kernelstats.stats_kernel(defn, jit.lookup(defn, np.dtype(np.float32))) is not None
    calls = []
    check = pipeline.check_finite
    monkeypatch.setattr(pipeline, "check_finite", lambda name, g, start=0: (calls.append(g.size), check(name, g, start)))
    srv = OptregServer(Settings(port=0, data_dir=""))
    srv.start()
    try:
        with Client(srv.address) as c:
            s = c.create_session("adam", {"w": np.ones(50_000, np.float32), "b": np.ones(10, np.float32)})
            before = s.arrays["w"].copy()
            g = {"w": np.full(50_000, 0.1, np.float32), "b": np.full(10, 0.1, np.float32)}
            s.step(g)
            assert calls == []  # neither: the small whole tensor's check rides on its statistics pass
            g["w"][123] = bad
            with pytest.raises(Exception, match="1 NaN or Inf"):
                s.step(g)
            assert calls == [50_000]  # only to count what the update pass's max |g| found
            info, params, _ = s.read_state()
            assert info.step == 1 and not np.array_equal(params["w"], before) and np.isfinite(params["w"]).all()
    finally:
        srv.stop(0)
