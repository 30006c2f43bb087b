"""What the client's calls return: small frozen objects built from the protobufs, never the protobufs."""
from __future__ import annotations

import dataclasses
import datetime
from dataclasses import dataclass
from typing import Mapping, NamedTuple

import numpy as np

from optreg.v1 import names, registry_pb2, session_pb2
from optreg.v1.names import name_of

# Enum values <-> the names the client's API takes and returns (optreg.v1.names: the server's tables too).
STEP_REPLY, DURABILITY, MASTER_DTYPE = names.STEP_REPLY, names.DURABILITY, names.MASTER_DTYPE
_ITEMSIZE = {"float32": 4, "float64": 8}


def _time(ts) -> datetime.datetime | None:
    if not ts.seconds and not ts.nanos:
        return None
    return ts.ToDatetime(tzinfo=datetime.timezone.utc)


@dataclass(frozen=True)
class Hyperparameter:
    name: str
    type: str            # "float", "int" or "bool"
    default: float
    minimum: float | None
    maximum: float | None
    minimum_exclusive: bool
    maximum_exclusive: bool
    doc: str

    @classmethod
    def from_proto(cls, h: registry_pb2.HyperparameterSpec) -> "Hyperparameter":
        return cls(h.name, name_of(names.HYPERPARAMETER_TYPE, h.type) or "float", h.default,
                   h.minimum if h.HasField("minimum") else None, h.maximum if h.HasField("maximum") else None,
                   h.minimum_exclusive, h.maximum_exclusive, h.doc)


@dataclass(frozen=True)
class Slot:
    """A state slot and its layout (registry.proto StateSlotSpec): `shape` the rule giving its shape
    from a parameter's ("same", "rows", "scalar", "blocks(256)", ...), `dtype` "" for the session's."""
    name: str
    initial_value: float
    shape: str = "same"
    dtype: str = ""
    domain: str = "real"


@dataclass(frozen=True)
class OptimizerInfo:
    """One optimizer a server has loaded, and the plugin that provides it."""
    name: str
    summary: str
    hyperparameters: tuple[Hyperparameter, ...]
    slots: tuple[Slot, ...]
    elementwise: bool
    sparse_rows: bool
    plugin: str
    distribution: str
    version: str

    @property
    def defaults(self) -> dict[str, float]:
        return {h.name: h.default for h in self.hyperparameters}

    @classmethod
    def from_proto(cls, o: registry_pb2.OptimizerInfo) -> "OptimizerInfo":
        return cls(o.name, o.summary, tuple(Hyperparameter.from_proto(h) for h in o.hyperparameters),
                   tuple(Slot(s.name, s.initial_value, s.shape or "same", s.dtype, s.domain or "real")
                         for s in o.slots), o.elementwise, o.sparse_rows,
                   o.plugin, o.distribution, o.version)


@dataclass(frozen=True)
class ScheduleInfo:
    """A learning-rate schedule the server offers: its parameters (with `required` those that
    must be given) and where it comes from."""
    name: str
    summary: str
    parameters: tuple[Hyperparameter, ...]
    required: tuple[str, ...]
    plugin: str
    distribution: str
    version: str

    @classmethod
    def from_proto(cls, o: registry_pb2.ScheduleInfo) -> "ScheduleInfo":
        return cls(o.name, o.summary, tuple(Hyperparameter.from_proto(h) for h in o.parameters), tuple(o.required),
                   o.plugin, o.distribution, o.version)


@dataclass(frozen=True)
class PluginFailure:
    """A plugin the server could not load, and why."""
    plugin: str
    reason: str


