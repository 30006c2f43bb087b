"""Sparse rows: a step that names some rows of 2-D parameters (docs/workers.md, "Sparse rows").

A sparse step's gradient is zero everywhere it does not name. Rows it names are brought up
to date (their missed zero-gradient steps, kernels/rows.py catch_up) and stepped by the
optimizer's ordinary kernel; rows it does not name are left lazy. Each lazy 2-D parameter
has a clock (Session.clocks: name -> int64 per row, the step the row is current through);
a row with clock < the session's step is owed steps. Every reader sees dense-equivalent
values: reads get caught-up copies (`read_view`), a dense step catches a parameter up
before stepping it, a change of hyperparameters catches everything up first (missed steps
ran with the old ones). Catch-ups that change the session happen only inside a logged
step or before a snapshot, so replaying the log gives the same bits.

A sparse step never copies the whole session: it works on gathered rows, logs the step,
then scatters them into the live set, in place when nobody reads it outside the lock,
else into a fresh copy that replaces it (so readers never see a step half-applied).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from optreg.server.kernels import apply as kernels

from optreg.server.kernels import rows as sparsekernels
from optreg.server.model.errors import FailedPrecondition, InvalidArgument, shown
from optreg.server.model.session import Arrays, Buffers, Session, StepResult
from optreg.server.kernels.finite import check_finite
from optreg.server.kernels.widen import widen
from optreg.v1 import tensor_pb2, tensors

ROWS, VALUES = "\x00rows/", "\x00values/"  # log keys of a sparse step's tensors (no parameter name starts so)


@dataclass
class SparseStepResult(StepResult):
    sparse: dict = field(default_factory=dict)  # name -> (rows, values): the rows the step answered with


def supported(s: Session) -> bool:
    return bool(getattr(s.optimizer.definition, "sparse_rows", False))


def require(s: Session, where: str = "sparse") -> None:
    if not supported(s):
        d = s.optimizer.definition
        raise FailedPrecondition(
            f"{where}: optimizer {d.name} does not declare sparse rows, so session {s.id} cannot step some rows "
            "of a parameter: send dense gradients (zeros where there is none), or create the session with an "
            "optimizer that declares sparse_rows (ListOptimizers: sgd, momentum, nesterov, adagrad, rmsprop, adam)")
    if s.schedule is not None:  # a lazy row's catch-up runs the steps it missed with one lr, not each step's
        raise FailedPrecondition(
            f"{where}: session {s.id} follows schedule {s.schedule.name}, whose lr changes every step, and rows "
            "left lazy would catch up under one lr: send dense gradients (zeros where there is none)")


def lazy_names(s: Session) -> list[str]:
    """The parameters a sparse step leaves lazy when it does not name them: the 2-D ones."""
    return [n for n, shape in s.shapes.items() if len(shape) == 2]


# -- validate ---------------------------------------------------------------------------------------
def parse(s: Session, msg, where: str) -> tuple[str, np.ndarray, np.ndarray]:
    """One SparseRows message -> (name, rows sorted and unique, values (k, columns) in the master dtype);
    a row named twice has its values summed (in the order given, so the sum is reproducible)."""
    require(s, where)
    name = msg.name
    if name not in s.shapes:
        known = ", ".join(shown(n, 40) for n in list(s.shapes)[:20])
        raise InvalidArgument(f"{where}.name {shown(name)} is not a parameter of session {s.id}; its parameters are: "
                              f"{known}")
    shape = s.shapes[name]
    if len(shape) != 2:
        raise InvalidArgument(f"{where} {shown(name)}: sparse rows need a 2-D parameter, and this one is "
                              f"{list(shape)}: send its gradient in gradients (dense)")
    if len(msg.rows) % 8:
        raise InvalidArgument(f"{where}.rows of {shown(name)}: {len(msg.rows)} bytes is not a whole number of "
                              "little-endian int64 row indices (8 bytes each)")
    rows = np.frombuffer(msg.rows, dtype="<i8")
    k, cols = rows.size, shape[1]
    v = msg.values
    if not msg.HasField("values"):
        raise InvalidArgument(f"{where}.values of {shown(name)} is missing: send a tensor of shape [{k}, {cols}]")
    if v.dtype not in s.spec[name][1]:
        raise InvalidArgument(f"{where}.values of {shown(name)}: dtype {tensors.dtype_name(v.dtype)} is not "
                              "accepted here; send " + " or ".join(tensors.dtype_name(a) for a in s.spec[name][1]))
    if tuple(v.shape) != (k, cols):
        raise InvalidArgument(f"{where}.values of {shown(name)}: shape {list(v.shape)}, but {k} row(s) of "
                              f"{cols} columns need [{k}, {cols}]")
    if v.offset:
        raise InvalidArgument(f"{where}.values of {shown(name)}: offset {v.offset}; sparse values come whole "
                              "(offset 0)")
    dt = tensors.numpy_dtype(v.dtype)
    if len(v.data) != k * cols * dt.itemsize:
        raise InvalidArgument(f"{where}.values of {shown(name)}: {len(v.data)} bytes, but [{k}, {cols}] of "
                              f"{tensors.dtype_name(v.dtype)} needs {k * cols * dt.itemsize}")
    if k and (rows.min() < 0 or rows.max() >= shape[0]):
        bad = rows[(rows < 0) | (rows >= shape[0])]
        raise InvalidArgument(f"{where}.rows of {shown(name)}: {bad.size} row index(es) outside [0, {shape[0]}) "
                              f"(first: {int(bad[0])}); the parameter has {shape[0]} rows")
    values = widen(np.frombuffer(v.data, dtype=dt), s.dtype).reshape(k, cols)
    check_finite(f"{name} (sparse values)", values)
    rows, values = merge_duplicates(rows, values)
    return name, rows, values


def merge_duplicates(rows: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique rows, a repeated row's values summed in the order given (0 + a + b ...: the bits of
    adding them into a dense zero gradient one by one)."""
    if rows.size < 2 or np.all(rows[1:] > rows[:-1]):
        return rows.astype(np.int64), np.ascontiguousarray(values)
    unique, inverse = np.unique(rows, return_inverse=True)
    if unique.size == rows.size:
        order = np.argsort(rows)
        return rows[order].astype(np.int64), values[order]
    out = np.zeros((unique.size, values.shape[1]), values.dtype)
    np.add.at(out, inverse, values)
    return unique.astype(np.int64), out


