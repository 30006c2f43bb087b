"""torch.optim.Adagrad (2.13), as `torch.adagrad`: eps outside the root.

    h <- initial_accumulator_value  (before step 1)
    g <- g + weight_decay * p
    h <- h + g*g
    p <- p - lr/(1 + (t - 1)*lr_decay) * g / (sqrt(h) + eps)

Slot initial values are constants, so `sum` starts at 0 and the hyperparameter
initial_accumulator_value is added to it at step 1: exactly torch's float32 sums,
and, as in torch, changing it after step 1 has no effect.
"""
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
    slots=(Slot("sum"),),
    scratch=3,
    effective_lr=effective_lr,
)


@hookimpl
def optreg_optimizers():
    return [TORCH_ADAGRAD]
