"""torch.optim.RMSprop (2.13), as `torch.rmsprop`: eps outside the root.

    g <- g + weight_decay * p
    v <- alpha*v + (1 - alpha)*g*g
    c <- lerp(c, g, 1 - alpha);  d <- sqrt(v - c*c) + eps      (centered)
                                 d <- sqrt(v) + eps            (otherwise)
    b <- momentum*b + g/d;  p <- p - lr*b                      (momentum > 0)
    p <- p - lr*g/d                                            (otherwise)

Not the book's `rmsprop` (fixed 1e-7, no options). grad_avg and momentum_buffer
are allocated even when unused: slots are declared, not conditional.
"""
import math

import numpy as np

from optreg.plugins import Hyperparameter, Optimizer, Slot, hookimpl


def update(param, grad, state, step, hp, scratch):
    s, t, d = scratch
    lr, alpha, mu, wd = hp["lr"], hp["alpha"], hp["momentum"], hp["weight_decay"]
    g = grad  # read-only: a changed gradient goes to scratch
    if wd != 0:
        np.multiply(param, wd, out=s)
        s += grad
        g = s
    v = state["square_avg"]
    v *= alpha
    np.multiply(g, 1 - alpha, out=t)  # torch's addcmul: (value*g)*g
    t *= g
    v += t
    if hp["centered"]:
        c = state["grad_avg"]
        np.subtract(g, c, out=t)  # torch's lerp: c + w*(g - c)
        t *= 1 - alpha
        c += t
        np.multiply(c, c, out=d)
        np.subtract(v, d, out=d)
        np.sqrt(d, out=d)
    else:
        np.sqrt(v, out=d)
    d += hp["eps"]
    if mu > 0:
        buf = state["momentum_buffer"]
        buf *= mu
        np.divide(g, d, out=t)
        buf += t
        np.multiply(buf, lr, out=t)
        param -= t
    else:
        np.multiply(g, -lr, out=t)  # torch's addcdiv: (value*g)/d
        t /= d
        param += t



def effective_lr(state, hp, step):
    """Telemetry: lr/(sqrt(v - c^2 if centered else v)+eps), the step size on g."""
    v = state["square_avg"] - state["grad_avg"] ** 2 if hp["centered"] else state["square_avg"]
    return hp["lr"] / (np.sqrt(np.maximum(v, 0)) + hp["eps"])
def kernel(p, g, square_avg, grad_avg, momentum_buffer, c):
    # update one element at a time, same operations in the same order (fused by numba).
    coupled, wd, alpha, a, centered, eps = c[0] != 0, c[1], c[2], c[3], c[4] != 0, c[5]
    use_buffer, mu, lr, neg_lr = c[6] != 0, c[7], c[8], c[9]
    for i in range(p.size):
        pi = p[i]
        gi = g[i]
        if coupled:
            gi = pi * wd + gi
        vi = square_avg[i] * alpha + (gi * a) * gi
        square_avg[i] = vi
        if centered:
            ci = grad_avg[i] + (gi - grad_avg[i]) * a
            grad_avg[i] = ci
            # np.sqrt: a variance made negative by rounding gives NaN, as torch does; math.sqrt would raise
            di = np.sqrt(vi - ci * ci) + eps
        else:
            di = math.sqrt(vi) + eps
        if use_buffer:
            bi = momentum_buffer[i] * mu + gi / di
            momentum_buffer[i] = bi
            p[i] = pi - bi * lr
        else:
            p[i] = pi + (gi * neg_lr) / di


def kernel_scalars(hp, step):
    alpha, wd, mu, lr = hp["alpha"], hp["weight_decay"], hp["momentum"], hp["lr"]
    return (float(wd != 0), wd, alpha, 1 - alpha, float(bool(hp["centered"])), hp["eps"], float(mu > 0), mu, lr,
            -lr)


TORCH_RMSPROP = Optimizer(
    name="torch.rmsprop",
    summary="torch.optim.RMSprop: eps outside sqrt, centered, momentum, L2 weight_decay (not the book's).",
    update=update,
    hyperparameters=(
        Hyperparameter("lr", 1e-2, "learning rate", minimum=0.0),
        Hyperparameter("alpha", 0.99, "smoothing constant of the squared-gradient average", minimum=0.0,
                       maximum=1.0),
        Hyperparameter("eps", 1e-8, "added to the root", minimum=0.0),
        Hyperparameter("weight_decay", 0.0, "L2 penalty added to the gradient", minimum=0.0),
        Hyperparameter("momentum", 0.0, "momentum factor", minimum=0.0),
        Hyperparameter("centered", False, "normalise by the estimated variance of the gradient", type=bool),
    ),
    slots=(Slot("square_avg", domain="nonnegative"), Slot("grad_avg"), Slot("momentum_buffer")),
    scratch=3,
    effective_lr=effective_lr,
    kernel=kernel,
    kernel_scalars=kernel_scalars,
)


@hookimpl
def optreg_optimizers():
    return [TORCH_RMSPROP]
