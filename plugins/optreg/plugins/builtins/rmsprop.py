"""RMSProp (the book's): h <- decay*h + (1-decay)*g*g; W <- W - lr*g / (sqrt(h) + 1e-7)."""
import math

import numpy as np

from optreg.plugins import Hyperparameter, Optimizer, Slot, hookimpl
from optreg.plugins.builtins import BOOK_EPS, geometric


def update(param, grad, state, step, hp, scratch):
    s, r = scratch
    h = state["h"]
    decay = hp["decay_rate"]
    h *= decay
    np.multiply(grad, 1 - decay, out=s)
    s *= grad
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
    decay, a, lr, eps = c[0], c[1], c[2], c[3]
    for i in range(p.size):
        gi = g[i]
        hi = h[i] * decay + (gi * a) * gi
        h[i] = hi
        p[i] = p[i] - (gi * lr) / (math.sqrt(hi) + eps)


def kernel_scalars(hp, step):
    decay = hp["decay_rate"]
    return (decay, 1 - decay, hp["lr"], BOOK_EPS)


def catch_up(p, state, last, now, hp):
    """d steps with g = 0: h <- decay^d h; W does not move (lr * 0). Equal to the dense steps to rounding."""
    f, _ = geometric(float(p.dtype.type(hp["decay_rate"])), now - last)
    h = state["h"]
    h[...] = h.astype(np.float64) * f[:, None]

RMSPROP = Optimizer(
    name="rmsprop",
    summary="RMSProp: h = decay*h + (1-decay)*g*g; W -= lr*g/(sqrt(h)+1e-7) (the book's RMSprop).",
    update=update,
    hyperparameters=(
        Hyperparameter("lr", 0.01, "learning rate", minimum=0.0),
        Hyperparameter("decay_rate", 0.99, "decay of the squared-gradient average", minimum=0.0, maximum=1.0),
    ),
    slots=(Slot("h", domain="nonnegative"),),
    scratch=2,
    effective_lr=effective_lr,
    kernel=kernel,
    kernel_scalars=kernel_scalars,
    sparse_rows=True,
    catch_up=catch_up,
)


@hookimpl
def optreg_optimizers():
    return [RMSPROP]
