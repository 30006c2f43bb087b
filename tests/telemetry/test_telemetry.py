"""Telemetry: the ring (full resolution, then downsampled), alert rules, persistence, effective lr per
built-in, and TelemetryService over a real gRPC server (WatchSession resumes without gaps, tokens)."""
from __future__ import annotations

import math
import pathlib
import threading
import time

import grpc
import numpy as np
import pytest

from optreg.plugins.registry import Registry
from optreg.server.kernels.stats import tensor_stats
from optreg.server.telemetry.hub import StepEvent, TelemetryHub, sample_indices
from optreg.v1 import telemetry_pb2, telemetry_pb2_grpc


def event(step, session="s", owner="", ratio=1e-3, metrics=None, **kw):
    # param norm 10, update norm 10*ratio, grad norm 2, max |g| 1.5
    return StepEvent(session, step, time.time(), owner=owner, optimizer="sgd", hyperparameters={"lr": 0.1},
                     tensors={"W": np.array([4.0, 100.0, (10 * ratio) ** 2, 1.5]),
                              "b": np.array([1.0, 4.0, (2 * ratio) ** 2, 1.0])},
                     metrics={"loss": 1.0 / step} if metrics is None else metrics, **kw)


def test_ring_keeps_recent_steps_whole_and_every_older_step_in_a_bucket():
    hub = TelemetryHub(recent_steps=50, coarse_buckets=8)
    for s in range(1, 1001):
        hub.on_step(event(s))
    ring = hub.ring("s")
    records = ring.records()
    assert [r.step for r in records[-50:]] == list(range(951, 1001))
    assert all(r.steps == 1 for r in records[-50:])
    # buckets tile steps 1..950 with no gap and no overlap
    covered = []
    for r in records[:-50]:
        covered.extend(range(r.step - r.steps + 1, r.step + 1))
    assert covered == list(range(1, 951))
    assert len(records) - 50 <= 8 + 1  # the closed buckets and at most one partial one
    # a bucket's loss is the mean of its steps' losses
    r = records[0]
    assert math.isclose(r.metrics["loss"], np.mean([1.0 / s for s in range(r.step - r.steps + 1, r.step + 1)]))
    assert ring.first_step == 1 and ring.last_step == 1000 and ring.full_resolution_from == 951


def test_figures_from_the_four_sums():
    rng = np.random.default_rng(0)
    g, old = rng.normal(size=100), rng.normal(size=100)
    new = old - 0.01 * g
    sums = tensor_stats(g, old, new)
    hub = TelemetryHub()
    hub.on_step(StepEvent("s", 1, time.time(), tensors={"W": sums}))
    f = hub.ring("s").records()[0].tensor_figures(["W"])["W"]
    assert math.isclose(f["grad_norm"], np.linalg.norm(g))
    assert math.isclose(f["param_norm"], np.linalg.norm(new))
    assert math.isclose(f["update_norm"], np.linalg.norm(new - old))
    assert math.isclose(f["update_ratio"], np.linalg.norm(new - old) / np.linalg.norm(new))
    assert f["grad_max_abs"] == np.max(np.abs(g))


