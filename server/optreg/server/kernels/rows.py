"""Catch-up of rows that missed steps (sparse rows, steps/sparse_rows.py): numba kernels for the
built-ins, numpy otherwise.

A row of a 2-D parameter that a sparse step did not name had a zero gradient at that step,
applied lazily: when the row is next touched or read, `catch_up` brings it from the step
it is current through (`last`, per row) to `now`. Rows come gathered, as (k, columns)
arrays. What each optimizer owes a row is its plugin's to say (`Optimizer.catch_up`, see
optreg.plugins.api); without one the update is replayed with zero gradients, step by
step (exact, but it costs every missed step).

The kernels here are the same arithmetic as the plugins' numpy catch-ups, element by
element in the same order and precision (float64 coefficients, one rounding into the
array dtype), so they give the same bits (tests/steps/test_sparse.py compares them); they are
picked by the identity of the plugin's function, so a third party's optimizer never runs
a built-in's kernel. Compiled on the JIT thread (kernels/jit.py submit); until then numpy runs.
"""
from __future__ import annotations

import math
import threading

import numpy as np

from optreg.plugins.builtins import adam, geometric, momentum, nesterov, rmsprop, unchanged
from optreg.server.kernels import jit

_compiled: dict = {}  # kernel name -> (nogil build) once compiled
_requested = False
_lock = threading.Lock()


# -- the kernels (plain Python; numba compiles them) -------------------------------------------
def drift_decay(p, v, cp, cv):
    """p[i] += v[i] * cp[i]; v[i] *= cv[i] (float64 products, rounded once): Momentum and Nesterov."""
    for i in range(p.shape[0]):
        a, b = cp[i], cv[i]
        for j in range(p.shape[1]):
            x = np.float64(v[i, j])
            p[i, j] = p[i, j] + x * a
            v[i, j] = x * b


def decay(h, cv):
    """h[i] *= cv[i] (float64 product, rounded once): RMSProp."""
    for i in range(h.shape[0]):
        b = cv[i]
        for j in range(h.shape[1]):
            h[i, j] = np.float64(h[i, j]) * b


def adam_replay(p, m, v, last, now, lrt, base, c):
    """The book's Adam kernel with g = 0 for each step last[i]+1 .. now of each row (lrt[s - base]: lr_t of
    step s in the array dtype; c: 1 - beta1, 1 - beta2, eps in the array dtype). Rows whose m and v are all
    zero stay as they are (the kernel leaves them so), and are skipped."""
    a1, a2, eps = c[0], c[1], c[2]
    z = a1 - a1
    for i in range(p.shape[0]):
        idle = True
        for j in range(p.shape[1]):
            if m[i, j] != z or v[i, j] != z:
                idle = False
                break
        if idle:
            continue
        for s in range(last[i] + 1, now + 1):
            lr_t = lrt[s - base]
            for j in range(p.shape[1]):
                mi = m[i, j] + (z - m[i, j]) * a1
                vi = v[i, j] + (z * z - v[i, j]) * a2
                m[i, j] = mi
                v[i, j] = vi
                p[i, j] = p[i, j] - (mi * lr_t) / (math.sqrt(vi) + eps)


def gather_rows(src, rows, out):
    """out[i] = src[rows[i]] (2-D, C order): ~3x numpy's fancy indexing for 256-byte rows."""
    for i in range(rows.size):
        r = rows[i]
        for j in range(src.shape[1]):
            out[i, j] = src[r, j]


def scatter_rows(dst, rows, src):
    """dst[rows[i]] = src[i]."""
    for i in range(rows.size):
        r = rows[i]
        for j in range(dst.shape[1]):
            dst[r, j] = src[i, j]


_KERNELS = {"drift_decay": drift_decay, "decay": decay, "adam_replay": adam_replay, "gather_rows": gather_rows,
            "scatter_rows": scatter_rows}


def _compile_all() -> None:
    for name, fn in _KERNELS.items():
        try:
            _compiled[name] = jit.njit(fn, nogil=True)
        except Exception:  # pragma: no cover - numba refused: numpy stays
            pass


