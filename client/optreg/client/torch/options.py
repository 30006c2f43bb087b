"""How each torch.optim class maps onto an optreg optimizer: option names one way, state names both ways.

torch keeps options in `param_groups` under its own names (`betas`, `momentum`, ...) and state
per parameter (`exp_avg`, `step`, ...); an optreg session keeps flat float hyperparameters, one
array per parameter in each slot, and one step count for the whole session.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.optim.optimizer import _get_scalar_dtype

from optreg.client.errors import UsageError

@dataclass(frozen=True)
class OptimizerMap:
    torch_class: type
    server_optimizer: Callable[[dict], str]
    hyperparameters: Callable[[dict], dict[str, float]]
    # torch state name -> optreg slot, with whether the entry is present for a group
    state: tuple[tuple[str, str, Callable[[dict], bool]], ...]
    # torch stores a per-parameter `step` tensor (SGD does not)
    has_step: bool
    # torch creates the state at construction (Adagrad) rather than at the first step
    state_at_step_zero: bool = False
    # Which state entries a parameter has depends on the parameter (Adafactor: row_var and col_var for a
    # matrix, variance for a vector): the session keeps the others with no element (shape (0,), the slot's
    # declared layout), which torch's layout leaves out.
    per_parameter: bool = False


def _always(group: dict) -> bool:
    return True


def _adam_hp(g: dict) -> dict[str, float]:
    b1, b2 = g["betas"]
    return {"lr": g["lr"], "beta1": b1, "beta2": b2, "eps": g["eps"], "weight_decay": g["weight_decay"],
            "amsgrad": g["amsgrad"]}


ADAM_STATE = (("exp_avg", "m", _always), ("exp_avg_sq", "v", _always),
              ("max_exp_avg_sq", "max_v", lambda g: bool(g["amsgrad"])))

def _adafactor_hp(g: dict) -> dict[str, float]:
    eps1, eps2 = g["eps"]
    return {"lr": g["lr"], "beta2_decay": g["beta2_decay"], "eps1": -1.0 if eps1 is None else eps1, "eps2": eps2,
            "d": g["d"], "weight_decay": g["weight_decay"]}


ADJUST_LR = {None: 0, "original": 0, "match_rms_adamw": 1}


def _muon_hp(g: dict) -> dict[str, float]:
    a, b, c = g["ns_coefficients"]
    return {"lr": g["lr"], "weight_decay": g["weight_decay"], "momentum": g["momentum"], "nesterov": g["nesterov"],
            "ns_a": a, "ns_b": b, "ns_c": c, "eps": g["eps"], "ns_steps": g["ns_steps"],
            "adjust_lr": ADJUST_LR[g["adjust_lr_fn"]]}


MAPPINGS = {
    "torch.adam": OptimizerMap(torch.optim.Adam,
                          lambda g: "adamw" if g.get("decoupled_weight_decay") else "torch.adam",
                          _adam_hp, ADAM_STATE, has_step=True),
    "adamw": OptimizerMap(torch.optim.AdamW, lambda g: "adamw", _adam_hp, ADAM_STATE, has_step=True),
    "torch.sgd": OptimizerMap(
        torch.optim.SGD, lambda g: "torch.sgd",
        lambda g: {k: g[k] for k in ("lr", "momentum", "dampening", "weight_decay", "nesterov")},
        (("momentum_buffer", "momentum_buffer", lambda g: g["momentum"] != 0),), has_step=False),
    "torch.rmsprop": OptimizerMap(
        torch.optim.RMSprop, lambda g: "torch.rmsprop",
        lambda g: {k: g[k] for k in ("lr", "alpha", "eps", "weight_decay", "momentum", "centered")},
        (("square_avg", "square_avg", _always), ("momentum_buffer", "momentum_buffer", lambda g: g["momentum"] > 0),
         ("grad_avg", "grad_avg", lambda g: bool(g["centered"]))), has_step=True),
    "torch.adagrad": OptimizerMap(
        torch.optim.Adagrad, lambda g: "torch.adagrad",
        lambda g: {k: g[k] for k in ("lr", "lr_decay", "weight_decay", "initial_accumulator_value", "eps")},
        (("sum", "sum", _always),), has_step=True, state_at_step_zero=True),
    "torch.adafactor": OptimizerMap(
        torch.optim.Adafactor, lambda g: "torch.adafactor", _adafactor_hp,
        (("row_var", "row_var", _always), ("col_var", "col_var", _always), ("variance", "variance", _always)),
        has_step=True, per_parameter=True),
    # torch.optim.Muon takes 2-D parameters only, and so does the session (refused otherwise, naming the
    # parameter): biases and norms go to a second optimizer, AdamW, as with torch.
    "torch.muon": OptimizerMap(torch.optim.Muon, lambda g: "torch.muon", _muon_hp,
                               (("momentum_buffer", "momentum_buffer", _always),), has_step=False),
}
CLASSES = {torch.optim.Adam: "torch.adam", torch.optim.AdamW: "adamw", torch.optim.SGD: "torch.sgd",
           torch.optim.RMSprop: "torch.rmsprop", torch.optim.Adagrad: "torch.adagrad",
           torch.optim.Adafactor: "torch.adafactor", torch.optim.Muon: "torch.muon"}
BOOK = ("adam", "sgd", "rmsprop", "adagrad", "momentum", "nesterov")


def lookup(optimizer) -> tuple[str, OptimizerMap]:
    """The optreg name and mapping for `optimizer` (an optreg name or a torch.optim class)."""
    name = CLASSES.get(optimizer, optimizer) if isinstance(optimizer, type) else optimizer
    if isinstance(name, str) and name in MAPPINGS:
        return name, MAPPINGS[name]
    hint = " (that is optreg's book optimizer, not torch's)" if name in BOOK else ""
    raise ValueError(f"optimizer={optimizer!r}{hint}: RemoteOptimizer runs the torch-parity optimizers; use one of "
                     + ", ".join(repr(n) for n in MAPPINGS) + " or a torch.optim class (Adam, AdamW, SGD, RMSprop, "
                     "Adagrad, Adafactor, Muon)")


def server_hyperparameters(mapping: OptimizerMap, group: dict) -> dict[str, float]:
    """The group's options as the session's hyperparameters (floats; bools as 0/1; tensor lr as its value)."""
    out = {}
    for k, v in mapping.hyperparameters(group).items():
        if isinstance(v, torch.Tensor):
            v = v.item()
        out[k] = float(v)
    return out


def to_torch_state(mapping: OptimizerMap, group: dict, step: int, slots: dict[str, np.ndarray],
                   like: torch.Tensor) -> dict:
    """One parameter's torch state from the session's slot arrays (float32 master precision)."""
    if step == 0 and not mapping.state_at_step_zero:
        return {}
    out = {}
    if mapping.has_step:
        out["step"] = torch.tensor(float(step), dtype=_get_scalar_dtype())
    for torch_name, slot, present in mapping.state:
        if mapping.per_parameter and slots[slot].size == 0:
            continue  # not kept for this parameter
        if present(group):
            value = torch.from_numpy(np.array(slots[slot]))
            if slot == "sum" and step == 0:
                # torch.adagrad's session adds initial_accumulator_value at step 1; torch fills it at construction
                value += group["initial_accumulator_value"]
            out[torch_name] = value.to(like.device)
    return out


def to_session_state(mapping: OptimizerMap, group: dict, names: list[str], states: list[dict], shapes: list[tuple],
                     master: np.dtype, where: str) -> tuple[dict[str, dict[str, np.ndarray]], int]:
    """(slots, step) for a new session from the group's torch states (one per parameter, {} when none).

    torch counts steps per parameter and the session counts one per group, so the parameters of a
    group must agree: a group where torch skipped some parameters cannot be expressed and is refused.
    """
    present = [bool(s) for s in states]
    if not any(present):
        return {}, 0
    if not all(present):
        missing = [n for n, p in zip(names, present) if not p]
        raise ValueError(f"{where}: state for some parameters but not {', '.join(missing)}; an optreg session keeps "
                         "one step count per param group, so every parameter of a group needs state (or none)")
    known = {"step"} | {t for t, _, _ in mapping.state} if mapping.has_step else {t for t, _, _ in mapping.state}
    needed = ({"step"} if mapping.has_step else set()) | {t for t, _, present in mapping.state if present(group)
                                                          and not mapping.per_parameter}
    for name, state in zip(names, states):
        if not needed <= set(state) or not set(state) <= known:
            raise ValueError(f"{where}: the state of {name} has {sorted(state)}; {mapping.torch_class.__name__} with "
                             f"these options keeps {sorted(needed)}: is the state dict from another optimizer?")
    if mapping.has_step:
        steps = {float(s["step"]) for s in states}
        if len(steps) != 1:
            raise ValueError(f"{where}: the parameters have different step counts {sorted(steps)}; an optreg "
                             "session keeps one per param group: put parameters stepped separately in their own "
                             "group")
        step = int(steps.pop())
    else:
        step = 1  # SGD keeps no step: a momentum buffer exists only after the first step
    slots: dict[str, dict[str, np.ndarray]] = {}
    for torch_name, slot, _ in mapping.state:
        arrays = {}
        for name, state, shape in zip(names, states, shapes):
            value = state.get(torch_name)
            if value is None:
                arrays[name] = np.zeros((0,) if mapping.per_parameter else shape, master)
                continue
            a = value.detach().to("cpu", torch.float64 if master == np.float64 else torch.float32).numpy()
            if slot == "sum" and step == 0:
                a = a - np.asarray(group["initial_accumulator_value"], a.dtype)
            if a.shape != tuple(shape) and not mapping.per_parameter:  # (the server checks declared layouts)
                raise ValueError(f"{where}: state {torch_name!r} of {name} has shape {list(a.shape)}, the parameter "
                                 f"{list(shape)}")
            arrays[name] = np.ascontiguousarray(a)
        slots[slot] = arrays
    return slots, step


def check_value(spec, value: float, where: str) -> None:
    """The server's own check of one hyperparameter (type, finite, bounds) from its published spec, so a
    bad value is refused before any group's gradients are sent. Raises UsageError (a ValueError) naming it."""
    name = spec.name
    problem = None
    if value != value or value in (float("inf"), float("-inf")):
        problem = "must be finite"
    elif spec.type == "bool" and value not in (0.0, 1.0):
        problem = "must be a boolean"
    elif spec.type == "int" and value != int(value):
        problem = "must be an integer"
    else:
        low, high = spec.minimum, spec.maximum
        if low is not None and (value <= low if spec.minimum_exclusive else value < low):
            problem = f"must be {'>' if spec.minimum_exclusive else '>='} {low:g}"
        elif high is not None and (value >= high if spec.maximum_exclusive else value > high):
            problem = f"must be {'<' if spec.maximum_exclusive else '<='} {high:g}"
    if problem:
        raise UsageError(f"{where}: {name}={value!r} {problem} (the group's {TORCH_OPTION.get(name, name)}); "
                         "nothing was sent")


# optreg hyperparameter -> the torch option it comes from, for messages
TORCH_OPTION = {"beta1": "betas[0]", "beta2": "betas[1]"}
