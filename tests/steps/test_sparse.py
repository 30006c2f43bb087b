"""Sparse rows (issue 10 item 3; docs/workers.md, "Sparse rows"): lazy row updates against dense steps
with zero gradients, the row clocks through the log and snapshots, bad input, and workers.

Every test talks to a real server on loopback, except the kernel checks (numba against numpy).
"""
from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest

from conftest import ServerProcess
from optreg.client import Client, FailedPrecondition
from optreg.v1 import session_pb2, session_pb2_grpc, tensor_pb2, tensors

SPARSE = ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"]
EXACT = {"sgd", "adagrad", "adam"}  # lazy equals dense bit for bit; the others to rounding (docs/workers.md)
RTOL = {"float32": 1e-6, "float64": 1e-12}


def _close(lazy, dense, rtol, what, scale=None):
    """rtol relative to the tensor's scale: an element near 0 is held to rtol * max |dense| (the dense
    steps round every step, so an element that crossed zero carries their rounding, not a relative error
    of its own)."""
    scale = scale or float(np.abs(dense).max()) or 1.0
    np.testing.assert_allclose(lazy, dense, rtol=rtol, atol=rtol * scale, err_msg=what)


def _rows_msg(name, rows, values):
    return tensor_pb2.SparseRows(name=name, rows=np.asarray(rows, "<i8").tobytes(),
                                 values=tensors.from_numpy(name, np.asarray(values)))


def _scatter(shape, rows, values, dtype):
    g = np.zeros(shape, dtype)
    np.add.at(g, rows, values)
    return g


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("opt", SPARSE)
def test_lazy_equals_dense_with_zero_gradients(client, opt, dtype):
    """500 steps: rows touched at random (repeats within a step summed), a dense bias every step, a 2-D
    parameter never named (lazy throughout); reads on the way must not disturb anything."""
    rng = np.random.default_rng(SPARSE.index(opt) * 2 + (dtype == "float64"))
    params = {"E": rng.standard_normal((40, 6)).astype(dtype), "b": rng.standard_normal(5).astype(dtype),
              "F": rng.standard_normal((7, 3)).astype(dtype)}
    hp = {"lr": 0.05} if opt != "adam" else {"lr": 0.01}
    lazy = client.create_session(opt, {k: v.copy() for k, v in params.items()}, **hp)
    dense = client.create_session(opt, {k: v.copy() for k, v in params.items()}, **hp)
    for t in range(500):
        k = int(rng.integers(0, 7))
        rows = rng.integers(0, 40, k)
        vals = rng.standard_normal((k, 6)).astype(dtype)
        gb = rng.standard_normal(5).astype(dtype)
        got = lazy.step_sparse("E", rows, vals, grads={"b": gb})
        dense.step({"E": _scatter((40, 6), rows, vals, dtype), "b": gb, "F": np.zeros((7, 3), dtype)})
        assert got.step == t + 1
        if k:  # the answer carries the stepped rows, sorted and unique, as the dense session holds them
            r, v = got.rows["E"]
            assert list(r) == sorted(set(rows.tolist()))
            if opt in EXACT:
                np.testing.assert_array_equal(v, dense.arrays["E"][r])
            else:
                _close(v, dense.arrays["E"][r], RTOL[dtype], f"{opt} rows at step {t + 1}",
                       float(np.abs(dense.arrays["E"]).max()))
        if t % 125 == 124:
            pl, pd = lazy.read_parameters(), dense.read_parameters()
            for n in params:
                _close(pl[n], pd[n], RTOL[dtype], f"{opt} {n} at step {t + 1}")
    sl, sd = lazy.read_state(), dense.read_state()
    assert sl.info.step == sd.info.step == 500
    for n in params:
        if opt in EXACT:
            np.testing.assert_array_equal(sl.parameters[n], sd.parameters[n])
        _close(sl.parameters[n], sd.parameters[n], RTOL[dtype], f"{opt} parameter {n}")
        for slot in sd.state:
            if opt in EXACT:
                np.testing.assert_array_equal(sl.state[slot][n], sd.state[slot][n])
            _close(sl.state[slot][n], sd.state[slot][n], RTOL[dtype], f"{opt} {slot} of {n}")
    # The untouched parameter F moved as the dense steps moved it (velocity drift), or not at all.
    if opt in ("sgd", "adagrad"):
        np.testing.assert_array_equal(sl.parameters["F"], params["F"])