def test_alert_rules_each_once_per_excursion():
    """The rules of docs/telemetry.md "Alerts" on made-up figures (tests/dashboard/test_dashboard_alerts.py drives
    them with real training): a ratio far outside the old band alone raises nothing."""
    hub = TelemetryHub(patience=5)
    for s in range(1, 31):
        hub.on_step(event(s, ratio=1e-6 if s < 15 else 0.5))
    assert not hub.ring("s").alerts
    zero = lambda s, g2: StepEvent("s", s, time.time(), tensors={"W": np.array([g2, 100.0, 1e-6, 1.0]),
                                                                 "b": np.array([1.0, 4.0, 1e-6, 1.0])})
    for s in range(31, 41):
        hub.on_step(zero(s, 0.0))  # W: no gradient at all
    (a,) = hub.ring("s").alerts
    assert (a.kind, a.step, a.tensor) == ("dead_tensor", 35, "W")
    hub.on_step(zero(41, 4.0 * 11 ** 2))  # W's gradient norm 22: 11x its first steps' 2
    hub.on_step(zero(42, 4.0 * 11 ** 2))
    a = hub.ring("s").alerts[-1]
    assert (a.kind, a.step, a.tensor) == ("exploding_gradients", 41, "W") and "11x" in a.message
    for s in range(43, 60):  # the loss: 1/s so far, then from 1.0 up to 10
        hub.on_step(event(s, metrics={"loss": 10.0}))
    a = hub.ring("s").alerts[-1]
    assert a.kind == "diverging" and a.step == 52 and "learning rate too high" in a.message
    assert [x.kind for x in hub.ring("s").alerts].count("diverging") == 1
    hub.on_refused("s", "", 59, "gradient 'W' holds NaN at index 3")
    a = hub.ring("s").alerts[-1]
    assert a.kind == "refused" and a.step == 59 and "step 60 refused" in a.message and "NaN" in a.message
    assert hub.ring("s").refused == 1
    hub.on_step(StepEvent("s", 60, time.time(), tensors={"W": np.array([np.inf, 1.0, 1.0, np.inf]),
                                                          "b": np.array([1.0, 4.0, 4e-6, 1.0])}))
    assert hub.ring("s").alerts[-1].kind == "non_finite"


def test_persisted_ring_survives_a_restart_and_a_delete_removes_it(tmp_path):
    hub = TelemetryHub(tmp_path, recent_steps=20, coarse_buckets=4)
    for s in range(1, 101):
        hub.on_step(event(s, owner="abc"))
    hub.on_refused("s", "abc", 101, "non-finite gradient")
    hub.close()
    again = TelemetryHub(tmp_path, recent_steps=20, coarse_buckets=4)  # reads the ring on its first use
    a, b = hub.ring("s"), again.ring("s")
    assert [(r.step, r.steps, r.metrics) for r in a.records()] == [(r.step, r.steps, r.metrics) for r in b.records()]
    assert all(np.array_equal(x.stats, y.stats) for x, y in zip(a.records(), b.records()))
    assert b.owner == "abc" and b.refused == 1 and b.alerts[-1].kind == "refused"
    again.on_step(event(101, owner="abc"))  # and it goes on from there
    assert again.ring("s").last_step == 101
    again.on_delete("s")
    assert again.ring("s") is None and not list(pathlib.Path(tmp_path, "telemetry").glob("*.telemetry"))


def test_an_idle_ring_leaves_memory_and_is_read_again_from_its_file_on_use(tmp_path):
    """With a data directory a ring is in memory only while used: unused for idle_seconds it is written
    and dropped (its summary kept for the list), read again by a reader or the next step; a new hub
    (a restart) reads none at start, each on its first use."""
    import tracemalloc
    hub = TelemetryHub(tmp_path, recent_steps=100, coarse_buckets=8, idle_seconds=0.05)
    # Counted in the hub's own allocations: other threads of the test process (a channel an earlier
    # test left to the collector) allocate meanwhile too.
    only_hub = [tracemalloc.Filter(True, "*telemetry/hub.py")]

    def traced():
        return sum(t.size for t in tracemalloc.take_snapshot().filter_traces(only_hub).traces)
    tracemalloc.start()
    before = traced()
    for sid in range(20):
        for s in range(1, 101):
            hub.on_step(event(s, session=f"s{sid:02d}", owner="abc"))
    hub.drain()
    held = traced() - before
    rings = {sid: repr([(r.step, r.steps, r.metrics) for r in hub.ring(sid).records()]) for sid in ("s03", "s04")}
    time.sleep(0.1)
    assert hub.drop_idle() == 20
    left = traced() - before
    tracemalloc.stop()
    assert left < held / 10, (left, held)  # what stays per session is its summary
    assert sorted((x["session_id"], x["step"], x["loss"]) for x in hub.sessions("abc")) == [
        (f"s{i:02d}", 100, 1 / 100) for i in range(20)]
    assert repr([(r.step, r.steps, r.metrics) for r in hub.ring("s03").records()]) == rings["s03"]  # read again
    hub.on_step(event(101, session="s04", owner="abc"))  # a step goes on from the file's ring
    assert hub.ring("s04").last_step == 101 and len(hub.ring("s04").records()) > 100
    hub.close()
    again = TelemetryHub(tmp_path, recent_steps=100, coarse_buckets=8)
    assert len(again.sessions("abc")) == 20 and again.ring("s04").last_step == 101


