"""The conformance kit over every registered optimizer, and the kit against broken ones
(each check must be able to fail)."""
import numpy as np
import pytest

from optreg.plugins import Hyperparameter, Optimizer, Slot, layouts, matrices, per_dimension, rows
from optreg.plugins import testing as kit
from optreg.plugins.registry import Registry

REGISTRY = Registry()  # built-ins, plus whatever plugins this environment has installed


class TestEveryRegisteredOptimizer(kit.OptimizerConformance):
    @pytest.fixture(params=sorted(REGISTRY.optimizers))
    def definition(self, request):
        return REGISTRY.get(request.param).definition


def test_the_builtins_load_without_failures():
    # Built-ins only: an environment may hold deliberately broken plugins (contained failures).
    assert Registry(autoload=False).failures == []


def test_every_builtin_is_covered():
    names = set(REGISTRY.optimizers)
    assert {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam",
            "torch.adam", "adamw", "torch.sgd", "torch.rmsprop", "torch.adagrad"} <= names


# ---- broken optimizers: the kit must catch each ----------------------------------

LR = (Hyperparameter("lr", 0.01, "learning rate", minimum=0.0),)


def sgd(param, grad, state, step, hp, scratch):
    param -= hp["lr"] * grad


def make(update, **kw):
    args = dict(name="broken", summary="a broken optimizer", update=update, hyperparameters=LR)
    args.update(kw)
    return Optimizer(**args)


def writes_grad(param, grad, state, step, hp, scratch):
    grad *= hp["lr"]
    param -= grad


def not_in_place(param, grad, state, step, hp, scratch):
    param = param - hp["lr"] * grad  # rebinds the name; the server's array never changes  # noqa: F841


def writes_neighbours(param, grad, state, step, hp, scratch):
    param -= hp["lr"] * grad
    if param.base is not None:
        param.base[0] = 0.0


def replaces_state(param, grad, state, step, hp, scratch):
    state["v"] = 0.9 * state["v"] + grad
    param -= hp["lr"] * state["v"]


_hidden = {}


def hidden_state(param, grad, state, step, hp, scratch):
    # keeps a velocity outside the declared slots, keyed on the array's size
    v = _hidden.setdefault(param.size, np.zeros(param.size))
    v *= 0.9
    v += grad.reshape(-1)
    param -= hp["lr"] * v.reshape(param.shape)


def global_norm(param, grad, state, step, hp, scratch):
    param -= hp["lr"] * grad / max(1.0, float(np.linalg.norm(grad)) / 10)


def ascends(param, grad, state, step, hp, scratch):
    param += hp["lr"] * grad


def float32_only(param, grad, state, step, hp, scratch):
    # a kernel tuned for float32 whose float64 path is a different formula
    scale = 1.0 if param.dtype == np.float32 else 1.01
    param -= hp["lr"] * scale * grad


def no_eps(param, grad, state, step, hp, scratch):
    state["h"] += grad * grad
    param -= hp["lr"] * grad / np.sqrt(state["h"])


def reads_scratch_first(param, grad, state, step, hp, scratch):
    (s,) = scratch
    s += grad  # assumes scratch starts at zero
    param -= hp["lr"] * s


def noisy(param, grad, state, step, hp, scratch):
    # declared deterministic (the default) but adds unseeded noise: a replayed log would diverge
    param -= hp["lr"] * (grad * (1 + 1e-6 * np.random.default_rng().standard_normal(grad.shape)))


def lr_scalars(hp, step):
    return (hp["lr"],)


def k_literal(p, g, c):
    # a constant written as a Python float: numba then computes in float64
    for i in range(p.size):
        p[i] = p[i] - 0.01 * g[i]


def k_reordered(p, g, c):
    lr = c[0]
    for i in range(p.size):
        p[i] = (p[i] / lr - g[i]) * lr


def k_uncompilable(p, g, c):
    lr = c[0]
    for i in range(p.size):
        p[i] = p[i] - g[i] * lr
    print(object())


def k_sgd(p, g, c):
    lr = c[0]
    for i in range(p.size):
        p[i] = p[i] - g[i] * lr


def sgd_book(param, grad, state, step, hp, scratch):
    (s,) = scratch
    np.multiply(grad, hp["lr"], out=s)
    param -= s


def resizes_row_slot(param, grad, state, step, hp, scratch):
    # contract v2: a factored slot widened to the parameter's shape (gives up the memory it exists for)
    state["r"] = np.zeros_like(param)
    param -= hp["lr"] * grad


def widens_bf16_slot(param, grad, state, step, hp, scratch):
    state["m"] = state["m"].astype(param.dtype)  # the bfloat16 slot replaced by a master-dtype one
    param -= hp["lr"] * grad


def k_sgd_m(p, g, m, c):
    for i in range(p.size):
        p[i] = p[i] - g[i] * c[0]


def refuses_all(name, shape):
    return "refuses everything"


class UncheckedHyperparameter(Hyperparameter):
    def coerce(self, value, optimizer=""):
        return value


