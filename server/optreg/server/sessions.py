"""Sessions: master parameters, optimizer state, hyperparameters and step count, each behind its lock."""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field

import grpc
import numpy as np

from optreg.plugins import HyperparameterError
from optreg.plugins.registry import Registered, Registry
from optreg.server import kernels
from optreg.server.errors import RequestError, invalid, not_found
from optreg.v1 import session_pb2, tensor_pb2

DT = tensor_pb2.DataType
REPLY = session_pb2.StepReply
MASTER_DTYPES = {DT.DATA_TYPE_FLOAT32: np.dtype("<f4"), DT.DATA_TYPE_FLOAT64: np.dtype("<f8")}
# A gradient may be the master dtype or narrower; it is widened on the server.
GRAD_DTYPES = {
    DT.DATA_TYPE_FLOAT32: (DT.DATA_TYPE_FLOAT32, DT.DATA_TYPE_FLOAT16, DT.DATA_TYPE_BFLOAT16),
    DT.DATA_TYPE_FLOAT64: (DT.DATA_TYPE_FLOAT64, DT.DATA_TYPE_FLOAT32, DT.DATA_TYPE_FLOAT16,
                           DT.DATA_TYPE_BFLOAT16),
}
BUILTIN_DISTRIBUTION = "optreg"


class PluginError(Exception):
    """An optimizer's update raised; the session was restored to before the step."""


@dataclass
class StepResult:
    step: int
    replayed: bool
    tensors: dict[str, np.ndarray]  # what the session's step_reply asks for (empty for NONE)


@dataclass
class Session:
    id: str
    optimizer: Registered
    hyperparameters: dict
    master_code: int
    step_reply: int
    params: dict[str, np.ndarray]
    state: dict[str, dict[str, np.ndarray]]  # slot -> parameter name -> array
    step: int = 0
    created_at: float = field(default_factory=time.time)
    last_used_at: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # STEP_REPLY_DELTA keeps the last step's deltas so a retry gets the same answer.
    last_delta: dict[str, np.ndarray] | None = None

    @property
    def dtype(self) -> np.dtype:
        return MASTER_DTYPES[self.master_code]

    def check_fence(self, step: int | None) -> bool:
        """True when `step` names the last applied step (a retry); raise if it names neither it nor the next."""
        if step is None or step == self.step:
            return False
        if step == self.step - 1 and step >= 0:
            return True
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"step {step} does not match session {self.id}, which is at step {self.step}: "
            f"send step={self.step} for the next step (or {self.step - 1} to retry the last one)",
            metadata=(("optreg-server-step", str(self.step)),))

    def gradient_spec(self) -> dict[str, tuple[tuple, tuple]]:
        allowed = GRAD_DTYPES[self.master_code]
        return {name: (p.shape, allowed) for name, p in self.params.items()}

    def reply(self, replayed: bool) -> StepResult:
        if self.step_reply == REPLY.STEP_REPLY_NONE:
            tensors = {}
        elif self.step_reply == REPLY.STEP_REPLY_DELTA:
            tensors = self.last_delta or {n: np.zeros_like(p) for n, p in self.params.items()}
        else:
            tensors = self.params
        return StepResult(self.step, replayed, tensors)

    def fenced_apply(self, fence: int | None, grads: dict[str, np.ndarray], still_wanted) -> StepResult:
        """Apply unless `fence` names the last applied step (then answer it again). Caller holds the lock."""
        if self.check_fence(fence):
            return self.reply(True)
        if not still_wanted():  # deadline passed or client gone: apply no step nobody will see
            raise RequestError(grpc.StatusCode.CANCELLED, "the call ended before the step was applied")
        return self.apply(grads)

    def apply(self, grads: dict[str, np.ndarray]) -> StepResult:
        """Apply one step of validated, master-dtype gradients. Caller holds the lock."""
        defn, hp, t = self.optimizer.definition, self.hyperparameters, self.step + 1
        # Built-ins are trusted; a third-party update runs on a snapshot so a raise loses nothing.
        backup = None
        if self.optimizer.distribution != BUILTIN_DISTRIBUTION:
            backup = ({n: p.copy() for n, p in self.params.items()},
                      {s: {n: a.copy() for n, a in arrs.items()} for s, arrs in self.state.items()})
        want_delta = self.step_reply == REPLY.STEP_REPLY_DELTA
        delta = {}
        try:
            for name, param in self.params.items():
                if want_delta:
                    delta[name] = param.copy()
                kernels.apply(defn, param, grads[name], {s: self.state[s][name] for s in self.state}, t, hp)
                if want_delta:
                    np.subtract(param, delta[name], out=delta[name])
        except Exception as e:
            if backup is not None:
                for n, p in backup[0].items():
                    self.params[n][...] = p
                for s, arrs in backup[1].items():
                    for n, a in arrs.items():
                        self.state[s][n][...] = a
            raise PluginError(f"optimizer {defn.name} (plugin {self.optimizer.plugin}) raised in update: "
                              f"{type(e).__name__}: {e}") from e
        self.step = t
        if want_delta:
            self.last_delta = delta
        return self.reply(False)


