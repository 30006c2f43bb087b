"""The fused kernels against the plugins' numpy updates (bit for bit) and the book's formulas in float64;
statistics in the update pass against a numpy recomputation."""
import dataclasses
import logging
import math

import numpy as np
import pytest

from optreg.plugins import Hyperparameter, Optimizer
from optreg.plugins import testing as kit
from optreg.plugins.registry import Registry
from optreg.server.kernels import jit
from optreg.server.kernels import warmup
from optreg.server.kernels import finite
from optreg.server.kernels import apply as kernels
from optreg.server.kernels import stats as kernelstats

HPS = {"sgd": {"lr": 0.05}, "momentum": {"lr": 0.02, "momentum": 0.8}, "nesterov": {"lr": 0.02, "momentum": 0.85},
       "adagrad": {"lr": 0.1}, "rmsprop": {"lr": 0.01, "decay_rate": 0.9},
       "adam": {"lr": 0.01, "beta1": 0.8, "beta2": 0.999}}
SIZES = [1, 1000, (1 << 18) + 17]  # the last crosses the threaded split and is not a multiple of anything
# Every optimizer with a kernel, under settings that take each of its branches.
SETTINGS = {
    **{name: [hp] for name, hp in HPS.items()},
    "torch.adam": [{}, {"weight_decay": 0.1, "amsgrad": True, "eps": 1e-6}],
    "adamw": [{}, {"weight_decay": 0.05, "amsgrad": True, "lr": 0.01}],
    "torch.sgd": [{}, {"momentum": 0.9}, {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
                  {"momentum": 0.8, "dampening": 0.3}],
    "torch.rmsprop": [{}, {"centered": True}, {"centered": True, "momentum": 0.9, "weight_decay": 0.01},
                      {"momentum": 0.5}],
    "torch.adagrad": [{}, {"lr_decay": 0.01, "weight_decay": 0.01, "initial_accumulator_value": 0.1}],
    "lion": [{}, {"lr": 3e-3, "beta1": 0.5, "beta2": 0.9, "weight_decay": 0.1}],
}
CASES = [(name, i) for name in sorted(SETTINGS) for i in range(len(SETTINGS[name]))]


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
    warmup.warm(block=True)
    return Registry()


def _numpy_update(defn, p, g, st, t, hp):
    defn.update(p, g, st, t, hp, [np.empty_like(p) for _ in range(defn.scratch)])


def test_every_registered_optimizer_declares_a_kernel(registry):
    """Every elementwise optimizer whose slots are the parameter's shape and dtype (contract v1): a
    whole-tensor update has no kernel, and numba has no bfloat16 (adamw-bf16 runs its numpy update)."""
    fused = {n for n, r in registry.optimizers.items()
             if r.definition.elementwise and all(s.standard for s in r.definition.slots)}
    assert set(SETTINGS) == fused
    assert all(registry.get(name).definition.kernel is not None for name in SETTINGS)


@pytest.mark.skipif(not jit.available(), reason="numba not installed")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name,setting", CASES)
def test_fused_kernel_equals_numpy_update_bit_for_bit(registry, name, setting, size, dtype):
    defn = registry.get(name).definition
    hp = defn.resolve(SETTINGS[name][setting])
    assert jit.lookup(defn, np.dtype(dtype)) is not None
    rng = np.random.default_rng(3)
    p = rng.standard_normal(size).astype(dtype)
    st = {s.name: np.full(size, s.initial_value, dtype) for s in defn.slots}
    p_ref, st_ref = p.copy(), {k: v.copy() for k, v in st.items()}
    for t in range(1, 6):
        g = rng.standard_normal(size).astype(dtype)
        g.flags.writeable = False  # as the server's gradients
        kernels.apply(defn, p, g, st, t, hp)
        _numpy_update(defn, p_ref, g, st_ref, t, hp)
    np.testing.assert_array_equal(p, p_ref)
    for k in st:
        np.testing.assert_array_equal(st[k], st_ref[k])


@pytest.mark.parametrize("name,setting", CASES)
def test_the_kits_kernel_check_passes_every_setting(registry, name, setting):
    defn = registry.get(name).definition
    kit.check_kernel(defn, SETTINGS[name][setting])
    kit.check_kernel(defn, SETTINGS[name][setting], jit=False, steps=3)  # the plain loop is the same math


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


def test_no_kernel_without_a_declared_one(registry):
    defn = dataclasses.replace(registry.get("adam").definition, kernel=None, kernel_scalars=None)
    assert jit.lookup(defn, np.dtype(np.float32)) is None
    assert jit.status(defn) is None  # nothing was queued


def _sgd_update(param, grad, state, step, hp, scratch):
    (s,) = scratch
    np.multiply(grad, hp["lr"], out=s)
    param -= s


def _kernel_numba_refuses(p, g, c):
    lr = c[0]
    for i in range(p.size):
        p[i] = p[i] - g[i] * lr
    print(object())  # an object numba cannot type


@pytest.mark.skipif(not jit.available(), reason="numba not installed")
def test_a_kernel_numba_cannot_compile_falls_back_to_numpy_with_a_warning(caplog):
    defn = Optimizer(name="refused-kernel", summary="sgd whose kernel numba refuses", update=_sgd_update,
                     hyperparameters=(Hyperparameter("lr", 0.1, minimum=0.0),), scratch=1,
                     kernel=_kernel_numba_refuses, kernel_scalars=lambda hp, step: (hp["lr"],))
    p, g = np.ones(1000, np.float32), np.full(1000, 2.0, np.float32)
    with caplog.at_level(logging.WARNING, logger="optreg.server"):
        kernels.apply(defn, p, g, {}, 1, {"lr": 0.1})  # queues the compile, runs numpy meanwhile
        assert jit.wait_idle(120)
        kernels.apply(defn, p, g, {}, 2, {"lr": 0.1})
    assert jit.status(defn) == "failed" and jit.lookup(defn, p.dtype) is None
    assert any("refused-kernel" in r.getMessage() and "numpy" in r.getMessage() for r in caplog.records)
    expected = np.ones(1000, np.float32)
    for _ in range(2):
        expected -= np.float32(0.1) * g
    np.testing.assert_array_equal(p, expected)


# ---- statistics -----------------------------------------------------------------

def _recompute(new, old, g):
    n64, o64, g64 = (a.astype(np.float64).reshape(-1) for a in (new, old, g))
    return np.array([np.sum(g64 * g64), np.sum(n64 * n64), np.sum((n64 - o64) ** 2),
                     np.max(np.abs(g64)) if g64.size else 0.0])


STAT_SIZES = [1, 1000, (1 << 15) + 3, (1 << 18) + 17]  # GIL kept, GIL released, threaded split
# The fused float32 kernels sum in float32 within blocks of kernelstats.BLOCK32 (512) elements, at most
# ~(512 + 2) * 2^-24 = 3.1e-5 from float64 (kernelstats._accumulate32); float64 and numpy sum in float64.
STATS_RTOL = {("fused", np.float32): 4e-5}


@pytest.mark.parametrize("path", ["fused", "numpy"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_statistics_equal_a_numpy_recomputation(registry, name, dtype, path):
    defn = registry.get(name).definition
    if path == "numpy":
        defn = dataclasses.replace(defn, kernel=None, kernel_scalars=None)
    elif not jit.available():
        pytest.skip("numba not installed")
    else:
        kernelstats.stats_kernel(defn, jit.lookup(defn, np.dtype(dtype)))
        assert jit.wait_idle(300)  # the statistics kernel, not the interim slices
        assert kernelstats.stats_status(defn) == "fused"  # every built-in's loop takes the rewrite
    hp = defn.resolve(SETTINGS[name][-1])
    rng = np.random.default_rng(7)
    for size in STAT_SIZES:
        p = rng.standard_normal(size).astype(dtype)
        st = {s.name: np.full(size, s.initial_value, dtype) for s in defn.slots}
        p_ref, st_ref = p.copy(), {k: v.copy() for k, v in st.items()}
        for t in range(1, 4):
            g = (rng.standard_normal(size) * 0.1).astype(dtype)
            old = p.copy()
            stats = np.full(4, np.nan)
            kernels.apply(defn, p, g, st, t, hp, stats=stats)
            _numpy_update(defn, p_ref, g, st_ref, t, hp)
            np.testing.assert_array_equal(p, p_ref)  # statistics never change the update
            np.testing.assert_allclose(stats, _recompute(p, old, g), rtol=STATS_RTOL.get((path, dtype), 1e-12),
                                       atol=0, err_msg=f"{name} {np.dtype(dtype).name} size {size} step {t}")
            assert stats[3] == _recompute(p, old, g)[3]  # the max is exact in every path


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_statistics_fold_over_threads_and_copy_out(registry, threads, monkeypatch):
    """The parallel split folds per-thread sums (and the max) into one; with out= as well."""
    monkeypatch.setattr(jit, "_threads", threads)
    defn = registry.get("adam").definition
    kernelstats.stats_kernel(defn, jit.lookup(defn, np.dtype(np.float32)))
    jit.wait_idle(300)
    rng = np.random.default_rng(8)
    n = (1 << 19) + 11
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    g[n - 5] = 40.0  # the largest |g| sits in the last thread's share
    st = {s.name: np.zeros(n, np.float32) for s in defn.slots}
    for out in (None, np.empty(n, np.float32)):
        old = p.copy()
        stats = np.zeros(4)
        kernels.apply(defn, p, g, st, 1, HPS["adam"], out, stats=stats)
        np.testing.assert_allclose(stats, _recompute(p, old, g), rtol=STATS_RTOL["fused", np.float32], atol=0)
        assert stats[3] == 40.0
        if out is not None:
            np.testing.assert_array_equal(out, p)


def test_a_busy_kernel_pool_does_not_hold_a_parallel_update_up(registry, monkeypatch):
    """The split hands its pieces to whichever thread asks first: with every helper of the kernels' pool
    busy (on a server: another step, or a helper the OS starts late) the caller runs all the pieces
    itself and returns, with the same bits. (Fixed halves waited for a helper to take the second half.)"""
    import threading

    defn = registry.get("adam").definition
    warmup.warm(block=True, definitions=[defn])
    if jit.lookup(defn, np.dtype(np.float32)) is None:
        pytest.skip("numba not installed")
    monkeypatch.setattr(jit, "_threads", 2)
    rng = np.random.default_rng(12)
    n = kernels.PARALLEL_ABOVE * 3 + 5
    p, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    st = {s.name: np.zeros(n, np.float32) for s in defn.slots}
    p_ref, st_ref = p.copy(), {k: v.copy() for k, v in st.items()}
    pool, release = kernels.executor(2), threading.Event()
    busy = [pool.submit(release.wait, 120) for _ in range(pool._max_workers)]
    try:
        done = threading.Thread(target=kernels.apply, args=(defn, p, g, st, 1, HPS["adam"]), daemon=True)
        done.start()
        done.join(60)  # a hang guard: it returns at once
        assert not done.is_alive(), "the update waited for the busy pool"
    finally:
        release.set()
        for f in busy:
            f.result(10)
    _numpy_update(defn, p_ref, g, st_ref, 1, HPS["adam"])
    np.testing.assert_array_equal(p, p_ref)
    for k in st:
        np.testing.assert_array_equal(st[k], st_ref[k])


def test_float32_block_sums_hold_where_squares_leave_float32s_range(registry):
    """Blocks whose float32 sum of squares overflows (|x| ~ 1e25), underflows (|x| ~ 1e-25) or is zero
    are summed again in float64: the figures still equal float64's."""
    if not jit.available():
        pytest.skip("numba not installed")
    defn = registry.get("sgd").definition
    kernelstats.stats_kernel(defn, jit.lookup(defn, np.dtype(np.float32)))
    assert jit.wait_idle(300) and kernelstats.stats_status(defn) == "fused"
    rng = np.random.default_rng(9)
    n = (1 << 18) + 17
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    p[:5000] *= np.float32(1e25)
    g[:5000] *= np.float32(1e-25)
    g[5000:9000] = 0
    p[9000:12000] *= np.float32(1e-25)
    g[12000:20000] *= np.float32(1e25)
    old = p.copy()
    stats = np.zeros(4)
    kernels.apply(defn, p, g, {}, 1, {"lr": 1e-30}, stats=stats)
    e = _recompute(p, old, g)
    assert np.isfinite(stats).all() and stats[0] > 1e50
    np.testing.assert_allclose(stats, e, rtol=STATS_RTOL["fused", np.float32], atol=0)


def test_statistics_argument_is_checked(registry):
    defn = registry.get("sgd").definition
    with pytest.raises(ValueError, match="float64 array of shape"):
        kernels.apply(defn, np.ones(3), np.ones(3), {}, 1, HPS["sgd"], stats=np.zeros(3))


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64", "bfloat16"])
@pytest.mark.parametrize("size", [3, (1 << 15) + 5])  # below and above the GIL-keeping threshold
def test_finite_check_matches_numpy(dtype, size):
    import ml_dtypes
    warmup.warm(block=True)
    if not jit.available():
        pytest.skip("numba not installed")
    dt = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    info = ml_dtypes.finfo(dt) if dtype == "bfloat16" else np.finfo(dt)
    for special in [1.0, -0.0, float(info.max), -float(info.max), float(info.smallest_subnormal), np.nan, np.inf,
                    -np.inf]:
        a = np.ones(size, dt)
        a[size // 2] = special
        for arr in (a, a.reshape(1, -1)):
            assert finite.all_finite(arr) == bool(np.isfinite(arr.astype(np.float64)).all()), (dtype, special)
    assert finite.all_finite(np.ones(10, np.float32)[::2]) is None  # not contiguous: numpy decides
    assert kernels.COPY_SLICE > 0


@pytest.mark.parametrize("name", ["adam", "rmsprop"])
def test_copy_out_equals_update(name):
    """kernels.apply(out=...) (shared-memory steps) writes the same numbers it leaves in the parameter."""
    warmup.warm(block=True)
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_finite_check_gives_max_abs(dtype):
    """jit.abs_max: the finite check's reduction, max |g| exactly, NaN or Inf when any element is."""
    warmup.warm(block=True)
    if not jit.available():
        pytest.skip("numba not installed")
    rng = np.random.default_rng(11)
    for size in (0, 1, 1000, (1 << 18) + 17):
        g = rng.standard_normal(size).astype(dtype)
        if size > 20_000:
            g[:5000] *= dtype(1e-30)
            g[12000:20000] *= dtype(1e30)
        assert finite.abs_max(g) == (float(np.abs(g).max()) if size else 0.0), size
        for bad in (np.nan, np.inf, -np.inf, -np.nan):
            if size:
                h = g.copy()
                h[size * 2 // 3] = bad
                top = finite.abs_max(h)
                assert not np.isfinite(top) and (np.isnan(top) == np.isnan(bad)), (size, bad)
                assert finite.all_finite(h) is False
    assert finite.abs_max(np.ones(4, np.float16)) is None


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_update_given_max_abs_leaves_it_out(registry, dtype):
    """kernels.apply(grad_abs_max=): the kernel variant without max |g| runs (acc[3] left alone), the update
    is the kernel's bit for bit, and the figures equal a numpy recomputation."""
    if not jit.available():
        pytest.skip("numba not installed")
    defn = registry.get("adam").definition
    comp = jit.lookup(defn, np.dtype(dtype))
    kernelstats.stats_kernel(defn, comp)
    assert jit.wait_idle(300)
    sk = kernelstats.stats_kernel(defn, comp)
    assert sk.fused and sk.nomax is not None
    rng = np.random.default_rng(12)
    n = (1 << 18) + 17
    p = rng.standard_normal(n).astype(dtype)
    g = (rng.standard_normal(n) * 0.1).astype(dtype)
    st = {s.name: np.zeros(n, dtype) for s in defn.slots}
    p_ref, st_ref = p.copy(), {k: v.copy() for k, v in st.items()}
    for t in (1, 2):
        old = p.copy()
        stats = np.zeros(4)
        kernels.apply(defn, p, g, st, t, HPS["adam"], stats=stats, grad_abs_max=finite.abs_max(g))
        kernels.apply(defn, p_ref, g, st_ref, t, HPS["adam"])
        np.testing.assert_array_equal(p, p_ref)
        for k in st:
            np.testing.assert_array_equal(st[k], st_ref[k])
        e = _recompute(p, old, g)
        np.testing.assert_allclose(stats, e, rtol=STATS_RTOL.get(("fused", dtype), 1e-12), atol=0)
        assert stats[3] == e[3]
    acc = np.zeros(4)
    old = p.copy()
    sk(True, p, g, [st[k] for k in comp.slots], comp.consts(HPS["adam"], 3, np.dtype(dtype)), acc,
       max_known=True)
    e = _recompute(p, old, g)
    assert acc[3] == 0  # not measured: the caller has it
    np.testing.assert_allclose(acc[:3], e[:3], rtol=STATS_RTOL.get(("fused", dtype), 1e-12), atol=0)


@pytest.mark.parametrize("max_known", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name,setting", CASES)
def test_update_from_sources_equals_copy_then_update(registry, name, setting, dtype, max_known):
    """kernels.apply(src=): the staging arrays are computed from the sources (the copying variants copy
    each block in within the pass): bit for bit the update of copies, the same statistics, the sources
    untouched, and the staging arrays' own contents (NaN here) never read."""
    defn = registry.get(name).definition
    hp = defn.resolve(SETTINGS[name][setting])
    if jit.available():
        kernelstats.stats_kernel(defn, jit.lookup(defn, np.dtype(dtype)))
        assert jit.wait_idle(300)
        sk = kernelstats.stats_kernel(defn, jit.lookup(defn, np.dtype(dtype)))
        assert dtype != np.float32 or sk.copy32 is not None  # every built-in's loop takes the copying rewrite
    rng = np.random.default_rng(13)
    for size in STAT_SIZES:
        live = rng.standard_normal(size).astype(dtype)
        live_st = {s.name: np.abs(rng.standard_normal(size)).astype(dtype) for s in defn.slots}
        frozen = [live.copy()] + [v.copy() for v in live_st.values()]
        for t in (1, 2):
            g = (rng.standard_normal(size) * 0.1).astype(dtype)
            known = finite.abs_max(g) if max_known else None
            p, st = np.full(size, np.nan, dtype), {k: np.full(size, np.nan, dtype) for k in live_st}
            stats = np.zeros(4)
            kernels.apply(defn, p, g, st, t, hp, stats=stats, grad_abs_max=known, src=(live, live_st))
            p_ref, st_ref = live.copy(), {k: v.copy() for k, v in live_st.items()}
            ref_stats = np.zeros(4)
            kernels.apply(defn, p_ref, g, st_ref, t, hp, stats=ref_stats, grad_abs_max=known)
            where = f"{name} {setting} {np.dtype(dtype).name} size {size}"
            np.testing.assert_array_equal(p, p_ref, err_msg=where)
            for k in st:
                np.testing.assert_array_equal(st[k], st_ref[k], err_msg=f"{where} slot {k}")
            # the sums' order is LLVM's to choose in each compiled variant (reassociation allowed)
            np.testing.assert_allclose(stats, ref_stats, rtol=STATS_RTOL.get(("fused", dtype), 1e-12), atol=0,
                                       err_msg=where)
            assert stats[3] == ref_stats[3]
            for a, b in zip([live, *live_st.values()], frozen):
                np.testing.assert_array_equal(a, b)  # the sources are read, never written


def test_a_nan_max_stays_whichever_side_it_comes_from():
    """max |g| folds keep a NaN (it marks a non-finite gradient) from the new part and from the total."""
    from optreg.server.kernels.stats import merge_stats
    for acc3, part3 in ((np.nan, 2.0), (2.0, np.nan), (1.0, 2.0)):
        acc, part = np.array([1.0, 1.0, 1.0, acc3]), np.array([1.0, 1.0, 1.0, part3])
        merge_stats(acc, part)
        assert np.isnan(acc[3]) if np.isnan(acc3) or np.isnan(part3) else acc[3] == 2.0
        acc = np.array([0.0, 0.0, 0.0, acc3])
        kernelstats._fold_max(np.array(part3, np.float32).view(np.uint32), np.dtype(np.float32), acc)
        assert np.isnan(acc[3]) if np.isnan(acc3) or np.isnan(part3) else acc[3] == 2.0
