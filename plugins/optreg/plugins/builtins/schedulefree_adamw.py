"""schedulefree.AdamWScheduleFree (PyPI `schedulefree` 1.4), as `schedulefree.adamw`: AdamW without a
schedule (Defazio et al., 2024). The session's parameters are the training point y; z and the
second moment are slots, and the run's lr_max and weight_sum are per-parameter scalar slots
(contract v2: `shape=scalar`, float64 as Python keeps them). At step t = k + 1:

    lr_t <- lr * min(1, t / warmup_steps);  lr_max <- max(lr_max, lr_t)
    weight <- t**r * lr_max**weight_lr_power;  weight_sum += weight;  c <- weight / weight_sum
    v <- beta2*v + (1 - beta2)*g*g;  u <- g / (sqrt(v / (1 - beta2**t)) + eps) + weight_decay*y
    y <- lerp(y, z, c) + lr_t*(beta1*(1 - c) - 1)*u;  z <- z - lr_t*u       (z starts as y)

The evaluation view is x = lerp(y, z, 1 - 1/beta1) (the reference's `optimizer.eval()`), computed by
the client from ReadState; the session always holds y (train mode). A whole-tensor update (lr_max and
weight_sum advance once a step, not per slice); the products rounded as torch's fused multiply-adds
round them. Its kernel takes z and exp_avg_sq; `kernel_scalars` advances the two running scalars.
"""
import math

import numpy as np

from optreg.plugins import Hyperparameter, Optimizer, Slot, hookimpl, scalar
from optreg.plugins.builtins.torch_muon import lerp


def _axpy(y, x, alpha):
    """torch's y.add_(x, alpha=alpha) in place: one fused multiply-add (float64 holds float32's product)."""
    a = y.dtype.type(alpha)
    if y.dtype == np.float32:
        np.copyto(y, np.add(y, x * np.float64(a), dtype=np.float64).astype(np.float32))
    else:
        y += x * a


def advance(hp, step, running) -> tuple[float, float]:
    """(lr_t, c) of step t: lr_max and weight_sum (0-d float64 arrays) advanced in place."""
    k, warmup = step - 1, hp["warmup_steps"]
    lr = hp["lr"] * ((k + 1) / warmup if k < warmup else 1.0)
    lr_max = running["lr_max"][()] = max(lr, float(running["lr_max"]))
    weight = (k + 1) ** hp["r"] * lr_max ** hp["weight_lr_power"]
    weight_sum = running["weight_sum"][()] = float(running["weight_sum"]) + weight
    return lr, (weight / weight_sum if weight_sum != 0 else 0.0)


def update(param, grad, state, step, hp, scratch):
    dt = param.dtype.type
    b1, b2, k = hp["beta1"], hp["beta2"], step - 1
    lr, ckp1 = advance(hp, step, state)
    z, v = state["z"], state["exp_avg_sq"]
    if step == 1:
        np.copyto(z, param)  # the reference clones the parameter at its first step
    v *= dt(b2)
    v += (grad * dt(1 - b2)) * grad
    u = np.divide(v, dt(1 - b2 ** (k + 1)), out=np.empty_like(v))  # (an array for a 0-d parameter too)
    np.sqrt(u, out=u)
    u += dt(hp["eps"])
    np.divide(grad, u, out=u)
    if hp["weight_decay"] != 0:
        _axpy(u, param, hp["weight_decay"])
    np.copyto(param, lerp(param, z, ckp1))
    _axpy(param, u, lr * (b1 * (1 - ckp1) - 1))
    _axpy(z, u, -lr)


def kernel(p, g, z, v, c):
    # update() one element at a time: float32 rounds as numpy's float32 operations do, and the fused
    # multiply-adds (_axpy, lerp) are done in float64 and rounded once, as there. lerp's two forms are
    # one: start + diff*w, or end + diff*(-(1 - w)) (a negated factor rounds the same).
    first, b2, a2, bias2, eps, wd, w, one, y_scale, z_scale = c[0] != 0, c[1], c[2], c[3], c[4], c[5], c[6], \
        c[7], c[8], c[9]
    decay, low = wd != 0, w < 0.5
    factor = np.float64(w) if low else -np.float64(one - w)
    to = p.dtype.type
    for i in range(p.size):  # branches as selects, so the loop vectorizes
        pi = p[i]
        zi = z[i]
        zi = pi if first else zi
        gi = g[i]
        vi = v[i] * b2 + (gi * a2) * gi
        v[i] = vi
        u = gi / (math.sqrt(vi / bias2) + eps)
        decayed = to(np.float64(u) + np.float64(pi) * np.float64(wd))
        u = decayed if decay else u
        y = to(np.float64(pi if low else zi) + np.float64(zi - pi) * factor)
        p[i] = to(np.float64(y) + np.float64(u) * np.float64(y_scale))
        z[i] = to(np.float64(zi) + np.float64(u) * np.float64(z_scale))


def kernel_scalars(hp, step, running):
    lr, ckp1 = advance(hp, step, running)
    b1, b2 = hp["beta1"], hp["beta2"]
    return (float(step == 1), b2, 1 - b2, 1 - b2 ** step, hp["eps"], hp["weight_decay"], ckp1, 1.0,
            lr * (b1 * (1 - ckp1) - 1), -lr)


SCHEDULEFREE_ADAMW = Optimizer(
    name="schedulefree.adamw",
    summary="schedulefree.AdamWScheduleFree: AdamW without a schedule (z and an averaged y), warm-up built in.",
    update=update,
    hyperparameters=(
        Hyperparameter("lr", 0.0025, "learning rate", minimum=0.0),
        Hyperparameter("beta1", 0.9, "interpolation between y and z (betas[0])", minimum=0.0, maximum=1.0,
                       maximum_exclusive=True, minimum_exclusive=True),
        Hyperparameter("beta2", 0.999, "second-moment decay (betas[1])", minimum=0.0, maximum=1.0,
                       maximum_exclusive=True),
        Hyperparameter("eps", 1e-8, "added to the bias-corrected sqrt(v)", minimum=0.0),
        Hyperparameter("weight_decay", 0.0, "weight decay (at y, on the normalised gradient)", minimum=0.0),
        Hyperparameter("warmup_steps", 0, "linear warm-up of lr over this many steps", type=int, minimum=0),
        Hyperparameter("r", 0.0, "polynomial weighting power of the average", minimum=0.0),
        Hyperparameter("weight_lr_power", 2.0, "the average's weights are lr_max**this", minimum=0.0),
    ),
    slots=(Slot("z"), Slot("exp_avg_sq", domain="nonnegative"),
           Slot("lr_max", initial_value=-1.0, shape=scalar, dtype="float64"),
           Slot("weight_sum", domain="nonnegative", shape=scalar, dtype="float64")),
    elementwise=False,
    kernel=kernel,
    kernel_scalars=kernel_scalars,
)


@hookimpl
def optreg_optimizers():
    return [SCHEDULEFREE_ADAMW]
