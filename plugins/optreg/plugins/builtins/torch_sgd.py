"""torch.optim.SGD (2.13), as `torch.sgd`.

    g <- g + weight_decay * p
    b <- g at step 1, else momentum*b + (1 - dampening)*g      (when momentum != 0)
    g <- g + momentum*b if nesterov else b
    p <- p - lr*g

Unlike the book's momentum, b does not fold in lr, so a mid-run lr change
rescales the whole step at once (as in torch). torch creates b from the first
gradient it sees with momentum != 0; here that is step 1, so a session that turns
momentum on later starts from b = 0 (differs from torch only when dampening != 0).
torch refuses nesterov with momentum 0 or dampening != 0; optreg's hyperparameters
are checked one by one, so here such a combination simply runs the formula above.
"""
import numpy as np

from optreg.plugins import Hyperparameter, Optimizer, Slot, hookimpl


def update(param, grad, state, step, hp, scratch):
    s, t = scratch
    lr, mu, wd = hp["lr"], hp["momentum"], hp["weight_decay"]
    g = grad  # read-only: a changed gradient goes to scratch
    if wd != 0:
        np.multiply(param, wd, out=s)
        s += grad
        g = s
    if mu != 0:
        buf = state["momentum_buffer"]
        if step == 1:
            np.copyto(buf, g)
        else:
            buf *= mu
            np.multiply(g, 1 - hp["dampening"], out=t)
            buf += t
        if hp["nesterov"]:
            np.multiply(buf, mu, out=t)
            t += g
            g = t
        else:
            g = buf
    np.multiply(g, lr, out=t)
    param -= t


def kernel(p, g, momentum_buffer, c):
    # update one element at a time, same operations in the same order (fused by numba).
    coupled, wd, use_buffer, first, mu, keep, nesterov, lr = (c[0] != 0, c[1], c[2] != 0, c[3] != 0, c[4], c[5],
                                                              c[6] != 0, c[7])
    for i in range(p.size):
        pi = p[i]
        gi = g[i]
        if coupled:
            gi = pi * wd + gi
        if use_buffer:
            if first:
                bi = gi
            else:
                bi = momentum_buffer[i] * mu + gi * keep
            momentum_buffer[i] = bi
            if nesterov:
                gi = bi * mu + gi
            else:
                gi = bi
        p[i] = pi - gi * lr


def kernel_scalars(hp, step):
    mu, wd = hp["momentum"], hp["weight_decay"]
    return (float(wd != 0), wd, float(mu != 0), float(step == 1), mu, 1 - hp["dampening"],
            float(bool(hp["nesterov"])), hp["lr"])


TORCH_SGD = Optimizer(
    name="torch.sgd",
    summary="torch.optim.SGD: momentum buffer without lr, dampening, nesterov, L2 weight_decay.",
    update=update,
    hyperparameters=(
        Hyperparameter("lr", 1e-3, "learning rate", minimum=0.0),
        Hyperparameter("momentum", 0.0, "momentum factor (0: plain SGD)", minimum=0.0),
        Hyperparameter("dampening", 0.0, "dampening of the gradient added to the buffer", minimum=0.0,
                       maximum=1.0),
        Hyperparameter("weight_decay", 0.0, "L2 penalty added to the gradient", minimum=0.0),
        Hyperparameter("nesterov", False, "Nesterov momentum", type=bool),
    ),
    slots=(Slot("momentum_buffer"),),
    scratch=2,
    kernel=kernel,
    kernel_scalars=kernel_scalars,
)


@hookimpl
def optreg_optimizers():
    return [TORCH_SGD]
