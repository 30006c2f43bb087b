"""AdaGrad: h <- h + g*g; W <- W - lr*g / (sqrt(h) + 1e-7)."""
import math

import numpy as np

from optreg.plugins import Hyperparameter, Optimizer, Slot, hookimpl
from optreg.plugins.builtins import BOOK_EPS, unchanged


def update(param, grad, state, step, hp, scratch):
    s, r = scratch
    h = state["h"]
    np.multiply(grad, grad, out=s)
    h += s
    np.multiply(grad, hp["lr"], out=s)
    np.sqrt(h, out=r)
    r += BOOK_EPS
    s /= r
    param -= s



def effective_lr(state, hp, step):
    """Telemetry: lr/(sqrt(h)+1e-7), the step size on g."""
    return hp["lr"] / (np.sqrt(state["h"]) + BOOK_EPS)
def kernel(p, g, h, c):
    lr, eps = c[0], c[1]
    for i in range(p.size):
        gi = g[i]
        hi = h[i] + gi * gi
        h[i] = hi
        p[i] = p[i] - (gi * lr) / (math.sqrt(hi) + eps)


def kernel_scalars(hp, step):
    return (hp["lr"], BOOK_EPS)


# A zero gradient adds 0 to h and moves W by 0: rows that missed steps need nothing (exact).

ADAGRAD = Optimizer(
    name="adagrad",
    summary="AdaGrad: h += g*g; W -= lr*g/(sqrt(h)+1e-7) (the book's AdaGrad).",
    update=update,
    hyperparameters=(Hyperparameter("lr", 0.01, "learning rate", minimum=0.0),),
    slots=(Slot("h", domain="nonnegative"),),
    scratch=2,
    effective_lr=effective_lr,
    kernel=kernel,
    kernel_scalars=kernel_scalars,
    sparse_rows=True,
    catch_up=unchanged,
)


@hookimpl
def optreg_optimizers():
    return [ADAGRAD]