@pytest.mark.parametrize("opt", ["momentum", "adam", "rmsprop"])
def test_hyperparameter_changes_and_dense_steps_catch_up_first(client, opt):
    """Owed steps ran with the hyperparameters in force then: a change (UpdateHyperparameters, or carried
    by a step) catches every row up first; so does a dense step between sparse ones."""
    rng = np.random.default_rng(7)
    E = rng.standard_normal((30, 4)).astype(np.float32)
    lazy = client.create_session(opt, {"E": E.copy()})
    dense = client.create_session(opt, {"E": E.copy()})
    key = "decay_rate" if opt == "rmsprop" else ("beta1" if opt == "adam" else "momentum")
    for t in range(120):
        rows = rng.integers(0, 30, 3)
        vals = rng.standard_normal((3, 4)).astype(np.float32)
        change = {key: 0.8 + 0.05 * (t % 3)} if t % 40 == 20 else None
        if t % 25 == 24:  # a dense step in between: the owed rows are caught up first, then stepped
            g = rng.standard_normal((30, 4)).astype(np.float32)
            lazy.step({"E": g}, hyperparameters=change)
            dense.step({"E": g}, hyperparameters=change)
            continue
        lazy.step_sparse("E", rows, vals, hyperparameters=change)
        dense.step({"E": _scatter((30, 4), rows, vals, np.float32)}, hyperparameters=change)
        if t % 40 == 30:
            lazy.set_hyperparameters(lr=0.02 + 0.01 * (t // 40))
            dense.set_hyperparameters(lr=0.02 + 0.01 * (t // 40))
    sl, sd = lazy.read_state(), dense.read_state()
    _close(sl.parameters["E"], sd.parameters["E"], 1e-6, opt)
    for slot in sd.state:
        _close(sl.state[slot]["E"], sd.state[slot]["E"], 1e-6, f"{opt} {slot}")


def test_kernels_match_the_plugins_numpy_catch_up():
    """sparsekernels' compiled catch-ups give the plugins' numpy numbers bit for bit."""
    from optreg.plugins.registry import Registry
    from optreg.server.kernels import jit
    from optreg.server.kernels import rows as sparsekernels
    if not jit.available():
        pytest.skip("numba is not installed")
    sparsekernels.warm(block=True)
    reg = Registry()
    rng = np.random.default_rng(3)
    for opt in SPARSE:
        defn = reg.get(opt).definition
        for dtype in (np.float32, np.float64):
            p = rng.standard_normal((50, 9)).astype(dtype)
            st = {s.name: np.abs(rng.standard_normal((50, 9))).astype(dtype) for s in defn.slots}
            st.get("m", np.empty((50, 9)))[7] = 0  # an idle Adam row: m and v zero, skipped
            st.get("v", np.empty((50, 9)))[7] = 0
            last = rng.integers(0, 60, 50)
            hp = defn.resolve({})
            a = (p.copy(), {k: v.copy() for k, v in st.items()})
            b = (p.copy(), {k: v.copy() for k, v in st.items()})
            sparsekernels.catch_up(defn, a[0], a[1], last, 60, hp, numpy_only=True)
            sparsekernels.catch_up(defn, b[0], b[1], last, 60, hp)
            np.testing.assert_array_equal(a[0], b[0], err_msg=opt)
            for k in st:
                np.testing.assert_array_equal(a[1][k], b[1][k], err_msg=f"{opt} {k}")


def test_one_percent_of_a_million_row_embedding(client):
    """A 1e6 x 64 float32 embedding, 1% of its rows a step (different rows each step): each step answers
    with the dense Adam step's rows (computed here on those rows), untouched rows stay, and the read
    holds the dense-equivalent table (rows stepped earlier kept moving: Adam's replayed drift)."""
    from optreg.plugins.builtins import adam
    n, k, steps = 1_000_000, 10_000, 3
    rng = np.random.default_rng(11)
    E = rng.standard_normal((n, 64), dtype=np.float32)
    s = client.create_session("adam", {"E": E.copy()}, lr=0.01)
    hp = {"lr": 0.01, "beta1": 0.9, "beta2": 0.999}
    picks = rng.permutation(n)[:k * steps].reshape(steps, k)
    expect = {}
    for t in range(1, steps + 1):
        rows = picks[t - 1]
        vals = rng.standard_normal((k, 64), dtype=np.float32)
        got = s.step_sparse("E", rows, vals)
        order = np.argsort(rows)
        r = rows[order]
        pr, st = E[r].copy(), {"m": np.zeros((k, 64), np.float32), "v": np.zeros((k, 64), np.float32)}
        adam.update(pr, vals[order], st, t, hp, [np.empty_like(pr), np.empty_like(pr)])
        assert got.step == t
        np.testing.assert_array_equal(got.rows["E"][0], r)
        np.testing.assert_array_equal(got.rows["E"][1], pr)
        np.testing.assert_array_equal(s.arrays["E"][r], pr)
        for u in range(t + 1, steps + 1):  # what the dense steps after it do to these rows: g = 0
            adam.update(pr, np.zeros_like(pr), st, u, hp, [np.empty_like(pr), np.empty_like(pr)])
        expect[t] = (r, pr)
    back = s.read_parameters()["E"]
    for t, (r, pr) in expect.items():
        np.testing.assert_array_equal(back[r], pr, err_msg=f"rows stepped at {t}")
    never = np.ones(n, bool)
    never[picks.reshape(-1)] = False
    np.testing.assert_array_equal(back[never], E[never])


def _steps(sess, rng, n, dense=None):
    for _ in range(n):
        rows = rng.integers(0, 50, 4)
        vals = rng.standard_normal((4, 3)).astype(np.float32)
        sess.step_sparse("E", rows, vals)
        if dense is not None:
            dense.step({"E": _scatter((50, 3), rows, vals, np.float32)})


@pytest.mark.parametrize("how", ["kill", "stop"])
def test_row_clocks_survive_a_restart(tmp_path, how):
    """kill -9 (the log replays the sparse steps) or a clean stop (the snapshot holds the clocks): the
    session reads the same bits after the restart and keeps agreeing with its dense twin."""
    data = str(tmp_path / "data")
    env = {"OPTREG_DATA_DIR": data}
    srv = ServerProcess("--data-dir", data, env=env)
    rng = np.random.default_rng(5)
    E = rng.standard_normal((50, 3)).astype(np.float32)
    try:
        with Client(srv.address, timeout=60) as c:
            lazy = c.create_session("momentum", {"E": E.copy()}, session_id="lazy", durability="log")
            dense = c.create_session("momentum", {"E": E.copy()}, session_id="dense", durability="log")
            _steps(lazy, rng, 60, dense)
            before = lazy.read_state()
    finally:
        srv.kill() if how == "kill" else srv.stop()
    srv = ServerProcess("--data-dir", data, env=env)
    try:
        with Client(srv.address, timeout=60) as c:
            lazy, dense = c.session("lazy"), c.session("dense")
            after = lazy.read_state()
            assert after.info.step == 60
            np.testing.assert_array_equal(after.parameters["E"], before.parameters["E"])
            np.testing.assert_array_equal(after.state["v"]["E"], before.state["v"]["E"])
            lazy.arrays, dense.arrays = {"E": after.parameters["E"].copy()}, {"E": after.parameters["E"].copy()}
            _steps(lazy, rng, 40, dense)
            sl, sd = lazy.read_state(), dense.read_state()
            _close(sl.parameters["E"], sd.parameters["E"], 1e-6, "E after restart")
            _close(sl.state["v"]["E"], sd.state["v"]["E"], 1e-6, "v after restart")
    finally:
        srv.stop()


def test_bad_sparse_input(client, server):
    E = np.zeros((10, 4), np.float32)
    s = client.create_session("sgd", {"E": E, "b": np.zeros(3, np.float32)})
    stub = session_pb2_grpc.SessionServiceStub(grpc.insecure_channel(server.address))

    def step(*sparse, grads=(), code=grpc.StatusCode.INVALID_ARGUMENT, words=()):
        with pytest.raises(grpc.RpcError) as e:
            stub.Step(session_pb2.StepRequest(session_id=s.id, step=0, sparse=list(sparse), gradients=list(grads)))
        assert e.value.code() == code, e.value.details()
        for w in words:
            assert w in e.value.details(), e.value.details()

    ok = np.ones((2, 4), np.float32)
    step(_rows_msg("E", [1, 10], ok), words=["outside [0, 10)", "sparse[0].rows"])
    step(_rows_msg("E", [-1, 2], ok), words=["outside"])
    step(tensor_pb2.SparseRows(name="E", rows=b"\x01\x02\x03", values=tensors.from_numpy("E", ok)),
         words=["int64"])
    step(_rows_msg("E", [1, 2], np.ones((2, 3), np.float32)), words=["shape [2, 3]", "[2, 4]"])
    step(_rows_msg("E", [1, 2], np.ones((2, 4), np.float64)), words=["DATA_TYPE_FLOAT64 is not accepted"])
    step(_rows_msg("E", [1, 2], np.array([[1, 2, np.nan, 4], [1, 1, 1, 1]], np.float32)), words=["NaN"])
    step(_rows_msg("b", [0], np.ones((1, 3), np.float32)), words=["2-D", "gradients"])
    step(_rows_msg("nope", [0], ok[:1]), words=["not a parameter", "its parameters are: 'E', 'b'"])
    with pytest.raises(grpc.RpcError) as e:  # a fence ahead at step 0: nothing to retry, so no step -1 offered
        stub.Step(session_pb2.StepRequest(session_id=s.id, step=3, sparse=[_rows_msg("E", [1], ok[:1])]))
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "send step=0 for the next step (it has no step to retry)" in e.value.details(), e.value.details()
    step(tensor_pb2.SparseRows(name="E", rows=np.array([1], "<i8").tobytes()), words=["values", "missing"])
    step(_rows_msg("E", [1], ok[:1]), _rows_msg("E", [2], ok[:1]), words=["already in the step"])
    step(_rows_msg("E", [1], ok[:1]), grads=[tensors.from_numpy("E", E)], words=["both as sparse rows and dense"])
    assert s.refresh().step == 0  # nothing was applied
    t = client.create_session("torch.adam", {"E": E})
    with pytest.raises(FailedPrecondition, match="does not declare sparse rows"):
        t.step_sparse("E", [1], ok[:1])
    # Repeated rows are summed, in order: the same bits as one row with the sum.
    a = client.create_session("sgd", {"E": np.ones((10, 4), np.float32)}, lr=0.5)
    b = client.create_session("sgd", {"E": np.ones((10, 4), np.float32)}, lr=0.5)
    x, y = np.full((1, 4), 0.3, np.float32), np.full((1, 4), 0.7, np.float32)
    a.step_sparse("E", [3, 5, 3], np.concatenate([x, ok[:1], y]))
    b.step_sparse("E", [5, 3], np.concatenate([ok[:1], x + y]))
    np.testing.assert_array_equal(a.read_parameters()["E"], b.read_parameters()["E"])


def test_retry_is_applied_once_and_stream_carries_rows(client, server):
    s = client.create_session("momentum", {"E": np.ones((8, 2), np.float32)})
    stub = session_pb2_grpc.SessionServiceStub(grpc.insecure_channel(server.address))
    req = session_pb2.StepRequest(session_id=s.id, step=0, sparse=[_rows_msg("E", [2, 6], np.ones((2, 2), np.float32))])
    first = stub.Step(req)
    again = stub.Step(req)
    assert (first.step, first.replayed, again.step, again.replayed) == (1, False, 1, True)
    assert again.sparse == first.sparse and list(np.frombuffer(first.sparse[0].rows, "<i8")) == [2, 6]
    assert s.refresh().step == 1
    msgs = [session_pb2.StepStreamRequest(session_id=s.id, step=1,
                                          sparse=[_rows_msg("E", [0], np.ones((1, 2), np.float32))])]
    replies = list(stub.StepStream(iter(msgs)))
    assert replies[-1].step == 2 and replies[-1].sparse[0].name == "E"
    late = [session_pb2.StepStreamRequest(session_id=s.id, step=2),
            session_pb2.StepStreamRequest(sparse=[_rows_msg("E", [0], np.ones((1, 2), np.float32))])]
    with pytest.raises(grpc.RpcError) as e:
        list(stub.StepStream(iter(late)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "first message" in e.value.details()
    # The dense-equivalent read: momentum's velocity keeps moving untouched rows; a dense step agrees.
    d = client.create_session("momentum", {"E": np.ones((8, 2), np.float32)})
    g1 = np.zeros((8, 2), np.float32)
    g1[[2, 6]] = 1
    d.step({"E": g1})
    g2 = np.zeros((8, 2), np.float32)
    g2[0] = 1
    d.step({"E": g2})
    _close(s.read_parameters()["E"], d.read_parameters()["E"], 1e-6, "after a stream step")


def _mean(gs):
    acc = gs[0].copy()
    for g in gs[1:]:
        acc += g
    return acc / np.float32(len(gs))


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_workers_step_sparse_rows(client, server, mode):
    """sync: two workers' rows merged (a row both name summed, then the mean) into one step equal to the
    dense mean's; async: each contribution applied on its own."""
    E = np.zeros((12, 3), np.float32)
    s = client.create_session("sgd", {"E": E.copy()}, workers=2, mode=mode, lr=1.0)
    dense = client.create_session("sgd", {"E": E.copy()}, lr=1.0)
    rows = {"w0": [1, 4, 4], "w1": [4, 9]}
    vals = {"w0": np.array([[1, 2, 3], [4, 5, 6], [1, 1, 1]], np.float32),
            "w1": np.array([[0.5, 0.25, 2], [3, 3, 3]], np.float32)}
    out = {}
    joined = threading.Barrier(len(rows), timeout=60)  # a round closes when every member *so far* is in

    def run(w):
        with Client(server.address, timeout=60) as c:
            worker = c.join(s.id, w)
            joined.wait()
            out[w] = worker.step_sparse("E", rows[w], vals[w])
            worker.leave()

    threads = [threading.Thread(target=run, args=(w,)) for w in rows]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert set(out) == {"w0", "w1"}
    gs = [_scatter((12, 3), rows[w], vals[w], np.float32) for w in sorted(rows)]
    if mode == "sync":
        dense.step({"E": _mean(gs)})
        assert out["w0"].step == out["w1"].step == 1
    else:
        for g in gs:
            dense.step({"E": g})
    np.testing.assert_array_equal(s.read_parameters()["E"], dense.read_parameters()["E"])


def test_conformance_kit_catches_a_catch_up_that_forgets_the_drift():
    """The kit's check_catch_up holds a plugin's catch_up to its own update with zero gradients."""
    import dataclasses

    from optreg.plugins.builtins import momentum
    from optreg.plugins.testing import check_catch_up

    def decay_only(p, state, last, now, hp):  # v decays, but W does not move: not what the dense steps do
        state["v"][...] *= hp["momentum"] ** (now - last)[:, None]

    check_catch_up(momentum.MOMENTUM)
    with pytest.raises(AssertionError, match="catch_up's param differs"):
        check_catch_up(dataclasses.replace(momentum.MOMENTUM, catch_up=decay_only))


@pytest.mark.parametrize("mode", ["sync", "ssp"])
def test_worker_streamed_sparse_contribution(client, server, mode):
    """A worker's StepStream: rows in the first message, a dense gradient of another parameter after."""
    s = client.create_session("sgd", {"E": np.zeros((6, 2), np.float32), "b": np.zeros(3, np.float32)},
                              workers=1, mode=mode, lr=1.0)
    stub = session_pb2_grpc.SessionServiceStub(grpc.insecure_channel(server.address))
    stub.JoinSession(session_pb2.JoinSessionRequest(session_id=s.id, worker="w0"))
    msgs = [session_pb2.StepStreamRequest(session_id=s.id, worker="w0", round=0,
                                          sparse=[_rows_msg("E", [4, 1, 4], np.ones((3, 2), np.float32))]),
            session_pb2.StepStreamRequest(chunks=[tensors.from_numpy("b", np.full(3, 2.0, np.float32))])]
    replies = list(stub.StepStream(iter(msgs)))
    assert replies[-1].step == 1
    rows = {m.name: (np.frombuffer(m.rows, "<i8"), tensors.to_numpy(m.values)) for m in replies[-1].sparse}
    assert list(rows["E"][0]) == [1, 4]
    np.testing.assert_array_equal(rows["E"][1], [[-1, -1], [-2, -2]])
    p = s.read_parameters()
    np.testing.assert_array_equal(p["b"], [-2, -2, -2])
    assert p["E"][4, 0] == -2 and p["E"][0, 0] == 0


def test_delta_reply_and_an_empty_step(client):
    """A delta session's sparse answer is new - old of the rows (added into the caller's arrays); a step
    naming no rows is a step of zero gradients (the velocity still moves every row)."""
    E = np.arange(24, dtype=np.float32).reshape(8, 3)
    s = client.create_session("momentum", {"E": E.copy()}, step_reply="delta")
    d = client.create_session("momentum", {"E": E.copy()})
    got = s.step_sparse("E", [5, 2], np.ones((2, 3), np.float32))
    g = np.zeros((8, 3), np.float32)
    g[[2, 5]] = 1
    d.step({"E": g})
    np.testing.assert_array_equal(got.rows["E"][1], d.arrays["E"][[2, 5]] - E[[2, 5]])
    np.testing.assert_array_equal(s.arrays["E"][[2, 5]], d.arrays["E"][[2, 5]])
    empty = s.step_sparse("E", np.empty(0, np.int64), np.empty((0, 3), np.float32))
    d.step({"E": np.zeros((8, 3), np.float32)})
    assert empty.step == 2 and empty.rows["E"][0].size == 0
    _close(s.read_parameters()["E"], d.read_parameters()["E"], 1e-6, "after an empty sparse step")
    state = s.read_state()  # dense-equivalent, so a session recreated from it continues as the dense one
    again = client.create_session("momentum", state.parameters, state=state.state, initial_step=state.info.step)
    again.step({"E": g})
    d.step({"E": g})
    _close(again.read_parameters()["E"], d.read_parameters()["E"], 1e-6, "recreated from ReadState")


@pytest.mark.parametrize("opt", ["momentum", "nesterov", "adam"])
def test_delta_reply_keeps_the_callers_rows_when_they_owe_steps(client, opt):
    """Rows that owe steps move when caught up (momentum's velocity, Adam's drift). The caller's copy of a
    lazy row is the value it was last answered with, so a delta answer must be new - that stored value:
    after every sparse step and every dense step of the table, the rows the caller was answered with equal
    those of a session answering with whole parameters. set_hyperparameters catches every row up on the
    server, unanswered: the client then reads them, so later deltas still land right. (A change carried by
    a sparse step does the same; docs/workers.md says to read the parameters then.)"""
    rng = np.random.default_rng(7)
    E = rng.standard_normal((30, 4))
    delta = client.create_session(opt, {"E": E.copy()}, step_reply="delta")
    whole = client.create_session(opt, {"E": E.copy()})
    for t in range(40):
        if t % 13 == 12:  # a dense step of the lazy table: answered whole (delta from the stored rows)
            g = rng.standard_normal((30, 4))
            delta.step({"E": g})
            whole.step({"E": g})
            np.testing.assert_allclose(delta.arrays["E"], whole.arrays["E"], rtol=0, atol=1e-12, err_msg=f"dense {t}")
            continue
        if t % 11 == 10:
            for s in (delta, whole):
                s.set_hyperparameters(lr=0.002 * t)
        rows = rng.integers(0, 30, 3)
        vals = rng.standard_normal((3, 4))
        a = delta.step_sparse("E", rows, vals)
        b = whole.step_sparse("E", rows, vals)
        np.testing.assert_array_equal(a.rows["E"][0], b.rows["E"][0])
        np.testing.assert_allclose(delta.arrays["E"][rows], whole.arrays["E"][rows], rtol=0, atol=1e-12,
                                   err_msg=f"step {t + 1}: the caller's rows after a delta answer")
    np.testing.assert_array_equal(delta.read_parameters()["E"], whole.read_parameters()["E"])


def test_staleness_scaled_lr_leaves_no_row_owing_a_step_of_another_lr(tmp_path):
    """async with scale_lr_by_staleness: a stale contribution runs at lr / (1 + staleness), the session keeps
    its lr. Adam's rows the contribution does not name move too (their drift uses that step's lr), so they
    must not be caught up later with the session's lr: sparse contributions equal the same contributions
    sent densely, bit for bit, also after a kill -9 (the log replays the scaled steps)."""
    data = str(tmp_path / "data")
    srv = ServerProcess("--data-dir", data, env={"OPTREG_DATA_DIR": data})
    E = np.random.default_rng(2).standard_normal((12, 3))
    try:
        with Client(srv.address, timeout=60) as c:
            for kind in ("sparse", "dense"):
                c.create_session("adam", {"E": E.copy()}, session_id=kind, workers=2, mode="async",
                                 scale_lr_by_staleness=True, lr=0.01, durability="log")
                workers = (c.join(kind, "a"), c.join(kind, "b"))
                rng, stale = np.random.default_rng(4), []
                for t in range(30):  # alternating workers: each contribution is one step stale
                    rows, vals = rng.integers(0, 12, 2), rng.standard_normal((2, 3))
                    w = workers[t % 2]
                    stale.append((w.step_sparse("E", rows, vals) if kind == "sparse"
                                  else w.step({"E": _scatter((12, 3), rows, vals, np.float64)})).staleness)
                assert sum(stale) >= 25
            before = c.session("sparse").read_state()
            np.testing.assert_array_equal(before.parameters["E"], c.session("dense").read_parameters()["E"])
            assert before.info.hyperparameters["lr"] == 0.01
    finally:
        srv.kill()
    srv = ServerProcess("--data-dir", data, env={"OPTREG_DATA_DIR": data})
    try:
        with Client(srv.address, timeout=60) as c:
            after = c.session("sparse").read_state()
            for name in ("m", "v"):
                np.testing.assert_array_equal(after.state[name]["E"], before.state[name]["E"])
            np.testing.assert_array_equal(after.parameters["E"], before.parameters["E"])
    finally:
        srv.stop()


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_sparse_contribution_whose_answer_cannot_be_sent_is_not_applied(start_server, mode):
    """A unary sparse contribution answers with the parameters stepped densely too: over the server's
    message limit it is refused before anything is applied (as a single-writer sparse step is), not applied
    and then unanswerable (RESOURCE_EXHAUSTED while sending)."""
    srv = start_server("--memory-only", "--max-message-mb", "2")
    stub = session_pb2_grpc.SessionServiceStub(grpc.insecure_channel(srv.address))
    with Client(srv.address, timeout=60) as c:
        c.create_session("sgd", {"E": np.zeros((10, 4)), "b": np.zeros(400_000)}, session_id="big", workers=2,
                         mode=mode)
        stub.JoinSession(session_pb2.JoinSessionRequest(session_id="big", worker="a"))
        with pytest.raises(grpc.RpcError) as e:
            stub.Step(session_pb2.StepRequest(session_id="big", worker="a", round=0,
                                              sparse=[_rows_msg("E", [1], np.ones((1, 4)))]))
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION, e.value.details()
        assert "message limit" in e.value.details() and "nothing was applied" in e.value.details()
        assert c.get_session("big").step == 0
        small = c.create_session("sgd", {"E": np.zeros((10, 4)), "b": np.zeros(3)}, workers=1, mode=mode)
        stub.JoinSession(session_pb2.JoinSessionRequest(session_id=small.id, worker="a"))
        r = stub.Step(session_pb2.StepRequest(session_id=small.id, worker="a", round=0,
                                              sparse=[_rows_msg("E", [1], np.ones((1, 4)))]))
        assert r.step == 1 and r.sparse[0].name == "E"
