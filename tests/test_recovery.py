"""Recovery of real servers from kill -9, damaged files and a full disk (issue 9's durability tests).

Every test runs `optreg serve` processes on a real data directory (tests/conftest.py) and drives
them through the raw gRPC stubs, so each step's fence, dtype and transport are chosen exactly:
  1. kill -9 at random moments, 50 kills, one session per mode on one server;
  2. a replay of the log equals the uninterrupted run bit for bit, for every registered optimizer;
  3. random bit flips in snapshots and log records, and crafted snapshot headers;
  4. a full disk (a small tmpfs; root only);
  5. a shape-[] parameter across restarts.
"""
from __future__ import annotations

import errno
import math
import os
import pathlib
import random
import threading
import time

import grpc
import ml_dtypes
import numpy as np
import pytest

from disk_helpers import small_tmpfs
from durability_helpers import digest, step_request, stub
from optreg.plugins.registry import Registry
from optreg.server import snapshot
from optreg.v1 import session_pb2, tensors

D = session_pb2.Durability
MODE_CODES = {"every-step": D.DURABILITY_EVERY_STEP, "log": D.DURABILITY_LOG, "periodic": D.DURABILITY_PERIODIC,
              "none": D.DURABILITY_NONE}
F32, F64 = tensors.DataType.DATA_TYPE_FLOAT32, tensors.DataType.DATA_TYPE_FLOAT64
BF16 = np.dtype(ml_dtypes.bfloat16)
T = 30  # seconds: the timeout of every call


# -- helpers ---------------------------------------------------------------------------------------
def create(st, sid, optimizer, params, *, mode="log", master=None, reply=None, hp=None, periodic_steps=0,
           periodic_seconds=0.0):
    config = session_pb2.SessionConfig(optimizer=optimizer, session_id=sid, durability=MODE_CODES[mode],
                                       hyperparameters=hp or {}, periodic_steps=periodic_steps,
                                       periodic_seconds=periodic_seconds)
    if master is not None:
        config.master_dtype = master
    if reply is not None:
        config.step_reply = reply
    return st.CreateSession(session_pb2.CreateSessionRequest(
        config=config, parameters=[tensors.from_numpy(n, a) for n, a in params.items()]), timeout=T).session


def read_state(st, sid):
    """(SessionInfo, {"params/W": array, "state/m/W": array, ...})."""
    r = st.ReadState(session_pb2.ReadStateRequest(session_id=sid), timeout=T)
    out = {f"params/{t.name}": tensors.to_numpy(t) for t in r.parameters}
    for slot in r.state:
        for t in slot.tensors:
            out[f"state/{slot.slot}/{t.name}"] = tensors.to_numpy(t)
    return r.session, out


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_same_arrays(got: dict, want: dict, what: str) -> None:
    assert sorted(got) == sorted(want), (what, sorted(got), sorted(want))
    bad = [k for k in want if not same_bits(got[k], want[k])]
    assert not bad, f"{what}: not bit-identical: {bad}"


def get_info(st, sid):
    return st.GetSession(session_pb2.GetSessionRequest(session_id=sid), timeout=T).session


def refusal(call):
    """The grpc.RpcError `call` raises, or None when it succeeds."""
    try:
        call()
    except grpc.RpcError as e:
        return e
    return None


def stream_messages(sid, grads: dict, step=None, chunk_bytes=1 << 20, hp=None):
    """StepStream requests: the first names the session (and carries the step's hyperparameters),
    each carries one chunk."""
    chunks = [c for n, a in grads.items() for c in tensors.chunk(n, a, chunk_bytes)]
    head = session_pb2.StepStreamRequest(session_id=sid, chunks=chunks[:1], hyperparameters=hp or {})
    if step is not None:
        head.step = step
    return [head] + [session_pb2.StepStreamRequest(chunks=[c]) for c in chunks[1:]]