# -- catch-up ---------------------------------------------------------------------------------------
def stale_rows(s: Session, name: str, now: int) -> np.ndarray:
    c = s.clocks.get(name)
    return np.empty(0, np.int64) if c is None else np.flatnonzero(c < now)


def settle_tensor(s: Session, arrays: Arrays, name: str, now: int, hp: dict, clocks: dict | None = None) -> None:
    """Catch every stale row of `name` in `arrays` up to step `now`, in place (clocks: name -> row clocks,
    the session's when None)."""
    c = (s.clocks if clocks is None else clocks).get(name)
    if c is None:
        return
    idx = np.flatnonzero(c < now)
    if idx.size == 0:
        return
    p = arrays.params[name]
    pr = p[idx]
    st = {slot: arrays.state[slot][name][idx] for slot in arrays.state}
    sparsekernels.catch_up(s.optimizer.definition, pr, st, c[idx], now, hp)
    p[idx] = pr
    for slot, a in st.items():
        arrays.state[slot][name][idx] = a


def read_view(store, s: Session) -> Arrays:
    """Caller holds the lock. The set a reader may read outside it: the live one, or when rows are owed
    steps a copy of what the dense steps would hold (the copied parameters caught up; the others shared).
    Marked read (both: a sparse step then never writes the shared arrays in place)."""
    live = s.live
    view = caught_up(s)  # may raise (a plugin's catch_up): no reader counted yet
    live.readers += 1
    if view is live:
        return live
    view.base = live
    view.readers += 1
    return view


