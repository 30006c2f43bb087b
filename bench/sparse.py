"""Sparse rows (docs/workers.md, "Sparse rows"), same run:

    python -m bench --only sparse

A sparse step touching 1% of a 1e6 x 64 float32 table against the dense step of the whole table
(target: at most 5% of it), for Momentum (closed-form catch-up) and Adam (replayed catch-up):

- compute, in process: what the server does under the session's lock for the step (gather the rows,
  catch them up, the kernel, scatter them back) against kernels.apply over the whole table (numba,
  both cores). Two states of the table: "fresh" (the issue's case: the first steps of a new table,
  rows whose moments are zero) and "steady" (every row has moments and owes ~100 steps, as after a
  long run at 1% a step: the catch-up's cost is the steps owed, times ~1 for Momentum's closed form,
  times each owed step for Adam, whose drift has no closed form).
- through the server: one Step with the rows (unary) against one StepStream of the dense gradient,
  in sessions that reply with nothing (the dense reply alone would be another 256 MB).
"""
from __future__ import annotations

import statistics

import numpy as np

from bench.run import timed

N, COLS, FRACTION, OWED = 1_000_000, 64, 0.01, 100


def _session(defn, table, reg):
    from optreg.server.model.session import Arrays, Durability, Session
    from optreg.v1 import tensor_pb2
    s = Session("bench", reg, defn.resolve({}), tensor_pb2.DATA_TYPE_FLOAT32, "none", Durability(),
                {"E": table.shape}, tuple(x.name for x in defn.slots))
    return s


def _median(fn, reps):
    fn()  # a warm-up call, not counted
    return statistics.median(timed(fn, reps))


def _compute_rows(name, cfg):
    from bench.run import row
    from optreg.plugins.registry import Registry
    from optreg.server.kernels import jit
    from optreg.server.kernels import warmup
    from optreg.server.kernels import apply as kernels
    from optreg.server.steps import sparse_rows as sparse
    from optreg.server.kernels import rows as sparsekernels
    from optreg.server.model.session import Arrays

    reg = Registry().get(name)
    defn = reg.definition
    warmup.warm(block=True, stats=True)
    sparsekernels.warm(block=True)
    rng = np.random.default_rng(3)
    table = rng.standard_normal((N, COLS), dtype=np.float32)
    state = {x.name: np.zeros_like(table) for x in defn.slots}
    s = _session(defn, table, reg)
    s.live = Arrays({"E": table}, {k: {"E": a} for k, a in state.items()})
    hp = s.hyperparameters
    k = int(N * FRACTION)
    g_dense = (rng.standard_normal((N, COLS), dtype=np.float32) * 1e-2)
    t = 5000  # past every owed step (at most 10 * OWED)
    s.step = t - 1
    reps = 3 if cfg.quick else 7
    dense = _median(lambda: kernels.apply(defn, table, g_dense, state, t, hp), reps)
    del g_dense
    vals = rng.standard_normal((k, COLS), dtype=np.float32) * 1e-2
    sparse_reps = 9 if cfg.quick else 21  # ~10 ms each; the median of more of them steadies the figure
    picks = iter(np.sort(rng.choice(N, k, replace=False)) for _ in range(2 * (sparse_reps + 1)))

    def sparse_step():  # other rows each repetition, as a training step's batch would touch
        rows = next(picks)
        plan = sparse.compute(s, s.live, s.clocks, t, hp, {}, {"E": (rows, vals)})
        sparse.write(s, s.live, plan)

    for label in ("fresh", "steady"):
        if label == "fresh":
            for a in state.values():
                a[...] = 0
            owed = np.zeros(N, np.int64) + 2
        else:  # every row with moments, owing ~OWED steps (geometric: touched at 1% a step)
            for a in state.values():
                a[...] = np.abs(rng.standard_normal((N, COLS), dtype=np.float32)) * 1e-3
            owed = np.minimum(rng.geometric(FRACTION, N), 10 * OWED).astype(np.int64)
        s.clocks = {"E": (t - 1 - owed).astype(np.int64)}
        cost = _median(sparse_step, sparse_reps)
        row(f"sparse 1% of 1e6x64, {name}, {label} rows", cost, "s", f"dense {name} step, 1e6x64 (compute)", dense,
            target=0.05, note="in process: gather, catch-up, kernel, scatter vs the whole table's kernel")


def _server_rows(cfg, server):
    from bench.run import row
    from optreg.client import Client
    from optreg.v1 import session_pb2, tensor_pb2, tensors

    rng = np.random.default_rng(5)
    table = rng.standard_normal((N, COLS), dtype=np.float32)
    k = int(N * FRACTION)
    with Client(server.address, timeout=600) as c:
        s = c.create_session("momentum", {"E": table}, step_reply="none")
        g = {"E": rng.standard_normal((N, COLS), dtype=np.float32) * 1e-2}
        reps = 3 if cfg.quick else 5
        dense = _median(lambda: s.step(g), reps)
        del g
        stub = c.transport
        rows = np.sort(rng.choice(N, k, replace=False))
        msg = tensor_pb2.SparseRows(name="E", rows=rows.astype("<i8").tobytes(),
                                    values=tensors.from_numpy("E", rng.standard_normal((k, COLS), dtype=np.float32)))

        def one():
            req = session_pb2.StepRequest(session_id=s.id, sparse=[msg])  # unfenced: every repetition a step
            stub.unary("Step", req, timeout=600)

        sparse_cost = _median(one, 5 if cfg.quick else 20)
        s.delete()
    row("sparse 1% of 1e6x64 Step, momentum", sparse_cost, "s", "dense StepStream 1e6x64, momentum", dense,
        target=0.05, note="through the server, reply none; rows and values 2.6 MB")


def bench_sparse(cfg, server, _echo):
    for name in ("momentum", "adam"):
        _compute_rows(name, cfg)
    _server_rows(cfg, server)
