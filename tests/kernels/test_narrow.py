"""bfloat16 slots under a rewritten kernel (kernels/narrow.py): the numpy update's numbers bit for bit."""
from __future__ import annotations

import logging

import ml_dtypes
import numpy as np
import pytest

from optreg.plugins import Hyperparameter, Optimizer, Slot
from optreg.plugins import testing as kit
from optreg.plugins.registry import Registry
from optreg.server.kernels import apply as kernels
from optreg.server.kernels import jit
from optreg.server.kernels import narrow

pytestmark = pytest.mark.skipif(not jit.available(), reason="numba not installed")
F32 = np.dtype(np.float32)


def _ready(defn):
    for _ in range(3):  # the kernel's compile, then the rewrite's
        narrow.lookup(defn, F32)
        jit.wait_idle(120)
    return narrow.lookup(defn, F32)


@pytest.fixture(scope="module")
def adamw_bf16():
    defn = Registry(autoload=False).get("adamw-bf16").definition
    assert _ready(defn) is not None
    return defn


def _numpy_update(defn, p, g, st, t, hp):
    defn.update(p, g, st, t, hp, [np.empty_like(p) for _ in range(defn.scratch)])


def test_the_conversions_are_ml_dtypes_bit_for_bit():
    from numba import njit

    from optreg.server.kernels.bits import bfloat_to_float, float_to_bfloat

    @njit
    def both(bits, f, out_f, out_bits):
        for i in range(bits.size):
            out_f[i] = bfloat_to_float(bits[i])
        for i in range(f.size):
            out_bits[i] = float_to_bfloat(f[i])

    every = np.arange(1 << 16, dtype=np.uint16)
    rng = np.random.default_rng(5)
    raw = rng.integers(0, 1 << 32, 2_000_000, dtype=np.uint64).astype(np.uint32)
    edges = np.array([0x7F7FFFFF, 0x7F7F8000, 0x7F7F7FFF, 0x3F808000, 0x3F818000, 0x00008000, 0x80018000,
                      0x7F800001, 0xFFC12345, 0x7F800000, 0xFF800000, 0x00000001], np.uint32)
    f = np.concatenate([raw, edges]).view(np.float32)
    out_f, out_bits = np.empty(every.size, np.float32), np.empty(f.size, np.uint16)
    both(every, f, out_f, out_bits)
    np.testing.assert_array_equal(out_f.view(np.uint32), every.view(ml_dtypes.bfloat16).astype(np.float32).view(np.uint32))
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(out_bits, f.astype(ml_dtypes.bfloat16).view(np.uint16))


@pytest.mark.parametrize("size", [1, 1000, (1 << 18) + 17])  # the last is split over threads
@pytest.mark.parametrize("setting", [{}, {"amsgrad": True, "weight_decay": 0.1, "lr": 0.01}])
def test_adamw_bf16_kernel_equals_its_numpy_update(adamw_bf16, size, setting):
    defn, hp = adamw_bf16, adamw_bf16.resolve(setting)
    rng = np.random.default_rng(size)
    p = rng.standard_normal(size).astype(np.float32)
    st = {s.name: np.zeros(size, ml_dtypes.bfloat16) for s in defn.slots}
    p_ref, st_ref = p.copy(), {k: v.copy() for k, v in st.items()}
    out = np.empty_like(p)
    for t in range(1, 7):
        g = rng.standard_normal(size).astype(np.float32)
        if t == 4:
            g[:3] = [np.inf, -np.inf, np.nan][: min(3, size)]  # NaN and Inf reach the state as numpy's do
        g.flags.writeable = False
        stats = np.zeros(kernels.STATS) if t % 2 else None
        with np.errstate(all="ignore"):
            kernels.apply(defn, p, g, st, t, hp, out=out if t == 5 else None, stats=stats)
            _numpy_update(defn, p_ref, g, st_ref, t, hp)
        if t == 5:
            np.testing.assert_array_equal(out, p)
        if stats is not None and t < 4:  # (a NaN stays in p once a step put it there)
            old = p_ref  # (sums over the new p; the statistics' own tests check the rest)
            assert stats[1] == pytest.approx(float(np.dot(old.astype(np.float64), old.astype(np.float64))), rel=1e-9)
            assert stats[3] == float(np.abs(g).max())
    np.testing.assert_array_equal(p, p_ref)
    for k in st:
        np.testing.assert_array_equal(st[k].view(np.uint16), st_ref[k].view(np.uint16))


