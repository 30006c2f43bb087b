"""A conformance kit for optimizer plugins: what optreg's server relies on, as tests.

In a plugin package's tests (pytest)::

    from optreg.plugins.testing import OptimizerConformance
    from optreg_lion import LION

    class TestLionConformance(OptimizerConformance):
        optimizer = LION                  # a definition, or a registered name
        hyperparameters = {"lr": 1e-3}    # optional: overrides for the behaviour checks

An optimizer that declares a kernel (`Optimizer.kernel`) is also checked to give
its update's numbers bit for bit (compiled with numba when it is installed, as the
server compiles it; the plain Python loop otherwise), and every optimizer declaring
`deterministic=True` to give the same bits from the same inputs.

Each check is also a plain function (``check_*``, taking the definition and the
overrides) that raises AssertionError saying what is wrong, so it can be used
without pytest's class machinery. The checks call ``update`` the way the server
does: grad is a read-only array, state arrays come from the declared slots, scratch
from the declared count, step is 1-based and shared by all parameters.

Needs pytest (a test dependency, not a runtime one).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Mapping

import numpy as np
import pytest

from optreg.plugins.api import DefinitionError, HyperparameterError, Optimizer, kernel_constants, kernel_slots, validate

__all__ = ["OptimizerConformance", "CHECKS", "check_all", "new_state", "new_scratch", "quadratic"] + [
    f"check_{name}" for name in ("definition", "defaults", "bad_hyperparameters", "decreases_quadratic", "in_place",
                                 "state_round_trip", "sliced", "dtypes", "zero_gradients", "kernel",
                                 "deterministic", "catch_up", "layouts")] + ["problem_shape"]


# ---- helpers -------------------------------------------------------------------

def new_state(definition: Optimizer, like: np.ndarray) -> dict[str, np.ndarray]:
    """State arrays as the server allocates them: one per slot, in its declared shape and dtype
    (Slot.layout; the parameter's by default), filled with its initial value."""
    return {s.name: np.full_like(like, s.initial_value) if s.standard
            else np.full(*s.layout(like.shape, like.dtype)[:1], s.initial_value, s.layout(like.shape, like.dtype)[1])
            for s in definition.slots}


def problem_shape(definition: Optimizer, n: int) -> tuple:
    """A shape of n elements the optimizer applies to (Optimizer.accepts): (n,), else the squarest
    matrix (an optimizer of 2-D weights, such as Muon)."""
    if definition.accepts is None or definition.accepts("x", (n,)) is None:
        return (n,)
    rows = max(d for d in range(1, int(n ** 0.5) + 1) if n % d == 0)
    return (rows, n // rows)


def _shaped(definition: Optimizer, x: np.ndarray, *more: np.ndarray):
    """x (and `more`, flat arrays of its size) in problem_shape."""
    shape = problem_shape(definition, x.size)
    return tuple(a.reshape(shape) for a in (x, *more))


def new_scratch(definition: Optimizer, like: np.ndarray, fill: float = np.nan) -> list[np.ndarray]:
    # NaN-filled by default: an update that reads scratch before writing it shows up as NaN.
    return [np.full_like(like, fill) for _ in range(definition.scratch)]


def quadratic(size: int, dtype=np.float64, seed: int = 0):
    """x0 and the gradient of f(x) = 0.5*sum(a*x*x), a in [0.5, 2): a convex test problem."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 2.0, size).astype(dtype)
    x0 = rng.standard_normal(size).astype(dtype)
    return x0, a


def _read_only(array: np.ndarray) -> np.ndarray:
    view = array.view()
    view.flags.writeable = False  # the server's gradients are views of received bytes
    return view


def _step(definition, param, grad, state, step, hp, scratch):
    if definition.refresh_due(step, hp):  # Optimizer.every's work, before the update, as the server runs it
        try:
            definition.every[1](_read_only(param), _read_only(grad), state, step, hp)
        except ValueError as e:
            if "read-only" in str(e):
                raise AssertionError(f"{definition.name}: every's refresh wrote to param or grad, which are "
                                     f"read-only to it (it updates slots only): {e}") from e
            raise
    try:
        definition.update(param, _read_only(grad), state, step, hp, scratch)
    except ValueError as e:
        if "read-only" in str(e):
            raise AssertionError(f"{definition.name}: update wrote to grad, which is read-only: {e}") from e
        raise


def _run(definition, param, grad_of, state, hp, steps, first_step=1, scratch=None):
    scratch = new_scratch(definition, param) if scratch is None else scratch
    for step in range(first_step, first_step + steps):
        _step(definition, param, grad_of(param), state, step, hp, scratch)


def _hp(definition: Optimizer, overrides: Mapping[str, Any] | None) -> dict:
    given = dict(overrides or {})
    every = definition.every[0] if definition.every else None
    if isinstance(every, str) and every not in given:  # the refresh runs within the checks' few steps
        given[every] = min(2, next(h.default for h in definition.hyperparameters if h.name == every))
    return definition.resolve(given)


# ---- the checks ----------------------------------------------------------------

def check_definition(definition: Optimizer, overrides=None) -> None:
    """The registry would accept it, and update takes the six arguments the server passes."""
    try:
        validate(definition)
    except DefinitionError as e:
        raise AssertionError(f"invalid definition: {e}") from e
    try:
        inspect.signature(definition.update).bind(None, None, None, None, None, None)
    except TypeError as e:
        raise AssertionError(
            f"{definition.name}: update must accept (param, grad, state, step, hp, scratch): {e}") from e
    except ValueError:
        pass  # no signature to inspect (a builtin or C function): nothing to check


def check_defaults(definition: Optimizer, overrides=None) -> None:
    """Each default is valid and already of its declared type (it is listed to clients as is)."""
    for h in definition.hyperparameters:
        try:
            value = h.coerce(h.default, definition.name)
        except HyperparameterError as e:
            raise AssertionError(f"default out of bounds: {e}") from e
        wanted = {bool: (bool,), int: (int,), float: (float, int)}[h.type]
        assert isinstance(h.default, wanted) and (h.type is bool or not isinstance(h.default, bool)), (
            f"{definition.name}: default of {h.name} is {h.default!r} ({type(h.default).__name__}), "
            f"declared {h.type.__name__}")
        assert value == h.default, f"{definition.name}: default of {h.name} changes when validated: {value!r}"
    resolved = definition.resolve({})
    assert set(resolved) == set(definition.hyperparameter_names), f"{definition.name}: resolve({{}}) = {resolved}"


def _bad_values(h) -> list[tuple[Any, str]]:
    bad = [(math.nan, "NaN"), (math.inf, "infinity"), ("not a number", "a string"), (None, "None")]
    if h.minimum is not None:
        bad.append((h.minimum if h.minimum_exclusive else h.minimum - max(1.0, abs(h.minimum)), "below minimum"))
    if h.maximum is not None:
        bad.append((h.maximum if h.maximum_exclusive else h.maximum + max(1.0, abs(h.maximum)), "above maximum"))
    if h.type is bool:
        bad.append((2, "neither 0 nor 1"))
    if h.type is int:
        bad.append((1.5, "not an integer"))
    return bad


def check_bad_hyperparameters(definition: Optimizer, overrides=None) -> None:
    """Out-of-bounds, NaN, infinite, wrongly typed and unknown values are refused, naming the field."""
    base = definition.resolve({})
    before = dict(base)
    for h in definition.hyperparameters:
        for value, why in _bad_values(h):
            try:
                definition.resolve({h.name: value}, base)
            except HyperparameterError as e:
                assert h.name in str(e), f"{definition.name}: error for {h.name}={value!r} does not name it: {e}"
            else:
                raise AssertionError(f"{definition.name}: accepted {h.name}={value!r} ({why})")
            assert base == before, f"{definition.name}: a refused {h.name} changed the base values"
    with pytest.raises(HyperparameterError):
        definition.resolve({"no_such_hyperparameter": 1.0})


def check_decreases_quadratic(definition: Optimizer, overrides=None, steps: int = 100) -> None:
    """After `steps` steps on f = 0.5*sum(a*x*x) the loss is finite and lower."""
    hp = _hp(definition, overrides)
    x, a = _shaped(definition, *quadratic(64))
    f0 = 0.5 * float(np.sum(a * x * x))
    state = new_state(definition, x)
    _run(definition, x, lambda p: a * p, state, hp, steps)
    f = 0.5 * float(np.sum(a * x * x))
    assert math.isfinite(f) and f < f0 * (1 - 1e-3), (
        f"{definition.name} {hp}: f went from {f0:.6g} to {f:.6g} in {steps} steps on a convex quadratic "
        "(too small or too large a learning rate? set `hyperparameters` in the test class)")


def check_in_place(definition: Optimizer, overrides=None) -> None:
    """update writes param and its state in place and nothing else (not grad, not its neighbours)."""
    hp = _hp(definition, overrides)
    hp_before = dict(hp)
    shape, guard, rng = (4, 5), 3, np.random.default_rng(1)
    n = math.prod(shape)

    def guarded(values):  # an array that is a view into a buffer with guard elements each side
        buffer = rng.standard_normal(n + 2 * guard)
        buffer[guard:guard + n] = values.reshape(-1)
        return buffer, buffer[guard:guard + n].reshape(shape)

    x, a = quadratic(n)
    pbuf, param = guarded(x)
    gbuf, grad = guarded(a * x)
    state, sbufs = {}, {}
    for name, init in new_state(definition, param).items():
        buffer = np.zeros(init.size + 2 * guard, init.dtype)  # a view with guard elements, as above
        buffer[:guard], buffer[-guard:] = 3, 7  # (fits any slot dtype, uint8 codes too)
        buffer[guard:guard + init.size] = init.reshape(-1)
        sbufs[name], state[name] = buffer, buffer[guard:guard + init.size].reshape(init.shape)
    keep = {"param": pbuf.copy(), "grad": gbuf.copy(), **{f"slot {k}": b.copy() for k, b in sbufs.items()}}
    arrays = dict(state)
    start = param.copy()
    scratch = new_scratch(definition, param)
    for step in (1, 2, 3):
        _step(definition, param, grad, state, step, hp, scratch)
    assert not np.array_equal(param, start), (
        f"{definition.name}: param unchanged after 3 steps with a non-zero gradient (not updated in place?)")
    for label, buf in [("param", pbuf), ("grad", gbuf)] + [(f"slot {k}", b) for k, b in sbufs.items()]:
        old = keep[label]
        assert np.array_equal(buf[:guard], old[:guard]) and np.array_equal(buf[-guard:], old[-guard:]), (
            f"{definition.name}: update wrote outside the {label} array it was given")
    assert np.array_equal(gbuf, keep["grad"]), f"{definition.name}: update changed grad"
    assert set(state) == set(arrays) and all(state[k] is arrays[k] for k in arrays), (
        f"{definition.name}: update replaced or added state entries ({sorted(state)}); update them in place")
    assert all((v.shape, v.dtype) == s.layout(shape, param.dtype) for s, v in zip(definition.slots, state.values()))
    assert hp == hp_before, f"{definition.name}: update changed the hyperparameters dict"


def check_state_round_trip(definition: Optimizer, overrides=None, k: int = 5, n: int = 5) -> None:
    """Everything an update depends on is in param, the declared slots and step: a copy taken
    after step k continues exactly as the original does."""
    hp = _hp(definition, overrides)
    x, a = _shaped(definition, *quadratic(50, seed=2))
    state = new_state(definition, x)
    _run(definition, x, lambda p: a * p, state, hp, k)
    saved_param, saved_state = x.copy(), {name: v.copy() for name, v in state.items()}
    _run(definition, x, lambda p: a * p, state, hp, n, first_step=k + 1)
    # Restored into fresh arrays after the original has run on: hidden state in the
    # plugin (a cache keyed on anything) would now differ.
    restored, restored_state = saved_param.copy(), {name: v.copy() for name, v in saved_state.items()}
    _run(definition, restored, lambda p: a * p, restored_state, hp, n, first_step=k + 1)
    assert np.isfinite(x).all(), (
        f"{definition.name}: param became non-finite (does update read scratch before writing it? "
        "scratch arrives holding anything)")
    # Bit for bit when the optimizer is deterministic; otherwise to its noise (a loose tolerance).
    rtol = 0.0 if definition.deterministic else 1e-3
    np.testing.assert_allclose(restored, x, rtol=rtol, atol=0,
                               err_msg=f"{definition.name}: restored state diverged (param)")
    for name in state:
        np.testing.assert_allclose(restored_state[name], state[name], rtol=rtol, atol=0,
                                   err_msg=f"{definition.name}: restored state diverged (slot {name})")


def check_sliced(definition: Optimizer, overrides=None, rtol: float | None = None) -> None:
    """An elementwise optimizer gives the same result over uneven slices of the flattened
    tensor as over the whole (the server chunks and threads on that promise); bit for bit
    unless it declares deterministic=False."""
    if not definition.elementwise:
        return
    if rtol is None:
        rtol = 0.0 if definition.deterministic else 1e-3
    hp = _hp(definition, overrides)
    shape = (5, 37)
    x, a = quadratic(math.prod(shape), seed=3)
    whole, a2 = x.reshape(shape).copy(), a.reshape(shape)
    whole_state = new_state(definition, whole)
    flat = x.copy()
    flat_state = new_state(definition, flat)
    bounds = [0, 1, 17, 64, 100, 184, flat.size]
    for step in range(1, 6):
        _step(definition, whole, a2 * whole, whole_state, step, hp, new_scratch(definition, whole))
        grad = a * flat
        for lo, hi in zip(bounds, bounds[1:]):
            part = flat[lo:hi]
            _step(definition, part, grad[lo:hi], {k: v[lo:hi] for k, v in flat_state.items()}, step, hp,
                  new_scratch(definition, part))
    msg = f"{definition.name}: sliced and whole updates differ (is it really elementwise?)"
    np.testing.assert_allclose(flat, whole.reshape(-1), rtol=rtol, atol=0, err_msg=msg)
    for k in whole_state:
        np.testing.assert_allclose(flat_state[k], whole_state[k].reshape(-1), rtol=rtol, atol=0,
                                   err_msg=f"{msg} (slot {k})")


def check_dtypes(definition: Optimizer, overrides=None) -> None:
    """float32 and float64 both work, keep their dtype, and agree to float32's precision."""
    hp = _hp(definition, overrides)
    results = {}
    for dtype in (np.float32, np.float64):
        x, a = _shaped(definition, *quadratic(40, dtype=dtype, seed=4))
        start = x.copy()
        state = new_state(definition, x)
        _run(definition, x, lambda p: a * p, state, hp, 3)
        assert x.dtype == dtype and all(v.dtype == s.layout(x.shape, dtype)[1]
                                        for s, v in zip(definition.slots, state.values())), (
            f"{definition.name}: dtype changed from {np.dtype(dtype).name}")
        assert np.isfinite(x).all(), f"{definition.name}: non-finite param in {np.dtype(dtype).name}"
        assert not np.array_equal(x, start), f"{definition.name}: {np.dtype(dtype).name} param did not move"
        results[dtype] = (start.astype(np.float64), x.astype(np.float64))
    (_, p32), (start, p64) = results[np.float32], results[np.float64]
    # float32's own rounding (relative to |p|) plus a small fraction of the distance moved;
    # a dtype-dependent formula shows up, lost precision common to both runs does not.
    moved = np.abs(p64 - start).max()
    error = np.abs(p32 - p64)
    allowed = 1e-4 * moved + 1e-6 * np.abs(p64)
    assert (error <= allowed).all(), (
        f"{definition.name}: float32 and float64 results differ by up to {error.max():.3g} "
        f"after moving {moved:.3g} (a dtype-dependent path?)")


def check_zero_gradients(definition: Optimizer, overrides=None) -> None:
    """Zero gradients, from fresh state and after real steps, produce no NaN or infinity."""
    hp = _hp(definition, overrides)
    for warmup in (0, 5):
        x, a = _shaped(definition, *quadratic(30, seed=5))
        state = new_state(definition, x)
        _run(definition, x, lambda p: a * p, state, hp, warmup)
        _run(definition, x, np.zeros_like, state, hp, 3, first_step=warmup + 1)
        assert np.isfinite(x).all(), f"{definition.name}: zero gradients made param non-finite (warm-up {warmup})"
        for k, v in state.items():
            assert np.isfinite(v).all(), f"{definition.name}: zero gradients made slot {k} non-finite"


def check_catch_up(definition: Optimizer, overrides=None, rtol: float = 1e-12) -> None:
    """sparse_rows with a catch_up: rows brought up to date by catch_up equal (float64, to rtol of the
    tensor's scale) the same rows stepped by update with zero gradients for each step they missed."""
    if not definition.sparse_rows or definition.catch_up is None:
        return
    hp = _hp(definition, overrides)
    rng = np.random.default_rng(9)
    k, cols, now = 12, 5, 40
    x = rng.standard_normal((k, cols))
    state = new_state(definition, x)
    _run(definition, x, lambda p: rng.standard_normal(p.shape) * 0.1, state, hp, 4)  # real state first
    last = rng.integers(4, now + 1, k).astype(np.int64)
    want, want_state = x.copy(), {n: a.copy() for n, a in state.items()}
    for s in range(int(last.min()) + 1, now + 1):
        sel = np.flatnonzero(last < s)
        p, st = want[sel], {n: a[sel] for n, a in want_state.items()}
        _step(definition, p, np.zeros_like(p), st, s, hp, new_scratch(definition, p))
        want[sel] = p
        for n, a in st.items():
            want_state[n][sel] = a
    definition.catch_up(x, state, last, now, hp)
    for label, got, ref in [("param", x, want)] + [(f"slot {n}", state[n], want_state[n]) for n in state]:
        scale = float(np.abs(ref).max()) or 1.0
        bad = np.abs(got - ref) > rtol * np.abs(ref) + rtol * scale
        assert not bad.any(), (f"{definition.name}: catch_up's {label} differs from {int(bad.sum())} zero-gradient "
                               f"update(s) replayed, by up to {float(np.abs(got - ref).max()):.3g}")


def _bits(a: np.ndarray) -> np.ndarray:
    return a.reshape(-1).view(f"u{a.dtype.itemsize}")


def _first_difference(label: str, got: np.ndarray, want: np.ndarray) -> str | None:
    diff = np.flatnonzero(_bits(got) != _bits(want))
    if diff.size == 0:
        return None
    i = int(diff[0])
    return (f"{label} differs at {diff.size} of {got.size} element(s), first at [{i}]: "
            f"kernel {got.reshape(-1)[i]!r}, update {want.reshape(-1)[i]!r}")


_compiled: dict = {}  # id(kernel) -> (kernel, numba dispatcher or the exception it raised)


def compiled_kernel(definition: Optimizer, jit: bool | None = None):
    """`definition.kernel` as the checks run it: compiled with numba's options as the server compiles
    it (error_model="numpy", no fastmath) when numba is installed and `jit` is not False, else as is."""
    kernel = getattr(definition.kernel, "py_func", definition.kernel)  # a numba function: its Python loop
    if jit is False:
        return kernel
    try:
        import numba
    except ImportError:
        if jit:
            raise AssertionError("numba is not installed: cannot check the compiled kernel") from None
        return kernel
    hit = _compiled.get(id(kernel))
    if hit is None or hit[0] is not kernel:
        try:
            hit = (kernel, numba.njit(error_model="numpy")(kernel))
        except Exception as e:  # pragma: no cover - njit is lazy; errors come at the first call
            hit = (kernel, e)
        _compiled[id(kernel)] = hit
    if isinstance(hit[1], Exception):
        raise AssertionError(f"{definition.name}: kernel does not compile with numba: {hit[1]}")
    return hit[1]


def _run_kernel(fn, definition: Optimizer, p, g, state, c) -> None:
    """Run a kernel as the server does: a bfloat16 slot comes to it widened to p's dtype and is rounded
    back to nearest even after (the numpy update's np.copyto(slot, wide, casting="unsafe"))."""
    takes = kernel_slots(definition)
    wide = {s.name: state[s.name].astype(p.dtype) if state[s.name].dtype != p.dtype else state[s.name]
            for s in takes}
    fn(p, g, *[wide[s.name] for s in takes], c)
    for name, values in wide.items():
        if values is not state[name]:
            np.copyto(state[name], values, casting="unsafe")


def check_kernel(definition: Optimizer, overrides=None, jit: bool | None = None, steps: int = 5) -> None:
    """A declared kernel gives the update's numbers bit for bit: float32 and float64, several steps,
    odd sizes, read-only gradients; compiled with numba when it is installed (`jit`: force either way)."""
    if definition.kernel is None:
        return
    hp = _hp(definition, overrides)
    fn = compiled_kernel(definition, jit)
    compiled = fn is not getattr(definition.kernel, "py_func", definition.kernel)
    how = "compiled with numba" if compiled else "as plain Python"
    sizes = (1, 7, 37, 1031) if compiled else (1, 7, 37, 131)
    for dtype in (np.float32, np.float64):
        for size in sizes:
            rng = np.random.default_rng(size)
            x = (rng.standard_normal(size) * 2).astype(dtype)
            ref, ref_state = x.copy(), new_state(definition, x)
            got, got_state = x.copy(), new_state(definition, x)
            for step in range(1, steps + 1):
                grad = rng.standard_normal(size).astype(dtype)
                if step == 3:
                    grad[: size // 3] = 0  # zero gradients take other branches (sign, max)
                _step(definition, ref, grad, ref_state, step, hp, new_scratch(definition, ref))
                scalars = kernel_constants(definition, hp, step, got_state)
                try:
                    c = np.array(scalars, dtype=dtype)
                except (TypeError, ValueError) as e:
                    raise AssertionError(f"{definition.name}: kernel_scalars returned {scalars!r}, "
                                         f"not a tuple of numbers: {e}") from e
                assert c.ndim == 1, f"{definition.name}: kernel_scalars must return a flat tuple, got {scalars!r}"
                try:
                    with np.errstate(all="ignore"):
                        _run_kernel(fn, definition, got, _read_only(grad), got_state, c)
                except AssertionError:
                    raise
                except Exception as e:
                    raise AssertionError(f"{definition.name}: kernel {how} failed on {np.dtype(dtype).name} "
                                         f"arrays of {size}: {type(e).__name__}: {e}") from e
                where = f"{definition.name}: kernel ({how}) and update, {np.dtype(dtype).name}, size {size}, " \
                        f"step {step}:"
                problems = [_first_difference("param", got, ref)] + [
                    _first_difference(f"slot {k}", got_state[k], ref_state[k]) for k in ref_state]
                problems = [p for p in problems if p]
                assert not problems, (
                    f"{where} {problems[0]} (same operations in the same order? every constant from c? "
                    "a Python float literal makes numba compute in float64)")
        # The server may run a kernel where the parameters live (a resident session's shared memory) and
        # reads NaN or Inf in a gradient from the pass's statistics: a kernel must never raise, on any input.
        bad = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, np.finfo(dtype).max, np.finfo(dtype).tiny], dtype)
        takes = kernel_slots(definition)
        state = {k: np.full_like(bad, v) for k, v in zip((s.name for s in takes), (0.0, 1.0, np.inf, np.nan))}
        state.update({s.name: np.zeros_like(bad) for s in takes if s.name not in state})
        try:
            with np.errstate(all="ignore"):
                fn(bad.copy(), _read_only(bad[::-1].copy()), *[state[s.name] for s in takes],
                   np.array(kernel_constants(definition, hp, 1), dtype=dtype))
        except Exception as e:
            raise AssertionError(f"{definition.name}: kernel {how} raised on NaN, Inf or extreme values "
                                 f"({type(e).__name__}: {e}); a kernel must never raise (the server updates in "
                                 "place and checks gradients in the same pass)") from e


def check_deterministic(definition: Optimizer, overrides=None, steps: int = 6) -> None:
    """An optimizer declaring deterministic=True gives the same bits from the same inputs (the
    write-ahead log replays its updates instead of logging their results)."""
    if not definition.deterministic:
        return
    hp = _hp(definition, overrides)
    runs = []
    for fill in (np.nan, 7.0):  # scratch holding different leftovers must not matter either
        rng = np.random.default_rng(6)
        for dtype in (np.float32, np.float64):
            x = rng.standard_normal((3, 41)).astype(dtype)
            state = new_state(definition, x)
            scratch = new_scratch(definition, x, fill)
            for step in range(1, steps + 1):
                _step(definition, x, rng.standard_normal(x.shape).astype(dtype), state, step, hp, scratch)
            runs.append([("param", x)] + sorted(state.items()))
    half = len(runs) // 2
    for first, second in zip(runs[:half], runs[half:]):
        for (label, a), (_, b) in zip(first, second):
            problem = _first_difference(label, a, b)
            assert problem is None, (
                f"{definition.name} declares deterministic=True but two runs on the same inputs differ "
                f"({a.dtype.name}): {problem.replace('kernel', 'run 1').replace('update', 'run 2')}; "
                "declare deterministic=False (the log then keeps results) or remove the randomness")


def check_layouts(definition: Optimizer, overrides=None) -> None:
    """Contract v2: for parameters of every rank the optimizer accepts (a scalar, a vector, a matrix, a
    3-D tensor), update keeps each slot in place in its declared shape and dtype (Slot.layout: what the
    server allocates, snapshots and restores) and the parameter finite; a parameter it does not accept
    gets a one-line reason from `accepts`."""
    hp = _hp(definition, overrides)
    rng = np.random.default_rng(10)
    tried = 0
    for shape in ((), (7,), (4, 5), (2, 3, 4)):
        if definition.accepts is not None:
            why = definition.accepts("x", shape)
            assert why is None or (isinstance(why, str) and why.strip() and "\n" not in why), (
                f"{definition.name}: accepts('x', {shape}) must return None or a one-line reason, got {why!r}")
            if why:
                continue
        tried += 1
        for dtype in (np.float32, np.float64):
            x = rng.standard_normal(shape).astype(dtype)
            state = new_state(definition, x)
            arrays = dict(state)
            _run(definition, x, lambda p: np.asarray(rng.standard_normal(shape), dtype), state, hp, 3)
            assert np.isfinite(x).all(), f"{definition.name}: a parameter of shape {shape} became non-finite"
            for slot in definition.slots:
                a = state[slot.name]
                assert a is arrays[slot.name] and (a.shape, a.dtype) == slot.layout(shape, dtype), (
                    f"{definition.name}: slot {slot.name} of a {np.dtype(dtype).name} parameter of shape {shape} "
                    f"must stay the array it was given, {slot.layout(shape, dtype)}; got {a.shape} {a.dtype}")
    assert tried, f"{definition.name}: accepts refuses every shape tried ((), (7,), (4, 5), (2, 3, 4))"


CHECKS: dict[str, Callable[..., None]] = {
    "layouts": check_layouts,
    "definition": check_definition,
    "defaults": check_defaults,
    "bad_hyperparameters": check_bad_hyperparameters,
    "decreases_quadratic": check_decreases_quadratic,
    "in_place": check_in_place,
    "state_round_trip": check_state_round_trip,
    "sliced": check_sliced,
    "dtypes": check_dtypes,
    "zero_gradients": check_zero_gradients,
    "kernel": check_kernel,
    "deterministic": check_deterministic,
    "catch_up": check_catch_up,
}


def check_all(definition: Optimizer, overrides: Mapping[str, Any] | None = None) -> None:
    """Run every check; the first failure raises AssertionError."""
    for check in CHECKS.values():
        check(definition, overrides)


# ---- the pytest class ----------------------------------------------------------

class OptimizerConformance:
    """Subclass as ``Test...`` and set `optimizer`; pytest then runs one test per check.

    To cover several optimizers, override the `definition` fixture (parametrized) and,
    if they need different settings, the `overrides` fixture.
    """
    optimizer: Optimizer | str | None = None
    hyperparameters: Mapping[str, Any] = {}

    @pytest.fixture
    def definition(self) -> Optimizer:
        if isinstance(self.optimizer, str):
            from optreg.plugins.registry import Registry
            return Registry().get(self.optimizer).definition
        if self.optimizer is None:
            pytest.fail(f"{type(self).__name__}: set `optimizer` to an Optimizer definition or a registered name")
        return self.optimizer

    @pytest.fixture
    def overrides(self) -> Mapping[str, Any]:
        return dict(self.hyperparameters)

    def test_definition_is_valid(self, definition, overrides):
        check_definition(definition, overrides)

    def test_defaults_are_valid(self, definition, overrides):
        check_defaults(definition, overrides)

    def test_bad_hyperparameters_are_refused(self, definition, overrides):
        check_bad_hyperparameters(definition, overrides)

    def test_decreases_a_convex_quadratic(self, definition, overrides):
        check_decreases_quadratic(definition, overrides)

    def test_updates_in_place_and_nothing_else(self, definition, overrides):
        check_in_place(definition, overrides)

    def test_state_round_trips(self, definition, overrides):
        check_state_round_trip(definition, overrides)

    def test_slices_match_whole(self, definition, overrides):
        if not definition.elementwise:
            pytest.skip(f"{definition.name} is not elementwise")
        check_sliced(definition, overrides)

    def test_slot_layouts(self, definition, overrides):
        check_layouts(definition, overrides)

    def test_float32_and_float64(self, definition, overrides):
        check_dtypes(definition, overrides)

    def test_zero_gradients_stay_finite(self, definition, overrides):
        check_zero_gradients(definition, overrides)

    def test_kernel_equals_update(self, definition, overrides):
        if definition.kernel is None:
            pytest.skip(f"{definition.name} declares no kernel")
        check_kernel(definition, overrides)

    def test_deterministic(self, definition, overrides):
        if not definition.deterministic:
            pytest.skip(f"{definition.name} declares deterministic=False")
        check_deterministic(definition, overrides)

    def test_catch_up_equals_zero_gradient_steps(self, definition, overrides):
        if not definition.sparse_rows or definition.catch_up is None:
            pytest.skip(f"{definition.name} declares no catch_up")
        check_catch_up(definition, overrides)
