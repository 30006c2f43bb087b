"""`adamw-bf16`: torch.optim.AdamW's formula (adamw) with its state m, v and max_v kept in bfloat16
(a declared slot dtype, contract v2): 6 bytes a float32 parameter instead of 12.

Each step widens the slots to the master dtype, runs adamw's update, and stores them back rounded to
the nearest bfloat16 (ties to even): the parameters stay in the master dtype, the moments carry 8
bits of mantissa. Not torch's numbers (torch keeps the state in the parameter's dtype): close to
adamw for ordinary gradients, and its own bits, deterministic and replayed by the log. Elementwise,
with adamw's own kernel: the server widens the bfloat16 slots block by block around it and rounds
them back, the numpy update's numbers bit for bit (float32 sessions; a float64 one runs the update).
"""
import numpy as np

from optreg.plugins import Optimizer, Slot, hookimpl
from optreg.plugins.builtins.adamw import kernel_scalars
from optreg.plugins.builtins.torch_adam import adam_update, hyperparameters, kernel


def update(param, grad, state, step, hp, scratch):
    wide = {}
    for (name, low), buf in zip(state.items(), scratch[2:]):
        np.copyto(buf, low, casting="unsafe")
        wide[name] = buf
    adam_update(param, grad, wide, step, hp, scratch[:2], decoupled=True)
    for name, low in state.items():
        np.copyto(low, wide[name], casting="unsafe")  # rounded to nearest even


ADAMW_BF16 = Optimizer(
    name="adamw-bf16",
    summary="adamw (torch.optim.AdamW's formula) with m, v and max_v stored in bfloat16: half the state bytes.",
    update=update,
    hyperparameters=hyperparameters(weight_decay=1e-2),
    slots=(Slot("m", dtype="bfloat16"), Slot("v", domain="nonnegative", dtype="bfloat16"),
           Slot("max_v", domain="nonnegative", dtype="bfloat16")),
    scratch=5,
    kernel=kernel,
    kernel_scalars=kernel_scalars,
)


@hookimpl
def optreg_optimizers():
    return [ADAMW_BF16]
