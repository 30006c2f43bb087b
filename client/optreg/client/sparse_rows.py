"""Sparse rows on the client (Session.step_sparse, Worker.step_sparse): some rows of a 2-D parameter
as one SparseRows message, and a sparse step's reply written back into the caller's arrays (only the
rows the step named). docs/workers.md, "Sparse rows", says what the server does with them."""
from __future__ import annotations

from typing import Mapping, NamedTuple

import numpy as np

from optreg.client.errors import UsageError
from optreg.v1 import tensor_pb2, tensors


class SparseStepResult(NamedTuple):
    """A sparse step's answer. `rows`: name -> (row indices sorted and unique, their new values, or new -
    old for a delta session); `arrays`: the session's arrays, those rows already written in."""
    step: int
    replayed: bool
    rows: Mapping[str, tuple[np.ndarray, np.ndarray]]
    arrays: Mapping[str, np.ndarray]


def message(name: str, rows, values) -> tensor_pb2.SparseRows:
    """SparseRows for `rows` (k integer indices) and `values` (k x columns). Repeated rows are summed by
    the server."""
    if not isinstance(name, str) or not name:
        raise UsageError(f"name={name!r}: give the parameter's name")
    r = np.asarray(rows)
    if r.ndim != 1 or (r.size and r.dtype.kind not in "iu"):
        raise UsageError(f"rows: give a 1-D array of integer row indices, not {r.dtype} of shape {r.shape}")
    v = np.asarray(values)
    if v.ndim != 2 or v.shape[0] != r.size:
        raise UsageError(f"values: give a 2-D array with one row per index ({r.size} x columns), not shape "
                         f"{v.shape}")
    return tensor_pb2.SparseRows(name=name, rows=np.ascontiguousarray(r, "<i8").tobytes(),
                                 values=tensors.from_numpy(name, np.ascontiguousarray(v)))


def decode(reply_sparse) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {m.name: (np.frombuffer(m.rows, "<i8").copy(), tensors.to_numpy(m.values)) for m in reply_sparse}


def apply_rows(arrays: dict, mode: str, rows: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Write the reply's rows into the caller's arrays: new values copied, deltas added."""
    for name, (r, v) in rows.items():
        target = arrays.get(name)
        if target is None or not r.size:
            continue
        if mode == "delta":
            target[r] += v.astype(target.dtype, copy=False)
        else:
            target[r] = v
