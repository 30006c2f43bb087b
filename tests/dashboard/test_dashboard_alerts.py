"""The dashboard's alerts on real runs (issue 27): silent on healthy training, raised on broken training.

Each test drives real sessions of a real `optreg serve` process (a separate process) with real gradients:
the demo's network on scikit-learn's digits, or a small numpy network on a synthetic regression problem,
and reads the alerts the server raised (TelemetryService.GetTelemetry, what the page shows).
"""
from __future__ import annotations

import grpc
import numpy as np
import pytest

from optreg.client import Client


def alerts(address, session_id):
    from optreg.v1 import telemetry_pb2, telemetry_pb2_grpc
    with grpc.insecure_channel(address) as channel:
        got = telemetry_pb2_grpc.TelemetryServiceStub(channel).GetTelemetry(
            telemetry_pb2.GetTelemetryRequest(session_id=session_id), timeout=30)
    return [(a.kind, a.step, a.tensor, a.message) for a in got.alerts]


class Regression:
    """y = relu(x W1 + b1) W2 + b2 fitted to a fixed synthetic linear target by mean squared error."""

    def __init__(self, seed=0, n=256, inputs=8, hidden=16):
        rng = np.random.default_rng(seed)
        self.x = rng.normal(size=(n, inputs)).astype(np.float32)
        self.y = (self.x @ rng.normal(size=(inputs, 1)) + 0.1 * rng.normal(size=(n, 1))).astype(np.float32)
        self.params = {"W1": (rng.normal(size=(inputs, hidden)) * np.sqrt(2 / inputs)).astype(np.float32),
                       "b1": np.zeros(hidden, np.float32),
                       "W2": (rng.normal(size=(hidden, 1)) * np.sqrt(2 / hidden)).astype(np.float32),
                       "b2": np.zeros(1, np.float32)}

    def gradient(self, p, x=None):
        x = self.x if x is None else x
        pre = x @ p["W1"] + p["b1"]
        h = np.maximum(pre, 0)
        err = h @ p["W2"] + p["b2"] - self.y
        d = 2 * err / len(x)
        dh = (d @ p["W2"].T) * (pre > 0)
        grads = {"W1": x.T @ dh, "b1": dh.sum(0), "W2": h.T @ d, "b2": d.sum(0)}
        return float(np.mean(err ** 2)), {k: v.astype(np.float32) for k, v in grads.items()}

    def train(self, session, steps, x=None):
        for _ in range(steps):
            loss, grads = self.gradient(session.arrays, x)
            session.step(grads, metrics={"loss": loss})


def test_the_demos_six_optimizers_at_the_books_rates_raise_no_alert(server):
    """The demo's 4x100 ReLU network on the digits with SGD, Momentum, AdaGrad, Adam, RMSProp (the demo's
    rates) and Nesterov (the book's 0.01, momentum 0.9): biases starting at zero, the fast first drop and
    the flattening loss all raise nothing (the update/param band raised a dozen "learning rate too high?")."""
    pytest.importorskip("sklearn")
    from optreg.app.demo import data, training
    from optreg.client import Nesterov
    optimizers = training.OPTIMIZERS + [("Nesterov", Nesterov, {"lr": 0.01, "momentum": 0.9})]
    with Client(server.address, timeout=120) as c:
        results = training.run(c, data.load(None, "digits"), iterations=40, optimizers=optimizers, progress=False,
                               named=True)
        assert all(r["final_loss"] < r["losses"][0] for r in results.values())  # they did learn
        for title, _, _ in optimizers:
            assert alerts(server.address, f"demo-{title.lower()}") == [], title
            c.delete_session(f"demo-{title.lower()}")


def test_a_learning_rate_100x_too_high_is_diverging_and_the_right_one_is_quiet(server):
    """Linear least squares (the hidden layer left out: the network overflows to NaN within 4 steps at
    this rate, where the refused step is the alert): SGD at 0.01 fits it, at 1.0 every step overshoots
    further (the largest curvature is ~2.8, stable below 0.7), and the smoothed loss says so."""
    task = Regression()
    linear = {"W": np.zeros((8, 1), np.float32), "b": np.zeros(1, np.float32)}

    def train(session, steps):
        for _ in range(steps):
            p = session.arrays
            err = task.x @ p["W"] + p["b"] - task.y
            d = 2 * err / len(err)
            session.step({"W": task.x.T @ d, "b": d.sum(0)}, metrics={"loss": float(np.mean(err ** 2))})

    with Client(server.address, timeout=60) as c:
        good = c.create_session("sgd", linear, session_id="regression-good", lr=0.01)
        bad = c.create_session("sgd", linear, session_id="regression-x100", lr=1.0)
        train(good, 60)
        train(bad, 30)
        assert np.isfinite(bad.arrays["W"]).all()
        assert alerts(server.address, "regression-good") == []
        found = alerts(server.address, "regression-x100")
    diverging = [a for a in found if a[0] == "diverging"]
    assert len(diverging) == 1, found
    assert "loss diverging" in diverging[0][3] and "learning rate too high" in diverging[0][3]
    assert diverging[0][1] <= 20


def test_a_dead_layer_is_named_once_per_tensor(server):
    """The hidden layer's biases start at -100: no ReLU ever fires, so W1, b1 and W2 get exactly zero
    gradient (b2 still learns the mean). The alert names each dead tensor once, after 20 steps."""
    task = Regression()
    params = dict(task.params, b1=np.full(16, -100.0, np.float32))
    with Client(server.address, timeout=60) as c:
        s = c.create_session("adam", params, session_id="dead-layer", lr=0.001)
        task.train(s, 30)
        found = alerts(server.address, "dead-layer")
    assert sorted((kind, step, tensor) for kind, step, tensor, _ in found) == [
        ("dead_tensor", 20, "W1"), ("dead_tensor", 20, "W2"), ("dead_tensor", 20, "b1")], found
    assert "gradient exactly zero for 20 steps" in found[0][3]


def test_exploding_gradients_from_a_corrupted_batch(server):
    """30 healthy Adam steps, then one batch whose inputs are 1000x too large (a unit bug in the data):
    its gradient norms jump far above the run's first steps, and that step raises exploding_gradients."""
    task = Regression()
    with Client(server.address, timeout=60) as c:
        s = c.create_session("adam", task.params, session_id="exploding", lr=0.001)
        task.train(s, 30)
        assert alerts(server.address, "exploding") == []
        task.train(s, 1, x=task.x * 1000)
        found = alerts(server.address, "exploding")
    assert found and {kind for kind, *_ in found} == {"exploding_gradients"}, found
    assert {step for _, step, _, _ in found} == {31}
    assert {"W1", "W2"} <= {tensor for _, _, tensor, _ in found}
    assert "exploding gradients" in found[0][3]
