"""8-bit AdamW (bitsandbytes' AdamW8bit, Dettmers et al. 2022, "8-bit Optimizers via Block-wise
Quantization") as an optreg plugin of contract v2: m and v are kept as one uint8 code per element,
with one scale (the block's largest magnitude) per block of 256 elements of the flattened parameter.

Quantisation is bitsandbytes' *dynamic* (not linear) map: 256 values, signed for m and unsigned for v,
dense near zero and sparse near 1 (a decimal exponent with a shrinking fraction; `dynamic_map`). A
block is stored as code = the nearest map value to x / absmax(block), and read back as map[code] *
absmax. Each step decodes m and v into the master dtype, runs torch.optim.AdamW's formula (what
bitsandbytes' CPU backend runs), and encodes them again:

    m <- b1*m + (1-b1)*g;  v <- b2*v + (1-b2)*g*g;  p <- p*(1 - lr*wd)
    p <- p - lr/(1 - b1**t) * m / (sqrt(v)/sqrt(1 - b2**t) + eps)

State: 2 bytes per element plus 2 scales per 256 elements, against 8 (m, v) or 12 (m, v, max_v) for a
float32 AdamW. Whole-tensor (the blocks run across the flattened parameter), deterministic (numpy; the
log replays it bit for bit).
"""
from __future__ import annotations

import numpy as np

from optreg.plugins import Hyperparameter, Optimizer, Slot, blocks, hookimpl

BLOCK = 256  # bitsandbytes' block size for its 8-bit optimizers' state


def dynamic_map(signed: bool) -> np.ndarray:
    """bitsandbytes.functional.create_dynamic_map(signed) (max_exponent_bits=7, total_bits=8): 256 sorted
    float32 values in [-1, 1] (signed) or [0, 1]: for each decimal exponent 10**(i-6), i = 0..6, the
    midpoints of an even split of [0.1, 1] into 2**i (signed) or 2**(i+1) parts; then 0 and 1."""
    data = []
    for i in range(7):
        n = 2 ** i + 1 if signed else 2 ** (i + 1) + 1
        bounds = np.linspace(0.1, 1, n, dtype=np.float32)
        means = ((bounds[:-1] + bounds[1:]) / np.float32(2)).tolist()
        data += [10 ** (i - 6) * x for x in means]
        if signed:
            data += [-(10 ** (i - 6)) * x for x in means]
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return np.array(sorted(data), dtype=np.float32)


SIGNED, UNSIGNED = dynamic_map(True), dynamic_map(False)
# Nearest map value by bisection: the midpoints between neighbours.
_EDGES = {id(c): (c[:-1] + c[1:]) / np.float32(2) for c in (SIGNED, UNSIGNED)}


def decode(codes, absmax, code_map, dtype) -> np.ndarray:
    """The values a uint8 block-quantised slot stands for, in `dtype`, shaped like `codes`."""
    flat = code_map.astype(dtype)[codes.reshape(-1)]
    n = flat.size
    scale = np.repeat(absmax.astype(dtype), BLOCK)[:n]
    return (flat * scale).reshape(codes.shape)


def encode(values, codes, absmax, code_map) -> None:
    """Store `values` into `codes` (uint8) and `absmax` (one per block), in place."""
    flat = values.reshape(-1)
    n = flat.size
    padded = np.zeros(absmax.size * BLOCK, flat.dtype)
    padded[:n] = flat
    top = np.abs(padded).reshape(-1, BLOCK).max(axis=1)
    absmax[...] = top
    scaled = padded.reshape(-1, BLOCK) / np.where(top > 0, top, 1)[:, None]
    idx = np.searchsorted(_EDGES[id(code_map)].astype(flat.dtype), scaled.reshape(-1)[:n])
    codes.reshape(-1)[...] = idx.astype(np.uint8)


def update(param, grad, state, step, hp, scratch):
    dt = param.dtype.type
    lr, b1, b2, eps, wd = hp["lr"], hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"]
    m = decode(state["m"], state["m_absmax"], SIGNED, param.dtype)
    v = decode(state["v"], state["v_absmax"], UNSIGNED, param.dtype)
    m *= dt(b1)
    m += dt(1 - b1) * grad
    v *= dt(b2)
    v += dt(1 - b2) * grad * grad
    denom = np.sqrt(v) / dt((1 - b2 ** step) ** 0.5) + dt(eps)
    if wd != 0:
        param *= dt(1 - lr * wd)
    param -= dt(lr / (1 - b1 ** step)) * m / denom
    encode(m, state["m"], state["m_absmax"], SIGNED)
    encode(v, state["v"], state["v_absmax"], UNSIGNED)


ADAMW_8BIT = Optimizer(
    name="adamw-8bit",
    summary="AdamW with m and v block-quantised to 8 bits (bitsandbytes' AdamW8bit: dynamic map, blocks of 256).",
    update=update,
    hyperparameters=(
        Hyperparameter("lr", 1e-3, "learning rate", minimum=0.0),
        Hyperparameter("beta1", 0.9, "decay of the first moment m", minimum=0.0, maximum=1.0, maximum_exclusive=True),
        Hyperparameter("beta2", 0.999, "decay of the second moment v", minimum=0.0, maximum=1.0,
                       maximum_exclusive=True),
        Hyperparameter("eps", 1e-8, "added to sqrt(v) after bias correction", minimum=0.0, minimum_exclusive=True),
        Hyperparameter("weight_decay", 1e-2, "decoupled weight decay", minimum=0.0),
    ),
    slots=(Slot("m", dtype="uint8"), Slot("m_absmax", domain="nonnegative", shape=blocks(BLOCK)),
           Slot("v", dtype="uint8"), Slot("v_absmax", domain="nonnegative", shape=blocks(BLOCK))),
    elementwise=False,
)


@hookimpl
def optreg_optimizers():
    return [ADAMW_8BIT]