def _kernel(name: str):
    """The compiled kernel, or None (numpy) until it is ready; the first ask queues the compile."""
    global _requested
    hit = _compiled.get(name)
    if hit is not None or not jit.available():
        return hit
    with _lock:
        if not _requested:
            _requested = True
            jit.submit(_compile_all)
    return None


def warm(block: bool = False) -> None:
    """Queue (and with block, finish) the compile: benchmarks and tests measure the compiled path."""
    _kernel("decay")
    if block:
        jit.wait_idle(120)


def gather(src: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """A new (k, columns) array of src's rows."""
    k = _kernel("gather_rows")
    if k is None or not src.flags.c_contiguous:
        return src[rows]
    out = np.empty((rows.size, src.shape[1]), src.dtype)
    k(src, rows, out)
    return out


def scatter(dst: np.ndarray, rows: np.ndarray, src: np.ndarray) -> None:
    k = _kernel("scatter_rows")
    if k is None or not dst.flags.c_contiguous or src.dtype != dst.dtype:
        dst[rows] = src
        return
    k(dst, rows, np.ascontiguousarray(src))


# -- dispatch -------------------------------------------------------------------------------------
def _adam_table(hp, lo: int, now: int, dtype) -> np.ndarray:
    # kernel_scalars itself, per step: the same Python float pow the dense kernel's constants come from.
    return np.array([adam.kernel_scalars(hp, s)[2] for s in range(lo, now + 1)], dtype=dtype)


def _fast(defn, p, state, last, now, hp) -> bool:
    fn = defn.catch_up
    d = now - last
    if fn is momentum.catch_up or fn is nesterov.catch_up:
        k = _kernel("drift_decay")
        if k is None:
            return False
        mu = float(p.dtype.type(hp["momentum"]))
        f, s = geometric(mu, d)
        if fn is nesterov.catch_up:
            s = float(p.dtype.type(hp["momentum"] * hp["momentum"])) * ((1.0 - f) / (1.0 - mu))
        k(p, state["v"], s, f)
        return True
    if fn is rmsprop.catch_up:
        k = _kernel("decay")
        if k is None:
            return False
        k(state["h"], geometric(float(p.dtype.type(hp["decay_rate"])), d)[0])
        return True
    if fn is None and defn is adam.ADAM:
        k = _kernel("adam_replay")
        if k is None:
            return False
        lo = int(last.min()) + 1
        consts = np.array(adam.kernel_scalars(hp, max(lo, 1)), dtype=p.dtype)
        k(p, state["m"], state["v"], last, now, _adam_table(hp, lo, now, p.dtype), lo,
          np.array([consts[0], consts[1], consts[3]], dtype=p.dtype))
        return True
    return False


def catch_up(defn, p: np.ndarray, state: dict[str, np.ndarray], last: np.ndarray, now: int, hp: dict,
             numpy_only: bool = False) -> None:
    """Bring the gathered rows `p` (k, columns) and `state` {slot: (k, columns)}, each current through
    step last[i], to step `now` (zero gradients, hyperparameters `hp`), in place. Rows with last >= now
    are left as they are."""
    if p.shape[0] == 0 or defn.catch_up is unchanged:
        return
    last = np.minimum(np.asarray(last, np.int64), now)
    if not (last < now).any():
        return
    if not numpy_only and _fast(defn, p, state, last, now, hp):
        return
    if defn.catch_up is not None:
        defn.catch_up(p, state, last, now, hp)
        return
    replay(defn, p, state, last, now, hp)


def replay(defn, p, state, last, now, hp) -> None:
    """The update with zero gradients for each missed step, on the rows that missed it: the dense steps'
    numbers bit for bit (an elementwise update does the same operations row by row)."""
    lo = int(last.min())
    for s in range(lo + 1, now + 1):
        sel = np.nonzero(last < s)[0]
        if sel.size == p.shape[0]:
            pr, st = p, state
        else:
            pr, st = p[sel], {k: a[sel] for k, a in state.items()}
        scratch = [np.empty_like(pr) for _ in range(defn.scratch)]
        defn.update(pr, np.zeros_like(pr), st, s, hp, scratch)
        if pr is not p:
            p[sel] = pr
            for k, a in st.items():
                state[k][sel] = a
