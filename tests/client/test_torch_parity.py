"""The torch.* optimizers (and adamw) against real torch.optim, float32, 100+ steps.

Both sides see the same gradients; ours run through the registry exactly as the
server runs them (state from the declared slots, scratch as declared, the session's
1-based step). Every case changes the learning rate mid-run.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from optreg.plugins.registry import Registry  # noqa: E402

REGISTRY = Registry(autoload=False)
SHAPES = [(1,), (7,), (3, 5), (2, 3, 4), (64, 33)]
STEPS = 120
LR_CHANGE_AT = 50  # the new lr applies from this step on
# rtol 1e-6, elementwise, relative to the distance each element has travelled
# (|p0| + the sum of its step sizes): torch's CPU kernels fuse some multiply-adds
# (one rounding) where numpy rounds twice, a fraction of an ulp of every step, so an
# element that large steps carried near zero keeps an error of the steps' size.
RTOL = 1e-6

TORCH_CLASS = {
    "torch.adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "torch.sgd": torch.optim.SGD,
    "torch.rmsprop": torch.optim.RMSprop,
    "torch.adagrad": torch.optim.Adagrad,
}
# Our slot name -> torch's state key, to compare state as well as parameters.
TORCH_STATE = {
    "m": "exp_avg", "v": "exp_avg_sq", "max_v": "max_exp_avg_sq",
    "momentum_buffer": "momentum_buffer", "square_avg": "square_avg", "grad_avg": "grad_avg", "sum": "sum",
}

CASES = [
    ("torch.adam", {}),
    ("torch.adam", {"amsgrad": True}),
    ("torch.adam", {"weight_decay": 0.1}),
    ("torch.adam", {"amsgrad": True, "weight_decay": 0.05, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "lr": 1e-2}),
    ("adamw", {}),
    ("adamw", {"amsgrad": True}),
    ("adamw", {"weight_decay": 0.1, "lr": 1e-2}),
    ("torch.sgd", {}),
    ("torch.sgd", {"weight_decay": 0.1}),
    ("torch.sgd", {"momentum": 0.9}),
    ("torch.sgd", {"momentum": 0.9, "dampening": 0.3}),
    ("torch.sgd", {"momentum": 0.9, "nesterov": True}),
    ("torch.sgd", {"momentum": 0.5, "nesterov": True, "weight_decay": 0.01, "lr": 1e-2}),
    ("torch.rmsprop", {}),
    ("torch.rmsprop", {"centered": True}),
    ("torch.rmsprop", {"momentum": 0.9}),
    ("torch.rmsprop", {"centered": True, "momentum": 0.5, "weight_decay": 0.01}),
    ("torch.rmsprop", {"alpha": 0.9, "eps": 1e-6, "lr": 1e-3}),
    ("torch.adagrad", {}),
    ("torch.adagrad", {"lr_decay": 0.01}),
    ("torch.adagrad", {"initial_accumulator_value": 0.1}),
    ("torch.adagrad", {"weight_decay": 0.01, "lr_decay": 0.05, "initial_accumulator_value": 0.5}),
    ("torch.adagrad", {"eps": 1e-6, "lr": 0.1}),
]


def torch_kwargs(hp):
    kw = {k: v for k, v in hp.items() if k not in ("beta1", "beta2")}
    if "beta1" in hp:
        kw["betas"] = (hp["beta1"], hp["beta2"])
    return kw


def gradients(rng, step):
    # The scale swings over the run so the squared-gradient averages fall as well as
    # rise (AMSGrad's maximum then matters), and a few entries are tiny (eps matters).
    scale = 1.0 + 0.9 * np.sin(step / 7.0)
    grads = []
    for shape in SHAPES:
        g = rng.standard_normal(shape).astype(np.float32) * np.float32(scale)
        g.reshape(-1)[::5] *= np.float32(1e-5)
        grads.append(g)
    return grads


@pytest.mark.parametrize("name,overrides", CASES, ids=[f"{n}-{o}" for n, o in CASES])
def test_matches_torch_optim(name, overrides):
    definition = REGISTRY.get(name).definition
    hp = definition.resolve(overrides)
    rng = np.random.default_rng(5)
    params = [rng.standard_normal(shape).astype(np.float32) for shape in SHAPES]
    states = [{s.name: np.full_like(p, s.initial_value) for s in definition.slots} for p in params]
    scratch = [[np.empty_like(p) for _ in range(definition.scratch)] for p in params]

    tparams = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
    topt = TORCH_CLASS[name](tparams, **torch_kwargs(hp))

    travelled = [np.abs(p).astype(np.float64) for p in params]
    new_lr = hp["lr"] * 0.3
    for step in range(1, STEPS + 1):
        if step == LR_CHANGE_AT:
            hp = definition.resolve({"lr": new_lr}, base=hp)
            for group in topt.param_groups:
                group["lr"] = new_lr
        grads = gradients(rng, step)
        for p, g, st, sc in zip(params, grads, states, scratch):
            g.flags.writeable = False  # the contract: grad is read-only
            definition.update(p, g, st, step, hp, sc)
        before = [tp.detach().numpy().copy() for tp in tparams]
        for tp, g in zip(tparams, grads):
            tp.grad = torch.from_numpy(g.copy())
        topt.step()
        for i, (p, tp) in enumerate(zip(params, tparams)):
            expected = tp.detach().numpy()
            travelled[i] += np.abs(expected - before[i])
            error = np.abs(p.astype(np.float64) - expected)
            worst = np.argmax(error - RTOL * travelled[i])
            assert (error <= RTOL * travelled[i]).all(), (
                f"{name} {overrides} param {i} at step {step}: element {worst} is {p.flat[worst]!r}, "
                f"torch has {expected.flat[worst]!r}, allowed error {RTOL * travelled[i].flat[worst]:.3g}")

    for i, (st, tp) in enumerate(zip(states, tparams)):
        tstate = topt.state[tp]
        for slot, arr in st.items():
            key = TORCH_STATE[slot]
            if key in tstate and isinstance(tstate[key], torch.Tensor):
                # Buffers are sums of terms of both signs: judge their rounding on their own scale.
                expected = tstate[key].numpy()
                np.testing.assert_allclose(arr, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max(),
                                           err_msg=f"{name} {overrides} slot {slot} of param {i}")
    assert all(p.dtype == np.float32 for p in params)


def one_step(name, grad, lr):
    definition = REGISTRY.get(name).definition
    p = np.zeros(1, np.float64)
    state = {s.name: np.full_like(p, s.initial_value) for s in definition.slots}
    scratch = [np.empty_like(p) for _ in range(definition.scratch)]
    definition.update(p, np.full_like(p, grad), state, 1, definition.resolve({"lr": lr}), scratch)
    return -p[0]


def test_book_adam_and_torch_adam_differ_for_a_tiny_gradient():
    g, lr = 1e-6, 1e-3
    book, ours = one_step("adam", g, lr), one_step("torch.adam", g, lr)
    # The book: lr_t = lr*sqrt(1-b2)/(1-b1); step = lr_t*m/(sqrt(v)+1e-7), m and v uncorrected.
    m, v = 0.1 * g, 0.001 * g * g
    assert book == pytest.approx(lr * 0.001 ** 0.5 / 0.1 * m / (v ** 0.5 + 1e-7), rel=1e-9)
    assert book == pytest.approx(2.4e-4, rel=0.01)  # the figure docs/plugins.md quotes
    # torch: corrected m and v are g and g*g, so step = lr*g/(g + 1e-8), about 9.9e-4.
    assert ours == pytest.approx(lr * g / (g + 1e-8), rel=1e-9)
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    p.grad = torch.full((1,), g, dtype=torch.float64)
    torch.optim.Adam([p], lr=lr).step()
    assert ours == pytest.approx(-p.item(), rel=1e-12)
    assert ours > 3.5 * book