def caught_up(s: Session) -> Arrays:
    """Caller holds the lock. The live set when no row owes steps, else a set sharing its arrays but for
    copies of the parameters (and their slots) that owe steps, caught up."""
    live = s.live
    names = [n for n in s.clocks if stale_rows(s, n, s.step).size]
    if not names:
        return live
    view = Arrays(dict(live.params), {slot: dict(a) for slot, a in live.state.items()})
    for n in names:
        view.params[n] = live.params[n].copy()
        for slot in view.state:
            view.state[slot][n] = live.state[slot][n].copy()
        settle_tensor(s, view, n, s.step, s.hyperparameters)
    return view


def done_reading(arrays: Arrays) -> None:
    """Caller holds the lock (store.done_reading)."""
    base = getattr(arrays, "base", None)
    if base is not None:
        base.readers -= 1


def owes(s: Session) -> bool:
    return any(stale_rows(s, n, s.step).size for n in s.clocks)


def copy_set(store, s: Session, what: str) -> Arrays:
    """Caller holds the lock: a copy of the live set (the spare's memory when there is one)."""
    new = s.spare if s.spare is not None else store.allocate_set(s, what)
    s.spare = None
    for n, p in s.live.params.items():
        np.copyto(new.params[n], p)
        for slot in new.state:
            np.copyto(new.state[slot][n], s.live.state[slot][n])
    return new


def settled_copy(store, s: Session) -> Arrays:
    """Caller holds the lock. A copy of the live set with every row current (a change of hyperparameters
    is next: the owed steps ran with the old ones); the caller swaps it in once what follows is logged."""
    new = copy_set(store, s, "a catch-up copy")
    for n in list(s.clocks):
        settle_tensor(s, new, n, s.step, s.hyperparameters)
    return new


def swap(s: Session, new: Arrays) -> None:
    """Caller holds the lock: `new` (every row current) replaces the live set; readers keep the old."""
    old, s.live = s.live, new
    s.clocks.clear()
    s.keep_spare(old)


# -- a sparse step --------------------------------------------------------------------------------
@dataclass
class Plan:
    """A sparse step computed apart from the live set: what the commit writes into it."""
    t: int
    dense: dict = field(default_factory=dict)  # name -> (params, {slot: array}) whole new tensors
    rows: dict = field(default_factory=dict)  # name -> (rows, params rows, {slot: rows})
    old_rows: dict = field(default_factory=dict)  # name -> the rows' params before the step (caught up)
    old_dense: dict = field(default_factory=dict)  # name -> params before (for a delta reply)
    lazy: list = field(default_factory=list)  # 2-D parameters left lazy (not named)
    stats: dict = field(default_factory=dict)


