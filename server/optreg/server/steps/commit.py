"""The commit: the one place a step changes a session, for live steps, resident steps and recovery.

Every path that applies a step ends in `commit`, under the session's lock, once the step's new
values are computed (or are about to be written in place): the log record is made durable, the
values go into the live set the path's own way (`write`), and the session advances: its step,
row clocks, hyperparameters, the answer a retry gets, its workers' bookkeeping. Recovery replays
the log through the same function, which is what makes a recovered session the uninterrupted
one bit for bit.
"""
from __future__ import annotations

from optreg.server.model.errors import FailedPrecondition
from optreg.server.model.session import MAX_STEP, Session
from optreg.server.model.workers import LR_SCALED, note_worker_record
from optreg.server.steps import sparse_rows
from optreg.server.storage.journal import NULL_RECORD


def next_step(s: Session) -> int:
    """The number the session's next step takes; refused when it has none. Caller holds the lock."""
    if s.step >= MAX_STEP:
        raise FailedPrecondition(f"session {s.id} is at step {s.step}, the largest step number: it cannot step "
                                 "again (restart it from its state with a smaller initial_step)")
    return s.step + 1


def commit(s: Session, t: int, hp: dict, write, *, record=NULL_RECORD, logged=None, changes: dict | None = None,
           extras: dict | None = None, delta: dict | None = None, plan: sparse_rows.Plan | None = None,
           store=None) -> None:
    """Step `t`, run with hyperparameters `hp`, becomes the session's. Caller holds the lock.

    What differs between the paths is given, not decided here:
    `write()` puts the new values into the live set: a live step swaps its staging set in, a resident
    step updates the client's segment in place (or copies a staging set there), recovery updates in place.
    `record` is the step's log record, made durable (with `logged`, the set a non-deterministic
    optimizer's record holds) before `write`: a failed write changes nothing. Recovery has none.
    `changes`: the hyperparameters the step set, kept on top of those in force (recovery: the record's
    full set); not kept when the step ran at a staleness-scaled lr of its own (extras[LR_SCALED]).
    `extras`: the record's extras (a shared session's round or contribution: its workers' bookkeeping).
    `delta`: new - old of every parameter (reply "delta"), the answer a retry gets; None otherwise.
    `plan`: a sparse step's (it wrote its rows and clocks; a dense step steps every row).
    `store`: told once the step is in (the log's snapshot schedule); None in recovery."""
    if t != next_step(s):  # callers check the fence; here only a log out of order can get it wrong
        raise ValueError(f"step {t} cannot follow session {s.id}'s step {s.step}")
    extras = extras or {}
    record.commit(logged)
    write()
    s.step = t
    if plan is None:
        s.clocks.clear()  # owed rows were caught up before the dense step
    if changes and not extras.get(LR_SCALED):
        s.hyperparameters = s.optimizer.definition.resolve(changes, base=s.hyperparameters)
    if hp != s.hyperparameters and s.clocks:  # rows left lazy owe this step with hyperparameters not kept
        sparse_rows.settle_own_hyperparameters(s, t, hp)
    s.last_delta = delta
    if plan is not None:
        s.last_sparse = sparse_rows.answer(s, plan)
    note_worker_record(s, extras)
    s.dirty = True
    if store is not None:
        store.after_commit(s)
