"""What a plugin declares: optimizers, their hyperparameters and state slots.

An optimizer is data plus one function. The server owns every array (so it can
checkpoint, export and slice them); the plugin owns the math::

    def update(param, grad, state, step, hp, scratch):
        # param: ndarray, updated in place; grad: read-only ndarray, same shape
        # and dtype; state: {slot name: ndarray like param, or in the slot's
        # declared shape and dtype (contract v2, Slot.shape/dtype)}, updated in place;
        # step: the 1-based number of this step; hp: {name: value};
        # scratch: list of `Optimizer.scratch` work arrays like param.

An elementwise optimizer may also declare a *kernel*: the same math as a plain
Python scalar loop, which the server compiles with numba when it is installed
(one fused pass over memory instead of one per numpy operation)::

    def kernel(p, g, *slots, c):   # positional: kernel(p, g, m, v, c)
        # p, g and each slot (in `Optimizer.slots` order): 1-D arrays of one
        # dtype; c: 1-D array of `kernel_scalars(hp, step)` in that dtype.
        # A bfloat16 slot reads as that dtype and is stored rounded to nearest
        # even (the server rewrites m[i] and m[i] = x; docs/plugins.md).
        for i in range(p.size):
            ...

It must give the numpy update's numbers bit for bit (the conformance kit checks):
the same operations in the same order, every constant taken from `c` (a Python
float or int literal in arithmetic makes numba compute in float64).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

_NAME = re.compile(r"^[a-z][a-z0-9_.\-]*$")
_TYPES = (float, int, bool)


class DefinitionError(ValueError):
    """An optimizer definition that cannot be used."""


class HyperparameterError(ValueError):
    """A hyperparameter value an optimizer refuses; the message names it, its value and the rule."""


@dataclass(frozen=True)
class Hyperparameter:
    name: str
    default: float | int | bool
    doc: str = ""
    type: type = float
    minimum: float | None = None
    maximum: float | None = None
    minimum_exclusive: bool = False
    maximum_exclusive: bool = False

    def bounds_text(self) -> str:
        parts = []
        if self.minimum is not None:
            parts.append(f"{'>' if self.minimum_exclusive else '>='} {self.minimum:g}")
        if self.maximum is not None:
            parts.append(f"{'<' if self.maximum_exclusive else '<='} {self.maximum:g}")
        return " and ".join(parts)

    def coerce(self, value: Any, optimizer: str = "") -> float | int | bool:
        """Return `value` as this hyperparameter's type, or raise HyperparameterError."""
        where = f"{optimizer} hyperparameter {self.name}" if optimizer else f"hyperparameter {self.name}"
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise HyperparameterError(f"{where}={value!r} is not a number") from None
        if math.isnan(number) or math.isinf(number):
            raise HyperparameterError(f"{where}={number!r} must be finite")
        if self.type is bool:
            if number not in (0.0, 1.0):
                raise HyperparameterError(f"{where}={number:g} must be a boolean (0 or 1)")
            return bool(number)
        if self.type is int:
            if number != int(number):
                raise HyperparameterError(f"{where}={number!r} must be an integer")
            number = int(number)
        too_low = self.minimum is not None and (
            number <= self.minimum if self.minimum_exclusive else number < self.minimum)
        too_high = self.maximum is not None and (
            number >= self.maximum if self.maximum_exclusive else number > self.maximum)
        if too_low or too_high:
            raise HyperparameterError(f"{where}={number!r} is out of bounds: it must be {self.bounds_text()}")
        return number


DOMAINS = ("real", "nonnegative")
# A slot's dtype: None (the session's master dtype, float32 or float64) or one of these
# (uint8/int8: quantised codes, e.g. 8-bit Adam's m and v, with their scales in a `blocks` slot).
SLOT_DTYPES = ("bfloat16", "float64", "uint8", "int8")


def same(shape: tuple) -> tuple:
    """The parameter's own shape (a slot's default)."""
    return tuple(shape)


def rows(shape: tuple) -> tuple:
    """One value per row of the last two dimensions, as torch keeps it: [..., R, 1]; (0,) (not kept)
    for a vector or a scalar."""
    return tuple(shape[:-1]) + (1,) if len(shape) > 1 else (0,)


def columns(shape: tuple) -> tuple:
    """One value per column of the last two dimensions: [..., 1, C]; (0,) for a vector or a scalar."""
    return tuple(shape[:-2]) + (1, shape[-1]) if len(shape) > 1 else (0,)


def unfactored(shape: tuple) -> tuple:
    """The parameter's shape for a vector or a scalar, (0,) (not kept) for a matrix: the full-size state
    of the parameters a factored method (Adafactor) cannot factor."""
    return tuple(shape) if len(shape) <= 1 else (0,)


