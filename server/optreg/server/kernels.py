"""Runs an optimizer's update over a parameter: elementwise ones over cache-sized slices.

Slicing keeps the working set (parameter, gradient, slots, scratch) in cache: DESIGN
measured Adam at ~1.7 ns/param over 256K-element chunks against ~3.1 whole-array.
"""
from __future__ import annotations

import threading

import numpy as np

from optreg.plugins import Optimizer

CHUNK_ELEMENTS = 1 << 16

_local = threading.local()


def _scratch(count: int, size: int, dtype: np.dtype) -> list[np.ndarray]:
    """Per-thread work arrays, reused across steps and sessions."""
    if count == 0:
        return []
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    key = (dtype.str, count)
    bufs = cache.get(key)
    if bufs is None or bufs[0].size < size:
        bufs = cache[key] = [np.empty(max(size, CHUNK_ELEMENTS), dtype=dtype) for _ in range(count)]
    return [b[:size] for b in bufs]


def apply(defn: Optimizer, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], step: int,
          hp: dict) -> None:
    """Update `param` and `state` in place with one gradient."""
    n = param.size
    if not defn.elementwise or n <= CHUNK_ELEMENTS:
        if defn.elementwise or defn.scratch == 0:
            scratch = [s.reshape(param.shape) for s in _scratch(defn.scratch, n, param.dtype)]
        else:  # a whole-tensor update may keep references: give it arrays of its own
            scratch = [np.empty_like(param) for _ in range(defn.scratch)]
        defn.update(param, grad, state, step, hp, scratch)
        return
    p, g = param.reshape(-1), grad.reshape(-1)
    flat_state = {k: v.reshape(-1) for k, v in state.items()}
    bufs = _scratch(defn.scratch, CHUNK_ELEMENTS, param.dtype)
    for start in range(0, n, CHUNK_ELEMENTS):
        end = min(start + CHUNK_ELEMENTS, n)
        size = end - start
        defn.update(p[start:end], g[start:end], {k: v[start:end] for k, v in flat_state.items()}, step, hp,
                    [b[:size] for b in bufs])
