"""What a plugin declares: optimizers, their hyperparameters and state slots.

An optimizer is data plus one function. The server owns every array (so it can
checkpoint, export and slice them); the plugin owns the math::

    def update(param, grad, state, step, hp, scratch):
        # param: ndarray, updated in place; grad: read-only ndarray, same shape
        # and dtype; state: {slot name: ndarray like param}, updated in place;
        # step: the 1-based number of this step; hp: {name: value};
        # scratch: list of `Optimizer.scratch` work arrays like param.
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


@dataclass(frozen=True)
class Slot:
    """A per-parameter state array, same shape and dtype as the parameter."""
    name: str
    initial_value: float = 0.0


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
    # `update` over slices of a tensor (cache-sized chunks, several threads).
    elementwise: bool = True
    sparse_rows: bool = False
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
        slots.add(s.name)
    return defn
