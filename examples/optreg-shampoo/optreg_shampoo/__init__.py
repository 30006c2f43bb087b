"""Shampoo (Gupta, Koren and Singer, 2018) in its plain form, as pytorch-optimizer's `Shampoo` runs it
(momentum 0, no weight decay), as an optreg plugin of contract v2: a preconditioner matrix per dimension,
recomputed every k steps (`Optimizer.every`).

For a matrix gradient G (m x n), with L (m x m) and R (n x n) the sums of G G^T and G^T G so far:

    every k steps, before the update (refresh):  P_L <- (eps I + L + G G^T)^(-1/4),  P_R likewise
    every step (update):  L += G G^T;  R += G^T G;  p <- p - lr * P_L G P_R

P_L and P_R start at zero, so the parameters move from the first refresh on (as in pytorch-optimizer).
The inverse fourth root is taken through a symmetric eigendecomposition (numpy's eigh, LAPACK): the
refresh's cost is O(m^3 + n^3), which is why it runs every k steps; the server reports its time.
Matrices only (`accepts`); whole-tensor; deterministic (the log replays the refresh with the update).
"""
from __future__ import annotations

import numpy as np

from optreg.plugins import Hyperparameter, Optimizer, Slot, hookimpl, matrices, per_dimension


def _inverse_root(s: np.ndarray, eps: float) -> np.ndarray:
    w, v = np.linalg.eigh(s + eps * np.eye(len(s), dtype=s.dtype))
    return (v * np.maximum(w, eps) ** -0.25) @ v.T


def refresh(param, grad, state, step, hp):
    for stats, precond, g in zip(matrices(state["stats"], grad.shape), matrices(state["precond"], grad.shape),
                                 (grad, grad.T)):
        precond[...] = _inverse_root(stats + g @ g.T, hp["eps"])


def update(param, grad, state, step, hp, scratch):
    (left, right), (p_left, p_right) = matrices(state["stats"], grad.shape), matrices(state["precond"], grad.shape)
    left += grad @ grad.T
    right += grad.T @ grad
    param -= param.dtype.type(hp["lr"]) * (p_left @ grad @ p_right)


def accepts(name, shape):
    if len(shape) != 2:
        return "Shampoo (this example) preconditions 2-D matrices; step vectors and scalars with another optimizer"
    return None


SHAMPOO = Optimizer(
    name="shampoo",
    summary="Shampoo (Gupta et al. 2018) as pytorch-optimizer runs it: per-dimension preconditioners, "
            "recomputed every k steps.",
    update=update,
    hyperparameters=(
        Hyperparameter("lr", 1e-3, "learning rate", minimum=0.0),
        Hyperparameter("eps", 1e-4, "added to each statistic's diagonal (pytorch-optimizer's matrix_eps)",
                       minimum=0.0, minimum_exclusive=True),
        Hyperparameter("precondition_frequency", 10, "steps between refreshes of the preconditioners (k)",
                       type=int, minimum=1),
    ),
    slots=(Slot("stats", shape=per_dimension), Slot("precond", shape=per_dimension)),
    elementwise=False,
    accepts=accepts,
    every=("precondition_frequency", refresh),
)


@hookimpl
def optreg_optimizers():
    return [SHAMPOO]