def test_the_kit_checks_a_kernel_over_bfloat16_slots(adamw_bf16):
    kit.check_kernel(adamw_bf16)
    kit.check_kernel(adamw_bf16, {"amsgrad": True, "weight_decay": 0.1})


def _ema(name, kernel):
    def update(param, grad, state, step, hp, scratch):
        m = state["m"].astype(param.dtype)
        m *= param.dtype.type(hp["beta"])
        m += grad
        np.copyto(state["m"], m, casting="unsafe")
        param -= m  # the float32 m, before it is rounded
    return Optimizer(name=name, summary="test", update=update, slots=(Slot("m", dtype="bfloat16"),),
                     hyperparameters=(Hyperparameter("beta", 0.9, "decay"),), kernel=kernel,
                     kernel_scalars=lambda hp, step: (hp["beta"],))


def _reads_back(p, g, m, c):
    for i in range(p.size):
        m[i] = m[i] * c[0] + g[i]
        p[i] = p[i] - m[i]  # reads the slot back after storing it: rounded here, not in the update


def _as_array(p, g, m, c):
    for i in range(m.size):
        m[i] = m[i] * c[0] + g[i]
        p[i] = p[i] - m[i]


def test_the_rewrite_takes_only_element_reads_and_stores():
    assert narrow.narrowed_source(_as_array, {"m"}) is None  # m.size: the array itself
    src = narrow.narrowed_source(_reads_back, {"m"})
    assert "_optreg_b2f(m[i])" in src and "m[i] = _optreg_f2b(_optreg_f32(" in src


def test_a_kernel_that_reads_a_slot_back_runs_its_numpy_update(caplog):
    defn = _ema("ema-reads-back", _reads_back)
    with caplog.at_level(logging.WARNING, logger="optreg.server"):
        assert _ready(defn) is None
    assert narrow.status(defn) == "failed"
    assert "differ" in caplog.text and "ema-reads-back" in caplog.text
    rng = np.random.default_rng(1)
    p = rng.standard_normal(100).astype(np.float32)
    m = np.zeros(100, ml_dtypes.bfloat16)
    p_ref, m_ref = p.copy(), m.copy()
    for t in (1, 2, 3):
        g = rng.standard_normal(100).astype(np.float32)
        kernels.apply(defn, p, g, {"m": m}, t, {"beta": 0.9})
        _numpy_update(defn, p_ref, g, {"m": m_ref}, t, {"beta": 0.9})
    np.testing.assert_array_equal(p, p_ref)


def test_a_float64_session_with_bfloat16_slots_runs_the_numpy_update(adamw_bf16):
    assert narrow.lookup(adamw_bf16, np.dtype(np.float64)) is None
    assert jit.lookup(adamw_bf16, np.dtype(np.float32)) is None  # no caller gets the bare kernel
    p = np.linspace(-1, 1, 50)
    st = {s.name: np.zeros(50, ml_dtypes.bfloat16) for s in adamw_bf16.slots}
    p_ref, st_ref = p.copy(), {k: v.copy() for k, v in st.items()}
    g = np.cos(p)
    hp = adamw_bf16.resolve({})
    kernels.apply(adamw_bf16, p, g, st, 1, hp)
    _numpy_update(adamw_bf16, p_ref, g, st_ref, 1, hp)
    np.testing.assert_array_equal(p, p_ref)
