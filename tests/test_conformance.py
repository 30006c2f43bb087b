"""The conformance kit over every registered optimizer, and the kit against broken ones
(each check must be able to fail)."""
import numpy as np
import pytest

from optreg.plugins import Hyperparameter, Optimizer, Slot
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
]


@pytest.mark.parametrize("check,definition,message", BROKEN,
                         ids=[f"{c}-{d.update.__name__}" for c, d, _ in BROKEN])
@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_the_kit_catches(check, definition, message):
    _hidden.clear()
    with pytest.raises(AssertionError, match=message):
        kit.CHECKS[check](definition)


def test_a_correct_optimizer_passes_every_check():
    kit.check_all(make(sgd))
