"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms") for optreg.

    c <- beta1*m + (1 - beta1)*g
    p <- p - lr*(sign(c) + weight_decay*p)
    m <- beta2*m + (1 - beta2)*g

Every step has the same size per element (lr, before weight decay), so Lion wants a
learning rate 3-10x smaller than AdamW's and a weight decay 3-10x larger.
"""
import numpy as np

from optreg.plugins import Hyperparameter, Optimizer, Slot, hookimpl


def update(param, grad, state, step, hp, scratch):
    # param, state["m"]: updated in place; grad: read-only; scratch: two work arrays.
    c, t = scratch
    lr, b1, b2, wd = hp["lr"], hp["beta1"], hp["beta2"], hp["weight_decay"]
    m = state["m"]
    np.multiply(m, b1, out=c)
    np.multiply(grad, 1 - b1, out=t)
    c += t
    np.sign(c, out=c)
    if wd != 0:
        param *= 1 - lr * wd  # lr*wd*p uses p before this step's sign update, as in the paper
    c *= lr
    param -= c
    m *= b2
    np.multiply(grad, 1 - b2, out=t)
    m += t


def kernel(p, g, m, c):
    # `update` one element at a time, same operations in the same order; the server
    # compiles it with numba (one pass over memory). Every constant comes from c:
    # a Python literal in arithmetic would make numba compute in float64.
    b1, a1, decoupled, decay, lr, b2, a2, one = c[0], c[1], c[2] != 0, c[3], c[4], c[5], c[6], c[7]
    zero = one - one
    for i in range(p.size):
        gi = g[i]
        mi = m[i]
        ci = mi * b1 + gi * a1
        if ci > zero:  # np.sign: 1, -1, 0 for either zero, NaN stays NaN
            s = one
        elif ci < zero:
            s = -one
        elif ci == zero:
            s = zero
        else:
            s = ci
        pi = p[i]
        if decoupled:
            pi = pi * decay
        p[i] = pi - s * lr
        m[i] = mi * b2 + gi * a2


def kernel_scalars(hp, step):
    lr, b1, b2, wd = hp["lr"], hp["beta1"], hp["beta2"], hp["weight_decay"]
    return (b1, 1 - b1, float(wd != 0), 1 - lr * wd, lr, b2, 1 - b2, 1.0)


LION = Optimizer(
    name="lion",
    summary="Lion (Chen et al. 2023): p -= lr*(sign(beta1*m + (1-beta1)*g) + wd*p); m = beta2*m + (1-beta2)*g.",
    update=update,
    hyperparameters=(
        Hyperparameter("lr", 1e-4, "learning rate (the size of every step)", minimum=0.0),
        Hyperparameter("beta1", 0.9, "interpolation of m and g for the update's sign", minimum=0.0, maximum=1.0),
        Hyperparameter("beta2", 0.99, "decay of the momentum m", minimum=0.0, maximum=1.0),
        Hyperparameter("weight_decay", 0.0, "decoupled weight decay", minimum=0.0),
    ),
    slots=(Slot("m"),),
    scratch=2,
    elementwise=True,
    kernel=kernel,
    kernel_scalars=kernel_scalars,
)


@hookimpl
def optreg_optimizers():
    return [LION]