@dataclass(frozen=True)
class SessionInfo:
    """A session as the server last described it."""
    session_id: str
    optimizer: str
    hyperparameters: Mapping[str, float]
    step: int                       # steps applied so far
    master_dtype: str               # "float32" or "float64"
    step_reply: str                 # "parameters", "delta" or "none"
    parameters: Mapping[str, tuple[int, ...]]   # name -> shape, in the session's order
    slots: tuple[str, ...]
    durability: str                 # "every-step", "log", "periodic" or "none"
    periodic_steps: int
    periodic_seconds: float
    persisted_step: int             # the step of the newest copy on disk (-1: none)
    loaded: bool                    # False while it sits only on disk
    created_at: datetime.datetime | None = None     # UTC
    last_used_at: datetime.datetime | None = None   # UTC
    quarantined: str = ""           # why its files failed their checks ("" when healthy)
    missing_optimizer: str = ""     # the optimizer it needs when the server has no plugin for it
    # log durability with a memory log: steps acknowledged but not yet on disk, and the oldest one's age
    # in seconds (what a power loss would lose now)
    unsaved_steps: int = 0
    unsaved_seconds: float = 0.0
    # Shared sessions: the worker config (None: single writer), members, open and last closed round.
    workers: WorkerSetup | None = None
    members: tuple = ()
    open_round: int = 0
    last_round: RoundSummary | None = None
    schedule: str = ""              # its learning-rate schedule ("" for none) and the schedule's parameters
    schedule_parameters: Mapping[str, float] = dataclasses.field(default_factory=dict)
    server_size_bytes: int = 0      # SessionInfo.size_bytes as the server counts it (0: a server before the field)

    @property
    def state(self) -> str:
        """One phrase: whether the session can be used now, and if not, why."""
        if self.missing_optimizer:
            return f"optimizer {self.missing_optimizer} not installed"
        if self.quarantined:
            return "quarantined (damaged files)"
        return "ready" if self.loaded else "on disk"

    @property
    def size_bytes(self) -> int:
        """Bytes of parameters and state slots, each slot in its declared shape and dtype (what the session
        holds and the server's memory budget counts). From a server before SessionInfo.size_bytes: every slot
        taken as parameter-sized in the master dtype (true of contract v1 optimizers only)."""
        if self.server_size_bytes:
            return self.server_size_bytes
        elements = sum(int(np.prod(s, dtype=np.int64)) for s in self.parameters.values())
        return elements * _ITEMSIZE.get(self.master_dtype, 4) * (1 + len(self.slots))

    @property
    def parameter_bytes(self) -> int:
        return sum(int(np.prod(s, dtype=np.int64)) for s in self.parameters.values()) * \
            _ITEMSIZE.get(self.master_dtype, 4)

    @classmethod
    def from_proto(cls, s: session_pb2.SessionInfo) -> "SessionInfo":
        return cls(
            session_id=s.session_id, optimizer=s.optimizer, hyperparameters=dict(sorted(s.hyperparameters.items())),
            step=s.step, master_dtype=name_of(MASTER_DTYPE, s.master_dtype) or "float32",
            step_reply=name_of(STEP_REPLY, s.step_reply, "parameters") or "parameters",
            parameters={t.name: tuple(t.shape) for t in s.parameters}, slots=tuple(s.slots),
            durability=name_of(DURABILITY, s.durability) or "none", periodic_steps=s.periodic_steps,
            periodic_seconds=s.periodic_seconds, persisted_step=s.persisted_step, loaded=s.loaded,
            created_at=_time(s.created_at), last_used_at=_time(s.last_used_at), quarantined=s.quarantined,
            missing_optimizer=s.missing_optimizer, schedule=s.schedule,
            schedule_parameters=dict(sorted(s.schedule_parameters.items())), unsaved_steps=s.unsaved_steps,
            unsaved_seconds=s.unsaved_seconds, server_size_bytes=s.size_bytes, **_shared(s))


@dataclass(frozen=True)
class WorkerSetup:
    workers: int
    mode: str                       # "sync", "async" or "ssp"
    min_workers: int
    round_deadline: float
    lease: float
    combine: str                    # "mean" or "sum"
    staleness: int
    scale_lr_by_staleness: bool = False  # async, ssp: a contribution runs at lr / (1 + its staleness)


@dataclass(frozen=True)
class MemberInfo:
    worker: str
    contributions: int              # applied contributions (the SSP clock)
    last_round: int                 # -1: none yet
    last_contact: datetime.datetime | None
    joined_at: datetime.datetime | None


@dataclass(frozen=True)
class RoundSummary:
    round: int
    contributors: tuple[str, ...]
    stragglers: tuple[str, ...]
    seconds: float
    noise_scale: float = 0.0         # B_simple in worker batches (McCandlish et al. 2018); 0: not estimated




def _shared(s) -> dict:
    if not s.HasField("workers"):
        return {}
    w = s.workers
    out = dict(workers=WorkerSetup(w.workers, name_of(names.WORKER_MODE, w.mode, "sync") or "sync", w.min_workers,
                                   w.round_deadline_seconds, w.lease_seconds, name_of(names.COMBINE, w.combine, "mean") or "mean",
                                   w.staleness, w.scale_lr_by_staleness),
               members=tuple(MemberInfo(m.worker, m.contributions, m.last_round, _time(m.last_contact),
                                        _time(m.joined_at)) for m in s.members),
               open_round=s.open_round)
    if s.HasField("last_round"):
        r = s.last_round
        out["last_round"] = RoundSummary(r.round, tuple(r.contributors), tuple(r.stragglers), r.seconds,
                                         r.noise_scale)
    return out


class StepResult(NamedTuple):
    """What one step answered. `step`: the session's step count after it; `replayed`: True when
    the server answered a retry of an already applied step; `arrays`: the session's arrays, updated
    in place as its step_reply says. (A NamedTuple: built on every step, so it must be cheap.)"""
    step: int
    replayed: bool
    arrays: Mapping[str, np.ndarray]

    def __repr__(self):
        return f"StepResult(step={self.step}, replayed={self.replayed})"


class SessionState(NamedTuple):
    """Everything needed to recreate a session: pass `parameters`, `state=state` and
    `initial_step=info.step` to create_session. Unpacks as (info, parameters, state)."""
    info: SessionInfo
    parameters: dict[str, np.ndarray]
    state: dict[str, dict[str, np.ndarray]]
