"""SGD: W <- W - lr * dL/dW."""
import numpy as np

from optreg.plugins import Hyperparameter, Optimizer, hookimpl


def update(param, grad, state, step, hp, scratch):
    (s,) = scratch
    np.multiply(grad, hp["lr"], out=s)
    param -= s


SGD = Optimizer(
    name="sgd",
    summary="Stochastic gradient descent: W <- W - lr*g (the book's SGD).",
    update=update,
    hyperparameters=(Hyperparameter("lr", 0.01, "learning rate", minimum=0.0),),
    scratch=1,
)


@hookimpl
def optreg_optimizers():
    return [SGD]
