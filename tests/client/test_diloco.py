"""DiLoCo for numpy clients (issue 26): H local inner steps, then the pseudo-gradient (start - current weights)
to an outer session, over a real server."""
from __future__ import annotations

import threading

import numpy as np

from optreg.client import Client
from optreg.client.compression import Int8Blocks
from optreg.client.diloco import AdamW, DiLoCo, diloco_outer
from optreg.client.transport import Counted


def _problem(seed, n=64, d=8):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, d)).astype(np.float32)
    return X, X @ rng.standard_normal(d).astype(np.float32)


def _grad(w, X, y):
    return {"w": (2 / len(y)) * X.T @ (X @ w["w"] - y)}


def _loss(w, X, y):
    return float(np.mean((X @ w - y) ** 2))


def _workers(address, outer, w0, body, n=2) -> None:
    """`body(k, c, worker)` in n threads, each with its own client joined to `outer` as w<k> with arrays w0,
    starting together (a round closes with the members it has: all of them, from the first)."""
    errors = []
    joined = threading.Barrier(n, timeout=60)

    def work(k):
        try:
            with Client(address, timeout=60) as c, c.join(outer.id, f"w{k}", {"w": w0.copy()}) as w:
                joined.wait()
                body(k, c, w)
        except Exception as e:  # reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def test_outer_sgd_lr_1_lands_on_the_local_weights(client):
    """The pseudo-gradient is start - current: an outer SGD step of lr 1 makes the session the worker's
    local weights, once every H steps (and no step in between)."""
    X, y = _problem(0)
    # (float32 answers: with bf16 deltas a round starts from the copy, within one answer's rounding of the master)
    outer = client.create_session(**diloco_outer({"w": np.zeros(8, np.float32)}, optimizer="sgd", lr=1.0,
                                                 step_reply="parameters"))
    inner = AdamW(lr=0.05)
    local = {}

    class Recorded:  # the local weights after each inner step
        def step(self, params, grads):
            inner.step(params, grads)
            local.update(w=params["w"].copy())

    loco = DiLoCo(outer, Recorded(), every=5)
    for i in range(20):
        synced = loco.step(_grad(loco.params, X, y))
        assert (synced is not None) == ((i + 1) % 5 == 0)
        if synced is not None:
            np.testing.assert_allclose(outer.read_parameters()["w"], local["w"], rtol=0, atol=1e-6)
    assert outer.refresh().step == 4 and loco.syncs == 4
    np.testing.assert_array_equal(loco.params["w"], outer.arrays["w"])  # the next round starts from the answer


def test_two_workers_nesterov_outer_with_int8_pseudo_gradients(client, server):
    """Two workers of a sync session, each with its own data and inner AdamW, syncing every 10 steps with
    int8 pseudo-gradients and bf16 answers: every round they restart from the same outer weights, and the loss
    falls."""
    X, y = _problem(1, n=128)
    halves = [(X[:64], y[:64]), (X[64:], y[64:])]
    w0 = np.zeros(8, np.float32)
    outer = client.create_session(**diloco_outer({"w": w0.copy()}, workers=2, round_deadline=60.0))
    assert outer.info.optimizer == "nesterov" and outer.info.hyperparameters["lr"] == 0.7
    ends = {}

    def body(k, c, w):
        loco = DiLoCo(w, AdamW(lr=0.05, weight_decay=0.0), every=10, compress=Int8Blocks(4))
        for _ in range(100):
            loco.step(_grad(loco.params, *halves[k]))
        ends[k] = loco.params["w"].copy()

    _workers(server.address, outer, w0, body)
    final = outer.read_parameters()["w"]
    assert outer.refresh().step == 10  # 100 inner steps / H = 10 rounds, each one outer step
    # both restart from the same answer: the server's copy of the workers' weights (bf16 deltas), within one
    # answer's rounding of the master
    np.testing.assert_array_equal(ends[0], ends[1])
    np.testing.assert_allclose(ends[0], final, rtol=2.0 ** -7, atol=1e-6)
    assert _loss(final, X, y) < 0.2 * _loss(w0, X, y)


def test_a_worker_step_costs_under_a_hundredth_of_a_dense_float32_step(client, server):
    """The issue's figure, counted on the messages that cross: two DiLoCo workers (H = 50, int8 pseudo-gradients
    up, bf16 answers down, the first answer the parameters) send less than 1/100 of a dense float32 step's
    bytes (gradient up, parameters down) per inner step."""
    n, rounds = 20_000, 6
    rng = np.random.default_rng(4)
    w0 = rng.standard_normal(n).astype(np.float32)
    dense = client.create_session("adam", {"w": w0.copy()}, lr=1e-3)
    client.transport = counted = Counted(client.transport)
    dense.step({"w": rng.standard_normal(n).astype(np.float32)})
    dense_bytes = counted.bytes
    assert dense_bytes > 8 * n
    outer = client.create_session(**diloco_outer({"w": w0.copy()}, workers=2, round_deadline=60.0))
    sent = {}

    def body(k, c, w):
        c.transport = mine = Counted(c.transport)
        loco = DiLoCo(w, AdamW(lr=1e-3), every=50, compress=Int8Blocks(256))
        g = np.random.default_rng(k)
        for _ in range(rounds * 50):
            loco.step({"w": g.standard_normal(n).astype(np.float32)})
        sent[k] = (mine.bytes, mine.calls)

    _workers(server.address, outer, w0, body)
    for k, (b, calls) in sent.items():
        assert calls == rounds
        assert b / (rounds * 50) <= dense_bytes / 100, (k, b / (rounds * 50), dense_bytes)


def test_h50_int8_matches_synchronous_data_parallel_on_the_demo_network(server):
    """The demo network on the demo's data (Fashion-MNIST when installed, else digits) trained by 4 DiLoCo
    workers through the server with the helpers' defaults (H = 50, int8 pseudo-gradients, bf16 answers, inner
    AdamW lr 1e-3 and its default weight decay 0.1, outer Nesterov 0.7/0.9) against synchronous data parallel
    on the same samples from the same initial weights (4 x 2,000 batches of 32; AdamW on the mean of the 4
    gradients, computed here), paired by seed: the mean of 3 seeds' ratios of final test losses. On
    Fashion-MNIST a seed's ratio varied by ~1% (0.95-0.97, docs/slow-links.md), so the issue's 2% is asserted
    on the mean; on digits one run's test loss varies by ~9% from seed to seed and a 3-seed mean resolves
    ~+-7%: 10% there (inner weight decay 0.01 gave 3.3x)."""
    from bench.slow_links import LR, WD, WORKERS, _demo, train_workers
    from optreg.app.demo import _one_blas_thread

    ratios = []
    for seed in (0, 1, 2):
        name, base, batch, test_loss = _demo(seed)
        loco = train_workers(server.address, True, seed, 2000)[0]
        net, rngs, inner = base.copy(), [np.random.default_rng([seed, k]) for k in range(WORKERS)], \
            AdamW(lr=LR, weight_decay=WD)
        with _one_blas_thread():  # small matrices: a threaded BLAS only contends for the 2 cores
            for _ in range(2000):
                grads = [net.gradient(*batch(r))[1] for r in rngs]
                inner.step(net.params, {n: np.mean([g[n] for g in grads], axis=0) for n in net.params})
        ratios.append(loco / test_loss(net.params))
    assert np.mean(ratios) <= (1.02 if name == "Fashion-MNIST" else 1.10), (name, ratios)
