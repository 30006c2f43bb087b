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


class Interrupted(Exception):
    pass


def _steps(optimizer, net, x, t, batches):
    for batch in batches:
        optimizer.update(net.params, net.gradient(x[batch], t[batch]))


def test_dropin_resumes_by_session_id_and_ends_its_session(server, client):
    rng = np.random.default_rng(3)
    x, t = rng.standard_normal((200, 20)), rng.integers(0, 3, 200)
    initial = TwoLayerNet(rng).params
    batches = [rng.choice(200, 32) for _ in range(8)]
    reference = TwoLayerNet(rng)
    reference.params = {k: v.copy() for k, v in initial.items()}
    _steps(book_reference.Adam(), reference, x, t, batches)

    first = TwoLayerNet(rng)
    first.params = {k: v.copy() for k, v in initial.items()}
    with pytest.raises(Interrupted):
        with drop_in.Adam(address=server.address, session_id="book-resume") as optimizer:
            _steps(optimizer, first, x, t, batches[:5])
            raise Interrupted  # Ctrl-C, say: the session stays for the next run
    assert client.get_session("book-resume").step == 5

    second = TwoLayerNet(np.random.default_rng(99))  # a fresh start: resuming overwrites these values
    with drop_in.Adam(address=server.address, session_id="book-resume") as optimizer:
        start = optimizer.resume(second.params)
        assert start == 5
        _steps(optimizer, second, x, t, batches[start:])
        assert optimizer.step == 8
    for k in initial:
        np.testing.assert_allclose(second.params[k], reference.params[k], rtol=1e-12, atol=1e-14)
    with pytest.raises(drop_in.NotFound):  # the run finished: its session ended with the block
        client.get_session("book-resume")


def test_dropin_keep_and_close(server, client):
    p = {"w": np.ones(3)}
    optimizer = drop_in.SGD(address=server.address, session_id="book-close")
    optimizer.update(p, {"w": np.ones(3)})
    optimizer.close()
    with pytest.raises(drop_in.NotFound):
        client.get_session("book-close")
    with drop_in.SGD(address=server.address, session_id="book-kept", keep=True) as optimizer:
        optimizer.update(p, {"w": np.ones(3)})
    assert client.get_session("book-kept").step == 1
    p = {"w": np.zeros(3)}  # not the session's values
    with drop_in.SGD(address=server.address, session_id="book-kept", keep=False) as optimizer:
        with pytest.warns(RuntimeWarning, match="were not applied"):
            optimizer.update(p, {"w": np.ones(3)})  # resumes at step 1; these gradients are stale
        np.testing.assert_array_equal(p["w"], 0.98)  # 1 - 0.01 (book-close), - 0.01 (book-kept)
        assert optimizer.step == 1
        optimizer.update(p, {"w": np.ones(3)})
        assert optimizer.step == 2
    with pytest.raises(drop_in.NotFound):
        client.get_session("book-kept")
    with pytest.raises(drop_in.UsageError, match="cannot resume"):
        with drop_in.Adam(address=server.address, session_id="book-mismatch") as first:
            first.update({"w": np.ones(3)}, {"w": np.ones(3)})
            drop_in.SGD(client=client, session_id="book-mismatch").update({"w": np.ones(3)}, {"w": np.ones(3)})
