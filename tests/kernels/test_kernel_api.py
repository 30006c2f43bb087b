"""The plugin API's kernel fields, slot domains and their checks; statistics for kernels the fused
rewrite does not fit."""
import dataclasses

import numpy as np
import pytest

from optreg.plugins import DefinitionError, Hyperparameter, Optimizer, Slot, validate
from optreg.plugins.registry import Registry
from optreg.server.kernels import jit
from optreg.server.kernels import warmup
from optreg.server.kernels import apply as kernels
from optreg.server.kernels import stats as kernelstats

LR = (Hyperparameter("lr", 0.1, minimum=0.0),)


def sgd_update(param, grad, state, step, hp, scratch):
    (s,) = scratch
    np.multiply(grad, hp["lr"], out=s)
    param -= s


def sgd_kernel(p, g, c):
    lr = c[0]
    for i in range(p.size):
        p[i] = p[i] - g[i] * lr


def lr_scalars(hp, step):
    return (hp["lr"],)


def make(**kw):
    args = dict(name="k", summary="sgd with a kernel", update=sgd_update, hyperparameters=LR, scratch=1,
                kernel=sgd_kernel, kernel_scalars=lr_scalars)
    args.update(kw)
    return Optimizer(**args)


# ---- Slot.check and Optimizer.check_state -------------------------------------------

def test_slot_check_accepts_values_in_the_domain():
    assert Slot("v", domain="nonnegative").check("W", np.array([0.0, 1.0, 3e38, np.inf], np.float32), "adam") is None
    assert Slot("m").check("W", np.array([-1.0, 2.0, np.inf, -np.inf])) is None  # an overflowed accumulator


def test_slot_check_names_negative_values_in_a_nonnegative_slot():
    msg = Slot("v", domain="nonnegative").check("W", np.array([[1.0, -2.0], [-0.5, -np.inf]]), "adam")
    assert msg == "state v/W has 3 negative value(s); adam's v must be >= 0"


def test_slot_check_names_nan_in_any_slot():
    a = np.zeros(5, np.float32)
    a[[1, 3]] = np.nan
    msg = Slot("m").check("layer.0", a, "torch.adam")
    assert msg == "state m/layer.0 has 2 NaN value(s); torch.adam's m must be a number"


def test_slot_check_reads_bfloat16():
    import ml_dtypes
    a = np.array([1, -1], dtype=ml_dtypes.bfloat16)
    assert "1 negative" in Slot("h", domain="nonnegative").check("b", a)


def test_builtins_declare_their_nonnegative_slots():
    reg = Registry(autoload=False)
    nonneg = {(name, s.name) for name, r in reg.optimizers.items() for s in r.definition.slots
              if s.domain == "nonnegative"}
    assert nonneg == {("adam", "v"), ("adagrad", "h"), ("rmsprop", "h"), ("torch.adam", "v"),
                      ("torch.adam", "max_v"), ("adamw", "v"), ("adamw", "max_v"),
                      ("torch.rmsprop", "square_avg"), ("torch.adagrad", "sum"), ("adamw-bf16", "v"),
                      ("adamw-bf16", "max_v"), ("torch.adafactor", "row_var"), ("torch.adafactor", "col_var"),
                      ("torch.adafactor", "variance"), ("schedulefree.adamw", "exp_avg_sq"),
                      ("schedulefree.adamw", "weight_sum")}


def test_check_state_reports_the_first_bad_slot():
    adam = Registry(autoload=False).get("adam").definition
    good = {"m": np.array([-1.0, 1.0]), "v": np.array([0.0, 2.0])}
    assert adam.check_state("W", good) is None
    assert adam.check_state("W", {"m": good["m"], "v": np.array([-1e-30, 1.0])}) == (
        "state v/W has 1 negative value(s); adam's v must be >= 0")
    assert "m/W has 1 NaN" in adam.check_state("W", {"m": np.array([np.nan, 0.0]), "v": good["v"]})


# ---- validate --------------------------------------------------------------------------

@pytest.mark.parametrize("kw,message", [
    (dict(kernel_scalars=None), "needs kernel_scalars"),
    (dict(kernel=None), "kernel_scalars is declared without a kernel"),
    (dict(kernel="not a function"), "kernel must be a function"),
    (dict(elementwise=False), "needs elementwise=True"),
    (dict(kernel=lambda p, g, m, c: None), r"kernel takes 4 argument\(s\); it must take 3: \(p, g, c\)"),
    (dict(slots=(Slot("m"),)), r"kernel takes 3 argument\(s\); it must take 4: \(p, g, m, c\)"),
    (dict(kernel_scalars=lambda hp: ()), r"kernel_scalars must take \(hp, step\)"),
    (dict(deterministic=1), "deterministic must be True or False"),
    (dict(slots=(Slot("v", domain="positive"),), kernel=None, kernel_scalars=None), "domain 'positive'"),
    (dict(slots=(Slot("v", -1.0, "nonnegative"),), kernel=None, kernel_scalars=None), "starts at -1.0"),
])
def test_validate_refuses_bad_kernel_fields(kw, message):
    with pytest.raises(DefinitionError, match=message):
        validate(make(**kw))


def test_validate_accepts_a_kernel_and_a_nondeterministic_optimizer():
    validate(make())
    validate(make(kernel=None, kernel_scalars=None, deterministic=False))


# ---- statistics when the kernel's loop cannot be rewritten ------------------------------

