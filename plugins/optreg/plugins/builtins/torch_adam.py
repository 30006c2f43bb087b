"""torch.optim.Adam (2.13), as `torch.adam`: eps added after bias correction.

    g <- g + weight_decay * p                      (L2, coupled into the gradient)
    m <- lerp(m, g, 1 - beta1);  v <- beta2*v + (1 - beta2)*g*g
    v_max <- max(v_max, v)                         (amsgrad only; used in place of v)
    p <- p - lr/(1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)

Not the book's `adam` (which adds 1e-7 to the root of the *uncorrected* v): one step
with g = 1e-6 at lr 1e-3 moves this about 9e-4 and the book's about 2.4e-4.
t is the session's step, shared by all parameters (torch counts per parameter;
equal when every parameter is updated every step). The order of operations follows
torch's CPU kernels so float32 results agree to a few ulp.
"""
import math

import numpy as np

from optreg.plugins import Hyperparameter, Optimizer, Slot, hookimpl


def adam_update(param, grad, state, step, hp, scratch, decoupled):
    """Adam (decoupled=False) or AdamW (decoupled=True); shared by adamw.py."""
    s, t = scratch
    lr, b1, b2, wd = hp["lr"], hp["beta1"], hp["beta2"], hp["weight_decay"]
    m, v = state["m"], state["v"]
    g = grad  # never written: when weight decay changes it, the sum goes to scratch
    if wd != 0:
        if decoupled:
            param *= 1 - lr * wd
        else:
            np.multiply(param, wd, out=s)
            s += grad
            g = s
    np.subtract(g, m, out=t)  # torch's lerp: m + w*(g - m) for w < 0.5
    t *= 1 - b1
    m += t
    v *= b2
    np.multiply(g, 1 - b2, out=t)  # torch's addcmul: (value*g)*g
    t *= g
    v += t
    if hp["amsgrad"]:
        vmax = state["max_v"]
        np.maximum(vmax, v, out=vmax)
        v = vmax
    bias2_sqrt = (1 - b2 ** step) ** 0.5
    step_size = lr / (1 - b1 ** step)
    np.sqrt(v, out=s)  # g (if in s) is no longer needed
    s /= bias2_sqrt
    s += hp["eps"]
    np.multiply(m, -step_size, out=t)  # torch's addcdiv: (value*m)/denom
    t /= s
    param += t


def kernel(p, g, m, v, max_v, c):
    # adam_update one element at a time, same operations in the same order (fused by numba).
    coupled, decoupled, wd, decay = c[0] != 0, c[1] != 0, c[2], c[3]
    a1, b2, a2, bias2_sqrt, eps, neg_step, amsgrad = c[4], c[5], c[6], c[7], c[8], c[9], c[10] != 0
    for i in range(p.size):
        pi = p[i]
        gi = g[i]
        if coupled:
            gi = pi * wd + gi
        if decoupled:
            pi = pi * decay
        mi = m[i] + (gi - m[i]) * a1
        m[i] = mi
        vi = v[i] * b2 + (gi * a2) * gi
        v[i] = vi
        if amsgrad:
            x = max_v[i]
            if not (x >= vi or x != x):  # np.maximum: NaN wins, ties keep max_v
                x = vi
            max_v[i] = x
            vi = x
        p[i] = pi + (mi * neg_step) / (math.sqrt(vi) / bias2_sqrt + eps)


def adam_scalars(hp, step, decoupled):
    """c for `kernel`: Adam (decoupled=False) or AdamW (decoupled=True)."""
    lr, b1, b2, wd = hp["lr"], hp["beta1"], hp["beta2"], hp["weight_decay"]
    return (float(wd != 0 and not decoupled), float(wd != 0 and decoupled), wd, 1 - lr * wd,
            1 - b1, b2, 1 - b2, (1 - b2 ** step) ** 0.5, hp["eps"], -(lr / (1 - b1 ** step)),
            float(bool(hp["amsgrad"])))


def kernel_scalars(hp, step):
    return adam_scalars(hp, step, decoupled=False)


def hyperparameters(weight_decay):
    return (
        Hyperparameter("lr", 1e-3, "learning rate", minimum=0.0),
        Hyperparameter("beta1", 0.9, "first-moment decay (betas[0])", minimum=0.0, maximum=1.0,
                       maximum_exclusive=True),
        Hyperparameter("beta2", 0.999, "second-moment decay (betas[1])", minimum=0.0, maximum=1.0,
                       maximum_exclusive=True),
        Hyperparameter("eps", 1e-8, "added to the bias-corrected sqrt(v)", minimum=0.0),
        Hyperparameter("weight_decay", weight_decay, "weight decay", minimum=0.0),
        Hyperparameter("amsgrad", False, "use the running maximum of v (AMSGrad)", type=bool),
    )


# max_v is allocated even when amsgrad is off: slots are declared, not conditional.
SLOTS = (Slot("m"), Slot("v", domain="nonnegative"), Slot("max_v", domain="nonnegative"))


def update(param, grad, state, step, hp, scratch):
    adam_update(param, grad, state, step, hp, scratch, decoupled=False)



def effective_lr(state, hp, step):
    """Telemetry: lr/(sqrt(v_hat)+eps) (v_max with amsgrad), the step size on the bias-corrected m."""
    v = state["max_v"] if hp.get("amsgrad") else state["v"]
    return hp["lr"] / (np.sqrt(v / (1 - hp["beta2"] ** step)) + hp["eps"])

TORCH_ADAM = Optimizer(
    name="torch.adam",
    summary="torch.optim.Adam: eps after bias correction, L2 weight_decay, amsgrad (not the book's adam).",
    update=update,
    hyperparameters=hyperparameters(weight_decay=0.0),
    slots=SLOTS,
    scratch=2,
    effective_lr=effective_lr,
    kernel=kernel,
    kernel_scalars=kernel_scalars,
)


@hookimpl
def optreg_optimizers():
    return [TORCH_ADAM]
