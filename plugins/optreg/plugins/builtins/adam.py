"""Adam as the book writes it.

    lr_t = lr * sqrt(1 - beta2^t) / (1 - beta1^t)
    m <- m + (1 - beta1)(g - m);  v <- v + (1 - beta2)(g*g - v)
    W <- W - lr_t * m / (sqrt(v) + 1e-7)

The bias corrections are folded into lr_t and 1e-7 is added to the root of the
*uncorrected* v, so for tiny gradients this differs from torch.optim.Adam (which
adds eps after correction): one step with g = 1e-6 at lr 1e-3 moves this Adam
about 2.4e-4 and torch's about 9e-4. t is the session's step, shared by all
parameters. Moments use the book's lerp form, which rounds as the book does.
"""
import math

import numpy as np

from optreg.plugins import Hyperparameter, Optimizer, Slot, hookimpl
from optreg.plugins.builtins import BOOK_EPS


def update(param, grad, state, step, hp, scratch):
    s, r = scratch
    m, v = state["m"], state["v"]
    b1, b2 = hp["beta1"], hp["beta2"]
    lr_t = hp["lr"] * math.sqrt(1.0 - b2 ** step) / (1.0 - b1 ** step)
    np.subtract(grad, m, out=s)
    s *= 1 - b1
    m += s
    np.multiply(grad, grad, out=s)
    s -= v
    s *= 1 - b2
    v += s
    np.multiply(m, lr_t, out=s)
    np.sqrt(v, out=r)
    r += BOOK_EPS
    s /= r
    param -= s



def effective_lr(state, hp, step):
    """Telemetry: lr*sqrt(1-beta2^t)/(sqrt(v)+1e-7), the step size on the bias-corrected m."""
    return hp["lr"] * math.sqrt(1.0 - hp["beta2"] ** step) / (np.sqrt(state["v"]) + BOOK_EPS)
def kernel(p, g, m, v, c):
    a1, a2, lr_t, eps = c[0], c[1], c[2], c[3]
    for i in range(p.size):
        gi = g[i]
        mi = m[i] + (gi - m[i]) * a1
        vi = v[i] + (gi * gi - v[i]) * a2
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - (mi * lr_t) / (math.sqrt(vi) + eps)


def kernel_scalars(hp, step):
    b1, b2 = hp["beta1"], hp["beta2"]
    lr_t = hp["lr"] * math.sqrt(1.0 - b2 ** step) / (1.0 - b1 ** step)
    return (1 - b1, 1 - b2, lr_t, BOOK_EPS)


# Sparse rows: no catch_up, so the server replays the update with g = 0 for each step a row missed
# (m and v decay, and W keeps moving by lr_t m / (sqrt(v) + 1e-7) with each step's own lr_t): the dense
# steps' numbers bit for bit. The motion of W has no closed form (1e-7 sits outside the root), so a row's
# catch-up costs the steps it missed.

ADAM = Optimizer(
    name="adam",
    summary="Adam as in the book: bias correction folded into lr_t, 1e-7 outside sqrt of uncorrected v.",
    update=update,
    hyperparameters=(
        Hyperparameter("lr", 0.001, "learning rate", minimum=0.0),
        Hyperparameter("beta1", 0.9, "first-moment decay", minimum=0.0, maximum=1.0, maximum_exclusive=True),
        Hyperparameter("beta2", 0.999, "second-moment decay", minimum=0.0, maximum=1.0, maximum_exclusive=True),
    ),
    slots=(Slot("m"), Slot("v", domain="nonnegative")),
    scratch=2,
    effective_lr=effective_lr,
    kernel=kernel,
    kernel_scalars=kernel_scalars,
    sparse_rows=True,
)


@hookimpl
def optreg_optimizers():
    return [ADAM]