def stream_step(st, sid, grads, step=None, chunk_bytes=1 << 20, hp=None):
    """(step, replayed, {name: array}) of a StepStream, its reply chunks reassembled."""
    msgs = stream_messages(sid, grads, step, chunk_bytes, hp)
    assert len(msgs) > 2 or chunk_bytes >= 1 << 20, "a streamed step of this test should take several chunks"
    got, replayed, out = None, None, {}
    for r in st.StepStream(iter(msgs), timeout=T):
        got, replayed = r.step, r.replayed
        for c in r.chunks:
            a = out.get(c.name)
            if a is None:
                a = out[c.name] = np.empty(tuple(c.shape), tensors.DTYPES[c.dtype])
            data = np.frombuffer(bytes(c.data), tensors.DTYPES[c.dtype])
            a.reshape(-1)[c.offset:c.offset + data.size] = data
    return got, replayed, out


def unary_step(st, sid, grads, step=None, hp=None):
    req = session_pb2.StepRequest(session_id=sid, gradients=[tensors.from_numpy(n, g) for n, g in grads.items()],
                                  hyperparameters=hp or {})
    if step is not None:
        req.step = step
    r = st.Step(req, timeout=T)
    return r.step, r.replayed, {t.name: tensors.to_numpy(t) for t in r.tensors}


# == 1. kill -9 at random moments ===================================================================
KILLS = 50
WINDOW = 4  # the periodic session's periodic_steps
K_SHAPES = {"W": (16, 8), "b": (8,)}
K_LR = 0.01


def k_grads(t: int) -> dict:
    """The gradient of step t, the same for every session and every attempt."""
    rng = np.random.default_rng(t)
    return {n: rng.standard_normal(s) for n, s in K_SHAPES.items()}


def k_p0() -> dict:
    rng = np.random.default_rng(20261127)
    return {n: rng.standard_normal(s) for n, s in K_SHAPES.items()}


class BookAdam:
    """The book's Adam in float64 (eps 1e-7), written out independently of the plugin; the state after
    every step is kept, so a session that went back (periodic) costs nothing to check."""

    def __init__(self, p0, lr, b1=0.9, b2=0.999):
        self.lr, self.b1, self.b2 = lr, b1, b2
        zeros = {n: np.zeros_like(a) for n, a in p0.items()}
        self.states = [{**{f"params/{n}": a.copy() for n, a in p0.items()},
                        **{f"state/m/{n}": a for n, a in zeros.items()},
                        **{f"state/v/{n}": a.copy() for n, a in zeros.items()}}]

    def at(self, t: int) -> dict:
        while len(self.states) <= t:
            s, n = len(self.states), dict(self.states[-1])
            g = k_grads(s)
            lr_t = self.lr * math.sqrt(1 - self.b2 ** s) / (1 - self.b1 ** s)
            for name in K_SHAPES:
                m = n[f"state/m/{name}"] + (1 - self.b1) * (g[name] - n[f"state/m/{name}"])
                v = n[f"state/v/{name}"] + (1 - self.b2) * (g[name] ** 2 - n[f"state/v/{name}"])
                n[f"state/m/{name}"], n[f"state/v/{name}"] = m, v
                n[f"params/{name}"] = n[f"params/{name}"] - lr_t * m / (np.sqrt(v) + 1e-7)
            self.states.append(n)
        return self.states[t]


def _trainer(address, sid, start, rec, killing):
    """Steps `sid` from `start` (fenced; step t's gradient is k_grads(t)) until the server dies."""
    channel, st = stub(address)
    step = start
    try:
        while True:
            try:
                r = st.Step(step_request(sid, step, k_grads(step + 1)), timeout=10)
            except grpc.RpcError as e:
                if not killing.is_set():
                    rec["errors"].append(f"step {step + 1} refused before the kill: {e.code()} {e.details()}")
                return
            if (r.step, r.replayed) != (step + 1, False):
                rec["errors"].append(f"step {step + 1} answered as step {r.step}, replayed={r.replayed}")
                return
            step = rec["acked"] = r.step
            rec["reply"] = [t.SerializeToString() for t in r.tensors]
            rec["steps"] += 1
    finally:
        channel.close()


