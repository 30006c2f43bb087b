"""SGD: W <- W - lr * dL/dW."""
import numpy as np

from optreg.plugins import Hyperparameter, Optimizer, hookimpl
from optreg.plugins.builtins import unchanged


def update(param, grad, state, step, hp, scratch):
    (s,) = scratch
    np.multiply(grad, hp["lr"], out=s)
    param -= s


def kernel(p, g, c):
    # The update's operations in its order, one element at a time (fused by numba).
    lr = c[0]
    for i in range(p.size):
        p[i] = p[i] - g[i] * lr


def kernel_scalars(hp, step):
    return (hp["lr"],)


# A zero gradient leaves W as it is: rows that missed steps need nothing (exact).

SGD = Optimizer(
    name="sgd",
    summary="Stochastic gradient descent: W <- W - lr*g (the book's SGD).",
    update=update,
    hyperparameters=(Hyperparameter("lr", 0.01, "learning rate", minimum=0.0),),
    scratch=1,
    kernel=kernel,
    kernel_scalars=kernel_scalars,
    sparse_rows=True,
    catch_up=unchanged,
)


@hookimpl
def optreg_optimizers():
    return [SGD]
