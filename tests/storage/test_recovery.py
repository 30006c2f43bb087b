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

from disk_helpers import fill as _fill, small_tmpfs
from durability_helpers import digest, step_request, stub
from hostile_helpers import stream_params
from optreg.plugins.registry import Registry
from optreg.server.storage import snapshot
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
    return stream_params(st.StepStream(iter(msgs), timeout=T))


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


def _answer(arrays: dict) -> dict:
    return {n: (a.dtype.str, a.shape, a.tobytes()) for n, a in arrays.items()}


def _trainer(address, sid, start, rec, killing, streamed):
    """Steps `sid` from `start` (fenced; step t's gradient is k_grads(t)) until the server dies;
    `streamed`: by StepStream, several chunks a step (so kills land inside a record's frames)."""
    channel, st = stub(address)
    step = start
    try:
        while True:
            try:
                if streamed:
                    got = stream_step(st, sid, k_grads(step + 1), step=step, chunk_bytes=256)
                else:
                    got = unary_step(st, sid, k_grads(step + 1), step=step)
            except grpc.RpcError as e:
                if not killing.is_set():
                    rec["errors"].append(f"step {step + 1} refused before the kill: {e.code()} {e.details()}")
                return
            if got[:2] != (step + 1, False):
                rec["errors"].append(f"step {step + 1} answered as step {got[0]}, replayed={got[1]}")
                return
            step = rec["acked"] = got[0]
            rec["reply"] = _answer(got[2])
            rec["steps"] += 1
    finally:
        channel.close()


def _check_after_kill(st, mode, sid, rec, ref, stats):
    """Assert what the restarted server holds for one session; returns its step."""
    acked = rec["acked"]
    step = get_info(st, sid).step
    if mode.startswith("periodic"):
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
            assert _answer({t.name: tensors.to_numpy(t) for t in r.tensors}) == rec["reply"], f"{mode}: {step}"
            stats["retries answered identically across a kill"] += 1
    rec["acked"], rec["reply"] = step, None
    return step


def test_kill9_at_random_moments_loses_nothing_acknowledged(start_server, tmp_path):
    data = str(tmp_path / "data")
    # One session per mode, and one more in the default mode stepped by StepStream.
    ids = {mode: f"kill-{mode}" for mode in ("every-step", "log", "periodic", "log-streamed")}
    recs = {mode: {"acked": 0, "reply": None, "steps": 0, "errors": []} for mode in ids}
    ref = BookAdam(k_p0(), K_LR)
    stats = {"periodic lost": [], "retries answered identically across a kill": 0,
             **{f"{m} applied unacknowledged": 0 for m in ids}}
    rng = random.Random(9)
    kills = torn = 0
    t0 = time.monotonic()
    while True:
        s = start_server("--data-dir", data)
        channel, st = stub(s.address)
        if kills == 0:
            for mode, sid in ids.items():
                create(st, sid, "adam", k_p0(), mode=mode.split("-streamed")[0], hp={"lr": K_LR},
                       periodic_steps=WINDOW,
                       periodic_seconds=3600)
        else:
            for mode, sid in ids.items():
                _check_after_kill(st, mode, sid, recs[mode], ref, stats)
        channel.close()
        if kills == KILLS:
            s.stop()
            break
        killing = threading.Event()
        threads = [threading.Thread(target=_trainer, args=(s.address, ids[m], recs[m]["acked"], recs[m], killing,
                                                           m.endswith("streamed")))
                   for m in ids]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(0.02, 0.4))
        killing.set()
        s.kill()
        kills += 1
        torn += s.proc.stderr.getvalue().count(": cutting ")  # this server's start found a torn tail
        for t in threads:
            t.join(30)
        errors = [e for r in recs.values() for e in r["errors"]]
        assert not errors, errors
    steps = {m: r["steps"] for m, r in recs.items()}
    print(f"\nkill -9: {kills} kills in {time.monotonic() - t0:.0f} s, each of one server holding a session per "
          f"mode; acknowledged steps {steps}; torn log tails cut at a start: {torn}; {stats}")
    assert min(steps.values()) >= KILLS, f"too few steps between the kills to test anything: {steps}"


# == 2. replay equals the uninterrupted run =========================================================
R_SHAPES = {"W": (40, 25), "b": (7,), "s": ()}  # 1000 elements: streamed in uneven chunks


def r_grads(t: int, dtype, names=tuple(R_SHAPES)) -> dict:
    rng = np.random.default_rng(1000 + t)
    grads = {n: np.asarray(rng.standard_normal(s) * 0.5).astype(dtype) for n, s in R_SHAPES.items()}
    return {n: grads[n] for n in names}


