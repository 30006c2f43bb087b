"""The fused kernels against the plugins' numpy updates (bit for bit) and the book's formulas in float64."""
import math

import numpy as np
import pytest

from optreg.plugins.registry import Registry
from optreg.server import fastkernels, kernels

HPS = {"sgd": {"lr": 0.05}, "momentum": {"lr": 0.02, "momentum": 0.8}, "nesterov": {"lr": 0.02, "momentum": 0.85},
       "adagrad": {"lr": 0.1}, "rmsprop": {"lr": 0.01, "decay_rate": 0.9},
       "adam": {"lr": 0.01, "beta1": 0.8, "beta2": 0.999}}
SIZES = [1, 1000, (1 << 18) + 17]  # the last crosses the threaded split and is not a multiple of anything


def book(name, hp, p, g, st, t):
    """The book's formulas, plain numpy expressions (Deep Learning from Scratch, ch. 6)."""
    if name == "sgd":
        p -= hp["lr"] * g
    elif name == "momentum":
        st["v"] = hp["momentum"] * st["v"] - hp["lr"] * g
        p += st["v"]
    elif name == "nesterov":
        mu, lr = hp["momentum"], hp["lr"]
        p += mu * mu * st["v"] - (1 + mu) * lr * g
        st["v"] = mu * st["v"] - lr * g
    elif name == "adagrad":
        st["h"] += g * g
        p -= hp["lr"] * g / (np.sqrt(st["h"]) + 1e-7)
    elif name == "rmsprop":
        d = hp["decay_rate"]
        st["h"] = d * st["h"] + (1 - d) * g * g
        p -= hp["lr"] * g / (np.sqrt(st["h"]) + 1e-7)
    elif name == "adam":
        b1, b2 = hp["beta1"], hp["beta2"]
        lr_t = hp["lr"] * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
        st["m"] += (1 - b1) * (g - st["m"])
        st["v"] += (1 - b2) * (g ** 2 - st["v"])
        p -= lr_t * st["m"] / (np.sqrt(st["v"]) + 1e-7)


@pytest.fixture(scope="module")
def registry():
    fastkernels.warm(block=True)
    return Registry()


def _numpy_update(defn, p, g, st, t, hp):
    defn.update(p, g, st, t, hp, [np.empty_like(p) for _ in range(defn.scratch)])


@pytest.mark.skipif(not fastkernels.available(), reason="numba not installed")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", sorted(HPS))
def test_fused_kernel_equals_numpy_update_bit_for_bit(registry, name, size, dtype):
    defn = registry.get(name).definition
    assert fastkernels.lookup(defn.update, np.dtype(dtype)) is not None
    rng = np.random.default_rng(3)
    p = rng.standard_normal(size).astype(dtype)
    st = {s.name: np.full(size, s.initial_value, dtype) for s in defn.slots}
    p_ref, st_ref = p.copy(), {k: v.copy() for k, v in st.items()}
    for t in range(1, 6):
        g = rng.standard_normal(size).astype(dtype)
        kernels.apply(defn, p, g, st, t, HPS[name])
        _numpy_update(defn, p_ref, g, st_ref, t, HPS[name])
    np.testing.assert_array_equal(p, p_ref)
    for k in st:
        np.testing.assert_array_equal(st[k], st_ref[k])


@pytest.mark.parametrize("name", sorted(HPS))
def test_kernel_matches_float64_book_formula(registry, name):
    defn = registry.get(name).definition
    rng = np.random.default_rng(4)
    size = (1 << 18) + 5
    p = rng.standard_normal(size)
    st = {s.name: np.full(size, s.initial_value) for s in defn.slots}
    p_ref, st_ref = p.copy(), {k: v.copy() for k, v in st.items()}
    for t in range(1, 31):
        g = rng.standard_normal(size)
        kernels.apply(defn, p, g, st, t, HPS[name])
        book(name, HPS[name], p_ref, g, st_ref, t)
    np.testing.assert_allclose(p, p_ref, rtol=1e-12, atol=1e-12)


def test_numpy_fallback_used_for_unknown_update(registry):
    """A third-party update (not one of the built-in functions) never gets a fused kernel."""
    defn = registry.get("adam").definition
    assert fastkernels.lookup(lambda *a: None, np.dtype(np.float32)) is None
    assert defn.elementwise


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
@pytest.mark.parametrize("size", [3, (1 << 15) + 5])  # below and above the GIL-keeping threshold
def test_finite_check_matches_numpy(dtype, size):
    import ml_dtypes
    fastkernels.warm(block=True)
    if not fastkernels.names():
        pytest.skip("numba not installed")
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    info = ml_dtypes.finfo(dt) if dtype == "bfloat16" else np.finfo(dt)
    for special in [1.0, -0.0, float(info.max), -float(info.max), float(info.smallest_subnormal), np.nan, np.inf,
                    -np.inf]:
        a = np.ones(size, dt)
        a[size // 2] = special
        for arr in (a, a.reshape(1, -1)):
            assert fastkernels.all_finite(arr) == bool(np.isfinite(arr.astype(np.float64)).all()), (dtype, special)
    assert fastkernels.all_finite(np.ones(10, np.float32)[::2]) is None  # not contiguous: numpy decides
    assert kernels.COPY_SLICE > 0


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_copy_out_equals_update(name):
    """kernels.apply(out=...) (shared-memory steps) writes the same numbers it leaves in the parameter."""
    fastkernels.warm(block=True)
    defn = Registry().get(name).definition
    rng = np.random.default_rng(5)
    n = (1 << 18) + 333
    p1 = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    st1 = {s.name: np.full(n, s.initial_value, np.float32) for s in defn.slots}
    p2, st2 = p1.copy(), {k: v.copy() for k, v in st1.items()}
    out = np.zeros(n, np.float32)
    kernels.apply(defn, p1, g, st1, 1, HPS[name])
    kernels.apply(defn, p2, g, st2, 1, HPS[name], out)
    assert np.array_equal(p1, p2) and np.array_equal(out, p1)
    for k in st1:
        assert np.array_equal(st1[k], st2[k])