def compute(s: Session, base: Arrays, clocks: dict, t: int, hp: dict, dense: dict, sparse: dict,
            origin: dict | None = None) -> Plan:
    """Step `t` with hyperparameters `hp`: `dense` name -> whole gradient, `sparse` name -> (rows, values);
    every other 2-D parameter is left lazy, every other parameter gets a zero gradient. Nothing of `base`
    (the live set) is written. Caller holds the lock. The owed steps use the session's hyperparameters
    (they ran with them; a change catches up first). `clocks`: base's row clocks. `origin`: name -> the
    parameters a delta answer is taken from (default base's). A delta is new - the stored value before any
    catch-up, as the dense path's: the caller's copy of a lazy row is the value it was last answered with,
    so adding new - caught-up would leave out the motion the row owed."""
    defn, old_hp = s.optimizer.definition, s.hyperparameters
    origin = base.params if origin is None else origin
    plan = Plan(t)
    lazy = set(lazy_names(s))
    for name, shape in s.shapes.items():
        if name in sparse:
            rows, g = sparse[name]
            pr = sparsekernels.gather(base.params[name], rows)
            st = {slot: sparsekernels.gather(base.state[slot][name], rows) for slot in base.state}
            old = sparsekernels.gather(origin[name], rows) if s.reply == "delta" else None
            c = clocks.get(name)
            if c is not None:
                sparsekernels.catch_up(defn, pr, st, c[rows], t - 1, old_hp)
            acc = np.zeros(kernels.STATS)
            kernels.apply(defn, pr, g, st, t, hp, parallel=False, stats=acc if pr.size else None)
            plan.rows[name], plan.old_rows[name], plan.stats[name] = (rows, pr, st), old, acc
        elif name in lazy and name not in dense:
            plan.lazy.append(name)
        else:
            g = dense.get(name)
            if g is None:
                g = np.zeros(shape, s.dtype)
            p = base.params[name].copy()
            st = {slot: base.state[slot][name].copy() for slot in base.state}
            tmp = Arrays({name: p}, {slot: {name: a} for slot, a in st.items()})
            plan.old_dense[name] = origin[name].copy() if s.reply == "delta" else None
            settle_tensor(s, tmp, name, t - 1, old_hp, clocks)
            acc = np.zeros(kernels.STATS)
            kernels.apply(defn, p, g, st, t, hp, stats=acc)
            plan.dense[name], plan.stats[name] = (p, st), acc
    return plan


def commit(s: Session, plan: Plan, copy: Arrays | None = None) -> None:
    """Caller holds the lock; the step's record is committed. Write the plan into the live set in place, or,
    when readers hold it outside the lock, into `copy` (made before the commit) that replaces it (the old
    set stays with its readers); advance the clocks."""
    if copy is not None:
        s.live = copy
    write(s, s.live, plan)


def write(s: Session, target: Arrays, plan: Plan) -> None:
    for name, (p, st) in plan.dense.items():
        np.copyto(target.params[name], p)
        for slot, a in st.items():
            np.copyto(target.state[slot][name], a)
        s.clocks.pop(name, None)
    for name, (rows, pr, st) in plan.rows.items():
        sparsekernels.scatter(target.params[name], rows, pr)
        for slot, a in st.items():
            sparsekernels.scatter(target.state[slot][name], rows, a)
        clock(s, name, plan.t)[rows] = plan.t
    for name in plan.lazy:
        clock(s, name, plan.t)


def clock(s: Session, name: str, t: int) -> np.ndarray:
    """The parameter's row clocks; made (every row current through t - 1) when it had none."""
    c = s.clocks.get(name)
    if c is None:
        c = s.clocks[name] = np.full(s.shapes[name][0], t - 1, np.int64)
    return c


def reply_bytes(s: Session, dense_names, sparse: dict) -> int:
    """The size of a sparse step's answer: the rows it names, and every parameter stepped densely."""
    if s.reply == "none":
        return 0
    lazy = set(lazy_names(s))
    whole = sum(int(np.prod(shape)) for n, shape in s.shapes.items()
                if n not in sparse and (n not in lazy or n in dense_names))
    return (whole + sum(v.size for _, v in sparse.values())) * s.dtype.itemsize