def scalar(shape: tuple) -> tuple:
    """One number per parameter (a running sum the update keeps: schedule-free's weight_sum)."""
    return ()


def per_dimension(shape: tuple) -> tuple:
    """An [n, n] matrix for each dimension n of a matrix or larger tensor, one after another in one flat
    array (d1*d1 + d2*d2 + ...,), which `matrices` splits; (0,) for a vector or a scalar (Shampoo's and
    SOAP's preconditioners)."""
    return (sum(int(d) * int(d) for d in shape),) if len(shape) > 1 else (0,)


def blocks(size: int) -> Callable[[tuple], tuple]:
    """A shape function: one value per block of `size` elements of the flattened parameter, the last block
    partial, (ceil(n / size),) (the per-block scales of blockwise-quantised state, as bitsandbytes keeps
    them: `Slot("m_absmax", shape=blocks(256))` beside `Slot("m", dtype="uint8")`)."""
    if not isinstance(size, int) or size < 1:
        raise DefinitionError(f"blocks(size): size must be a positive int, got {size!r}")

    def shape(param_shape: tuple) -> tuple:
        return (-(-math.prod(int(d) for d in param_shape) // size),)
    shape.__name__ = shape.__qualname__ = f"blocks({size})"
    return shape


def matrices(flat, shape: tuple) -> list:
    """The [n, n] views of a `per_dimension` slot for a parameter of `shape` (writable: no copies)."""
    out, start = [], 0
    for d in shape:
        out.append(flat[start:start + d * d].reshape(d, d))
        start += d * d
    return out


@dataclass(frozen=True)
class Slot:
    """A per-parameter state array; by default of the parameter's shape and the session's master dtype.

    `shape(param_shape) -> tuple` (contract v2): the slot's shape for a parameter of that shape, e.g.
    `rows`/`columns` (Adafactor's factored second moment), `per_dimension`; a shape with no element,
    (0,), means the slot is not kept for that parameter (torch's state dict then has no entry for it).
    Only a whole-tensor optimizer (elementwise=False) may declare a shape other than `same`.
    `dtype`: None (the master dtype), "bfloat16" (half the bytes; the update reads and writes an
    ml_dtypes.bfloat16 array and rounds what it stores), "float64" (a running sum kept in double) or
    "uint8"/"int8" (quantised codes the update decodes itself, with their scales in another slot).
    The server allocates, counts (memory budget), snapshots, logs, exports and restores every slot in
    its declared shape and dtype.

    `domain` is what a valid value looks like: "real" (any number: +-inf included, since a
    finite gradient can overflow an accumulator such as momentum's) or "nonnegative" (>= 0,
    +inf included: Adam's v, AdaGrad's sum of squares, where g**2 overflows float32 for
    |g| > 1.8e19). NaN is in no domain. The server checks restored state against it (`check`)
    on every path that restores state (CreateSession, a snapshot's load), so whatever a step
    can leave in a slot can be read back and restored.
    """
    name: str
    initial_value: float = 0.0
    domain: str = "real"
    shape: Callable[[tuple], tuple] = same
    dtype: str | None = None

    def layout(self, shape: tuple, master) -> tuple[tuple, Any]:
        """(shape, numpy dtype) of this slot for a parameter of `shape` in a session of dtype `master`."""
        import numpy as np

        dtype = np.dtype(master)
        if self.dtype in ("float64", "uint8", "int8"):
            dtype = np.dtype(self.dtype)
        elif self.dtype is not None:
            import ml_dtypes

            dtype = np.dtype(getattr(ml_dtypes, self.dtype))
        return tuple(int(d) for d in self.shape(tuple(shape))), dtype

    @property
    def standard(self) -> bool:
        """Of the parameter's shape and dtype (contract v1)."""
        return self.shape is same and self.dtype is None

    def check(self, tensor: str, array, optimizer: str = "") -> str | None:
        """None when every value of this slot's `array` (for parameter `tensor`) is in the
        slot's domain; otherwise a message naming the slot, the tensor, the count and the rule."""
        import numpy as np  # only the server and tests need this; keep the API import light

        a = np.asarray(array)
        if a.dtype.kind not in "fiu":  # bfloat16 and other extension types: compare in float64
            a = a.astype(np.float64)
        owner = f"{optimizer}'s {self.name}" if optimizer else f"slot {self.name}"
        nan = int(np.count_nonzero(np.isnan(a))) if a.dtype.kind == "f" else 0
        if nan:
            return f"state {self.name}/{tensor} has {nan} NaN value(s); {owner} must be a number"
        if self.domain == "nonnegative":
            negative = int(np.count_nonzero(a < 0))
            if negative:
                return f"state {self.name}/{tensor} has {negative} negative value(s); {owner} must be >= 0"
        return None


@dataclass(frozen=True)
class Optimizer:
    name: str
    summary: str
    update: Callable[..., None]
    hyperparameters: tuple[Hyperparameter, ...] = ()
    slots: tuple[Slot, ...] = ()
    # How many scratch arrays (shaped like the parameter) `update` needs.
    scratch: int = 0
    # Each element's update depends only on that element: the server may run
    # `update` over slices of a tensor (cache-sized chunks, several threads). False: a whole-tensor
    # update (matrix math through numpy/BLAS: Muon, Adafactor), called once per parameter with the
    # whole parameter, gradient and slots (each in its declared shape and dtype).
    elementwise: bool = True
    # Which parameters the optimizer applies to (contract v2): accepts(name, shape) -> None when it
    # does, else the reason, one line (Muon: "orthogonalises 2-D matrices; ..."). The server refuses a
    # session holding a parameter it does not accept (INVALID_ARGUMENT naming the optimizer, the
    # parameter and the reason). None: every parameter.
    accepts: Callable[[str, tuple], str | None] | None = None
    # The optimizer can step some rows of a 2-D parameter (a sparse gradient): rows not named
    # get a zero gradient, applied lazily. `catch_up(p, state, last, now, hp)` brings rows that
    # missed steps up to date: p is (k, columns) rows, state {slot: (k, columns)}, last an int64
    # (k,) array of the step each row is current through; every row i missed steps last[i]+1 ..
    # now (at most `now`), all with gradient zero and hyperparameters `hp`, and must end as the
    # dense update with zero gradients would leave it (exactly, or to rounding: say which).
    # None: the server replays `update` with zero gradients for each missed step (exact, costs
    # the missed steps). Needs elementwise=True and deterministic=True.
    sparse_rows: bool = False
    catch_up: Callable[..., None] | None = None
    # The same math as a scalar loop, compiled by the server when numba is installed:
    # kernel(p, g, *slots, c) over 1-D arrays, c = kernel_scalars(hp, step) in the array dtype.
    # A whole-tensor optimizer whose only other slots are scalar float64 ones that advance once a
    # step (running(); schedule-free's lr_max, weight_sum) may declare one too: kernel_scalars(hp,
    # step, running) advances them in place, and the kernel takes the other slots.
    kernel: Callable[..., None] | None = None
    kernel_scalars: Callable[[Mapping[str, Any], int], tuple] | None = None
    # Same inputs give the same bits. The write-ahead log replays deterministic updates
    # from the gradients; for the others it logs the results.
    deterministic: bool = True
    # Optional work every k steps (contract v2): every=(k, refresh). k: a positive int, or the name of an int
    # hyperparameter (Shampoo's precondition_frequency); refresh(param, grad, state, step, hp) runs right
    # before `update` on the steps where step % k == 0, with the step's gradient, and updates slots in
    # place (never param): the preconditioner recomputed from the statistics the update keeps (and this
    # step's, as Shampoo does). The server times it and reports it
    # (optreg_refreshes and optreg_refresh_seconds by optimizer, on the metrics endpoint); the log
    # replays it with the update. Needs elementwise=False.
    every: tuple | None = None
    hyperparameter_names: tuple[str, ...] = field(init=False, repr=False, compare=False)
    # Telemetry, optional: effective_lr(state_sample, hp, step) -> per-element step size applied to the
    # (bias-corrected) moment, e.g. Adam's lr/(sqrt(v_hat)+eps), from {slot: a few state elements}.
    effective_lr: Callable[..., Any] | None = None

    def __post_init__(self):
        object.__setattr__(self, "hyperparameter_names", tuple(h.name for h in self.hyperparameters))

    def resolve(self, values: Mapping[str, Any], base: Mapping[str, Any] | None = None) -> dict:
        """Validate `values` over `base` (the defaults when None); return the full set.

        Raises HyperparameterError naming the first bad field; nothing is partly applied.
        """
        unknown = sorted(set(values) - set(self.hyperparameter_names))
        if unknown:
            known = ", ".join(self.hyperparameter_names) or "none"
            raise HyperparameterError(
                f"unknown hyperparameter {', '.join(unknown)} for optimizer {self.name}; it takes: {known}")
        resolved = dict(base) if base is not None else {h.name: h.default for h in self.hyperparameters}
        for h in self.hyperparameters:
            if h.name in values:
                resolved[h.name] = h.coerce(values[h.name], self.name)
        return resolved

    def refresh_due(self, step: int, hp: Mapping[str, Any]) -> bool:
        """True when `every`'s refresh runs (before the update) at `step` with hyperparameters `hp`."""
        if self.every is None:
            return False
        k = self.every[0]
        return step % int(hp[k] if isinstance(k, str) else k) == 0

    def check_state(self, tensor: str, state: Mapping[str, Any]) -> str | None:
        """The first slot of `state` ({slot name: array} for parameter `tensor`) outside its
        domain, as a message; None when all are valid. Slots missing from `state` are skipped."""
        for s in self.slots:
            if s.name in state:
                problem = s.check(tensor, state[s.name], self.name)
                if problem:
                    return problem
        return None


def _positional_count(fn) -> int | None:
    """How many positional arguments `fn` takes; None if it takes *args or has no signature."""
    import inspect
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def running(defn: Optimizer) -> tuple[Slot, ...]:
    """A whole-tensor optimizer's scalar float64 slots that advance once a step (schedule-free's lr_max
    and weight_sum): with a kernel, its `kernel_scalars(hp, step, running)` advances them."""
    return tuple(s for s in defn.slots if s.shape is scalar and s.dtype == "float64") if not defn.elementwise else ()


def kernel_slots(defn: Optimizer) -> tuple[Slot, ...]:
    """The slots a kernel takes, in order: every slot but the running scalars."""
    skip = running(defn)
    return tuple(s for s in defn.slots if s not in skip)


def kernel_constants(defn: Optimizer, hp, step: int, state=None) -> tuple:
    """`kernel_scalars`' tuple; a kernel with running scalars gets them from `state` (advanced in place),
    or fresh ones at their initial values when `state` is None (a compile's trial call)."""
    run = running(defn)
    if not run:
        return defn.kernel_scalars(hp, step)
    import numpy as np

    if state is None:
        state = {s.name: np.array(float(s.initial_value)) for s in run}
    return defn.kernel_scalars(hp, step, {s.name: state[s.name] for s in run})


def _validate_kernel(defn: Optimizer) -> None:
    where = f"optimizer {defn.name}"
    if not isinstance(defn.deterministic, bool):
        raise DefinitionError(f"{where}: deterministic must be True or False, got {defn.deterministic!r}")
    if defn.kernel is None:
        if defn.kernel_scalars is not None:
            raise DefinitionError(f"{where}: kernel_scalars is declared without a kernel; declare both or neither")
        return
    if not callable(defn.kernel):
        raise DefinitionError(f"{where}: kernel must be a function kernel(p, g, *slots, c), got {defn.kernel!r}")
    if defn.kernel_scalars is None or not callable(defn.kernel_scalars):
        raise DefinitionError(
            f"{where}: a kernel needs kernel_scalars(hp, step) returning the tuple of floats passed as c")
    if not defn.elementwise and not running(defn):
        raise DefinitionError(
            f"{where}: a kernel runs over slices of the flattened tensor, so it needs elementwise=True (a "
            "whole-tensor one only with scalar float64 slots that kernel_scalars advances once a step)")
    takes = kernel_slots(defn)
    odd = [s.name for s in takes if not (s.standard or (s.shape is same and s.dtype == "bfloat16"))]
    if odd:
        raise DefinitionError(f"{where}: a kernel runs over slots of the parameter's shape, in its dtype or "
                              f"bfloat16 (and, whole-tensor, scalar float64 ones advanced by kernel_scalars); "
                              f"slot(s) {', '.join(odd)} declare another: drop the kernel (the numpy update runs)")
    wanted = 3 + len(takes)
    got = _positional_count(defn.kernel)
    if got is not None and got != wanted:
        names = ", ".join(["p", "g", *(s.name for s in takes), "c"])
        raise DefinitionError(f"{where}: kernel takes {got} argument(s); it must take {wanted}: ({names})")
    got = _positional_count(defn.kernel_scalars)
    args = "(hp, step, running)" if running(defn) else "(hp, step)"
    if got is not None and got != len(args.split(",")):
        raise DefinitionError(f"{where}: kernel_scalars must take {args}, it takes {got} argument(s)")


def layouts(defn: Optimizer, shapes: Mapping[str, tuple], master) -> dict[str, dict[str, tuple]]:
    """{slot: {parameter: (shape, numpy dtype)}}: every state array a session of `defn` over parameters of
    `shapes` and master dtype `master` keeps (what the server allocates, counts, stores and restores)."""
    return {s.name: {n: s.layout(shape, master) for n, shape in shapes.items()} for s in defn.slots}


def validate(defn: Any) -> Optimizer:
    """Check a definition a plugin returned; raise DefinitionError saying what is wrong."""
    if not isinstance(defn, Optimizer):
        raise DefinitionError(f"expected an optreg.plugins.Optimizer, got {type(defn).__name__}")
    if not isinstance(defn.name, str) or not _NAME.match(defn.name):
        raise DefinitionError(
            f"optimizer name {defn.name!r} must be lower case letters, digits, '_', '.', '-', starting with a letter")
    if not isinstance(defn.summary, str) or not defn.summary.strip():
        raise DefinitionError(f"optimizer {defn.name}: summary must be a non-empty one-line string")
    if not callable(defn.update):
        raise DefinitionError(f"optimizer {defn.name}: update must be callable")
    if not isinstance(defn.scratch, int) or defn.scratch < 0:
        raise DefinitionError(f"optimizer {defn.name}: scratch must be a non-negative int")
    seen: set[str] = set()
    for h in defn.hyperparameters:
        if not isinstance(h, Hyperparameter):
            raise DefinitionError(f"optimizer {defn.name}: hyperparameters must be Hyperparameter, got {h!r}")
        if h.name in seen:
            raise DefinitionError(f"optimizer {defn.name}: hyperparameter {h.name} declared twice")
        seen.add(h.name)
        if h.type not in _TYPES:
            raise DefinitionError(f"optimizer {defn.name}: hyperparameter {h.name} type must be float, int or bool")
        try:
            h.coerce(h.default, defn.name)
        except HyperparameterError as e:
            raise DefinitionError(f"optimizer {defn.name}: default is invalid: {e}") from None
    slots: set[str] = set()
    for s in defn.slots:
        if not isinstance(s, Slot) or not _NAME.match(s.name) or s.name in slots:
            raise DefinitionError(f"optimizer {defn.name}: bad or repeated state slot {s!r}")
        if not math.isfinite(float(s.initial_value)):
            raise DefinitionError(f"optimizer {defn.name}: slot {s.name} initial value must be finite")
        if s.domain not in DOMAINS:
            raise DefinitionError(
                f"optimizer {defn.name}: slot {s.name} domain {s.domain!r} must be one of {', '.join(DOMAINS)}")
        if s.domain == "nonnegative" and s.initial_value < 0:
            raise DefinitionError(
                f"optimizer {defn.name}: slot {s.name} is nonnegative but starts at {s.initial_value!r}")
        if s.dtype is not None and s.dtype not in SLOT_DTYPES:
            raise DefinitionError(f"optimizer {defn.name}: slot {s.name} dtype {s.dtype!r} must be None (the "
                                  f"master dtype) or one of {', '.join(SLOT_DTYPES)}")
        if not callable(s.shape):
            raise DefinitionError(f"optimizer {defn.name}: slot {s.name} shape must be a function of the "
                                  f"parameter's shape, got {s.shape!r}")
        if s.shape is not same and defn.elementwise:
            raise DefinitionError(f"optimizer {defn.name}: slot {s.name} has its own shape, so its update cannot "
                                  "run over slices of the parameter: declare elementwise=False")
        slots.add(s.name)
    _validate_kernel(defn)
    if defn.sparse_rows and not (defn.elementwise and defn.deterministic):
        raise DefinitionError(f"optimizer {defn.name}: sparse_rows needs elementwise=True and deterministic=True "
                              "(rows are updated apart, and replayed from the log)")
    if defn.accepts is not None and not callable(defn.accepts):
        raise DefinitionError(f"optimizer {defn.name}: accepts must be a function accepts(name, shape) -> reason "
                              "or None")
    if defn.every is not None:
        k, fn = defn.every if isinstance(defn.every, tuple) and len(defn.every) == 2 else (None, None)
        hp = {h.name: h for h in defn.hyperparameters}
        good_k = (isinstance(k, int) and not isinstance(k, bool) and k >= 1) or (
            isinstance(k, str) and k in hp and hp[k].type is int and (hp[k].minimum or 0) >= 1)
        if not good_k or not callable(fn):
            raise DefinitionError(f"optimizer {defn.name}: every must be (k, refresh): k a positive int or the name "
                                  "of an int hyperparameter with minimum >= 1, refresh(param, grad, state, step, hp)")
        if defn.elementwise:
            raise DefinitionError(f"optimizer {defn.name}: every's refresh runs over whole tensors: declare "
                                  "elementwise=False")
    if defn.catch_up is not None and (not defn.sparse_rows or not callable(defn.catch_up)):
        raise DefinitionError(f"optimizer {defn.name}: catch_up must be a function, declared with sparse_rows=True")
    return defn
