"""Recovery: one logged step applied again to a session's live set, as the live step applied it."""
from __future__ import annotations

import numpy as np

from optreg.server.kernels import apply as kernels
from optreg.server.kernels.widen import widen
from optreg.server.model.session import Session
from optreg.server.model.workers import LR_SCALED, note_worker_record
from optreg.server.steps import sparse_rows as sparse
from optreg.server.storage import wal


def replay(s: Session, record: wal.Record) -> None:
    """Apply one logged step to the session's live set, in place (recovery: nobody else sees it)."""
    live = s.live
    if record.kind == "result":
        for key, a in record.tensors.items():
            kind, _, rest = key.partition("/")
            if kind == "p":
                np.copyto(live.params[rest], a)
            else:
                slot, _, name = rest.partition("/")
                np.copyto(live.state[slot][name], a)
    elif record.extras.get("sparse"):
        sparse.replay(s, record)
    else:
        defn, hp, t = s.optimizer.definition, record.hyperparameters, record.step
        for name in list(s.clocks):  # rows a sparse step left lazy: caught up before the dense step, as live
            sparse.settle_tensor(s, live, name, t - 1, s.hyperparameters)
        s.clocks.clear()
        for name, p in live.params.items():
            g = widen(record.tensors[name].reshape(-1), s.dtype).reshape(p.shape)
            before = p.copy() if s.reply == "delta" else None
            kernels.apply(defn, p, g, {slot: live.state[slot][name] for slot in live.state}, t, hp)
            if before is not None:
                s.last_delta = s.last_delta or {}
                s.last_delta[name] = p - before
    if not record.extras.get(LR_SCALED):  # a staleness-scaled contribution's lr was its own, not the session's
        s.hyperparameters = s.optimizer.definition.resolve(record.hyperparameters)
    s.step = record.step
    note_worker_record(s, record.extras)  # a shared session's round or contribution: members, clocks, retries
