"""The step run, its commit and replay, in process: a SessionStore over a real Journal on tmp_path and the
real plugin registry; no server, no socket. Recovery is a fresh store over the same directory, as after
a kill -9 (the first store is never flushed: its steps are in the log only)."""
from __future__ import annotations

import numpy as np
import pytest

from optreg.plugins import Hyperparameter, Optimizer
from optreg.plugins.builtins import MODULES as BUILTIN_MODULES
from optreg.plugins.registry import Registered, Registry
from optreg.server.model.errors import FailedPrecondition, InvalidArgument
from optreg.server.sessions.factory import SessionConfig
from optreg.server.sessions.store import SessionStore
from optreg.server.steps.run import StepRun
from optreg.server.storage.journal import Journal
from optreg.v1 import tensors

from store_helpers import (REGISTRY, SHAPES, assert_bits, create, grads, open_store, params, sparse_rows, state_of,
                           step)

# Those that apply to every parameter of store_helpers.SHAPES (torch.muon takes matrices only: its replay
# is checked by tests/storage/test_recovery.py on the matrix).
BUILTINS = sorted(n for n, r in REGISTRY.optimizers.items() if r.plugin in BUILTIN_MODULES and all(
    r.definition.accepts is None or r.definition.accepts(k, v) is None for k, v in SHAPES.items()))


# -- the step run ------------------------------------------------------------------------------------
def test_whole_tensors_chunks_and_unfenced_steps_compute_the_same_bits(tmp_path):
    """The three ways StepRun computes a step (whole tensors into staging, chunk by chunk into staging,
    buffered under the lock at commit) commit the same session bit for bit."""
    store = open_store(tmp_path)
    ways = {"whole": {}, "chunks": {"chunk_bytes": 8}, "unfenced": {}}
    sessions = {w: create(store, w) for w in ways}
    for k in range(3):
        answers = {}
        for w, kw in ways.items():
            fence = None if w == "unfenced" else k
            answers[w] = step(store, sessions[w], grads(np.float32, k), fence, **kw)
            assert answers[w][:2] == (k + 1, False), w
        assert_bits(answers["chunks"][2], answers["whole"][2], f"chunked answer, step {k + 1}")
        assert_bits(answers["unfenced"][2], answers["whole"][2], f"unfenced answer, step {k + 1}")
    whole = state_of(store, sessions["whole"])
    for w in ("chunks", "unfenced"):
        assert_bits(state_of(store, sessions[w]), whole, w)


def test_fence_answers_retries_and_refuses_other_steps(tmp_path):
    store = open_store(tmp_path)
    s = create(store, "f", reply="delta")
    first = step(store, s, grads(np.float32, 0), fence=0)
    assert first[:2] == (1, False)
    before = state_of(store, s)
    # A retry of the applied step: its answer again (the delta), nothing applied.
    again = step(store, s, grads(np.float32, 7), fence=0)
    assert again[:2] == (1, True)
    assert_bits(again[2], first[2], "the retry's answer")
    assert_bits(state_of(store, s), before, "after a retry")
    # Neither the last step nor the next: refused, naming the step to send.
    for fence in (5, -3):
        with pytest.raises(FailedPrecondition) as e:
            step(store, s, grads(np.float32, 1), fence=fence)
        assert "send step=1" in e.value.message and ("optreg-server-step", "1") in e.value.metadata
    assert_bits(state_of(store, s), before, "after refused fences")


@pytest.mark.parametrize("chunk_bytes", [None, 8])
def test_a_refused_step_leaves_the_session_untouched(tmp_path, chunk_bytes):
    """A gradient with NaN (whole or in the last chunk), a bad hyperparameter, a cut stream: refused, and
    step, parameters, state, hyperparameters and the retry's answer are as before; the next step applies."""
    store = open_store(tmp_path)
    s = create(store, "r", reply="delta")
    step(store, s, grads(np.float32, 0), fence=0)
    before = state_of(store, s)
    bad = grads(np.float32, 1)
    bad["b"][-1] = np.nan
    with pytest.raises(InvalidArgument, match="b"):
        step(store, s, bad, fence=1, hp={"lr": 0.5}, chunk_bytes=chunk_bytes)
    assert_bits(state_of(store, s), before, "after a NaN gradient")
    with pytest.raises(InvalidArgument, match="hyperparameters"):
        step(store, s, grads(np.float32, 1), fence=1, hp={"lr": -1.0}, chunk_bytes=chunk_bytes)
    assert_bits(state_of(store, s), before, "after a bad hyperparameter")
    run = StepRun(store, s, 1)
    try:
        assert run.open() is None
        run.feed(next(tensors.chunk("W", grads(np.float32, 1)["W"], 8)))
        with pytest.raises(InvalidArgument, match="arrived"):
            run.finish()
    finally:
        run.close()
    assert_bits(state_of(store, s), before, "after a cut stream")
    assert step(store, s, grads(np.float32, 1), fence=1)[:2] == (2, False)


