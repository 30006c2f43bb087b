"""torch.optim.Adagrad (2.13), as `torch.adagrad`: eps outside the root.

    h <- initial_accumulator_value  (before step 1)
    g <- g + weight_decay * p
    h <- h + g*g
    p <- p - lr/(1 + (t - 1)*lr_decay) * g / (sqrt(h) + eps)

Slot initial values are constants, so `sum` starts at 0 and the hyperparameter
initial_accumulator_value is added to it at step 1: exactly torch's float32 sums,
and, as in torch, changing it after step 1 has no effect.
"""
import math

import numpy as np

from optreg.plugins import Hyperparameter, Optimizer, Slot, hookimpl


def update(param, grad, state, step, hp, scratch):
    s, t, d = scratch
    wd = hp["weight_decay"]
    h = state["sum"]
    if step == 1:
        h += hp["initial_accumulator_value"]
    g = grad  # read-only: a changed gradient goes to scratch
    if wd != 0:
        np.multiply(param, wd, out=s)
        s += grad
        g = s
    clr = hp["lr"] / (1 + (step - 1) * hp["lr_decay"])
    np.multiply(g, g, out=t)
    h += t
    np.sqrt(h, out=d)
    d += hp["eps"]
    np.multiply(g, -clr, out=t)  # torch's addcdiv: (value*g)/d
    t /= d
    param += t



def effective_lr(state, hp, step):
    """Telemetry: lr/(1+(t-1)*lr_decay)/(sqrt(sum)+eps), the step size on g."""
    return hp["lr"] / (1 + (step - 1) * hp["lr_decay"]) / (np.sqrt(state["sum"]) + hp["eps"])
def kernel(p, g, h, c):
    # update one element at a time, same operations in the same order (fused by numba).
    first, initial, coupled, wd, neg_clr, eps = c[0] != 0, c[1], c[2] != 0, c[3], c[4], c[5]
    for i in range(p.size):
        pi = p[i]
        gi = g[i]
        hi = h[i]
        if first:
            hi = hi + initial
        if coupled:
            gi = pi * wd + gi
        hi = hi + gi * gi
        h[i] = hi
        p[i] = pi + (gi * neg_clr) / (math.sqrt(hi) + eps)


def kernel_scalars(hp, step):
    wd = hp["weight_decay"]
    clr = hp["lr"] / (1 + (step - 1) * hp["lr_decay"])
    return (float(step == 1), hp["initial_accumulator_value"], float(wd != 0), wd, -clr, hp["eps"])


TORCH_ADAGRAD = Optimizer(
    name="torch.adagrad",
    summary="torch.optim.Adagrad: lr_decay, initial_accumulator_value, eps 1e-10 outside sqrt (not the book's).",
    update=update,
    hyperparameters=(
        Hyperparameter("lr", 1e-2, "learning rate", minimum=0.0),
        Hyperparameter("lr_decay", 0.0, "lr at step t is lr/(1 + (t-1)*lr_decay)", minimum=0.0),
        Hyperparameter("weight_decay", 0.0, "L2 penalty added to the gradient", minimum=0.0),
        Hyperparameter("initial_accumulator_value", 0.0, "starting value of the squared-gradient sum",
                       minimum=0.0),
        Hyperparameter("eps", 1e-10, "added to the root", minimum=0.0),
    ),
    slots=(Slot("sum", domain="nonnegative"),),
    scratch=3,
    effective_lr=effective_lr,
    kernel=kernel,
    kernel_scalars=kernel_scalars,
)


@hookimpl
def optreg_optimizers():
    return [TORCH_ADAGRAD]