def _check_after_kill(st, mode, sid, rec, ref, stats):
    """Assert what the restarted server holds for one session; returns its step."""
    acked = rec["acked"]
    step = get_info(st, sid).step
    if mode == "periodic":
        assert acked - WINDOW < step <= acked + 1, f"{mode}: acknowledged {acked}, the restarted server has {step}"
        stats["periodic lost"].append(acked - step)
    else:
        assert acked <= step <= acked + 1, f"{mode}: acknowledged {acked}, the restarted server has {step}"
    stats[f"{mode} applied unacknowledged"] += step == acked + 1
    info, state = read_state(st, sid)
    assert info.step == step
    want = ref.at(step)
    assert sorted(state) == sorted(want)
    for k in want:
        np.testing.assert_allclose(state[k], want[k], rtol=1e-10, atol=1e-12, err_msg=f"{mode} step {step} {k}")
    if step:
        # The retry of the last applied step (acknowledged or not): a replay with the same numbers.
        r = st.Step(step_request(sid, step - 1, k_grads(step)), timeout=T)
        assert (r.step, r.replayed) == (step, True), (mode, step, r.step, r.replayed)
        assert_same_arrays({f"params/{t.name}": tensors.to_numpy(t) for t in r.tensors},
                           {k: a for k, a in state.items() if k.startswith("params/")}, f"{mode} retry of {step}")
        if step == acked and rec["reply"] is not None:  # answered before the kill: the same bytes after it
            assert [t.SerializeToString() for t in r.tensors] == rec["reply"], f"{mode}: retry of step {step}"
            stats["retries answered identically across a kill"] += 1
    rec["acked"], rec["reply"] = step, None
    return step


def test_kill9_at_random_moments_loses_nothing_acknowledged(start_server, tmp_path):
    data = str(tmp_path / "data")
    ids = {mode: f"kill-{mode}" for mode in ("every-step", "log", "periodic")}
    recs = {mode: {"acked": 0, "reply": None, "steps": 0, "errors": []} for mode in ids}
    ref = BookAdam(k_p0(), K_LR)
    stats = {"periodic lost": [], "retries answered identically across a kill": 0,
             **{f"{m} applied unacknowledged": 0 for m in ids}}
    rng = random.Random(9)
    kills = 0
    t0 = time.monotonic()
    while True:
        s = start_server("--data-dir", data)
        channel, st = stub(s.address)
        if kills == 0:
            for mode, sid in ids.items():
                create(st, sid, "adam", k_p0(), mode=mode, hp={"lr": K_LR}, periodic_steps=WINDOW,
                       periodic_seconds=3600)
        else:
            for mode, sid in ids.items():
                _check_after_kill(st, mode, sid, recs[mode], ref, stats)
        channel.close()
        if kills == KILLS:
            s.stop()
            break
        killing = threading.Event()
        threads = [threading.Thread(target=_trainer, args=(s.address, ids[m], recs[m]["acked"], recs[m], killing))
                   for m in ids]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.02, 0.4))
        killing.set()
        s.kill()
        kills += 1
        for t in threads:
            t.join(30)
        errors = [e for r in recs.values() for e in r["errors"]]
        assert not errors, errors
    steps = {m: r["steps"] for m, r in recs.items()}
    print(f"\nkill -9: {kills} kills in {time.monotonic() - t0:.0f} s, each of one server holding a session per "
          f"mode; acknowledged steps {steps}; {stats}")
    assert min(steps.values()) >= KILLS, f"too few steps between the kills to test anything: {steps}"


# == 2. replay equals the uninterrupted run =========================================================
R_SHAPES = {"W": (40, 25), "b": (7,), "s": ()}  # 1000 elements: streamed in uneven chunks


def r_grads(t: int, dtype) -> dict:
    rng = np.random.default_rng(1000 + t)
    return {n: np.asarray(rng.standard_normal(s) * 0.5).astype(dtype) for n, s in R_SHAPES.items()}


