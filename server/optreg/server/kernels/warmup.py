"""Builds the step path's compiled kernels ahead of the first steps that need them.

Until a kernel is compiled its step runs the numpy update (same numbers, slower), so the server
asks for the registered optimizers' kernels, their statistics variants and the finite check at
start, on the one compile thread (jit.submit), in that order.
"""
from __future__ import annotations

import os
import threading

import numpy as np

from optreg.plugins.registry import Registry
from optreg.server.kernels import finite, jit, narrow, stats

ready = threading.Event()  # set once warm()'s batch (the finite check and the registered kernels) is built


def warm(block: bool = False, definitions=None, stats: bool = False) -> None:
    """Compile the finite check and the kernels of `definitions` (default: the registered optimizers)
    in the background thread, with `stats` their statistics kernels too (otherwise built on first
    use); with `block` (or OPTREG_JIT_BLOCK=1) wait until they are built."""
    block = block or os.environ.get("OPTREG_JIT_BLOCK") == "1"
    if not jit.available():
        ready.set()
        return
    done = threading.Event()
    if not finite.built():
        jit.submit(finite.build)
    jit.submit(lambda: _request_all(definitions, stats))  # the registry is read on the worker, not the caller
    jit.submit(lambda: jit.submit(done.set))  # after the kernels _request_all queues
    threading.Thread(target=lambda: (done.wait(), ready.set()), name="optreg-jit-ready", daemon=True).start()
    if block:
        done.wait()


def _request_all(definitions, stats: bool = False) -> None:
    if definitions is None:
        definitions = [r.definition for r in Registry().optimizers.values()]
    for defn in definitions:
        if defn.kernel is not None:
            jit.request(defn)
            if narrow.narrows(defn):  # its rewrite over bfloat16 slots, once the kernel is built
                jit.submit(lambda defn=defn: narrow.lookup(defn, narrow.MASTER))
            if stats:  # runs after the kernel's own compile (one worker, in order)
                jit.submit(lambda defn=defn: _request_stats(defn))


def _request_stats(defn) -> None:
    comp = jit.lookup(defn, np.dtype(jit.DTYPES[0]))
    if comp is not None:
        stats.stats_kernel(defn, comp)
