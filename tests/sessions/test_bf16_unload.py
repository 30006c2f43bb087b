"""A step_reply bf16_delta session keeps a copy of its client's parameters (steps/run.py bf16_delta): unloaded
when idle, it keeps none (its budget is given back), and its next answer after the reload is the parameters."""
from __future__ import annotations

import gc

import numpy as np

from optreg.server.sessions.store import SessionStore
from optreg.server.storage.journal import Journal

from store_helpers import REGISTRY, create, grads, step


def _unloaded_held(path, reply) -> int:
    """The budget a store holds once its one session, stepped twice, is unloaded."""
    store = SessionStore(REGISTRY, Journal(path), idle_seconds=1e-9)
    store.open_all()
    s = create(store, "s", "adam", np.float32, reply=reply)
    for k in range(2):
        step(store, s, grads(np.float32, k), fence=k)
    store.tick()
    gc.collect()
    held = store.budget.held
    store.journal.close()
    return held


def test_an_unloaded_bf16_session_drops_its_copy_of_the_client(tmp_path):
    # an unloaded bf16_delta session holds no more than a parameters session (no copy, no answer)
    assert _unloaded_held(tmp_path / "b", "bf16_delta") == _unloaded_held(tmp_path / "p", "parameters")
    store = SessionStore(REGISTRY, Journal(tmp_path), idle_seconds=1e-9)
    store.open_all()
    s = create(store, "b", "adam", np.float32, reply="bf16_delta")
    first = step(store, s, grads(np.float32, 0), fence=0)[2]
    second = step(store, s, grads(np.float32, 1), fence=1)[2]
    assert all(a.dtype == np.float32 for a in first.values())  # the copy starts from the parameters
    assert all(a.dtype != np.float32 for a in second.values())  # then bf16 deltas
    assert s.reply_copy is not None
    store.tick()  # the janitor: idle, so unloaded
    gc.collect()
    assert s.live is None and s.reply_copy is None and s.last_reply is None
    after = step(store, s, grads(np.float32, 2), fence=2)[2]  # reloaded
    assert all(a.dtype == np.float32 for a in after.values())
    store.journal.close()
