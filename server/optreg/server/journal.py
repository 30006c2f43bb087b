"""Where sessions' steps go to be durable. NoJournal: memory only. Journal: a data directory."""
from __future__ import annotations

import logging
import pathlib
import time

import numpy as np

from optreg.server import storage as fmt
from optreg.server.errors import Unavailable
from optreg.server.sessions import DTYPE_NAMES, Arrays, Durability, Session

log = logging.getLogger("optreg.server.journal")
DTYPE_CODES = {v: k for k, v in DTYPE_NAMES.items()}


class NullRecord:
    def add(self, name, code, shape, start, data) -> None:
        pass

    def renumber(self, step: int) -> None:
        pass

    def commit(self) -> None:
        pass

    def abort(self) -> None:
        pass


NULL_RECORD = NullRecord()


class NoJournal:
    """Memory-only server: nothing is written."""

    def create(self, session): pass
    def begin(self, session, step, fence, hp, metrics): return NULL_RECORD
    def after_commit(self, session): pass
    def hyperparameters(self, session, hp): pass
    def delete(self, session): pass
    def scan(self): return iter(())
    def flush(self, session): pass
    def tick(self, session): pass

    def load(self, session, budget):  # pragma: no cover - memory-only sessions are never unloaded
        raise RuntimeError("memory-only sessions are never unloaded")


def meta_of(s: Session, hyperparameters: dict | None = None) -> dict:
    return {"session_id": s.id, "optimizer": s.optimizer.definition.name, "plugin": s.optimizer.plugin,
            "hyperparameters": {k: float(v) for k, v in (hyperparameters or s.hyperparameters).items()},
            "step": s.step, "master_dtype": DTYPE_NAMES[s.master_code], "reply": s.reply,
            "created_at": s.created_at, "owner": s.owner, "durability": s.durability.mode,
            "periodic_steps": s.durability.periodic_steps, "periodic_seconds": s.durability.periodic_seconds,
            "shapes": {n: list(v) for n, v in s.shapes.items()}, "slots": list(s.slot_names),
            "saved_at": time.time()}


class Journal:
    """A data directory: one snapshot file per session, written when the session's mode says."""

    def __init__(self, root: pathlib.Path, metrics=None):
        self.storage = fmt.Storage(pathlib.Path(root))
        self.metrics = metrics

    def _save(self, s: Session, hyperparameters: dict | None = None) -> None:
        data = fmt.encode(meta_of(s, hyperparameters), s.live.params, s.live.state, s.last_delta)
        self.storage.save(s.id, data)
        s.dirty = False
        s.persisted_step = s.step
        s.persisted_at = time.monotonic()
        if self.metrics:
            self.metrics.checkpoint(len(data))

    def create(self, s: Session) -> None:
        if s.durability.mode != "none":
            self._save(s)

    def begin(self, s, step, fence, hp, metrics):
        return NULL_RECORD

    def after_commit(self, s: Session) -> None:
        mode = s.durability
        due = mode.mode in ("every-step", "log") or (
            mode.mode == "periodic" and (s.step - s.persisted_step >= mode.periodic_steps
                                         or time.monotonic() - s.persisted_at >= mode.periodic_seconds))
        if not due:
            return
        try:
            self._save(s)
        except OSError as e:
            log.error("session %s: checkpoint failed: %s", s.id, e, extra={"session_id": s.id})
            raise Unavailable(f"session {s.id} is at step {s.step} but could not be written to disk ({e}); "
                              "retry the same step to have it written") from None

    def hyperparameters(self, s: Session, hp: dict) -> None:
        if s.durability.mode == "none":
            return
        try:
            self._save(s, hp)
        except OSError as e:
            raise Unavailable(f"session {s.id}: the change could not be written to disk ({e}); nothing changed, "
                              "retry") from None

    def delete(self, s: Session) -> None:
        if s.persisted_step >= 0:
            self.storage.delete(s.id)

    def scan(self):
        for sid in self.storage.ids():
            try:
                meta = self.storage.meta(sid)
                if meta.get("session_id") != sid:
                    raise ValueError(f"it names session {meta.get('session_id')!r}, not its file name's {sid!r}")
                yield sid, meta
            except Exception as e:
                yield sid, e

    @staticmethod
    def session_from(meta: dict, registry) -> Session:
        registered = registry.get(meta["optimizer"])  # KeyError names the optimizer
        hp = registered.definition.resolve(meta["hyperparameters"])
        s = Session(meta["session_id"], registered, hp, DTYPE_CODES[meta["master_dtype"]], meta["reply"],
                    Durability(meta["durability"], int(meta["periodic_steps"]), float(meta["periodic_seconds"])),
                    {n: tuple(v) for n, v in meta["shapes"].items()}, tuple(meta["slots"]),
                    step=int(meta["step"]), owner=meta.get("owner", ""), created_at=float(meta["created_at"]))
        s.persisted_step = s.step
        s.dirty = False
        return s

    def load(self, s: Session, budget) -> None:
        def build():
            meta, params, state, delta = self.storage.load(s.id)
            if int(meta["step"]) != s.step:
                raise ValueError(f"file holds step {meta['step']}, expected {s.step}")
            s.last_delta = delta
            return Arrays(params, state)
        s.live = budget.allocate(f"session {s.id}", s.set_bytes(), build)

    def flush(self, s: Session) -> None:
        if s.dirty and s.durability.mode != "none":
            self._save(s)

    def tick(self, s: Session) -> None:
        mode = s.durability
        if mode.mode == "periodic" and s.dirty and time.monotonic() - s.persisted_at >= mode.periodic_seconds:
            self._save(s)