def r_names(optimizer: str) -> tuple:
    """The parameters of R_SHAPES the optimizer applies to (torch.muon: the matrix only)."""
    accepts = Registry().get(optimizer).definition.accepts
    return tuple(n for n, s in R_SHAPES.items() if accepts is None or accepts(n, s) is None)


def _run_sequence(st, sid, master, lr0, stream_last, names):
    """Steps 1-7 through every path a step can take; returns the last step's reply arrays."""
    m = np.float32 if master == F32 else np.float64
    assert unary_step(st, sid, r_grads(1, m, names), step=0)[:2] == (1, False)
    assert unary_step(st, sid, r_grads(2, BF16, names), step=1)[:2] == (2, False)
    st.UpdateHyperparameters(session_pb2.UpdateHyperparametersRequest(session_id=sid,
                                                                      hyperparameters={"lr": lr0 * 3}), timeout=T)
    assert stream_step(st, sid, r_grads(3, m, names), step=2, chunk_bytes=300 * np.dtype(m).itemsize)[:2] == (3, False)
    assert unary_step(st, sid, r_grads(4, np.float16, names), step=3, hp={"lr": lr0 * 0.5})[:2] == (4, False)
    assert unary_step(st, sid, r_grads(5, np.float32, names))[:2] == (5, False)  # unfenced
    assert stream_step(st, sid, r_grads(6, BF16, names), step=5, chunk_bytes=512, hp={"lr": lr0 * 2})[:2] == (6, False)
    if stream_last:
        step, replayed, out = stream_step(st, sid, r_grads(7, m, names), step=6, chunk_bytes=256 * np.dtype(m).itemsize)
    else:
        step, replayed, out = unary_step(st, sid, r_grads(7, m, names), step=6)
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
            info = create(st, sid, opt, {n: p0[n].astype(np.float32 if master == F32 else np.float64)
                                         for n in r_names(opt)}, master=master, reply=reply)
            assert info.durability == D.DURABILITY_LOG  # the default
            sessions[sid] = (opt, master, info.hyperparameters["lr"])
    last = {sid: _run_sequence(st, sid, master, lr0, stream_last=master == F32, names=r_names(opt))
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
        step, was_replayed, out = unary_step(st, sid, r_grads(7, np.float32 if master == F32 else np.float64,
                                                              r_names(opt)), step=6)
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
        out = unary_step(st, sid, r_grads(7, np.float32 if master == F32 else np.float64, r_names(opt)), step=6)[2]
        assert_same_arrays(out, last[sid], f"{sid}: the retried last step's answer from the snapshot")
    print(f"\nreplay bit-identical for {len(names)} optimizers x float32/float64: {names}")


# == 3. damaged files: never wrong numbers, never a crash ============================================
def _expect_data_loss(st, sid, filename):
    """The session is refused with DATA_LOSS naming `filename` on every use; returns where it was found."""
    where = "ReadState"
    e = refusal(lambda: get_info(st, sid))
    if e is not None:
        assert e.code() == grpc.StatusCode.DATA_LOSS and filename in e.details(), (sid, e.code(), e.details())
        where = "GetSession"
    for name, call in (("ReadState", lambda: read_state(st, sid)),
                       ("Step", lambda: st.Step(step_request(sid, 7, k_grads(8)), timeout=T)),
                       ("Step", lambda: st.Step(step_request(sid, 3, k_grads(4)), timeout=T)),
                       ("ReadParameters", lambda: st.ReadParameters(
                           session_pb2.ReadParametersRequest(session_id=sid), timeout=T))):
        e = refusal(call)
        assert e is not None, f"{sid}: {name} succeeded on a damaged session"
        assert e.code() == grpc.StatusCode.DATA_LOSS and filename in e.details(), (sid, name, e.code(), e.details())
    if where == "ReadState":  # registered at start, quarantined on first load: GetSession says why
        assert filename in get_info(st, sid).quarantined, sid
    return where


def _flip(path: pathlib.Path, offset: int, bit: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 1 << bit
    path.write_bytes(bytes(raw))


def test_random_bit_flips_in_snapshots_and_log_records(start_server, tmp_path):
    data = tmp_path / "data"
    files = data / "sessions"
    snaps = [f"snap-{i}" for i in range(24)]
    logs = [f"log-{i}" for i in range(26)]  # 8 flips in the last record, 16 in earlier ones, 2 in the file header
    ref = {}  # step -> the state every session holds at that step (they all take the same steps)
    s = start_server("--data-dir", str(data), "--memory-log-dir", "")
    _, st = stub(s.address)
    for sid in ["control"] + snaps + logs:
        create(st, sid, "adam", k_p0(), hp={"lr": K_LR})
    ref[0] = read_state(st, "control")[1]
    for t in range(1, 4):
        for sid in ["control"] + snaps + logs:
            st.Step(step_request(sid, t - 1, k_grads(t)), timeout=T)
        ref[t] = read_state(st, "control")[1]
    assert s.stop() == 0  # snapshots at step 3, logs emptied

    sizes = {sid: [os.path.getsize(files / f"{sid}.wal")] for sid in logs}  # the file header alone
    s = start_server("--data-dir", str(data), "--memory-log-dir", "")
    _, st = stub(s.address)
    for t in range(4, 8):
        for sid in ["control"] + logs:
            st.Step(step_request(sid, t - 1, k_grads(t)), timeout=T)
            if sid != "control":
                sizes[sid].append(os.path.getsize(files / f"{sid}.wal"))  # written before the reply
        ref[t] = read_state(st, "control")[1]
    s.kill()

    rng = random.Random(10)
    flipped = {}
    for i, sid in enumerate(snaps):
        path = files / f"{sid}.safetensors"
        header_end = 8 + int.from_bytes(path.read_bytes()[:8], "little")
        lo, hi = (0, header_end) if i % 2 else (header_end, path.stat().st_size)
        flipped[sid] = (path.name, rng.randrange(lo, hi), rng.randrange(8), "header" if i % 2 else "data")
    for i, sid in enumerate(logs):
        head, *ends = sizes[sid]
        assert len(ends) == 4 and head < ends[0] < ends[-1] == (files / f"{sid}.wal").stat().st_size
        lo, hi, where = ((ends[-2], ends[-1], "last record") if i < 8 else
                         (head, ends[-2], "earlier record") if i < 24 else (0, head, "file header"))
        flipped[sid] = (f"{sid}.wal", rng.randrange(lo, hi), rng.randrange(8), where)
    for sid, (name, offset, bit, _) in flipped.items():
        _flip(files / name, offset, bit)

    s = start_server("--data-dir", str(data), "--memory-log-dir", "")
    _, st = stub(s.address)
    outcomes = {}
    for sid, (name, offset, bit, where) in flipped.items():
        info = refusal(lambda: get_info(st, sid)) or get_info(st, sid)
        if sid.startswith("log-") and where == "last record" and not isinstance(info, grpc.RpcError) \
                and info.step == 6 and not info.quarantined:
            # A torn tail: cut at the last good record. The numbers are step 6's, and step 7 taken again
            # gives the numbers it gave the first time.
            assert_same_arrays(read_state(st, sid)[1], ref[6], f"{sid} recovered to step 6")
            st.Step(step_request(sid, 6, k_grads(7)), timeout=T)
            assert_same_arrays(read_state(st, sid)[1], ref[7], f"{sid}: step 7 again")
            outcomes[sid] = "recovered to step 6"
        else:
            outcomes[sid] = "DATA_LOSS at " + _expect_data_loss(st, sid, name)
        # The others keep working meanwhile.
        assert read_state(st, "control")[0].step == 7
    listed = {i.session_id: i for i in st.ListSessions(session_pb2.ListSessionsRequest(), timeout=T).sessions}
    for sid, why in outcomes.items():
        if why == "DATA_LOSS at ReadState":
            assert flipped[sid][0] in listed[sid].quarantined, sid
    r = st.Step(step_request("control", 7, k_grads(8)), timeout=T)
    assert (r.step, r.replayed) == (8, False)
    assert s.proc.poll() is None, "the server died"
    assert s.stop() == 0
    for sid, (name, *_rest) in flipped.items():
        assert (files / name).exists(), f"{sid}: the damaged file {name} was not kept"
    summary = {}
    for sid, (name, offset, bit, where) in flipped.items():
        key = f"{'snapshot' if name.endswith('.safetensors') else 'log'} {where}: {outcomes[sid]}"
        summary[key] = summary.get(key, 0) + 1
    print(f"\nbit flips: {len(snaps)} in snapshots, {len(logs)} in logs: {summary}")
    # Whatever the flip, a snapshot's damage is found; so is a log's before its last record.
    for sid, (name, offset, bit, where) in flipped.items():
        if where != "last record":
            assert outcomes[sid].startswith("DATA_LOSS"), (sid, where, offset, bit, outcomes[sid])


def _craft(path: pathlib.Path, case: str) -> None:
    """Rewrite a snapshot so that it is well formed (checksums and all) but disagrees with itself, or
    edit its header bytes."""
    if case in ("m/W has 2 elements", "W is float32", "W is 8x8", "v/b missing", "last_delta/W has 2 elements"):
        meta, arrays = snapshot.read(path)
        if case == "m/W has 2 elements":
            arrays["state/m/W"] = arrays["state/m/W"][:2].copy()
        elif case == "W is float32":
            arrays["params/W"] = arrays["params/W"].astype(np.float32)
        elif case == "W is 8x8":
            arrays["params/W"] = arrays["params/W"].reshape(8, 8)
        elif case == "v/b missing":
            del arrays["state/v/b"]
        else:
            arrays["last_delta/W"] = np.ones(2)
            meta["tensors"]["last_delta/W"] = ["last_delta", "", "W"]
        snapshot.write(path, meta, arrays)
        return
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    head = raw[8:8 + n].decode()
    if case == "m/W and v/W offsets swapped":
        import json
        h = json.loads(head)
        h["state/m/W"]["data_offsets"], h["state/v/W"]["data_offsets"] = (h["state/v/W"]["data_offsets"],
                                                                          h["state/m/W"]["data_offsets"])
        new = json.dumps(h, separators=(",", ":"))
        new += " " * (n - len(new))
    elif case == "b's shape edited":
        old = '"params/b":{"dtype":"F64","shape":[4]'
        assert old in head
        new = head.replace(old, '"params/b":{"dtype":"F64","shape":[2]')
    elif case == "lr edited":
        old = '\\"lr\\":0.01'
        assert old in head, head[:400]
        new = head.replace(old, '\\"lr\\":0.02')
    elif case == "step edited":
        old = '\\"step\\":2,'
        assert old in head, head[:400]
        new = head.replace(old, '\\"step\\":9,')
    elif case == "header length past the end":
        raw[:8] = (len(raw) + 8).to_bytes(8, "little")
        path.write_bytes(bytes(raw))
        return
    else:
        raise AssertionError(case)
    assert len(new) == n
    raw[8:8 + n] = new.encode()
    path.write_bytes(bytes(raw))


CRAFTED = ["m/W has 2 elements", "W is float32", "W is 8x8", "v/b missing", "last_delta/W has 2 elements",
           "m/W and v/W offsets swapped", "b's shape edited", "lr edited", "step edited",
           "header length past the end"]


def test_crafted_snapshot_headers_are_data_loss_and_crash_nothing(start_server, tmp_path):
    data = tmp_path / "data"
    ids = {case: f"crafted-{i}" for i, case in enumerate(CRAFTED)}
    p0 = {"W": np.linspace(-1, 1, 64), "b": np.ones(4)}
    s = start_server("--data-dir", str(data))
    _, st = stub(s.address)
    for sid in ["control", *ids.values()]:
        create(st, sid, "adam", p0, hp={"lr": 0.01}, reply=session_pb2.STEP_REPLY_DELTA)
        for t in (1, 2):
            st.Step(session_pb2.StepRequest(session_id=sid, step=t - 1, gradients=[
                tensors.from_numpy("W", np.sin(np.arange(64.0) * t)), tensors.from_numpy("b", np.full(4, t * 1.0))]),
                timeout=T)
    assert s.stop() == 0
    for case, sid in ids.items():
        _craft(data / "sessions" / f"{sid}.safetensors", case)

    s = start_server("--data-dir", str(data))
    _, st = stub(s.address)
    where = {}
    for case, sid in ids.items():
        e = refusal(lambda: get_info(st, sid))
        if e is None:
            e = refusal(lambda: read_state(st, sid))
            where[case] = "ReadState"
        else:
            where[case] = "GetSession"
        assert e is not None, f"{case}: the session was served"
        assert e.code() == grpc.StatusCode.DATA_LOSS and f"{sid}.safetensors" in e.details(), (case, e.details())
        for attempt in range(5):  # finding 11: the 5th step used to abort the process
            for fence in (1, 2):
                e = refusal(lambda: st.Step(session_pb2.StepRequest(session_id=sid, step=fence, gradients=[
                    tensors.from_numpy("W", np.ones(64)), tensors.from_numpy("b", np.ones(4))]), timeout=T))
                assert e is not None and e.code() == grpc.StatusCode.DATA_LOSS, (case, attempt, e)
        assert s.proc.poll() is None, f"{case}: the server died"
        # The others keep working: the control session takes a step after each damaged one's refusals.
        r = st.Step(session_pb2.StepRequest(session_id="control", gradients=[
            tensors.from_numpy("W", np.ones(64)), tensors.from_numpy("b", np.ones(4))]), timeout=T)
        assert (r.step, r.replayed) == (2 + len(where), False)
    listed = {i.session_id for i in st.ListSessions(session_pb2.ListSessionsRequest(), timeout=T).sessions}
    assert "control" in listed
    assert get_info(st, "control").step == 2 + len(CRAFTED)
    assert s.stop() == 0
    print(f"\ncrafted snapshots refused with DATA_LOSS: {where}")


# == 4. a full disk ==================================================================================
def _held(st, sid):
    """What a session holds: its step, hyperparameters and every tensor's bytes (not when it was written)."""
    info, state = read_state(st, sid)
    return info.step, dict(info.hyperparameters), {k: a.tobytes() for k, a in state.items()}


def _resource_exhausted(call, sid):
    e = refusal(call)
    assert e is not None, f"{sid}: succeeded on a full disk"
    assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (sid, e.code(), e.details())
    assert "disk is full" in e.details() and sid in e.details(), e.details()


def test_disk_full_changes_nothing_and_the_shutdown_flush_tries_every_session(start_server):
    with small_tmpfs("8m") as mnt:
        data = mnt / "data"
        s = start_server("--data-dir", str(data), "--memory-log-dir", "")
        _, st = stub(s.address)
        big = {"W": np.linspace(-1, 1, 32768)}  # adam: a 768 KiB snapshot, 256 KiB log records
        mid = {"W": np.linspace(-1, 1, 1024)}  # 8 KiB log records: never in a page's slack
        create(st, "big-a", "adam", big)
        create(st, "big-b", "adam", big)
        create(st, "every", "adam", mid, mode="every-step")
        create(st, "per", "sgd", {"W": np.ones(16)}, mode="periodic", periodic_steps=1000, periodic_seconds=3600)
        create(st, "sgd", "sgd", mid, hp={"lr": 0.1})
        shapes = {"big-a": big, "big-b": big, "every": mid, "per": {"W": np.ones(16)}, "sgd": mid}

        def g(sid, t):
            return {"W": np.cos(np.arange(shapes[sid]["W"].size) * 0.01 * t)}

        steps = dict.fromkeys(shapes, 0)

        def step(sid, stream=False):
            t = steps[sid] + 1
            if stream:
                got = stream_step(st, sid, g(sid, t), step=t - 1, chunk_bytes=64 << 10)
            else:
                got = unary_step(st, sid, g(sid, t), step=t - 1)
            assert got[:2] == (t, False), (sid, got[:2])
            steps[sid] = t
            return got[2]

        for sid in shapes:
            step(sid)
            step(sid)

        # -- full: steps that need the log and hyperparameter changes are refused; nothing changes
        filler = _fill(mnt)
        for sid, stream in (("sgd", False), ("every", False), ("big-a", True), ("big-b", False)):
            before = digest(st, sid)
            t = steps[sid] + 1
            if stream:
                _resource_exhausted(lambda: stream_step(st, sid, g(sid, t), step=t - 1, chunk_bytes=64 << 10), sid)
            else:
                _resource_exhausted(lambda: unary_step(st, sid, g(sid, t), step=t - 1), sid)
            assert digest(st, sid) == before, f"{sid} changed by a refused step"
        step("per")  # periodic: nothing to write until its window closes
        before = digest(st, "sgd")
        _resource_exhausted(lambda: st.UpdateHyperparameters(session_pb2.UpdateHyperparametersRequest(
            session_id="sgd", hyperparameters={"lr": 0.5}), timeout=T), "sgd")
        assert get_info(st, "sgd").hyperparameters["lr"] == 0.1
        assert digest(st, "sgd") == before

        # -- freed: the old lr is still the one in force, and the steps are durable
        filler.unlink()
        p2 = read_state(st, "sgd")[1]["params/W"]
        p3 = step("sgd")["W"]
        np.testing.assert_allclose(p3, p2 - 0.1 * g("sgd", 3)["W"], rtol=1e-15, atol=1e-15)
        assert get_info(st, "sgd").hyperparameters["lr"] == 0.1
        for sid in ("every", "big-a"):
            step(sid)
        durable = ("big-a", "big-b", "every", "sgd")
        kept = {sid: digest(st, sid) for sid in durable}
        s.kill()
        s = start_server("--data-dir", str(data), "--memory-log-dir", "")
        _, st = stub(s.address)
        for sid in durable:
            assert digest(st, sid) == kept[sid], f"{sid} after kill -9"
        assert get_info(st, "sgd").hyperparameters["lr"] == 0.1
        steps["per"] = get_info(st, "per").step  # periodic: back to its last snapshot (the create)
        assert steps["per"] == 0

        # -- the shutdown flush with too little space for the big sessions' snapshots: each failure is
        # reported, every other session is still written, and the exit status says so
        for sid in ("big-a", "big-b", "sgd"):
            step(sid)
        for _ in range(3):
            step("per")
        kept = {sid: _held(st, sid) for sid in shapes}
        filler = _fill(mnt, leave=256 << 10)
        code = s.stop()
        err = s.proc.stderr.read()
        assert code != 0, f"the server exited 0 though two sessions could not be written:\n{err}"
        failed = [line for line in err.splitlines() if "at shutdown" in line]
        for sid in ("big-a", "big-b"):
            assert any(sid in line and "disk is full" in line or sid in line and "No space" in line
                       for line in failed), (sid, err)
        for sid in ("every", "per", "sgd"):
            assert not any(f"session {sid} " in line for line in failed), (sid, err)
        filler.unlink()
        s = start_server("--data-dir", str(data), "--memory-log-dir", "")
        _, st = stub(s.address)
        for sid in shapes:  # per's 3 acknowledged steps were written; the big ones recover from their logs
            assert _held(st, sid) == kept[sid], sid
        assert get_info(st, "per").step == 3
        assert s.stop() == 0
        print(f"\ndisk full: refused steps/lr change left the sessions unchanged; shutdown flush failures: {failed}")


def test_periodic_window_holds_when_its_snapshot_cannot_be_written(start_server):
    """A periodic session promises that a crash loses at most its window: once the snapshot that closes the
    window fails, further steps are refused (RESOURCE_EXHAUSTED) rather than acknowledged unwritten."""
    window = 2
    with small_tmpfs("4m") as mnt:
        data = mnt / "data"
        s = start_server("--data-dir", str(data))
        _, st = stub(s.address)
        w = np.linspace(-1, 1, 4096)  # a 32 KiB snapshot
        create(st, "per", "sgd", {"W": w}, mode="periodic", periodic_steps=window, periodic_seconds=3600)
        filler = _fill(mnt)
        acked = 0
        for t in range(1, 2 * window + 3):
            e = refusal(lambda: unary_step(st, "per", {"W": np.full(4096, float(t))}, step=acked))
            if e is not None:
                assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "disk is full" in e.details(), e.details()
                break
            acked = t
        assert acked == window, f"{acked} steps acknowledged with no snapshot written (window {window})"
        before = _held(st, "per")
        filler.unlink()
        assert unary_step(st, "per", {"W": np.full(4096, 3.0)}, step=acked)[:2] == (acked + 1, False)
        assert get_info(st, "per").persisted_step >= acked  # the overdue snapshot, written before the step
        s.kill()
        s = start_server("--data-dir", str(data))
        _, st = stub(s.address)
        step = get_info(st, "per").step
        assert acked + 1 - window <= step, f"window {window}: acknowledged {acked + 1}, recovered {step}"
        assert step == acked and _held(st, "per") == before


# == 5. shape [] across restarts (finding 7) =========================================================
def test_scalar_parameter_stays_shape_empty_after_kill_and_restart(start_server, tmp_path):
    data = str(tmp_path / "data")
    p0 = {"s": np.array(0.75), "w": np.array([1.0, -2.0, 0.5])}
    s = start_server("--data-dir", data)
    _, st = stub(s.address)
    for sid, master in (("scalar64", F64), ("scalar32", F32)):
        dt = np.float64 if master == F64 else np.float32
        info = create(st, sid, "adam", {n: a.astype(dt) for n, a in p0.items()}, master=master, hp={"lr": 0.1})
        assert [list(p.shape) for p in info.parameters] == [[], [3]]
        for t in range(1, 4):
            unary_step(st, sid, {"s": np.array(0.3 * t, dt), "w": np.full(3, 0.1 * t, dt)}, step=t - 1)
    before = {sid: read_state(st, sid)[1] for sid in ("scalar64", "scalar32")}

    def check(st, how):
        for sid in ("scalar64", "scalar32"):
            assert [(p.name, list(p.shape)) for p in get_info(st, sid).parameters] == [("s", []), ("w", [3])], how
            state = read_state(st, sid)[1]
            for k, a in state.items():
                assert a.shape == (() if k.endswith("/s") else (3,)), (sid, how, k, a.shape)
            assert_same_arrays(state, before[sid], f"{sid} {how}")
            params = st.ReadParameters(session_pb2.ReadParametersRequest(session_id=sid), timeout=T).parameters
            assert [list(p.shape) for p in params] == [[], [3]], (sid, how)

    s.kill()  # the log holds steps 1-3 after the create's snapshot
    s = start_server("--data-dir", data)
    _, st = stub(s.address)
    check(st, "replayed from the log")
    assert s.stop() == 0  # the clean stop writes snapshots at step 3 and empties the logs
    for sid in ("scalar64", "scalar32"):
        meta, arrays = snapshot.read(tmp_path / "data" / "sessions" / f"{sid}.safetensors")
        assert meta["step"] == 3 and meta["shapes"]["s"] == [] and arrays["params/s"].shape == ()
    s = start_server("--data-dir", data)
    _, st = stub(s.address)
    check(st, "from the snapshot")
    for sid in ("scalar64", "scalar32"):
        dt = np.float64 if sid == "scalar64" else np.float32
        step, _, out = unary_step(st, sid, {"s": np.array(1.0, dt), "w": np.ones(3, dt)}, step=3)
        assert step == 4 and out["s"].shape == () and out["w"].shape == (3,)


# == 6. a crash around a snapshot of a logged session =================================================
def test_crash_around_a_logged_sessions_snapshot_loses_nothing(start_server, tmp_path):
    """Default mode: a snapshot cut short before its rename (an lr change, the clean stop's flush) leaves
    the log whole; a crash after the rename but before the log is emptied leaves a log the snapshot
    already covers. Either way the restart holds every acknowledged step, bit for bit."""
    data = tmp_path / "data"
    files = data / "sessions"
    # Snapshot writes of this server: the create (1), the lr change (2): it exits before renaming the 2nd.
    s = start_server("--data-dir", str(data), env={snapshot.CRASH_ENV: "2"})
    _, st = stub(s.address)
    create(st, "c", "adam", k_p0(), hp={"lr": K_LR})
    for t in range(1, 4):
        st.Step(step_request("c", t - 1, k_grads(t)), timeout=T)
    at3 = _held(st, "c")
    e = refusal(lambda: st.UpdateHyperparameters(session_pb2.UpdateHyperparametersRequest(
        session_id="c", hyperparameters={"lr": 0.5}), timeout=T))
    assert e is not None and s.proc.wait(30) == 87
    s = start_server("--data-dir", str(data), env={snapshot.CRASH_ENV: "1"})  # its clean stop's flush crashes
    _, st = stub(s.address)
    assert _held(st, "c") == at3  # the snapshot at step 0 and the log's 3 records; lr unchanged
    for t in range(4, 6):
        st.Step(step_request("c", t - 1, k_grads(t)), timeout=T)
    at5 = _held(st, "c")
    log_at5 = (files / "c.wal").read_bytes()
    s.proc.terminate()
    assert s.proc.wait(30) == 87
    s = start_server("--data-dir", str(data))
    _, st = stub(s.address)
    assert _held(st, "c") == at5
    np.testing.assert_allclose(read_state(st, "c")[1]["params/W"], BookAdam(k_p0(), K_LR).at(5)["params/W"],
                               rtol=1e-10, atol=1e-12)
    assert s.stop() == 0  # a snapshot at step 5, the log emptied
    (files / "c.wal").write_bytes(log_at5)  # as if the crash came between the snapshot's rename and the reset
    s = start_server("--data-dir", str(data))
    _, st = stub(s.address)
    assert _held(st, "c") == at5
    assert unary_step(st, "c", k_grads(5), step=4)[:2] == (5, True)
    assert unary_step(st, "c", k_grads(6), step=5)[:2] == (6, False)
    at6 = _held(st, "c")
    s.kill()
    s = start_server("--data-dir", str(data))
    _, st = stub(s.address)
    assert _held(st, "c") == at6


# == 7. hyperparameter changes and the log ===========================================================
@pytest.mark.parametrize("mode", ["log", "every-step"])
def test_lr_change_while_a_logged_stream_step_is_in_flight_waits_for_it(start_server, tmp_path, mode):
    """The change would need the log emptied under the open record of the in-flight step: it waits for that
    step, which commits with the lr it began with (issue 22, finding 11: it was refused UNAVAILABLE). A change
    whose deadline passes while it waits ends DEADLINE_EXCEEDED with nothing written or changed."""
    data = tmp_path / "data"
    # The disk log, whose file this test watches grow (a memory log's is set aside as the disk catches up).
    s = start_server("--data-dir", str(data), "--memory-log-dir", "")
    _, st = stub(s.address)
    create(st, "c", "sgd", {"W": np.ones(1000)}, hp={"lr": 0.1}, mode=mode)
    unary_step(st, "c", {"W": np.ones(1000)}, step=0)
    wal_file = data / "sessions" / "c.wal"
    logged = wal_file.stat().st_size
    chunks = list(tensors.chunk("W", np.full(1000, 2.0), 800))
    release, sent = threading.Event(), threading.Event()

    def requests():
        yield session_pb2.StepStreamRequest(session_id="c", step=1, chunks=chunks[:1])
        sent.set()
        release.wait(T)
        for c in chunks[1:]:
            yield session_pb2.StepStreamRequest(chunks=[c])

    def change(lr, timeout=T):
        return st.UpdateHyperparameters(session_pb2.UpdateHyperparametersRequest(
            session_id="c", hyperparameters={"lr": lr}), timeout=timeout).session

    out, answered = {}, []
    t = threading.Thread(target=lambda: out.update(r=[(r.step, r.replayed) for r in st.StepStream(requests(),
                                                                                                   timeout=T)]))
    t.start()
    assert sent.wait(T)
    deadline = time.monotonic() + T
    while wal_file.stat().st_size == logged and time.monotonic() < deadline:
        time.sleep(0.01)  # until the first chunk is in the step's open record
    e = refusal(lambda: change(0.3, timeout=1))
    assert e is not None and e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
    assert get_info(st, "c").hyperparameters["lr"] == 0.1
    waiter = threading.Thread(target=lambda: answered.append(change(0.5)))
    waiter.start()
    waiter.join(0.5)
    assert not answered, "the change did not wait for the step in flight"
    release.set()
    t.join(T)
    waiter.join(T)
    assert out["r"][-1] == (2, False) and time.monotonic() < deadline
    assert answered and answered[0].step == 2 and answered[0].hyperparameters["lr"] == 0.5
    np.testing.assert_array_equal(read_state(st, "c")[1]["params/W"], 1 - 0.1 - 0.2)  # step 2 ran with 0.1
    kept = _held(st, "c")
    s.kill()
    s = start_server("--data-dir", str(data))
    _, st = stub(s.address)
    assert get_info(st, "c").hyperparameters["lr"] == 0.5  # before the load, as after it
    assert _held(st, "c") == kept
    np.testing.assert_allclose(unary_step(st, "c", {"W": np.ones(1000)}, step=2)[2]["W"], 1 - 0.1 - 0.2 - 0.5,
                               rtol=1e-15)


def test_lr_change_applies_when_its_snapshot_is_written_but_the_log_is_not_emptied(start_server, tmp_path):
    """The snapshot holding the new lr is on disk: refusing the call ("nothing was changed") would bring a
    refused change back at the next restart. A directory in the way of the log's rewrite makes it fail."""
    data = tmp_path / "data"
    s = start_server("--data-dir", str(data))
    _, st = stub(s.address)
    create(st, "c", "sgd", {"W": np.ones(8)}, hp={"lr": 0.1})
    unary_step(st, "c", {"W": np.ones(8)}, step=0)
    (data / "sessions" / ".c.wal.tmp").mkdir()  # EISDIR when the log is rewritten empty
    st.UpdateHyperparameters(session_pb2.UpdateHyperparametersRequest(session_id="c", hyperparameters={"lr": 0.5}),
                             timeout=T)
    assert get_info(st, "c").hyperparameters["lr"] == 0.5
    (data / "sessions" / ".c.wal.tmp").rmdir()
    unary_step(st, "c", {"W": np.ones(8)}, step=1)  # appended to the log the snapshot covers up to step 1
    kept = _held(st, "c")
    np.testing.assert_array_equal(read_state(st, "c")[1]["params/W"], np.full(8, 1 - 0.1 - 0.5))
    s.kill()
    s = start_server("--data-dir", str(data))
    _, st = stub(s.address)
    assert get_info(st, "c").hyperparameters["lr"] == 0.5
    assert _held(st, "c") == kept


def test_get_session_before_the_load_shows_the_lr_of_the_last_logged_step(start_server, tmp_path):
    data = tmp_path / "data"
    s = start_server("--data-dir", str(data))
    _, st = stub(s.address)
    create(st, "c", "sgd", {"W": np.ones(8)}, hp={"lr": 0.1})
    unary_step(st, "c", {"W": np.ones(8)}, step=0, hp={"lr": 0.25})
    s.kill()
    s = start_server("--data-dir", str(data))
    _, st = stub(s.address)
    listed = st.ListSessions(session_pb2.ListSessionsRequest(), timeout=T).sessions
    assert [(i.session_id, i.loaded, i.step, i.hyperparameters["lr"]) for i in listed] == [("c", False, 1, 0.25)]
    assert get_info(st, "c").hyperparameters["lr"] == 0.25
    read_state(st, "c")
    assert get_info(st, "c").hyperparameters["lr"] == 0.25
