"""Shampoo against pytorch-optimizer's `Shampoo` (momentum 0, float64) when it is installed, and against
its formula written plainly in float64 numpy (scipy's fractional matrix power for the inverse root)."""
import importlib.metadata

import numpy as np
import pytest
from scipy.linalg import fractional_matrix_power

from optreg.plugins.testing import OptimizerConformance, new_state
from optreg_shampoo import SHAMPOO


class TestShampooConformance(OptimizerConformance):
    optimizer = SHAMPOO
    hyperparameters = {"lr": 1e-2, "precondition_frequency": 2}  # refreshes within the kit's few steps


HP = SHAMPOO.resolve({"lr": 0.05, "precondition_frequency": 3})


def problem(steps=12, shape=(6, 4)):
    rng = np.random.default_rng(0)
    return rng.standard_normal(shape), [rng.standard_normal(shape) for _ in range(steps)]


def run(p0, grads, hp):
    p, state, out = p0.copy(), new_state(SHAMPOO, p0), []
    for t, g in enumerate(grads, 1):
        if SHAMPOO.refresh_due(t, hp):
            SHAMPOO.every[1](p, g, state, t, hp)
        SHAMPOO.update(p, g, state, t, hp, [])
        out.append(p.copy())
    return out


def test_against_the_formula_in_float64():
    p0, grads = problem()
    p, eps, k = p0.copy(), HP["eps"], HP["precondition_frequency"]
    L, R = eps * np.eye(6), eps * np.eye(4)
    PL, PR = np.zeros((6, 6)), np.zeros((4, 4))
    for t, (g, got) in enumerate(zip(grads, run(p0, grads, HP)), 1):
        L, R = L + g @ g.T, R + g.T @ g
        if t % k == 0:
            PL, PR = fractional_matrix_power(L, -0.25).real, fractional_matrix_power(R, -0.25).real
        p = p - HP["lr"] * PL @ g @ PR
        np.testing.assert_allclose(got, p, rtol=1e-10, atol=1e-12, err_msg=f"step {t}")
    assert not np.array_equal(p, p0)


def test_against_pytorch_optimizer_shampoo():
    po = pytest.importorskip("pytorch_optimizer", reason="pytorch-optimizer is not installed")
    import torch

    p0, grads = problem()
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = po.Shampoo([tp], lr=HP["lr"], momentum=0.0, weight_decay=0.0, matrix_eps=HP["eps"],
                     preconditioning_compute_steps=HP["precondition_frequency"])
    for t, (g, got) in enumerate(zip(grads, run(p0, grads, HP)), 1):
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        # float64 both; an SVD there and an eigendecomposition here: the same matrix to rounding
        np.testing.assert_allclose(got, tp.detach().numpy(), rtol=1e-9, atol=1e-12, err_msg=f"step {t}")


def test_registered_through_its_entry_point():
    try:
        importlib.metadata.distribution("optreg-shampoo")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("optreg-shampoo is not installed (pip install -e examples/optreg-shampoo)")
    from optreg.plugins.registry import Registry
    assert Registry().get("shampoo").distribution == "optreg-shampoo"
