"""AdaGrad: h <- h + g*g; W <- W - lr*g / (sqrt(h) + 1e-7)."""
import numpy as np

from optreg.plugins import Hyperparameter, Optimizer, Slot, hookimpl
from optreg.plugins.builtins import BOOK_EPS


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

ADAGRAD = Optimizer(
    name="adagrad",
    summary="AdaGrad: h += g*g; W -= lr*g/(sqrt(h)+1e-7) (the book's AdaGrad).",
    update=update,
    hyperparameters=(Hyperparameter("lr", 0.01, "learning rate", minimum=0.0),),
    slots=(Slot("h"),),
    scratch=2,
    effective_lr=effective_lr,
)


@hookimpl
def optreg_optimizers():
    return [ADAGRAD]
