"""What a schedule plugin declares: a learning-rate schedule the server applies to a session.

A schedule is a name, its parameters (declared as `Hyperparameter`s: type, default,
bounds) and one pure function::

    def factor(k, params):
        # k: the steps the session applied before this one (torch's `last_epoch`:
        #    k = t - 1 for step t); params: {name: value}, validated.
        return 0.5 * (1 + math.cos(math.pi * k / params["total_steps"]))

The step numbered t runs with lr = (the session's `lr`) * factor(t - 1, params):
the session's `lr` is the base the schedule multiplies (torch's `initial_lr`), as
`torch.optim.lr_scheduler` does when `scheduler.step()` follows each
`optimizer.step()`. `factor` must be a pure function of (k, params): every worker
of a shared session, a restarted server and the write-ahead log's replay compute
the same value from the same step. A plugin returns definitions from the
`optreg_schedules` hook::

    @hookimpl
    def optreg_schedules():
        return [Schedule(name="...", summary="...", factor=factor, parameters=(...))]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from optreg.plugins.api import _NAME, _TYPES, DefinitionError, Hyperparameter, HyperparameterError


@dataclass(frozen=True)
class Schedule:
    name: str
    summary: str
    factor: Callable[[int, Mapping[str, Any]], float]
    parameters: tuple[Hyperparameter, ...] = ()
    # Rules across parameters (total_steps > warmup_steps): check(params) -> a message naming the
    # parameters and the rule, or None when they fit together.
    check: Callable[[Mapping[str, Any]], str | None] | None = None
    # Parameters a session must give (a default would be a guess: total_steps); the others default.
    required: tuple[str, ...] = ()

    def resolve(self, values: Mapping[str, Any]) -> dict:
        """`values` over the defaults, validated; HyperparameterError naming the first bad one."""
        names = [p.name for p in self.parameters]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise HyperparameterError(f"unknown parameter {', '.join(unknown)} for schedule {self.name}; "
                                      f"it takes: {', '.join(names) or 'none'}")
        missing = [n for n in self.required if n not in values]
        if missing:
            raise HyperparameterError(f"schedule {self.name} needs parameter {', '.join(missing)}")
        out = {p.name: p.default for p in self.parameters}
        for p in self.parameters:
            if p.name in values:
                try:
                    out[p.name] = p.coerce(values[p.name], f"schedule {self.name}")
                except HyperparameterError as e:  # a schedule's are parameters, checked as hyperparameters are
                    raise HyperparameterError(str(e).replace(" hyperparameter ", " parameter ", 1)) from None
        problem = self.check(out) if self.check is not None else None
        if problem:
            raise HyperparameterError(f"schedule {self.name}: {problem}")
        return out

    def value(self, k: int, params: Mapping[str, Any]) -> float:
        """factor(k, params) as a float; ValueError when the plugin's function gives no finite number >= 0."""
        f = float(self.factor(k, params))
        if not (math.isfinite(f) and f >= 0):
            raise ValueError(f"schedule {self.name} gave factor {f!r} at step {k + 1}; it must be finite and >= 0")
        return f


def validate_schedule(defn: Any) -> Schedule:
    """Check a definition a plugin returned; raise DefinitionError saying what is wrong."""
    if not isinstance(defn, Schedule):
        raise DefinitionError(f"expected an optreg.plugins.Schedule, got {type(defn).__name__}")
    if not isinstance(defn.name, str) or not _NAME.match(defn.name):
        raise DefinitionError(
            f"schedule name {defn.name!r} must be lower case letters, digits, '_', '.', '-', starting with a letter")
    if not isinstance(defn.summary, str) or not defn.summary.strip():
        raise DefinitionError(f"schedule {defn.name}: summary must be a non-empty one-line string")
    if not callable(defn.factor) or (defn.check is not None and not callable(defn.check)):
        raise DefinitionError(f"schedule {defn.name}: factor (and check, when given) must be functions")
    seen = set()
    for p in defn.parameters:
        if not isinstance(p, Hyperparameter) or p.name in seen or p.type not in _TYPES:
            raise DefinitionError(f"schedule {defn.name}: bad or repeated parameter {p!r}")
        seen.add(p.name)
    if not set(defn.required) <= seen:
        raise DefinitionError(f"schedule {defn.name}: required names a parameter it does not declare")
    try:
        defaults = defn.resolve({p.name: p.default for p in defn.parameters})
        defn.value(0, defaults)
    except (HyperparameterError, ValueError) as e:
        raise DefinitionError(f"schedule {defn.name}: its defaults do not work: {e}") from None
    except Exception as e:
        raise DefinitionError(f"schedule {defn.name}: factor(0, defaults) raised {type(e).__name__}: {e}") from None
    return defn