def test_a_damaged_file_is_skipped_not_fatal(tmp_path):
    (tmp_path / "telemetry").mkdir()
    (tmp_path / "telemetry" / "x.telemetry").write_bytes(b"not zlib")
    hub = TelemetryHub(tmp_path)
    assert hub.ring("x") is None and hub.sessions() == []
    hub.on_step(event(1, session="x"))
    assert hub.ring("x").last_step == 1


def _one_step(defn, dtype, hp, step=3):
    rng = np.random.default_rng(1)
    param = rng.normal(size=32).astype(dtype)
    state = {s.name: np.full(32, s.initial_value, dtype=dtype) for s in defn.slots}
    for t in range(1, step + 1):
        grad = rng.normal(size=32).astype(dtype)
        before = param.copy()
        defn.update(param, grad, state, t, hp, [np.empty_like(param) for _ in range(defn.scratch)])
    return before, param, grad, state


ADAM_LIKE = {"adam", "torch.adam", "adamw"}


@pytest.mark.parametrize("name", ["adam", "torch.adam", "adamw", "adagrad", "rmsprop", "torch.adagrad",
                                  "torch.rmsprop"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_effective_lr_is_the_step_size_the_update_applied(name, dtype):
    """The declared effective lr times the bias-corrected m (Adam) or g (the others) is the update."""
    defn = Registry().get(name).definition
    hp = {h.name: h.default for h in defn.hyperparameters}
    if "weight_decay" in hp:
        hp["weight_decay"] = 0.0
    if name == "torch.rmsprop":
        hp["centered"] = True
    if name == "torch.adagrad":
        hp["lr_decay"] = 0.1
    step = 3
    before, after, grad, state = _one_step(defn, dtype, hp, step)
    idx = sample_indices(32, 8)
    lr = defn.effective_lr({k: v[idx] for k, v in state.items()}, hp, step)
    driver = state["m"][idx] / (1 - hp["beta1"] ** step) if name in ADAM_LIKE else grad[idx]
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose((before - after)[idx], lr * driver, rtol=rtol)


def test_hub_reports_effective_lr_quantiles_from_the_state_sample():
    defn = Registry().get("torch.adam").definition
    hub = TelemetryHub(effective_lr=lambda name: defn.effective_lr if name == "torch.adam" else None)
    v = np.linspace(1e-6, 1e-2, 64)
    hp = {"lr": 1e-3, "beta2": 0.999, "eps": 1e-8, "amsgrad": False}
    hub.on_step(StepEvent("s", 10, time.time(), optimizer="torch.adam", hyperparameters=hp,
                          tensors={"W": np.ones(4)}, state_sample={"v": {"W": v}, "m": {"W": v}}))
    q = hub.ring("s").records()[0].effective_lr["W"]
    expected = np.quantile(1e-3 / (np.sqrt(v / (1 - 0.999 ** 10)) + 1e-8), [0.05, 0.5, 0.95])
    np.testing.assert_allclose(q, expected)


# ---- TelemetryService over a real gRPC server (in-process, fed through its hub) ------------------

@pytest.fixture
def served(tmp_path):
    from optreg.server.assembly import OptregServer, Settings
    tokens = tmp_path / "tokens"
    tokens.write_text("alice\nbob\n")
    srv = OptregServer(Settings(port=0, data_dir="", token_file=str(tokens)))
    srv.start()
    yield srv
    srv.stop(0)


def _stub(srv, token):
    channel = grpc.insecure_channel(srv.address)
    md = (("authorization", f"Bearer {token}"),)
    return channel, telemetry_pb2_grpc.TelemetryServiceStub(channel), md


def _alice():
    from optreg.server.rpc.auth import token_hash
    return token_hash("alice")


def _session(srv, session_id="s"):
    """A real session of alice's (the servicer checks the session exists and is the caller's)."""
    from optreg.client import Client
    with Client(srv.address, token="alice") as c:
        c.create_session("sgd", {"W": np.zeros(4, np.float32)}, session_id=session_id)


def test_watch_session_resumes_from_a_step_without_gaps(served):
    hub = served.telemetry
    _session(served)
    for s in range(1, 41):
        hub.on_step(event(s, owner=_alice()))
    channel, stub, md = _stub(served, "alice")
    got = []
    stop_feeding = threading.Event()

    def feed():
        s = 41
        while not stop_feeding.is_set() and s <= 400:
            hub.on_step(event(s, owner=_alice()))
            s += 1
            time.sleep(0.001)

    feeder = threading.Thread(target=feed)
    feeder.start()
    try:
        # break the stream three times at arbitrary points, resuming from the last step seen + 1
        last = 0
        for cut in (25, 130, 260):
            call = stub.WatchSession(telemetry_pb2.WatchSessionRequest(session_id="s", from_step=last + 1),
                                     metadata=md)
            for msg in call:
                if msg.HasField("step"):
                    got.append(msg.step.step)
                    last = msg.step.step
                    if last >= cut:
                        call.cancel()
                        break
        call = stub.WatchSession(telemetry_pb2.WatchSessionRequest(session_id="s", from_step=last + 1),
                                 metadata=md, timeout=30)
        for msg in call:
            if msg.HasField("step"):
                got.append(msg.step.step)
                if msg.step.step == 400:
                    call.cancel()
                    break
    finally:
        stop_feeding.set()
        feeder.join()
        channel.close()
    assert got == list(range(1, 401))


def test_watch_session_streams_figures_and_alerts_live(served):
    hub = served.telemetry
    _session(served)
    hub.on_step(event(1, owner=_alice()))
    channel, stub, md = _stub(served, "alice")
    call = stub.WatchSession(telemetry_pb2.WatchSessionRequest(session_id="s"), metadata=md, timeout=30)
    threading.Timer(0.3, lambda: (hub.on_step(event(2, owner=_alice(), ratio=2e-3)),
                                  hub.on_refused("s", _alice(), 2, "gradient 'W' is not finite"))).start()
    msgs = []
    for msg in call:
        msgs.append(msg)
        if len(msgs) == 2:
            call.cancel()
            break
    channel.close()
    step, alert = msgs[0].step, msgs[1].alert
    assert step.step == 2 and step.steps == 1 and step.metrics["loss"] == 0.5
    w = {t.name: t for t in step.tensors}["W"]
    assert math.isclose(w.update_ratio, 2e-3) and math.isclose(w.grad_norm, 2.0) and w.grad_max_abs == 1.5
    assert alert.kind == "refused" and alert.step == 2 and "step 3 refused" in alert.message


def test_get_telemetry_range_and_tokens(served):
    hub = served.telemetry
    _session(served)
    for s in range(1, 11):
        hub.on_step(event(s, owner=_alice()))
    channel, stub, md = _stub(served, "alice")
    r = stub.GetTelemetry(telemetry_pb2.GetTelemetryRequest(session_id="s", from_step=3, to_step=6), metadata=md)
    assert [s.step for s in r.steps] == [3, 4, 5, 6] and r.first_step == 1 and r.last_step == 10
    _, bob, bob_md = _stub(served, "bob")
    for call in (lambda: bob.GetTelemetry(telemetry_pb2.GetTelemetryRequest(session_id="s"), metadata=bob_md),
                 lambda: next(bob.WatchSession(telemetry_pb2.WatchSessionRequest(session_id="s", from_step=1),
                                               metadata=bob_md))):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.NOT_FOUND)
    with pytest.raises(grpc.RpcError) as e:
        stub.GetTelemetry(telemetry_pb2.GetTelemetryRequest(session_id="s"),
                          metadata=(("authorization", "Bearer mallory"),))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as e:
        stub.GetTelemetry(telemetry_pb2.GetTelemetryRequest(session_id=""), metadata=md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "session_id" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.GetTelemetry(telemetry_pb2.GetTelemetryRequest(session_id="s", from_step=-1), metadata=md)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "from_step" in e.value.details()
    channel.close()


# ---- the dashboard's HTTP side without a browser ----------------------------------------------

def test_dashboard_guard_refuses_a_non_loopback_host_without_tls_and_tokens():
    from optreg.server.assembly import OptregServer, Settings
    with pytest.raises(ValueError, match="the dashboard to non-loopback address 0.0.0.0 without TLS and tokens"):
        OptregServer(Settings(port=0, data_dir="", dashboard_port=0, dashboard_host="0.0.0.0"))


def test_event_stream_resumes_after_last_event_id(tmp_path):
    import urllib.error
    import urllib.request
    from optreg.server.dashboard import DashboardServer
    hub = TelemetryHub(auth=True)
    dash = DashboardServer(hub, token_hashes=frozenset({_alice()}))
    dash.start()
    try:
        for s in range(1, 21):
            hub.on_step(event(s, owner=_alice()))
        req = urllib.request.Request(dash.url + "api/sessions/s/events",
                                     headers={"Last-Event-ID": "12", "Authorization": "Bearer alice"})
        with urllib.request.urlopen(req, timeout=10) as r:
            buf = b""
            while buf.count(b"event: step") < 8:
                buf += r.read1(65536)
        ids = [int(line[4:]) for line in buf.decode().splitlines() if line.startswith("id: ")]
        assert ids == list(range(13, 21))
        for headers in ({}, {"Authorization": "Bearer mallory"}):
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(urllib.request.Request(dash.url + "api/sessions", headers=headers))
            assert e.value.code == 401
    finally:
        dash.stop()


def test_telemetry_survives_a_server_restart_with_its_session(tmp_path):
    from optreg.client import Client
    from optreg.server.assembly import OptregServer, Settings
    settings = Settings(port=0, data_dir=str(tmp_path))
    srv = OptregServer(settings)
    srv.start()
    with Client(srv.address) as c:
        c.create_session("sgd", {"W": np.zeros(4, np.float32)}, session_id="keep")
    for s in range(1, 31):
        srv.telemetry.on_step(event(s, session="keep"))
    srv.telemetry.on_refused("keep", "", 30, "gradient 'W' is not finite")
    srv.stop(0)
    srv = OptregServer(settings)
    srv.start()
    try:
        channel = grpc.insecure_channel(srv.address)
        stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        r = stub.GetTelemetry(telemetry_pb2.GetTelemetryRequest(session_id="keep"))
        assert [s.step for s in r.steps] == list(range(1, 31))
        assert [a.kind for a in r.alerts] == ["refused"]
        channel.close()
    finally:
        srv.stop(0)


def test_export_and_import_carry_the_ring():
    hub = TelemetryHub()
    for s in range(1, 11):
        hub.on_step(event(s))
    other = TelemetryHub()
    other.import_("copy", hub.export("s"))
    assert [r.step for r in other.ring("copy").records()] == list(range(1, 11))
    with pytest.raises(ValueError, match="format"):
        import json, zlib
        other.import_("x", zlib.compress(json.dumps({"format": "other"}).encode()))


def test_compiled_small_tensor_sums_equal_numpy():
    """The compiled pass the step pipeline uses for small tensors gives numpy's figures (float32 and float64)."""
    import optreg.server.kernels.stats as t
    pytest.importorskip("numba")
    rng = np.random.default_rng(5)
    t.tensor_stats(np.zeros(2), np.zeros(2), np.zeros(2))  # starts the build
    deadline = time.time() + 120
    while len(t._SUMS) < 2 and time.time() < deadline:
        time.sleep(0.1)
    assert len(t._SUMS) == 2, "the compiled sums were not built"
    for dt in (np.float32, np.float64):
        g, old = rng.normal(size=1001).astype(dt), rng.normal(size=1001).astype(dt)
        new = (old - dt(0.01) * g).astype(dt)
        np.testing.assert_allclose(t.tensor_stats(g, old, new), t.reference_stats(g, old, new), rtol=1e-12)
