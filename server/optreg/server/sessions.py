"""Sessions: master parameters, optimizer state, hyperparameters and step count, each behind its lock."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import grpc
import numpy as np

from optreg.plugins.registry import Registered
from optreg.server import fastkernels, kernels
from optreg.server.errors import RequestError, invalid
from optreg.v1 import session_pb2, tensor_pb2, tensors

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
    # Persistence (see store.py): DURABILITY_* in force, its window, the owner's token hash.
    durability: int = session_pb2.DURABILITY_NONE
    periodic_steps: int = 0
    periodic_seconds: float = 0.0
    owner: str = ""
    persisted_step: int = -1
    persisted_at: float = field(default_factory=time.monotonic)
    dirty: bool = True
    # Shapes and slot names stay known while the tensors are unloaded (params is None).
    shapes: dict[str, tuple] = field(default_factory=dict)
    slot_names: list[str] = field(default_factory=list)
    nbytes: int = 0
    _spec: dict | None = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        if self.params is not None and not self.shapes:
            self.shapes = {n: tuple(p.shape) for n, p in self.params.items()}
            self.slot_names = list(self.state)
        if not self.nbytes:
            self.nbytes = self.size_bytes()

    @property
    def loaded(self) -> bool:
        return self.params is not None

    def size_bytes(self) -> int:
        elems = sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes.values())
        copies = 1 + len(self.slot_names) + (1 if self.step_reply == REPLY.STEP_REPLY_DELTA else 0)
        return elems * copies * self.dtype.itemsize

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

    def check_gradient(self, t) -> None:
        """A gradient's (or a chunk's) name, dtype and shape against the session's; INVALID_ARGUMENT naming it."""
        spec = self.gradient_spec()
        if t.name not in spec:
            raise invalid(f"unknown gradient {t.name!r}; the session's parameters are: {', '.join(spec)}")
        shape, allowed = spec[t.name]
        if t.dtype not in allowed:
            raise invalid(f"gradient {t.name!r}: dtype {tensors.dtype_name(t.dtype)} does not fit the session's "
                          f"master dtype {tensors.dtype_name(self.master_code)}; send one of "
                          + ", ".join(tensors.dtype_name(a) for a in allowed))
        if tuple(t.shape) != shape:
            raise invalid(f"gradient {t.name!r}: shape {list(t.shape)}, but the parameter's is {list(shape)}")

    def gradient_spec(self) -> dict[str, tuple[tuple, tuple]]:
        """name -> (shape, dtypes allowed); built once (shapes never change), treat as read-only."""
        spec = self._spec
        if spec is None:
            allowed = GRAD_DTYPES[self.master_code]
            spec = self._spec = {name: (shape, allowed) for name, shape in self.shapes.items()}
        return spec

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

    def apply(self, grads: dict[str, np.ndarray], out: dict[str, np.ndarray] | None = None) -> StepResult:
        """Apply one step of validated, master-dtype gradients. Caller holds the lock.

        `out` (name -> array of the parameter's shape and dtype) receives the updated
        parameters too, copied as they are computed (shared-memory steps); after a plugin
        error it receives the restored ones."""
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
                kernels.apply(defn, param, grads[name], {s: self.state[s][name] for s in self.state}, t, hp,
                              None if out is None else out.get(name))
                if want_delta:
                    np.subtract(param, delta[name], out=delta[name])
        except Exception as e:
            if backup is not None:
                for n, p in backup[0].items():
                    self.params[n][...] = p
                for s, arrs in backup[1].items():
                    for n, a in arrs.items():
                        self.state[s][n][...] = a
            for n, o in (out or {}).items():
                np.copyto(o, self.params[n])
            raise PluginError(f"optimizer {defn.name} (plugin {self.optimizer.plugin}) raised in update: "
                              f"{type(e).__name__}: {e}") from e
        self.step = t
        self.dirty = True
        if want_delta:
            self.last_delta = delta
        return self.reply(False)


def check_finite(name: str, grad: np.ndarray) -> None:
    # numba when compiled: ~1.4-2x numpy's speed at 1e7 (no 10 MB bool temporary; memory-bound, so
    # splitting it over two threads measured no faster), and for small gradients it keeps the GIL
    # (np.isfinite releases it above 500 elements, which costs a thread hand-off on a busy server).
    ok = fastkernels.all_finite(grad)
    if ok is None:
        ok = np.isfinite(grad).all()
    if not ok:
        bad = int(np.size(grad) - np.count_nonzero(np.isfinite(grad)))
        raise invalid(f"gradient {name!r} has {bad} NaN or Inf value(s); the step was not applied")


