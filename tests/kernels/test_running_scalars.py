"""A whole-tensor optimizer's kernel with running scalars (schedulefree.adamw): the numpy update's
numbers bit for bit, its lr_max and weight_sum advanced once a step however the tensor is split."""
from __future__ import annotations

import numpy as np
import pytest

from optreg.plugins import DefinitionError, Hyperparameter, Optimizer, Slot, scalar
from optreg.plugins import testing as kit
from optreg.plugins.api import validate
from optreg.plugins.registry import Registry
from optreg.server.kernels import apply as kernels
from optreg.server.kernels import jit

SETTINGS = [{}, {"weight_decay": 0.1, "warmup_steps": 3, "r": 0.5, "lr": 0.01}]


@pytest.fixture(scope="module")
def schedulefree():
    return Registry(autoload=False).get("schedulefree.adamw").definition


def _state(defn, n, dtype):
    return {s.name: np.full(*s.layout((n,), dtype)[:1], s.initial_value, s.layout((n,), dtype)[1])
            for s in defn.slots}


@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_the_kit_checks_the_kernel(schedulefree, setting):
    kit.check_kernel(schedulefree, SETTINGS[setting])


@pytest.mark.skipif(not jit.available(), reason="numba not installed")
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("size", [1, 1000, (1 << 18) + 17])  # the last is split over threads
@pytest.mark.parametrize("setting", range(len(SETTINGS)))
def test_schedulefree_kernel_equals_its_numpy_update(schedulefree, dtype, size, setting):
    defn, hp = schedulefree, schedulefree.resolve(SETTINGS[setting])
    for _ in range(2):
        jit.lookup(defn, np.dtype(dtype), whole=True)
        jit.wait_idle(120)
    assert jit.lookup(defn, np.dtype(dtype), whole=True) is not None
    assert jit.lookup(defn, np.dtype(dtype)) is None  # no other caller runs it (its scalars advance once)
    rng = np.random.default_rng(size)
    p = rng.standard_normal(size).astype(dtype)
    st = _state(defn, size, dtype)
    p_ref, st_ref = p.copy(), {k: v.copy() for k, v in st.items()}
    out = np.empty_like(p)
    for t in range(1, 8):
        g = rng.standard_normal(size).astype(dtype)
        g.flags.writeable = False
        src = None
        if t == 6:  # computed from a source set (a staging copy), the running scalars too
            src = (p.copy(), {k: v.copy() for k, v in st.items()})
            p[:] = 7.0
            st["weight_sum"][()] = 123.0
        kernels.apply(defn, p, g, st, t, hp, out=out if t == 5 else None,
                      stats=np.zeros(kernels.STATS) if t % 2 else None, src=src)
        defn.update(p_ref, g, st_ref, t, hp, [])
        if t == 5:
            np.testing.assert_array_equal(out, p)
    np.testing.assert_array_equal(p, p_ref)
    for k in st:
        np.testing.assert_array_equal(st[k], st_ref[k])


def _sgd(param, grad, state, step, hp, scratch):
    state["count"][()] += 1
    param -= hp["lr"] * grad


def test_a_whole_tensor_kernel_takes_running_scalars_only():
    base = dict(name="x", summary="test", update=_sgd, elementwise=False,
                hyperparameters=(Hyperparameter("lr", 0.1, "lr"),))
    good = Optimizer(**base, slots=(Slot("count", shape=scalar, dtype="float64"),),
                     kernel=lambda p, g, c: None, kernel_scalars=lambda hp, step, running: (hp["lr"],))
    validate(good)
    with pytest.raises(DefinitionError, match=r"kernel_scalars must take \(hp, step, running\)"):
        validate(Optimizer(**base, slots=good.slots, kernel=good.kernel, kernel_scalars=lambda hp, step: (1.0,)))
    from optreg.plugins import rows
    with pytest.raises(DefinitionError, match="slot.* r declare another"):
        validate(Optimizer(**base, slots=(*good.slots, Slot("r", shape=rows)), kernel=lambda p, g, r, c: None,
                           kernel_scalars=good.kernel_scalars))
    with pytest.raises(DefinitionError, match="needs elementwise=True .a whole-tensor one only with scalar"):
        validate(Optimizer(**base, slots=(Slot("m"),), kernel=lambda p, g, m, c: None,
                           kernel_scalars=lambda hp, step: (1.0,)))
