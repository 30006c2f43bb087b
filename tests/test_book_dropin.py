"""The book's training loop, unchanged, with the optimizer living in the service."""
import numpy as np
import pytest

import book_reference
import optreg.client as drop_in


class TwoLayerNet:
    """A small network in the book's style: params dict, gradient() returns a grads dict."""

    def __init__(self, rng, n_in=20, hidden=16, n_out=3):
        self.params = {"W1": rng.standard_normal((n_in, hidden)) * 0.1, "b1": np.zeros(hidden),
                       "W2": rng.standard_normal((hidden, n_out)) * 0.1, "b2": np.zeros(n_out)}

    def gradient(self, x, t):
        p = self.params
        h_pre = x @ p["W1"] + p["b1"]
        h = np.maximum(h_pre, 0)
        y = h @ p["W2"] + p["b2"]
        y = np.exp(y - y.max(axis=1, keepdims=True))
        y /= y.sum(axis=1, keepdims=True)
        self.loss = -np.mean(np.log(y[np.arange(len(t)), t] + 1e-7))
        dy = (y - np.eye(y.shape[1])[t]) / len(t)
        dh = (dy @ p["W2"].T) * (h_pre > 0)
        return {"W1": x.T @ dh, "b1": dh.sum(0), "W2": h.T @ dy, "b2": dy.sum(0)}


def train(optimizer, seed=0, iters=60):
    rng = np.random.default_rng(seed)
    x, t = rng.standard_normal((200, 20)), rng.integers(0, 3, 200)
    net = TwoLayerNet(rng)
    losses = []
    for i in range(iters):
        batch = rng.choice(200, 32)
        grads = net.gradient(x[batch], t[batch])
        optimizer.update(net.params, grads)
        losses.append(net.loss)
    return net.params, losses


@pytest.mark.parametrize("name,kwargs", [("SGD", {"lr": 0.1}), ("Momentum", {}), ("Nesterov", {}),
                                         ("AdaGrad", {}), ("RMSprop", {}), ("Adam", {})])
def test_book_loop_same_numbers_with_service(server, name, kwargs):
    local_params, local_losses = train(getattr(book_reference, name)(**kwargs))
    with getattr(drop_in, name)(address=server.address, **kwargs) as remote:
        remote_params, remote_losses = train(remote)
        assert remote.session.info.master_dtype == "float64"  # float64, as the book's arrays
        assert remote.session.step_count == 60
    for k in local_params:
        np.testing.assert_allclose(remote_params[k], local_params[k], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(remote_losses, local_losses, rtol=1e-12)
    assert remote_losses[-1] < remote_losses[0]
