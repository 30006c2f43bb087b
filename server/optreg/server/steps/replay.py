"""Recovery: one logged step applied again to a session's live set, through the live steps' commit."""
from __future__ import annotations

import numpy as np

from optreg.server.kernels import apply as kernels
from optreg.server.kernels.widen import widen
from optreg.server.model.session import Session
from optreg.server.steps import sparse_rows as sparse
from optreg.server.steps.commit import commit
from optreg.server.storage import wal


def replay(s: Session, record: wal.Record) -> None:
    """Apply one logged step to the session's live set, in place (recovery: nobody else sees it)."""
    live, t = s.live, record.step
    hp = s.optimizer.definition.resolve(record.hyperparameters)
    ran = s.in_force(t, hp)  # a schedule's lr computed again from the step, as the live step did
    delta = {} if s.reply == "delta" else None  # new - old of every parameter, filled by the write
    plan = None

    def dense():
        before = {n: p.copy() for n, p in live.params.items()} if delta is not None else {}
        if record.kind == "result":  # a non-deterministic optimizer's step: what it computed
            for key, a in record.tensors.items():
                kind, _, rest = key.partition("/")
                if kind == "p":
                    np.copyto(live.params[rest], a)
                else:
                    slot, _, name = rest.partition("/")
                    np.copyto(live.state[slot][name], a)
        else:
            for name in list(s.clocks):  # rows a sparse step left lazy: caught up before the dense step, as live
                sparse.settle_tensor(s, live, name, t - 1, s.hyperparameters)
            for name, p in live.params.items():
                g = widen(record.tensors[name].reshape(-1), s.dtype).reshape(p.shape)
                kernels.apply(s.optimizer.definition, p, g, {slot: live.state[slot][name] for slot in live.state},
                              t, ran)
        for name, old in before.items():
            delta[name] = live.params[name] - old

    if record.extras.get("sparse"):
        plan = sparse.replay_plan(s, record, hp)
        write, delta = (lambda: sparse.write(s, live, plan)), None
    else:
        write = dense
    commit(s, t, hp, write, changes=hp, extras=record.extras, delta=delta, plan=plan)
