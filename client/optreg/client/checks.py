"""Checks made before anything is sent: create_session's arguments (UsageError naming the
argument), and whether an existing session matches what a caller resumes or attaches with."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from optreg.client.errors import UsageError
from optreg.client.results import DURABILITY, MASTER_DTYPE, STEP_REPLY, SessionInfo
from optreg.v1 import session_pb2, tensor_pb2


def session_config(optimizer, params, session_id, resume, master_dtype, step_reply, durability, periodic_steps,
                   periodic_seconds, state, initial_step, hyperparameters):
    """Check the arguments before anything is sent (UsageError), and build the SessionConfig."""
    if not isinstance(optimizer, str) or not optimizer:
        raise UsageError(f"optimizer={optimizer!r}: give an optimizer's name (client.optimizers() lists them)")
    if not isinstance(params, Mapping):
        raise UsageError(f"params: give a mapping of name -> numpy array, not {type(params).__name__}")
    params = {name: a if isinstance(a, np.ndarray) else np.asarray(a) for name, a in params.items()}
    if session_id is not None and (not isinstance(session_id, str) or not session_id):
        raise UsageError(f"session_id={session_id!r}: give a non-empty string, or None for a fresh id")
    if resume and not session_id:
        raise UsageError("resume=True needs the session_id to resume")
    master_dtype = dtype_name(master_dtype)
    if step_reply is not None and step_reply not in STEP_REPLY:
        raise UsageError(f"step_reply={step_reply!r}: use one of {', '.join(map(repr, STEP_REPLY))}")
    if durability is not None and durability not in DURABILITY:
        raise UsageError(f"durability={durability!r}: use one of {', '.join(map(repr, DURABILITY))} or None "
                         "(the server's default)")
    for what, value in (("periodic_steps", periodic_steps), ("periodic_seconds", periodic_seconds),
                        ("initial_step", initial_step)):
        if value is not None and not (isinstance(value, (int, float)) and value >= 0):
            raise UsageError(f"{what}={value!r}: give a number >= 0")
    hp = {}
    for name, value in hyperparameters.items():
        try:
            hp[name] = float(value)
        except (TypeError, ValueError):
            raise UsageError(f"hyperparameter {name}={value!r} is not a number") from None
    state = {slot: dict(arrays) for slot, arrays in (state or {}).items()}
    config = session_pb2.SessionConfig(
        optimizer=optimizer, hyperparameters=hp,
        master_dtype=MASTER_DTYPE.get(master_dtype, tensor_pb2.DATA_TYPE_UNSPECIFIED),
        step_reply=STEP_REPLY.get(step_reply, session_pb2.STEP_REPLY_UNSPECIFIED), session_id=session_id or "",
        durability=DURABILITY.get(durability, session_pb2.DURABILITY_UNSPECIFIED),
        periodic_steps=int(periodic_steps or 0), periodic_seconds=float(periodic_seconds or 0.0))
    return config, params, state


def dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    try:
        name = np.dtype(dtype).name
    except TypeError:
        name = None
    if name not in MASTER_DTYPE:
        raise UsageError(f"master_dtype={dtype!r}: use 'float32' or 'float64' (None: that of the arrays)")
    return name


def shape_mismatches(info: SessionInfo, params: Mapping[str, np.ndarray], require_all: bool) -> list[str]:
    problems = []
    unknown = [n for n in params if n not in info.parameters]
    if unknown:
        problems.append(f"it has no parameter {', '.join(map(repr, unknown))} (it has "
                        f"{', '.join(map(repr, info.parameters))})")
    missing = [n for n in info.parameters if n not in params]
    if require_all and missing:
        problems.append(f"parameter {', '.join(map(repr, missing))} missing from params")
    for name, shape in info.parameters.items():
        if name in params and tuple(np.shape(params[name])) != tuple(shape):
            problems.append(f"parameter {name!r} has shape {tuple(shape)} there, {tuple(np.shape(params[name]))} here")
    return problems


def resume_mismatches(info: SessionInfo, optimizer: str, params: Mapping[str, np.ndarray],
                      master_dtype: str | None) -> list[str]:
    """What makes `params` and `optimizer` not the session described by `info` (empty: they match)."""
    problems = []
    if info.optimizer != optimizer:
        problems.append(f"its optimizer is {info.optimizer!r}, not {optimizer!r}")
    problems += shape_mismatches(info, params, require_all=True)
    if master_dtype is None and params:
        # The server's rule for an unspecified master dtype: the arrays' when float32/float64.
        first = np.asarray(next(iter(params.values()))).dtype.name
        master_dtype = first if first in MASTER_DTYPE else "float32"
    if master_dtype is not None and master_dtype != info.master_dtype:
        problems.append(f"its master dtype is {info.master_dtype}, not {master_dtype}")
    return problems


def load_into(params: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray]) -> None:
    for name, value in values.items():
        target = params.get(name)
        if isinstance(target, np.ndarray) and target.flags.writeable:
            np.copyto(target, value, casting="unsafe")