def test_lost_race_is_answered_as_the_retry_it_is(tmp_path):
    """Two calls carrying the same fenced step, computed at once: the second to commit is answered as a retry
    of the first; a step whose fence the session moved past meanwhile is refused, changing nothing."""
    store = open_store(tmp_path)
    s = create(store, "race")
    a, b, late = (StepRun(store, s, 0) for _ in range(3))
    try:
        for run in (a, b, late):
            assert run.open() is None
        for run in (a, b, late):
            for name, g in grads(np.float32, 0).items():
                run.feed(tensors.from_numpy(name, g))
        won = a.finish()
        won_params = {n: np.array(p) for n, p in won.tensors.items()}
        lost = b.finish()
        assert (won.step, won.replayed, lost.step, lost.replayed) == (1, False, 1, True)
        assert_bits({n: np.array(p) for n, p in lost.tensors.items()}, won_params, "the loser's answer")
        step(store, s, grads(np.float32, 1), fence=1)
        moved = state_of(store, s)
        with pytest.raises(FailedPrecondition, match="moved to step 2") as e:
            late.finish()
        assert ("optreg-server-step", "2") in e.value.metadata
    finally:
        for run in (a, b, late):
            run.close()
    assert_bits(state_of(store, s), moved, "after the refused late step")
    assert step(store, s, grads(np.float32, 2), fence=2)[:2] == (3, False)


# -- replay ----------------------------------------------------------------------------------------
def _sequence(store, s, dtype, sparse: bool) -> tuple:
    """Every kind of step: whole, chunked, unfenced with a new lr, sparse (rows named twice), dense catching
    lazy rows up, sparse with a new lr while rows owe steps. Returns the last step's answer."""
    lr = s.hyperparameters["lr"]
    step(store, s, grads(dtype, 0), fence=0)
    step(store, s, grads(dtype, 1), fence=1, chunk_bytes=16)
    step(store, s, grads(dtype, 2), hp={"lr": lr * 2})
    g3 = grads(dtype, 3)
    if sparse:
        step(store, s, {"b": g3["b"]}, fence=3, sparse=[sparse_rows("W", [4, 0, 4], g3["W"][:3])])
    else:
        step(store, s, g3, fence=3)
    step(store, s, grads(dtype, 4), fence=4)
    g5 = grads(dtype, 5)
    if sparse:
        step(store, s, {}, fence=5, sparse=[sparse_rows("W", [1], g5["W"][:1])])
        return step(store, s, {}, fence=6, hp={"lr": lr / 2}, sparse=[sparse_rows("W", [2, 5], g5["W"][1:3])])
    step(store, s, g5, fence=5)
    return step(store, s, grads(dtype, 6), fence=6, hp={"lr": lr / 2})


@pytest.mark.parametrize("dtype,reply", [(np.float32, "delta"), (np.float64, "parameters")])
def test_replay_equals_the_live_run_for_every_builtin(tmp_path, dtype, reply):
    store = open_store(tmp_path)
    sessions = {}
    for name in BUILTINS:
        s = create(store, f"{name}-{np.dtype(dtype).name}", name, dtype, reply)
        sparse = bool(getattr(s.optimizer.definition, "sparse_rows", False))
        sessions[s.id] = (sparse, _sequence(store, s, dtype, sparse))
    live = {sid: state_of(store, store.get(sid)) for sid in sessions}
    assert any(live[sid]["clocks"] for sid in sessions)  # some end with rows left lazy
    assert all(v["step"] == 7 for v in live.values())

    again = open_store(tmp_path)  # the first store never wrote a snapshot after creating: all from the log
    for sid, (sparse, last) in sessions.items():
        s = again.get(sid)
        assert s.live is None and s.step == 7, sid
        assert_bits(state_of(again, s), live[sid], f"{sid} replayed")
        # The retry of the last step is answered as the live session answered it.
        g = {} if sparse else grads(dtype, 6)
        rows = [sparse_rows("W", [2, 5], grads(dtype, 5)["W"][1:3])] if sparse else ()
        retry = step(again, s, g, fence=6, sparse=rows)
        assert retry[:2] == (7, True), sid
        assert_bits(retry[2:], last[2:], f"{sid}: the retry's answer after recovery")
        # And the next step is the same whether the session was recovered or not.
        nxt = step(again, s, grads(dtype, 8), fence=7)
        assert_bits(nxt, step(store, store.get(sid), grads(dtype, 8), fence=7), f"{sid}: the step after")
    store.journal.close()
    again.journal.close()


def _noisy(param, grad, state, step, hp, scratch):
    param -= hp["lr"] * grad * (1 + 1e-3 * np.random.default_rng().standard_normal(grad.shape))


def test_replay_of_a_nondeterministic_optimizer_restores_what_it_computed(tmp_path):
    """Its log records hold the step's results, not its gradients: recovery copies them in, and the session
    (parameters, the delta a retry gets) is the live one bit for bit."""
    registry = Registry()
    registry.optimizers["noisy"] = Registered(
        Optimizer(name="noisy", summary="unseeded noise", update=_noisy, deterministic=False,
                  hyperparameters=[Hyperparameter("lr", 0.1)]), "test-noisy", "test", "0")
    store = SessionStore(registry, Journal(tmp_path))
    s = store.create(SessionConfig(optimizer="noisy", session_id="n", reply="delta"), params(np.float32))
    for k in range(3):
        last = step(store, s, grads(np.float32, k), fence=k)
    live = state_of(store, s)
    again = SessionStore(registry, Journal(tmp_path))
    again.open_all()
    assert_bits(state_of(again, again.get("n")), live, "replayed")
    assert_bits(step(again, again.get("n"), grads(np.float32, 2), fence=2)[2], last[2], "the retry's answer")
    store.journal.close()
    again.journal.close()
