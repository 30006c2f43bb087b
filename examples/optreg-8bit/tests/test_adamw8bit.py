"""8-bit AdamW against a float64 AdamW written plainly, and against bitsandbytes' own AdamW8bit (its CPU
backend) when bitsandbytes is installed."""
import importlib.metadata

import numpy as np
import pytest

from optreg.plugins.testing import OptimizerConformance, new_state
from optreg_8bit import ADAMW_8BIT, BLOCK, SIGNED, UNSIGNED, decode, encode

HP = ADAMW_8BIT.resolve({"lr": 1e-2, "weight_decay": 0.1})
# The bound: one encode moves a value by at most half the widest gap of the map times its block's absmax
# (nearest code; the widest gap, 0.0141 signed and 0.0070 unsigned, is between 0.98 and 1). Carried
# through m_hat / sqrt(v_hat), where a small element of a block keeps fewer significant bits than its
# largest one, that leaves each element's step within 10% of lr of float64 AdamW's on average over a run,
# plus one whole step (lr) for an element whose v is so small in its first steps that its code decides
# the step. After t steps: |p - p_float64| <= lr * (1 + 0.1 t). Measured over three seeds: ours within
# lr * 0.044 t; bitsandbytes' own AdamW8bit within lr * (0.17 + 0.1 t).


def bound(t):
    return HP["lr"] * (1 + 0.1 * t)


class TestAdamW8bitConformance(OptimizerConformance):
    optimizer = ADAMW_8BIT


def run(steps=100, shape=(40, 33), seed=0):
    """(p0, grads): gradients whose rows differ in scale by 300x, so blocks mix large and small values."""
    rng = np.random.default_rng(seed)
    p0 = rng.standard_normal(shape).astype(np.float32)
    return p0, [(rng.standard_normal(shape) * rng.uniform(0.01, 3, (shape[0], 1))).astype(np.float32)
                for _ in range(steps)]


def adamw_float64(p0, grads, hp):
    """torch.optim.AdamW's formula in float64, one trajectory point per step."""
    p, m, v, out = p0.astype(np.float64), 0.0, 0.0, []
    b1, b2 = hp["beta1"], hp["beta2"]
    for t, g in enumerate(grads, 1):
        g = g.astype(np.float64)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p * (1 - hp["lr"] * hp["weight_decay"])
        p = p - hp["lr"] / (1 - b1 ** t) * m / (np.sqrt(v) / np.sqrt(1 - b2 ** t) + hp["eps"])
        out.append(p)
    return out


def eight_bit(p0, grads, hp):
    p, state, out = p0.copy(), new_state(ADAMW_8BIT, p0), []
    for t, g in enumerate(grads, 1):
        ADAMW_8BIT.update(p, g, state, t, hp, [])
        out.append(p.copy())
    return out, state


def test_state_is_8_bit_codes_and_a_scale_per_block():
    p0, grads = run(steps=3, shape=(300, 10))
    _, state = eight_bit(p0, grads, HP)
    assert state["m"].dtype == state["v"].dtype == np.uint8 and state["m"].shape == (300, 10)
    assert state["m_absmax"].shape == state["v_absmax"].shape == (12,)  # ceil(3000 / 256)


def test_one_encode_is_within_half_the_widest_gap():
    rng = np.random.default_rng(3)
    x = rng.standard_normal(3000) * rng.uniform(1e-4, 10, 3000)
    for code_map, values in ((SIGNED, x), (UNSIGNED, np.abs(x))):
        codes, absmax = np.zeros(values.shape, np.uint8), np.zeros(-(-values.size // BLOCK))
        encode(values, codes, absmax, code_map)
        err = np.abs(decode(codes, absmax, code_map, np.float64) - values)
        half_gap = np.diff(code_map).max() / 2
        assert (err <= np.repeat(absmax, BLOCK)[:values.size] * half_gap * (1 + 1e-6)).all()


def test_close_to_float64_adamw():
    p0, grads = run()
    ours, _ = eight_bit(p0, grads, HP)
    for t, (got, want) in enumerate(zip(ours, adamw_float64(p0, grads, HP)), 1):
        assert np.abs(got - want).max() <= bound(t), t


def test_against_bitsandbytes_adamw8bit():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install bitsandbytes)")
    import torch
    from bitsandbytes import functional as F

    # the same dynamic maps (numpy's linspace and torch's differ in the last bit of a few values)
    for signed, ours in ((True, SIGNED), (False, UNSIGNED)):
        np.testing.assert_allclose(F.create_dynamic_map(signed=signed).numpy(), ours, rtol=0, atol=6e-8)
    # one encode: bitsandbytes' CPU quantiser picks the nearest code but for a few values near a midpoint;
    # ours (the nearest) is never farther from the value
    x = (np.random.default_rng(1).standard_normal(5000) * np.linspace(1e-3, 3, 5000)).astype(np.float32)
    codes, absmax = np.zeros(x.shape, np.uint8), np.zeros(-(-x.size // BLOCK), np.float32)
    encode(x, codes, absmax, SIGNED)
    q, s = F.quantize_blockwise(torch.from_numpy(x), code=F.create_dynamic_map(signed=True), blocksize=BLOCK)
    np.testing.assert_array_equal(s.absmax.numpy(), absmax)
    assert np.mean(codes == q.numpy()) > 0.99
    theirs = F.dequantize_blockwise(q, s).numpy()
    slack = np.repeat(absmax, BLOCK)[:x.size] * 1e-6  # (their decode multiplies in another order)
    assert (np.abs(decode(codes, absmax, SIGNED, np.float32) - x) <= np.abs(theirs - x) + slack).all()
    # a run: both within the bound of float64 AdamW, and of each other
    p0, grads = run()
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    opt = bnb.optim.AdamW8bit([tp], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), eps=HP["eps"],
                              weight_decay=HP["weight_decay"], min_8bit_size=0)
    ours, _ = eight_bit(p0, grads, HP)
    for t, (g, got, want) in enumerate(zip(grads, ours, adamw_float64(p0, grads, HP)), 1):
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
        ref = tp.detach().numpy()
        assert opt.state[tp]["state1"].dtype == torch.uint8
        assert np.abs(ref - want).max() <= bound(t), t
        assert np.abs(got - ref).max() <= bound(t), t


def test_registered_through_its_entry_point():
    try:
        importlib.metadata.distribution("optreg-8bit")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("optreg-8bit is not installed (pip install -e examples/optreg-8bit)")
    from optreg.plugins.registry import Registry
    registered = Registry().get("adamw-8bit")
    assert registered.distribution == "optreg-8bit" and registered.plugin == "adamw8bit"
