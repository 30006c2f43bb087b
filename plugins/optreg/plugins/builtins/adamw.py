"""torch.optim.AdamW (2.13), as `adamw`: Adam with decoupled weight decay.

    p <- p * (1 - lr*weight_decay), then torch.adam's step with no L2 term.

Defaults as torch's (weight_decay 1e-2). The update and the kernel are torch_adam's.
"""
from optreg.plugins import Optimizer, hookimpl
from optreg.plugins.builtins.torch_adam import SLOTS, adam_scalars, adam_update, effective_lr, hyperparameters, kernel


def update(param, grad, state, step, hp, scratch):
    adam_update(param, grad, state, step, hp, scratch, decoupled=True)


def kernel_scalars(hp, step):
    return adam_scalars(hp, step, decoupled=True)


ADAMW = Optimizer(
    name="adamw",
    summary="torch.optim.AdamW: Adam (eps after bias correction) with decoupled weight decay, amsgrad.",
    update=update,
    hyperparameters=hyperparameters(weight_decay=1e-2),
    slots=SLOTS,
    scratch=2,
    effective_lr=effective_lr,
    kernel=kernel,
    kernel_scalars=kernel_scalars,
)


@hookimpl
def optreg_optimizers():
    return [ADAMW]
