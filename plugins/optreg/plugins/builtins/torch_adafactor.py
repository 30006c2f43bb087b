"""torch.optim.Adafactor (2.13), as `torch.adafactor`: a factored second moment (contract v2 slots).

For a parameter of two or more dimensions the second moment is kept as a row vector [..., R, 1] and a
column vector [..., 1, C] over the last two dimensions (its memory is R + C per matrix instead of
R * C); a vector or a scalar keeps a full `variance`. The slots not kept for a parameter have no
element (shape (0,)) and are absent from torch's state dict, as in torch.

    w <- t ** beta2_decay;  rho <- min(lr, 1/sqrt(t));  alpha <- max(eps2, rms(p)) * rho
    p <- p * (1 - lr*weight_decay)
    matrix: row <- lerp(row, mean(g*g, -1), w);  col <- lerp(col, mean(g*g, -2), w)
            v_hat <- row * col / max(mean(row, -2), eps1)
    vector: variance <- lerp(variance, g*g, w);  v_hat <- variance
    u <- g / sqrt(max(v_hat, eps1*eps1));  p <- p - alpha / max(1, rms(u)/d) * u

eps1 < 0 (the default) is torch's eps=(None, ...): the master dtype's machine epsilon. `maximize`
is the client's (torch's adapter sends -grad). t is the session's step. A whole-tensor update (its
norms are over the whole parameter); deterministic: numpy in float32, no threads.
"""
import numpy as np

from optreg.plugins import Hyperparameter, Optimizer, Slot, columns, hookimpl, rows, unfactored
from optreg.plugins.builtins.torch_muon import lerp


def _lerp(a, b, w):
    np.copyto(a, lerp(a, b, w))  # torch's lerp_, in place


def _rms(x) -> float:
    return float(np.linalg.norm(x.reshape(-1))) / x.size ** 0.5


def update(param, grad, state, step, hp, scratch):
    dt = param.dtype.type
    lr, wd = hp["lr"], hp["weight_decay"]
    eps1 = hp["eps1"] if hp["eps1"] >= 0 else float(np.finfo(param.dtype).eps)
    w = float(step) ** hp["beta2_decay"]
    rho = min(lr, 1 / float(step) ** 0.5)
    alpha = max(hp["eps2"], _rms(param)) * rho
    if wd != 0:
        param *= dt(1 - lr * wd)
    if grad.ndim > 1:
        row, col = state["row_var"], state["col_var"]
        sq = np.square(grad)
        _lerp(row, sq.mean(axis=-1, keepdims=True, dtype=param.dtype), w)
        _lerp(col, sq.mean(axis=-2, keepdims=True, dtype=param.dtype), w)
        v = row * col
        v /= np.maximum(row.mean(axis=-2, keepdims=True, dtype=param.dtype), dt(eps1))
    else:
        var = state["variance"]
        _lerp(var, grad * grad, w)
        v = var.copy()
    u = np.maximum(v, dt(eps1 * eps1), out=v)
    np.sqrt(u, out=u)
    np.divide(grad, u, out=u)
    denom = max(1.0, _rms(u) / hp["d"])
    u *= dt(-alpha / denom)
    param += u


TORCH_ADAFACTOR = Optimizer(
    name="torch.adafactor",
    summary="torch.optim.Adafactor: factored second moment (row and column vectors per matrix), relative step.",
    update=update,
    hyperparameters=(
        Hyperparameter("lr", 1e-2, "learning rate (the relative step is min(lr, 1/sqrt(t)))", minimum=0.0),
        Hyperparameter("beta2_decay", -0.8, "the second moment's weight is t**beta2_decay", maximum=0.0),
        Hyperparameter("eps1", -1.0, "added to the variance (eps[0]); < 0: the master dtype's machine epsilon "
                       "(torch's None)"),
        Hyperparameter("eps2", 1e-3, "the smallest parameter RMS the step scales by (eps[1])", minimum=0.0),
        Hyperparameter("d", 1.0, "clipping threshold of the update's RMS", minimum=1.0),
        Hyperparameter("weight_decay", 0.0, "decoupled weight decay", minimum=0.0),
    ),
    slots=(Slot("row_var", domain="nonnegative", shape=rows),
           Slot("col_var", domain="nonnegative", shape=columns),
           Slot("variance", domain="nonnegative", shape=unfactored)),
    elementwise=False,
)


@hookimpl
def optreg_optimizers():
    return [TORCH_ADAFACTOR]
