"""torch.optim.Muon (2.13), as `torch.muon`: momentum, then Newton-Schulz orthogonalisation of each
2-D update (a whole-tensor update of contract v2).

    B <- lerp(B, g, 1 - momentum);  U <- lerp(g, B, momentum) if nesterov else B
    O <- NS(U): X = bf16(U) (transposed when taller than wide) / max(||X||, eps), then ns_steps times
         A = X X^T;  B' = b A + c A A;  X = a X + B' X        (in bfloat16, as torch)
    p <- p * (1 - lr*weight_decay);  p <- p - lr * ratio * O
    ratio: sqrt(max(1, rows/cols)) (adjust_lr 0, torch's "original", the default) or
           0.2 * sqrt(max(rows, cols)) (adjust_lr 1, "match_rms_adamw")

Muon applies to 2-D parameters only (`accepts`): a session holding a vector, a scalar or a tensor of
three dimensions is refused (INVALID_ARGUMENT naming the parameter), as torch.optim.Muon refuses them.
Step biases, norms and embeddings in a second session with `adamw`, as torch users run AdamW beside
Muon. The matrix products run in torch's own bfloat16 kernels when torch is installed on the server
(the same bits as torch.optim.Muon), else in numpy float32 with every result rounded to bfloat16 (the
same numbers to bfloat16 rounding). Deterministic at a fixed number of threads (BLAS splits its work
by thread count): the write-ahead log replays it on the same server.
"""
import math

import ml_dtypes
import numpy as np

from optreg.plugins import Hyperparameter, Optimizer, Slot, hookimpl


def accepts(name, shape):
    if len(shape) != 2:
        return (f"Muon orthogonalises 2-D matrices and this is {len(shape)}-D; step it with adamw in a second "
                "session (as torch users pair torch.optim.Muon with AdamW)")
    return None


def lerp(start, end, w):
    """torch's lerp (a new array): start + w*(end - start) for w < 0.5, else end - (end - start)*(1 - w),
    each a fused multiply-add on torch's CPU: for float32 done in float64 (the product is exact there),
    which gives torch's bits (a momentum buffer one ulp off moves Muon's bfloat16 update by far more)."""
    dt = start.dtype.type
    diff = end - start
    w = dt(w)
    if start.dtype != np.float32:
        return start + diff * w if w < 0.5 else end - diff * (dt(1) - w)
    if w < 0.5:
        wide = start.astype(np.float64)
        wide += diff.astype(np.float64) * float(w)
    else:
        wide = end.astype(np.float64)
        wide -= diff.astype(np.float64) * float(dt(1) - w)
    return wide.astype(np.float32)


def _torch():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _ns_torch(torch, u, a, b, c, steps, eps):
    """torch.optim._muon._zeropower_via_newtonschulz, the same operations."""
    x = torch.from_numpy(u).bfloat16()
    tall = u.shape[0] > u.shape[1]
    if tall:
        x = x.T
    x.div_(x.norm().clamp(min=eps))
    for _ in range(steps):
        gram = x @ x.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, gram_update, x, beta=a)
    if tall:
        x = x.T
    return x.float().numpy()


def _bf16(x):
    return x.astype(ml_dtypes.bfloat16).astype(np.float32)


def _ns_numpy(u, a, b, c, steps, eps):
    """The same iteration in float32 matrix products, each result rounded to bfloat16 as torch stores it."""
    x = _bf16(u.astype(np.float32))
    tall = u.shape[0] > u.shape[1]
    if tall:
        x = x.T
    x = _bf16(x / _bf16(np.float32(max(float(np.linalg.norm(x)), eps))))
    a, b, c = np.float32(a), np.float32(b), np.float32(c)
    for _ in range(steps):
        gram = _bf16(x @ x.T)
        gram_update = _bf16(b * gram + c * (gram @ gram))
        x = _bf16(a * x + gram_update @ x)
    return x.T if tall else x


def orthogonalise(u, hp):
    args = (hp["ns_a"], hp["ns_b"], hp["ns_c"], int(hp["ns_steps"]), hp["eps"])
    torch = _torch()
    return _ns_torch(torch, np.ascontiguousarray(u), *args) if torch is not None else _ns_numpy(u, *args)


def update(param, grad, state, step, hp, scratch):
    dt = param.dtype.type
    lr, mu = hp["lr"], hp["momentum"]
    buf = state["momentum_buffer"]
    np.copyto(buf, lerp(buf, grad, 1 - mu))
    u = lerp(grad, buf, mu) if hp["nesterov"] else buf
    o = orthogonalise(u, hp)
    rows, cols = param.shape
    ratio = 0.2 * math.sqrt(max(rows, cols)) if hp["adjust_lr"] == 1 else math.sqrt(max(1, rows / cols))
    param *= dt(1 - lr * hp["weight_decay"])
    o *= dt(-(lr * ratio))  # torch's add_(o, alpha=-adjusted_lr): o promoted to the parameter's dtype
    param += o.astype(param.dtype, copy=False)


TORCH_MUON = Optimizer(
    name="torch.muon",
    summary="torch.optim.Muon: momentum orthogonalised by Newton-Schulz (bfloat16), 2-D parameters only.",
    update=update,
    hyperparameters=(
        Hyperparameter("lr", 1e-3, "learning rate", minimum=0.0),
        Hyperparameter("weight_decay", 0.1, "decoupled weight decay (scaled by lr)", minimum=0.0),
        Hyperparameter("momentum", 0.95, "momentum factor", minimum=0.0),
        Hyperparameter("nesterov", True, "Nesterov momentum", type=bool),
        Hyperparameter("ns_a", 3.4445, "Newton-Schulz coefficient a (ns_coefficients[0])"),
        Hyperparameter("ns_b", -4.7750, "Newton-Schulz coefficient b (ns_coefficients[1])"),
        Hyperparameter("ns_c", 2.0315, "Newton-Schulz coefficient c (ns_coefficients[2])"),
        Hyperparameter("eps", 1e-7, "the smallest norm the update is divided by", minimum=0.0),
        Hyperparameter("ns_steps", 5, "Newton-Schulz iterations", type=int, minimum=1, maximum=99),
        Hyperparameter("adjust_lr", 0, "lr adjustment: 0 torch's 'original' (None), 1 'match_rms_adamw'",
                       type=int, minimum=0, maximum=1),
    ),
    slots=(Slot("momentum_buffer"),),
    elementwise=False,
    accepts=accepts,
)


@hookimpl
def optreg_optimizers():
    return [TORCH_MUON]
