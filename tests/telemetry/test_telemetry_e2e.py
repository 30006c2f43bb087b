"""Telemetry from real steps: an `optreg serve` process, steps over gRPC (unary and streamed) carrying
client metrics, a refused non-finite gradient, WatchSession and GetTelemetry reading them back."""
from __future__ import annotations

import numpy as np
import grpc

from optreg.client import Client
from optreg.v1 import session_pb2, session_pb2_grpc, telemetry_pb2, telemetry_pb2_grpc, tensors


def _grad(name, a):
    return tensors.from_numpy(name, a)


def test_real_steps_reach_watch_and_get_telemetry(start_server):
    srv = start_server()
    rng = np.random.default_rng(0)
    params = {"W": rng.normal(size=(8, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
    with Client(srv.address) as c:
        c.create_session("torch.adam", params, session_id="e2e", lr=1e-2)
    channel = grpc.insecure_channel(srv.address)
    sessions = session_pb2_grpc.SessionServiceStub(channel)
    telemetry = telemetry_pb2_grpc.TelemetryServiceStub(channel)
    watch = telemetry.WatchSession(telemetry_pb2.WatchSessionRequest(session_id="e2e", from_step=1), timeout=60)
    losses = [2.0, 1.5, 1.2, 1.0, 0.9]
    for i, loss in enumerate(losses):
        grads = [_grad(n, rng.normal(size=a.shape).astype(np.float32)) for n, a in params.items()]
        sessions.Step(session_pb2.StepRequest(session_id="e2e", step=i, gradients=grads,
                                              metrics={"loss": loss, "accuracy": 0.1 * i}))
    bad = rng.normal(size=(8, 4)).astype(np.float32)
    bad[3, 1] = np.nan
    try:
        sessions.Step(session_pb2.StepRequest(session_id="e2e", step=5, gradients=[
            _grad("W", bad), _grad("b", np.zeros(4, np.float32))]))
        raise AssertionError("a NaN gradient was accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
    seen_steps, alerts = [], []
    for msg in watch:
        if msg.HasField("step"):
            seen_steps.append(msg.step)
        else:
            alerts.append(msg.alert)
        if alerts:
            watch.cancel()
            break
    assert [s.step for s in seen_steps] == [1, 2, 3, 4, 5]
    assert [s.metrics["loss"] for s in seen_steps] == losses
    assert all(s.hyperparameters["lr"] == 1e-2 for s in seen_steps)
    (alert,) = alerts
    assert alert.kind == "refused" and alert.step == 5 and "NaN" in alert.message and "'W'" in alert.message

    got = telemetry.GetTelemetry(telemetry_pb2.GetTelemetryRequest(session_id="e2e"))
    assert [s.step for s in got.steps] == [1, 2, 3, 4, 5] and got.last_step == 5
    with Client(srv.address) as c:
        c.delete_session("e2e") if hasattr(c, "delete_session") else sessions.DeleteSession(
            session_pb2.DeleteSessionRequest(session_id="e2e"))
    try:
        telemetry.GetTelemetry(telemetry_pb2.GetTelemetryRequest(session_id="e2e"))
        raise AssertionError("telemetry of a deleted session was served")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND
    channel.close()
