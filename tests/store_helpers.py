"""In-process helpers: a SessionStore as the server builds it, over a real Journal and the real plugin
registry, and steps driven through StepRun as the servicer drives them (no server, no socket)."""
from __future__ import annotations

import numpy as np

from optreg.plugins.registry import Registry
from optreg.server.sessions.factory import SessionConfig
from optreg.server.sessions.store import SessionStore
from optreg.server.steps.run import StepRun
from optreg.server.storage.journal import Journal
from optreg.v1 import tensor_pb2, tensors

REGISTRY = Registry()
SHAPES = {"W": (6, 3), "b": (5,)}


def open_store(root) -> SessionStore:
    """As the server builds it (assembly.py): the journal on the data directory, its sessions registered."""
    store = SessionStore(REGISTRY, Journal(root))
    store.open_all()
    return store


def params(dtype, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal(shape).astype(dtype) for n, shape in SHAPES.items()}


def grads(dtype, k) -> dict:
    rng = np.random.default_rng(100 + k)
    return {n: rng.standard_normal(shape).astype(dtype) for n, shape in SHAPES.items()}


def sparse_rows(name, rows, values) -> tensor_pb2.SparseRows:
    return tensor_pb2.SparseRows(name=name, rows=np.asarray(rows, "<i8").tobytes(),
                                 values=tensors.from_numpy(name, values))


def step(store, s, g, fence=None, hp=None, chunk_bytes=None, sparse=()):
    """One step through StepRun as the servicer drives it; returns (step, replayed, copies of the answer)."""
    run = StepRun(store, s, fence, hp, sparse=bool(sparse))
    try:
        result = run.open()
        if result is None:
            for msg in sparse:
                run.feed_sparse(msg)
            for name, a in g.items():
                for t in (tensors.chunk(name, a, chunk_bytes) if chunk_bytes else [tensors.from_numpy(name, a)]):
                    run.feed(t)
            result = run.finish()
        answer = {n: np.array(a) for n, a in result.tensors.items()}
        rows = {n: (np.array(r), np.array(v)) for n, (r, v) in getattr(result, "sparse", {}).items()}
        return result.step, result.replayed, answer, rows
    finally:
        run.close()


def state_of(store, s) -> dict:
    """Everything a step changes, copied under the session's lock."""
    with s.lock:
        store.ensure_loaded(s)
        return {"step": s.step, "hp": dict(s.hyperparameters),
                "params": {n: p.copy() for n, p in s.live.params.items()},
                "state": {slot: {n: a.copy() for n, a in arrs.items()} for slot, arrs in s.live.state.items()},
                "clocks": {n: c.copy() for n, c in s.clocks.items()},
                "delta": None if s.last_delta is None else {n: d.copy() for n, d in s.last_delta.items()},
                "worker_rounds": dict(s.worker_rounds), "round_record": s.round_record}


def assert_bits(a, b, where):
    """Equal bit for bit (NaN == NaN, -0.0 != 0.0), recursively through dicts, tuples and lists."""
    if a is None or b is None:
        assert a is None and b is None, f"{where}: {a!r:.60} vs {b!r:.60}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_bits(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bits(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        assert a.tobytes() == b.tobytes(), where
    else:
        assert a == b, where


def create(store, sid, optimizer="adam", dtype=np.float32, reply="parameters", **kw):
    return store.create(SessionConfig(optimizer=optimizer, session_id=sid, reply=reply, **kw), params(dtype))
