"""Each built-in, over the wire, against the book's formulas in plain float64."""
import numpy as np
import pytest

from book_reference import BY_NAME

SHAPES = {"W1": (7, 5), "b1": (5,), "W2": (3, 4, 12000), "s": ()}  # W2 spans several kernel slices
STEPS = 120
HPS = {"sgd": {"lr": 0.05}, "momentum": {"lr": 0.02, "momentum": 0.8}, "nesterov": {"lr": 0.02, "momentum": 0.85},
       "adagrad": {"lr": 0.1}, "rmsprop": {"lr": 0.01, "decay_rate": 0.9}, "adam": {"lr": 0.01, "beta1": 0.8}}


def _params(rng, dtype):
    return {k: rng.standard_normal(s).astype(dtype) for k, s in SHAPES.items()}


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_float64_matches_book_formula(client, name):
    rng = np.random.default_rng(1)
    params = _params(rng, np.float64)
    ref_params = {k: v.copy() for k, v in params.items()}
    ref = BY_NAME[name](**HPS[name])
    session = client.create_session(name, params, **HPS[name])
    assert session.info.master_dtype == "float64"  # float64 follows the arrays
    for _ in range(STEPS):
        grads = {k: rng.standard_normal(s) for k, s in SHAPES.items()}
        ref.update(ref_params, grads)
        out = session.step(grads)
        assert out.arrays is session.arrays and out.step == _ + 1 and not out.replayed
    for k in SHAPES:
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-12, atol=1e-12, err_msg=f"{name} {k}")
    np.testing.assert_array_equal(session.read_parameters()["W1"], params["W1"])
    assert session.refresh().step == STEPS
    session.delete()


@pytest.mark.parametrize("name", sorted(BY_NAME))
def test_float32_agrees_to_float32_rounding(client, name):
    rng = np.random.default_rng(2)
    params = _params(rng, np.float32)
    ref32 = {k: v.copy() for k, v in params.items()}
    ref64 = {k: v.astype(np.float64) for k, v in params.items()}
    opt32, opt64 = BY_NAME[name](**HPS[name]), BY_NAME[name](**HPS[name])
    session = client.create_session(name, params, **HPS[name])
    for _ in range(STEPS):
        grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
        opt32.update(ref32, grads)
        opt64.update(ref64, {k: g.astype(np.float64) for k, g in grads.items()})
        session.step(grads)
    for k in SHAPES:
        assert params[k].dtype == np.float32
        # the book's code run in float32 numpy rounds alike; the float64 run bounds the drift
        np.testing.assert_allclose(params[k], ref32[k], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(params[k], ref64[k], rtol=1e-3, atol=1e-3)
    session.delete()


@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
def test_low_precision_gradients_are_widened(client, wire):
    import ml_dtypes
    dtype = np.float16 if wire == "float16" else ml_dtypes.bfloat16
    rng = np.random.default_rng(3)
    params = {"w": rng.standard_normal((4, 6)).astype(np.float32)}
    expect = params["w"].copy()
    session = client.create_session("sgd", params, lr=0.5)
    g = rng.standard_normal((4, 6)).astype(dtype)
    session.step({"w": g})
    expect -= np.float32(0.5) * g.astype(np.float32)
    np.testing.assert_array_equal(params["w"], expect)
    session.delete()


def test_mid_run_learning_rate_change_keeps_folded_velocity(client):
    """Momentum's v folds in lr: a new lr scales only new gradients (documented semantics)."""
    p = {"w": np.array([1.0, -2.0])}
    s = client.create_session("momentum", p, lr=0.1, momentum=0.5)
    ref = BY_NAME["momentum"](lr=0.1, momentum=0.5)
    rp = {"w": p["w"].copy()}
    g = {"w": np.array([0.3, 0.7])}
    s.step(g), ref.update(rp, g)
    info = s.set_hyperparameters(lr=0.01)
    assert info.hyperparameters["lr"] == 0.01 and info.hyperparameters["momentum"] == 0.5
    ref.lr = 0.01
    s.step(g), ref.update(rp, g)
    np.testing.assert_allclose(p["w"], rp["w"], rtol=1e-15)
    s.delete()


def test_delta_reply(client):
    p = {"w": np.arange(6.0).reshape(2, 3)}
    s = client.create_session("sgd", p, lr=0.1, step_reply="delta")
    s.step({"w": np.ones((2, 3))})
    np.testing.assert_allclose(p["w"], np.arange(6.0).reshape(2, 3) - 0.1)
    np.testing.assert_allclose(s.read_parameters()["w"], p["w"])
    s.delete()


def test_none_reply_leaves_client_arrays(client):
    p = {"w": np.zeros(3)}
    s = client.create_session("sgd", p, lr=1.0, step_reply="none")
    s.step({"w": np.ones(3)})
    np.testing.assert_array_equal(p["w"], np.zeros(3))
    np.testing.assert_array_equal(s.read_parameters()["w"], -np.ones(3))
    s.delete()