def two_loops(p, g, c):
    lr = c[0]
    for i in range(p.size):
        p[i] = p[i] - g[i] * lr
    for i in range(0):  # a second loop: the rewrite declines, the block driver runs
        p[i] = p[i]


def with_continue(p, g, c):
    lr = c[0]
    for i in range(p.size):
        if g[i] == g[i] + 1:  # never true for finite g; `continue` alone makes the rewrite decline
            continue
        p[i] = p[i] - g[i] * lr


def test_the_rewrite_declines_what_it_cannot_fuse():
    assert kernelstats.fused_stats_source(sgd_kernel) is not None
    assert kernelstats.fused_stats_source(two_loops) is None
    assert kernelstats.fused_stats_source(with_continue) is None
    lr = 0.1

    def closure(p, g, c):
        for i in range(p.size):
            p[i] = p[i] - g[i] * lr
    assert kernelstats.fused_stats_source(closure) is None


def stored_twice(p, g, c):
    lr = c[0]
    for i in range(p.size):
        p[i] = p[i] - g[i] * lr
        p[i] = p[i] * c[1]  # reads the value just stored


def moves_i(p, g, c):
    for i in range(p.size):
        x = p[i]
        i = 0  # noqa: PLW2901 - p[i] below is another element
        p[i] = x - g[i] * c[0]


@pytest.mark.parametrize("blocked", [False, True])
def test_reads_of_p_before_its_store_use_the_value_read_first(blocked):
    """The rewrite reads p[i] once before the body (the statistics need it): reads of p[i] until the first
    store into p use that value; the ones after it, and any in a body that moves i, stay reads."""
    src = kernelstats.fused_stats_source(stored_twice, blocked=blocked)
    p = "_optreg_p" if blocked else "p"
    assert f"{p}[i] = _optreg_old - " in src and f"{p}[i] = {p}[i] * c[1]" in src
    src = kernelstats.fused_stats_source(moves_i, blocked=blocked)
    assert src is None or f"x = {p}[i]" in src


@pytest.mark.skipif(not jit.available(), reason="numba not installed")
@pytest.mark.parametrize("kernel,how", [(sgd_kernel, "fused"), (two_loops, "driver"), (with_continue, "driver")])
def test_statistics_from_the_driver_equal_numpy(kernel, how):
    defn = make(name=f"stats-{kernel.__name__}", kernel=kernel)
    rng = np.random.default_rng(9)
    n = (1 << 18) + 1001  # threaded, and not a multiple of the driver's block
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    kernels.apply(defn, p.copy(), g, {}, 1, {"lr": 0.1}, stats=np.zeros(4))  # queue the compiles
    assert jit.wait_idle(300)
    kernels.apply(defn, p.copy(), g, {}, 1, {"lr": 0.1}, stats=np.zeros(4))  # queue the statistics kernel
    assert jit.wait_idle(300)
    assert kernelstats.stats_status(defn) == how
    ref, old = p.copy(), p.copy()
    stats = np.zeros(4)
    kernels.apply(defn, p, g, {}, 1, {"lr": 0.1}, stats=stats)
    sgd_update(ref, g, {}, 1, {"lr": 0.1}, [np.empty_like(ref)])
    np.testing.assert_array_equal(p, ref)
    g64, n64, o64 = g.astype(np.float64), p.astype(np.float64), old.astype(np.float64)
    expected = [g64 @ g64, n64 @ n64, (n64 - o64) @ (n64 - o64), np.abs(g64).max()]
    # fused float32 sums are float32 within blocks of 512 (kernelstats._accumulate32: at most ~3.1e-5)
    np.testing.assert_allclose(stats, expected, rtol=4e-5 if how == "fused" else 1e-12, atol=0)
    assert stats[3] == expected[3]


def test_a_definition_copy_is_compiled_separately():
    """The cache is keyed by the definition, not by its update function."""
    adam = Registry(autoload=False).get("adam").definition
    twin = dataclasses.replace(adam, name="adam-twin")
    warmup.warm(block=True, definitions=[adam])
    if not jit.available():
        pytest.skip("numba not installed")
    assert jit.lookup(adam, np.dtype(np.float32)) is not None
    assert jit.lookup(twin, np.dtype(np.float32)) is None  # queued now, numpy meanwhile
    assert jit.wait_idle(300)
    assert jit.lookup(twin, np.dtype(np.float32)) is not None


@pytest.mark.skipif(not jit.available(), reason="numba not installed")
def test_warm_can_build_the_statistics_kernels_too():
    defn = make(name="warm-stats")
    warmup.warm(block=True, definitions=[defn], stats=True)
    assert jit.wait_idle(300)
    assert jit.status(defn) == "ready" and kernelstats.stats_status(defn) == "fused"


def refusing_kernel(p, g, c):
    for i in range(p.size):
        if g[i] != g[i]:
            raise ValueError("NaN")
        p[i] = p[i] - c[0] * g[i]


@pytest.mark.parametrize("jit", [False, None])
def test_the_conformance_kit_refuses_a_kernel_that_raises(jit):
    """Every optimizer's kernel may update a resident session in place and has its gradient's NaN found
    by the update pass (steps/resident.py, StepRun._checks_in_pass), built-in or not: the kit holds a
    third-party kernel to the contract that makes that safe."""
    from optreg.plugins.testing import check_kernel
    with pytest.raises(AssertionError, match="must never raise"):
        check_kernel(make(name="refusing", kernel=refusing_kernel), jit=jit)
    check_kernel(make(name="total", kernel=sgd_kernel), jit=jit)  # the same loop without the raise passes