BROKEN = [
    ("in_place", make(writes_grad), "grad"),
    ("in_place", make(not_in_place), "not updated in place"),
    ("in_place", make(writes_neighbours), "outside"),
    ("in_place", make(replaces_state, slots=(Slot("v"),)), "replaced"),
    ("state_round_trip", make(hidden_state), "diverged"),
    ("sliced", make(global_norm), "elementwise"),
    ("decreases_quadratic", make(ascends), "convex quadratic"),
    ("dtypes", make(float32_only), "differ"),
    ("zero_gradients", make(no_eps, slots=(Slot("h"),)), "non-finite"),
    ("state_round_trip", make(reads_scratch_first, scratch=1), "scratch"),
    ("bad_hyperparameters",
     make(sgd, hyperparameters=(UncheckedHyperparameter("lr", 0.01, minimum=0.0),)), "accepted lr"),
    ("defaults", make(sgd, hyperparameters=(Hyperparameter("nesterov", 1, type=bool),)), "declared bool"),
    ("definition", make(lambda param, grad: None), "must accept"),
    ("definition", make(sgd, name="Bad Name"), "invalid definition"),
    ("definition", make(sgd, kernel=k_sgd), "kernel_scalars"),
    ("kernel", make(sgd_book, scratch=1, kernel=k_reordered, kernel_scalars=lr_scalars), "differs"),
    ("deterministic", make(noisy), "deterministic=True"),
    ("layouts", make(resizes_row_slot, slots=(Slot("r", shape=rows),), elementwise=False), "slot r"),
    ("layouts", make(widens_bf16_slot, slots=(Slot("m", dtype="bfloat16"),)), "slot m"),
    ("layouts", make(sgd, accepts=lambda name, shape: "two\nlines"), "one-line reason"),
    ("layouts", make(sgd, accepts=refuses_all), "refuses every shape"),
    ("definition", make(sgd, slots=(Slot("r", shape=rows),)), "elementwise=False"),
    ("definition", make(sgd, slots=(Slot("m", dtype="float16"),)), "bfloat16, float64"),
    ("definition", make(sgd_book, scratch=1, kernel=k_sgd_m, kernel_scalars=lr_scalars,
                        slots=(Slot("m", dtype="float64"),)), "drop the kernel"),
]
NEEDS_NUMBA = [
    # pure Python computes np.float32 * 0.01 in float32 (numpy 2's weak scalars): only numba shows it
    ("kernel", make(sgd_book, scratch=1, kernel=k_literal, kernel_scalars=lr_scalars), "float literal"),
    ("kernel", make(sgd_book, scratch=1, kernel=k_uncompilable, kernel_scalars=lr_scalars), "compiled with numba"),
]


@pytest.mark.parametrize("check,definition,message", BROKEN,
                         ids=[f"{c}-{d.update.__name__}" for c, d, _ in BROKEN])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_the_kit_catches(check, definition, message):
    _hidden.clear()
    with pytest.raises(AssertionError, match=message):
        kit.CHECKS[check](definition)


@pytest.mark.parametrize("check,definition,message", NEEDS_NUMBA,
                         ids=[f"{c}-{d.kernel.__name__}" for c, d, _ in NEEDS_NUMBA])
def test_the_kit_catches_with_numba(check, definition, message):
    pytest.importorskip("numba")
    with pytest.raises(AssertionError, match=message):
        kit.CHECKS[check](definition)


def test_a_correct_optimizer_passes_every_check():
    kit.check_all(make(sgd))


def preconditioned(param, grad, state, step, hp, scratch):
    # a Shampoo-like whole-tensor update over [n, n] statistics per dimension (contract v2)
    if param.ndim < 2:
        param -= hp["lr"] * grad
        return
    left, right = matrices(state["stats"], param.shape)
    left += grad @ grad.T
    right += grad.T @ grad
    scale = 1.0 / (np.sqrt(np.trace(left) * np.trace(right)) ** 0.5 + 1e-12)
    param -= hp["lr"] * scale * grad


def test_a_whole_tensor_optimizer_with_per_dimension_matrices_passes_every_check():
    defn = make(preconditioned, slots=(Slot("stats", shape=per_dimension, domain="real"),), elementwise=False,
                accepts=lambda name, shape: None if len(shape) == 2 else "matrices only")
    kit.check_all(defn)
    assert layouts(defn, {"W": (3, 5)}, np.float32) == {"stats": {"W": ((34,), np.dtype(np.float32))}}



def test_every_k_steps_is_declared_checked_and_run_by_the_kit():
    from optreg.plugins import DefinitionError, validate

    k = Hyperparameter("k", 2, "refresh every k steps", type=int, minimum=1)
    refreshed = []

    def refresh(param, grad, state, step, hp):
        refreshed.append(step)

    def writes_param(param, grad, state, step, hp):
        param *= 0.5  # the refresh may write slots only: the kit hands it a read-only param

    ok = make(sgd, hyperparameters=LR + (k,), elementwise=False, every=("k", refresh))
    kit.check_state_round_trip(ok)
    assert refreshed[:2] == [2, 4]
    with pytest.raises(AssertionError, match="refresh wrote to param or grad"):
        kit.check_in_place(make(sgd, hyperparameters=LR + (k,), elementwise=False, every=(1, writes_param)))
    for bad in [dict(every=("k", refresh)),  # elementwise (the default)
                dict(every=("lr", refresh), elementwise=False),  # not an int hyperparameter
                dict(every=(0, refresh), elementwise=False), dict(every=(2, None), elementwise=False),
                dict(every=refresh, elementwise=False)]:
        with pytest.raises(DefinitionError, match="every"):
            validate(make(sgd, hyperparameters=LR + (k,), **bad))


@pytest.mark.parametrize("jit", [True, False], ids=["numba", "plain-python"])
def test_a_correct_kernel_passes_both_ways(jit):
    if jit:
        pytest.importorskip("numba")
    kit.check_kernel(make(sgd_book, scratch=1, kernel=k_sgd, kernel_scalars=lr_scalars), jit=jit)


def test_a_nondeterministic_optimizer_that_says_so_passes():
    kit.check_all(make(noisy, deterministic=False))
