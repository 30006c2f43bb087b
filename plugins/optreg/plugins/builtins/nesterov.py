"""Nesterov momentum, in the book's corrected (2021) form.

    W <- W + momentum^2 * v - (1 + momentum) * lr * g
    v <- momentum * v - lr * g

equivalently v_new = momentum*v - lr*g; W <- W + momentum*v_new - lr*g. Older
printings update v first, which is not Nesterov momentum. v folds in lr, as in Momentum.
"""
import numpy as np

from optreg.plugins import Hyperparameter, Optimizer, Slot, hookimpl
from optreg.plugins.builtins import geometric


def update(param, grad, state, step, hp, scratch):
    (s,) = scratch
    v = state["v"]
    mu, lr = hp["momentum"], hp["lr"]
    np.multiply(v, mu * mu, out=s)
    param += s
    np.multiply(grad, (1 + mu) * lr, out=s)
    param -= s
    v *= mu
    np.multiply(grad, lr, out=s)
    v -= s


def kernel(p, g, v, k):
    mu2, c, lr, mu = k[0], k[1], k[2], k[3]
    for i in range(p.size):
        gi = g[i]
        vi = v[i]
        p[i] = (p[i] + vi * mu2) - gi * c
        v[i] = vi * mu - gi * lr


def kernel_scalars(hp, step):
    mu, lr = hp["momentum"], hp["lr"]
    return (mu * mu, (1 + mu) * lr, lr, mu)


def catch_up(p, state, last, now, hp):
    """d steps with g = 0: W <- W + mu^2 (1 + mu + ... + mu^(d-1)) v, v <- mu^d v, in float64 then rounded
    once: equal to the dense steps to rounding."""
    d = now - last
    mu = float(p.dtype.type(hp["momentum"]))
    mu2 = float(p.dtype.type(hp["momentum"] * hp["momentum"]))
    f, _ = geometric(mu, d)
    v = state["v"]
    v64 = v.astype(np.float64)
    first = (1.0 - f) / (1.0 - mu)  # 1 + mu + ... + mu^(d-1) (mu < 1)
    p[...] = p + v64 * (mu2 * first)[:, None]
    v[...] = v64 * f[:, None]

NESTEROV = Optimizer(
    name="nesterov",
    summary="Nesterov momentum (the book's corrected form): W += mu^2*v - (1+mu)*lr*g; v = mu*v - lr*g.",
    update=update,
    hyperparameters=(
        Hyperparameter("lr", 0.01, "learning rate", minimum=0.0),
        Hyperparameter("momentum", 0.9, "velocity decay", minimum=0.0, maximum=1.0, maximum_exclusive=True),
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
    return [NESTEROV]