def check_finite(name: str, grad: np.ndarray) -> None:
    if not np.isfinite(grad).all():
        bad = int(np.size(grad) - np.count_nonzero(np.isfinite(grad)))
        raise invalid(f"gradient {name!r} has {bad} NaN or Inf value(s); the step was not applied")


class SessionStore:
    def __init__(self, registry: Registry):
        self.registry = registry
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def get(self, session_id: str) -> Session:
        if not session_id:
            raise invalid("session_id is empty: pass the id CreateSession returned")
        try:
            session = self._sessions[session_id]
        except KeyError:
            raise not_found(f"session {session_id!r} not found") from None
        session.last_used_at = time.time()
        return session

    def list(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def delete(self, session_id: str) -> None:
        self.get(session_id)
        with self._lock:
            self._sessions.pop(session_id, None)

    def create(self, config: session_pb2.SessionConfig, params: dict[str, np.ndarray],
               state: dict[str, dict[str, np.ndarray]] | None = None, initial_step: int = 0) -> Session:
        try:
            registered = self.registry.get(config.optimizer)
        except KeyError as e:
            raise not_found(e.args[0]) from None
        defn = registered.definition
        try:
            hp = defn.resolve(dict(config.hyperparameters))
        except HyperparameterError as e:
            raise invalid(str(e)) from None
        if not params:
            raise invalid("parameters is empty: a session needs at least one named tensor")
        master = config.master_dtype
        if master == DT.DATA_TYPE_UNSPECIFIED:
            first = next(iter(params.values())).dtype
            master = DT.DATA_TYPE_FLOAT64 if first == np.float64 else DT.DATA_TYPE_FLOAT32
        if master not in MASTER_DTYPES:
            raise invalid(f"config.master_dtype {tensor_pb2.DataType.Name(master)} is not supported; "
                          "use DATA_TYPE_FLOAT32 or DATA_TYPE_FLOAT64")
        if config.step_reply not in REPLY.values():
            raise invalid(f"config.step_reply {config.step_reply} is not a StepReply value")
        if initial_step < 0:
            raise invalid(f"initial_step {initial_step} is negative")
        dtype = MASTER_DTYPES[master]
        master_params = {}
        for name, p in params.items():
            if not name:
                raise invalid("a parameter has an empty name")
            master_params[name] = np.array(p, dtype=dtype, order="C", copy=True)
            check_finite(name, master_params[name])
        slots = {}
        state = state or {}
        declared = {s.name for s in defn.slots}
        extra = set(state) - declared
        if extra:
            raise invalid(f"state slot(s) {', '.join(sorted(extra))} unknown to {defn.name}; "
                          f"it keeps: {', '.join(sorted(declared)) or 'none'}")
        if state and set(state) != declared:
            raise invalid(f"state must give every slot of {defn.name} ({', '.join(sorted(declared))}) or none")
        for slot in defn.slots:
            given = state.get(slot.name)
            if given is not None and set(given) != set(params):
                raise invalid(f"state slot {slot.name!r} must have exactly the parameters' names")
            arrays = {}
            for name, p in master_params.items():
                if given is None:
                    arrays[name] = np.full(p.shape, slot.initial_value, dtype=dtype)
                else:
                    if tuple(given[name].shape) != p.shape:
                        raise invalid(f"state {slot.name}/{name}: shape {list(given[name].shape)}, "
                                      f"expected {list(p.shape)}")
                    arrays[name] = np.array(given[name], dtype=dtype, order="C", copy=True)
            slots[slot.name] = arrays
        session_id = config.session_id or uuid.uuid4().hex
        session = Session(session_id, registered, hp, master, config.step_reply or REPLY.STEP_REPLY_PARAMETERS,
                          master_params, slots, step=initial_step)
        with self._lock:
            if session_id in self._sessions:
                raise RequestError(grpc.StatusCode.ALREADY_EXISTS, f"session {session_id!r} already exists")
            self._sessions[session_id] = session
        return session
