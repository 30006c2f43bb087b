"""A new session from a plain config: everything checked before anything is allocated."""
from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field

import numpy as np

from optreg.plugins import HyperparameterError
from optreg.plugins import layouts as api_layouts
from optreg.server.model.errors import FailedPrecondition, InvalidArgument, NotFound, shown
from optreg.server.model.session import (DURABILITIES, MASTER_DTYPES, MAX_STEP, REPLIES, Arrays, Durability, Session,
                                         SessionSchedule, check_values)
from optreg.v1 import names

SESSION_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
SESSION_ID_RULE = "1-128 letters, digits, '_', '-' or '.', not starting with '.' or '-'"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; each has a serve option (docs/durability.md, "Limits")."""
    max_tensors: int = 4096  # parameters a session
    max_name: int = 256  # characters in a tensor name


@dataclass(frozen=True)
class SessionConfig:
    optimizer: str
    hyperparameters: dict = field(default_factory=dict)
    master_dtype: str = ""  # "float32" | "float64" | "" (that of the first parameter)
    reply: str = "parameters"  # one of sessions.REPLIES
    session_id: str = ""  # "" for a fresh random id
    durability: str = ""  # one of sessions.DURABILITIES, "" for the server's default
    periodic_steps: int = 0
    periodic_seconds: float = 0.0
    workers: object | None = None  # membership.WorkerConfig: a shared session
    schedule: str = ""  # a registered schedule's name, "" for none
    schedule_parameters: dict = field(default_factory=dict)


def valid_id(session_id: str) -> bool:
    return bool(SESSION_ID.fullmatch(session_id))


class SessionFactory:
    def __init__(self, registry, budget, limits: Limits, default_durability: str, has_disk: bool,
                 periodic_steps: int, periodic_seconds: float):
        self.registry = registry
        self.budget = budget
        self.limits = limits
        self.default_durability = default_durability
        self.has_disk = has_disk
        self.periodic_steps = periodic_steps
        self.periodic_seconds = periodic_seconds

    def durability(self, config: SessionConfig) -> Durability:
        mode = config.durability or self.default_durability
        if mode not in DURABILITIES:
            raise InvalidArgument(f"config.durability {shown(mode)} is not one of {', '.join(DURABILITIES)}")
        if mode != "none" and not self.has_disk:
            raise FailedPrecondition(f"durability {mode} needs a server started with a data directory (--data-dir); this one "
                                     "keeps sessions in memory only (use durability none)")
        if config.periodic_steps < 0 or config.periodic_seconds < 0 or not np.isfinite(config.periodic_seconds):
            raise InvalidArgument("periodic_steps and periodic_seconds must be >= 0 (0: the server's default)")
        if mode != "periodic":
            return Durability(mode)
        return Durability(mode, config.periodic_steps or self.periodic_steps,
                          config.periodic_seconds or self.periodic_seconds)

    def schedule(self, config: SessionConfig, hp: dict) -> SessionSchedule | None:
        """The config's schedule with its parameters validated; None without one."""
        if not config.schedule:
            if config.schedule_parameters:
                raise InvalidArgument("config.schedule_parameters are given without config.schedule: name the "
                                      "schedule they are for (ListOptimizers lists the schedules)")
            return None
        try:
            registered = self.registry.schedule(config.schedule)
        except KeyError as e:
            raise InvalidArgument(f"config.schedule: {shown(e.args[0], 600)}") from None
        try:
            parameters = registered.definition.resolve(dict(config.schedule_parameters))
        except HyperparameterError as e:
            raise InvalidArgument(f"config.schedule_parameters: {e}") from None
        if "lr" not in hp:
            raise InvalidArgument(f"config.schedule {shown(config.schedule)}: optimizer {config.optimizer} has no 'lr' "
                                  "hyperparameter for a schedule to set; leave config.schedule empty")
        return SessionSchedule(registered, parameters)

    def build(self, config: SessionConfig, params: dict[str, np.ndarray],
              state: dict[str, dict[str, np.ndarray]] | None = None, initial_step: int = 0,
              owner: str = "", adopt: bool = False) -> Session:
        """A validated Session holding its own copies (counted against the budget); not yet in any index.
        `adopt`: the arrays are the caller's to give away (a stream's freshly assembled upload): those
        already in the master dtype and C order become the session's without a copy."""
        try:
            registered = self.registry.get(config.optimizer)
        except KeyError as e:
            raise NotFound(shown(e.args[0], 600)) from None
        defn = registered.definition
        try:
            hp = defn.resolve(dict(config.hyperparameters))
        except HyperparameterError as e:
            raise InvalidArgument(str(e)) from None
        schedule = self.schedule(config, hp)
        if config.session_id and not valid_id(config.session_id):
            raise InvalidArgument(f"session_id {shown(config.session_id)}: use {SESSION_ID_RULE}")
        if not params:
            raise InvalidArgument("parameters is empty: a session needs at least one named tensor")
        if len(params) > self.limits.max_tensors:
            raise InvalidArgument(f"{len(params)} parameters: a session takes at most {self.limits.max_tensors} "
                                  "(--max-tensors); group small tensors into larger ones")
        for name, p in params.items():
            if not name or len(name) > self.limits.max_name:
                raise InvalidArgument(f"parameter name {shown(name)}: use 1-{self.limits.max_name} characters")
            if np.dtype(p.dtype).kind in "iub":  # the wire's 8-bit integers carry state codes only
                raise InvalidArgument(f"parameter {shown(name)}: dtype {np.dtype(p.dtype).name} is not a float; "
                                      "send parameters as float32, float64, float16 or bfloat16")
        if config.reply not in REPLIES:
            raise InvalidArgument(f"config.step_reply {shown(config.reply)} is not one of {', '.join(REPLIES)}")
        if not 0 <= initial_step < MAX_STEP:
            raise InvalidArgument(f"initial_step {initial_step} must be in 0..{MAX_STEP - 1}")
        master = config.master_dtype or ("float64" if next(iter(params.values())).dtype == np.float64 else "float32")
        codes = names.MASTER_DTYPE
        if master not in codes:
            raise InvalidArgument(f"config.master_dtype {shown(master)} is not supported; use float32 or float64")
        dtype = MASTER_DTYPES[codes[master]]
        durability = self.durability(config)
        state = state or {}
        declared = [s.name for s in defn.slots]
        extra = set(state) - set(declared)
        if extra:
            raise InvalidArgument(f"state slot(s) {shown(', '.join(sorted(extra)))} unknown to {defn.name}; "
                                  f"it keeps: {', '.join(sorted(declared)) or 'none'}")
        if state and set(state) != set(declared):
            raise InvalidArgument(f"state must give every slot of {defn.name} ({', '.join(sorted(declared))}) "
                                  "or none")
        shapes = {n: tuple(np.shape(p)) for n, p in params.items()}
        if defn.accepts is not None:
            for name, shape in shapes.items():
                why = defn.accepts(name, shape)
                if why:
                    raise InvalidArgument(f"parameter {shown(name)} of shape {list(shape)}: optimizer {defn.name} "
                                          f"does not apply to it: {why}")
        layouts = api_layouts(defn, shapes, dtype)
        for slot, arrays in state.items():
            if set(arrays) != set(params):
                raise InvalidArgument(f"state slot {slot!r} must have exactly the parameters' names")
            for name, a in arrays.items():
                shape = layouts[slot][name][0]
                if tuple(a.shape) != shape:
                    raise InvalidArgument(f"state {slot}/{shown(name)}: shape {list(a.shape)}, expected {list(shape)} "
                                          f"({defn.name}'s {slot} for a parameter of shape {list(shapes[name])})")
                want = layouts[slot][name][1]
                if a.dtype != want and (a.dtype.kind in "iu" or want.kind in "iu"):  # codes are not numbers to cast
                    raise InvalidArgument(f"state {slot}/{shown(name)}: dtype {a.dtype.name}, expected {want.name} "
                                          f"({defn.name}'s {slot} holds codes; send it as ReadState returned it)")
        session = Session(config.session_id or uuid.uuid4().hex, registered, hp, codes[master], config.reply,
                          durability, shapes, tuple(declared), step=initial_step, first_step=initial_step,
                          owner=owner, schedule=schedule)
        if config.workers is not None:
            session.workers = config.workers.checked()
            if config.reply == "bf16_delta" and session.workers.mode != "sync":
                # One copy of the members' parameters, which a sync round's answer moves for all of them alike
                # (rounds.py); an async contribution's answer is its own worker's.
                raise InvalidArgument(f"config.step_reply bf16_delta with config.workers.mode {session.workers.mode}: "
                                      "it keeps one copy of the workers' parameters, which only sync rounds answer "
                                      "alike; use mode sync, or step_reply parameters")
            if session.workers.mode != "sync" and config.reply == "delta":
                # A contribution applies to parameters other workers moved since this one read them: new - old
                # would leave the worker's copy without their updates (sync rounds are read and applied whole).
                raise InvalidArgument(
                    f"config.step_reply delta with config.workers.mode {session.workers.mode}: a contribution's "
                    "new - old would not bring the worker's copy up to date (other workers moved the parameters "
                    "since it read them); use step_reply parameters (or none, and read), or mode sync")
            if session.workers.scale_lr and "lr" not in hp:
                raise InvalidArgument(f"config.workers.scale_lr_by_staleness: optimizer {defn.name} has no 'lr' "
                                      "hyperparameter to scale; leave it false")

        def build() -> Arrays:
            copy = None if adopt else True
            master_params = {n: np.array(p, dtype=dtype, order="C", copy=copy) for n, p in params.items()}
            slots = {}
            for slot in defn.slots:
                given = state.get(slot.name)
                slots[slot.name] = {
                    n: (_filled(*layouts[slot.name][n], slot.initial_value) if given is None
                        else np.array(given[n], dtype=layouts[slot.name][n][1], order="C", copy=copy))
                    for n in master_params}
            return Arrays(master_params, slots)

        session.live = self.budget.allocate(f"session {session.id}", session.set_bytes(), build)
        problem = check_values(defn, session.live.params, session.live.state)  # as converted to the master dtype
        if problem:
            session.live = None
            raise InvalidArgument(f"{problem}; nothing was created")
        return session


def _filled(shape, dtype, value: float) -> np.ndarray:
    """A slot's initial array; zeros from calloc, so a large session's untouched pages cost no memory
    until its first step writes them."""
    a = np.zeros(shape, dtype)
    if value != 0 or np.signbit(value):
        a.fill(value)
    return a