def contribution_reply_bytes(s: Session, dense_names, msgs) -> int:
    """Before a unary sparse contribution is applied: about the most its answer holds, checked against the
    message limit so that nothing is applied whose answer cannot be sent. Its own rows (a sync round's
    answer carries the union of the members' rows: bounded by members x its own, capped at the parameter's
    rows) and every parameter stepped densely. Unknown names are refused later."""
    if s.reply == "none":
        return 0
    lazy = set(lazy_names(s))
    named = {m.name: len(m.rows) // 8 for m in msgs if m.name in lazy}
    whole = sum(int(np.prod(shape)) for n, shape in s.shapes.items()
                if n not in named and (n not in lazy or n in dense_names))
    per = s.workers.workers if s.workers.mode == "sync" else 1
    rows = sum(min(k * per, s.shapes[n][0]) * s.shapes[n][1] for n, k in named.items())
    return (whole + rows) * s.dtype.itemsize


def answer(s: Session, plan: Plan, replayed: bool = False) -> SparseStepResult:
    """The reply: the named rows (new values, or new - old), and the parameters stepped densely."""
    if s.reply == "none":
        rows, dense = {}, {}
    elif s.reply == "delta":
        rows = {n: (r, pr - plan.old_rows[n]) for n, (r, pr, _) in plan.rows.items()}
        dense = {n: p - plan.old_dense[n] for n, (p, _) in plan.dense.items()}
    else:
        rows = {n: (r, pr) for n, (r, pr, _) in plan.rows.items()}
        dense = {n: p for n, (p, _) in plan.dense.items()}
    return SparseStepResult(plan.t, replayed, dense, rows)


# -- the log --------------------------------------------------------------------------------------
def log_sparse(record, name: str, rows: np.ndarray, values: np.ndarray) -> None:
    record.add_array(ROWS + name, rows)
    record.add_array(VALUES + name, values)


def from_record(record_tensors: dict) -> tuple[dict, dict]:
    """(dense name -> gradient, sparse name -> (rows, values)) of a logged sparse step."""
    dense, sparse = {}, {}
    for key, a in record_tensors.items():
        if key.startswith(ROWS):
            name = key[len(ROWS):]
            sparse[name] = (a, record_tensors[VALUES + name])
        elif not key.startswith(VALUES):
            dense[key] = a
    return dense, sparse


def replay_plan(s: Session, record, hp: dict) -> Plan:
    """Recovery: a logged sparse step computed again, as the live server did (commit.py writes it in)."""
    dense_raw, sparse = from_record(record.tensors)
    dense = {n: widen(g.reshape(-1), s.dtype).reshape(s.shapes[n]) for n, g in dense_raw.items()}
    origin = None
    if hp != s.hyperparameters:  # the live step caught every row up first, in a copy it swapped in
        if s.reply == "delta" and s.clocks:  # the delta is taken from the values before this catch-up (compute)
            origin = {n: p.copy() for n, p in s.live.params.items()}
        settle_in_place(s)
    return compute(s, s.live, s.clocks, record.step, hp, dense, sparse, origin)


def settle_own_hyperparameters(s: Session, t: int, hp: dict) -> None:
    """Caller holds the lock; step `t` is written into the live set, which nobody reads outside the lock.
    The step ran with hyperparameters the session does not keep (a staleness-scaled lr, docs/workers.md):
    the rows it left lazy owe it with those, but a later catch-up would use the session's. So catch them
    up through `t` now, in place (every row was current through t - 1: a step whose hyperparameters differ
    from the session's settles first), and drop the clocks."""
    for n in list(s.clocks):
        settle_tensor(s, s.live, n, t, hp)
    s.clocks.clear()


def settle_in_place(s: Session) -> None:
    """Recovery only (nobody else sees the set): every row current, in place."""
    for n in list(s.clocks):
        settle_tensor(s, s.live, n, s.step, s.hyperparameters)
    s.clocks.clear()


def to_messages(result: SparseStepResult) -> list:
    out = []
    rows_of = getattr(result, "sparse", None)
    if rows_of is None:  # a shared session's Outcome
        rows_of = getattr(result, "rows", None) or {}
    for name, (rows, values) in rows_of.items():
        out.append(tensor_pb2.SparseRows(name=name, rows=np.ascontiguousarray(rows, "<i8").tobytes(),
                                         values=tensors.from_numpy(name, values)))
    return out


# -- shared sessions (rounds.py): sparse contributions -------------------------------------------
def parse_all(s: Session, msgs) -> dict:
    """name -> (rows, values) of a contribution's SparseRows messages; each parameter once."""
    out = {}
    for i, m in enumerate(msgs):
        name, rows, values = parse(s, m, f"sparse[{i}]")
        if name in out:
            raise InvalidArgument(f"sparse[{i}] {shown(name)}: this parameter is already in the contribution; "
                                  "name each parameter once (rows named twice in one SparseRows are summed)")
        out[name] = (rows, values)
    return out


def dense_buffer(store, s: Session, grads: dict, sparse: dict, name: str) -> None:
    """A sparse contribution's dense gradient of `name`: its buffer, made on its first chunk."""
    if name in sparse:
        raise InvalidArgument(f"gradient {shown(name)} is given both as sparse rows and dense: send one")
    if name not in grads:
        grads[name] = store.budget.allocate(f"a worker's gradient of session {s.id}",
                                            int(np.prod(s.shapes[name])) * s.dtype.itemsize,
                                            lambda: np.empty(s.shapes[name], s.dtype))


def check_whole(tracker) -> None:
    """The parameters a sparse step or contribution sent densely arrived whole (ValueError if not)."""
    for name in tracker.kinds:
        if tracker.filled[name] != tracker.sizes[name]:
            raise ValueError(f"gradient {shown(name)}: {tracker.filled[name]} of {tracker.sizes[name]} elements "
                             "arrived; the stream ended early")


def combine(contribs: dict, names: list, how: str, dtype):
    """A sync round's gradient from contributions some of which name rows: summed in worker-name order,
    the same bits as summing their dense equivalents (x + 0 = x), then divided by their count for the
    mean. A parameter sent densely by anyone is dense; one only ever named by rows stays rows (their
    union, duplicates summed); one named by nobody is left out (zero)."""
    dense, rows = Buffers(), {}
    params = []
    for w in names:
        for n in list(contribs[w]) + list(getattr(contribs[w], "sparse", None) or {}):
            if n not in params:
                params.append(n)
    for n in params:
        parts = [(contribs[w].get(n), (getattr(contribs[w], "sparse", None) or {}).get(n)) for w in names]
        if any(d is not None for d, _ in parts):
            acc = None
            for d, sp in parts:
                if d is not None:
                    acc = d.copy() if acc is None else acc.__iadd__(d)
                elif sp is not None:
                    if acc is None:
                        acc = np.zeros(next(x for x, _ in parts if x is not None).shape, dtype)
                    acc[sp[0]] += sp[1]
                elif acc is None:
                    acc = np.zeros(next(x for x, _ in parts if x is not None).shape, dtype)
            dense[n] = acc
        else:
            union = np.unique(np.concatenate([sp[0] for _, sp in parts if sp is not None]))
            vals = None
            for _, sp in parts:
                if sp is None:
                    continue
                idx = np.searchsorted(union, sp[0])
                if vals is None:
                    vals = np.zeros((union.size, sp[1].shape[1]), dtype)
                vals[idx] += sp[1]
            rows[n] = (union, vals)
    if how == "mean" and len(names) > 1:
        k = dtype.type(len(names))
        for a in dense.values():
            a /= k
        for _, v in rows.values():
            v /= k
    dense.sparse = rows
    return dense


def squared_norm(g) -> float:
    """Sum of squares (float64) of a gradient set: its dense arrays and its rows (zeros elsewhere)."""
    total = 0.0
    for a in list(g.values()) + [v for _, v in (getattr(g, "sparse", None) or {}).values()]:
        f = a.reshape(-1).astype(np.float64)
        total += float(np.dot(f, f))
    return total


def scaled(g, k: float):
    """A gradient set times k (a round's mean from its sum, for statistics)."""
    res = Buffers({n: a * k for n, a in g.items()})
    res.sparse = {n: (r, v * k) for n, (r, v) in (getattr(g, "sparse", None) or {}).items()}
    return res
