"""Momentum: v <- momentum*v - lr*g; W <- W + v.

v keeps the learning rate folded in (as the book's code does): after a mid-run
change of lr, the velocity already built up keeps the old rate and only new
gradients are scaled by the new one.
"""
import numpy as np

from optreg.plugins import Hyperparameter, Optimizer, Slot, hookimpl
from optreg.plugins.builtins import geometric


def update(param, grad, state, step, hp, scratch):
    (s,) = scratch
    v = state["v"]
    np.multiply(grad, hp["lr"], out=s)
    v *= hp["momentum"]
    v -= s
    param += v


def kernel(p, g, v, c):
    lr, mu = c[0], c[1]
    for i in range(p.size):
        vi = v[i] * mu - g[i] * lr
        v[i] = vi
        p[i] = p[i] + vi


def kernel_scalars(hp, step):
    return (hp["lr"], hp["momentum"])


def catch_up(p, state, last, now, hp):
    """d steps with g = 0: v <- mu^d v and W <- W + (mu + ... + mu^d) v (the velocity keeps moving W), in
    float64 then rounded once: equal to the dense steps to rounding (they round every step)."""
    d = now - last
    mu = float(p.dtype.type(hp["momentum"]))
    f, s = geometric(mu, d)
    v = state["v"]
    v64 = v.astype(np.float64)
    p[...] = p + v64 * s[:, None]
    v[...] = v64 * f[:, None]

MOMENTUM = Optimizer(
    name="momentum",
    summary="Momentum SGD: v <- momentum*v - lr*g; W <- W + v (the book's Momentum).",
    update=update,
    hyperparameters=(
        Hyperparameter("lr", 0.01, "learning rate", minimum=0.0),
        Hyperparameter("momentum", 0.9, "velocity decay (alpha in the book)", minimum=0.0, maximum=1.0,
                       maximum_exclusive=True),
    ),
    slots=(Slot("v"),),
    scratch=1,
    kernel=kernel,
    kernel_scalars=kernel_scalars,
    sparse_rows=True,
    catch_up=catch_up,
)


@hookimpl
def optreg_optimizers():
    return [MOMENTUM]