def _run_sequence(st, sid, master, lr0, stream_last):
    """Steps 1-7 through every path a step can take; returns the last step's reply arrays."""
    m = np.float32 if master == F32 else np.float64
    assert unary_step(st, sid, r_grads(1, m), step=0)[:2] == (1, False)
    assert unary_step(st, sid, r_grads(2, BF16), step=1)[:2] == (2, False)
    st.UpdateHyperparameters(session_pb2.UpdateHyperparametersRequest(session_id=sid,
                                                                      hyperparameters={"lr": lr0 * 3}), timeout=T)
    assert stream_step(st, sid, r_grads(3, m), step=2, chunk_bytes=300 * np.dtype(m).itemsize)[:2] == (3, False)
    assert unary_step(st, sid, r_grads(4, np.float16), step=3, hp={"lr": lr0 * 0.5})[:2] == (4, False)
    assert unary_step(st, sid, r_grads(5, np.float32))[:2] == (5, False)  # unfenced
    assert stream_step(st, sid, r_grads(6, BF16), step=5, chunk_bytes=512, hp={"lr": lr0 * 2})[:2] == (6, False)
    if stream_last:
        step, replayed, out = stream_step(st, sid, r_grads(7, m), step=6, chunk_bytes=256 * np.dtype(m).itemsize)
    else:
        step, replayed, out = unary_step(st, sid, r_grads(7, m), step=6)
    assert (step, replayed) == (7, False)
    return out


def _whole(st, sid):
    info, state = read_state(st, sid)
    return digest(st, sid), dict(info.hyperparameters), [(p.name, list(p.shape)) for p in info.parameters], state


def test_replay_equals_the_uninterrupted_run_for_every_optimizer(start_server, tmp_path):
    names = sorted(Registry().optimizers)
    assert {"adamw", "torch.adam", "torch.sgd", "adam", "sgd"} <= set(names), names
    data = str(tmp_path / "data")
    s = start_server("--data-dir", data)
    _, st = stub(s.address)
    rng = np.random.default_rng(3)
    p0 = {n: rng.standard_normal(shape) for n, shape in R_SHAPES.items()}
    sessions = {}  # sid -> (optimizer, master): float32 sessions answer deltas, float64 ones parameters
    for opt in names:
        for master, reply in ((F32, session_pb2.STEP_REPLY_DELTA), (F64, session_pb2.STEP_REPLY_PARAMETERS)):
            sid = f"r-{opt}-{'f32' if master == F32 else 'f64'}"
            info = create(st, sid, opt, {n: a.astype(np.float32 if master == F32 else np.float64)
                                         for n, a in p0.items()}, master=master, reply=reply)
            assert info.durability == D.DURABILITY_LOG  # the default
            sessions[sid] = (opt, master, info.hyperparameters["lr"])
    last = {sid: _run_sequence(st, sid, master, lr0, stream_last=master == F32)
            for sid, (opt, master, lr0) in sessions.items()}
    uninterrupted = {sid: _whole(st, sid) for sid in sessions}
    for sid in sessions:
        assert uninterrupted[sid][1]["lr"] == sessions[sid][2] * 2  # the last change, carried by a stream step
    s.kill()

    s2 = start_server("--data-dir", data)
    _, st = stub(s2.address)
    for sid in sessions:
        assert get_info(st, sid).step == 7
        replayed = _whole(st, sid)
        assert replayed[1:3] == uninterrupted[sid][1:3], sid
        assert_same_arrays(replayed[3], uninterrupted[sid][3], f"{sid} after kill -9 (snapshot + 5 log records)")
        assert replayed[0] == uninterrupted[sid][0], sid
        # The retry of the last step, after the kill: the same answer (deltas for the float32 sessions).
        opt, master, _ = sessions[sid]
        step, was_replayed, out = unary_step(st, sid, r_grads(7, np.float32 if master == F32 else np.float64),
                                             step=6)
        assert (step, was_replayed) == (7, True), sid
        assert_same_arrays(out, last[sid], f"{sid}: the retried last step's answer")
    assert s2.stop() == 0  # a clean stop: every session is written as a snapshot, the logs emptied

    s3 = start_server("--data-dir", data)
    _, st = stub(s3.address)
    for sid in sessions:
        again = _whole(st, sid)
        assert again[1:3] == uninterrupted[sid][1:3], sid
        assert_same_arrays(again[3], uninterrupted[sid][3], f"{sid} from its snapshot")
        opt, master, _ = sessions[sid]
        out = unary_step(st, sid, r_grads(7, np.float32 if master == F32 else np.float64), step=6)[2]
        assert_same_arrays(out, last[sid], f"{sid}: the retried last step's answer from the snapshot")
    print(f"\nreplay bit-identical for {len(names)} optimizers x float32/float64: {names}")
