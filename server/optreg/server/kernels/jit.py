"""Compiles the fused kernels optimizers declare (`Optimizer.kernel`) with numba.

This module names no optimizer: any definition with a `kernel` (a plain Python
scalar loop beside its numpy update, see optreg.plugins.api) is compiled here,
once per (definition, dtype), in a background thread; until it is ready, and
whenever numba is missing or fails on it, kernels.apply runs the numpy update,
which gives the same numbers.

Why numba: compiled, in place and split over the cores, a kernel runs several times
faster than the numpy update and about as fast as torch's fused Adam (the figures:
docs/speed.md, "Kernel notes").

Exactness: a kernel performs the numpy update's operations in the same order,
with the same scalars rounded to the array dtype first (numpy 2 treats a Python
float as a "weak" scalar, so `float32_array * 0.1` multiplies by float32(0.1)).
Without fastmath LLVM neither reassociates nor contracts a*b+c into an FMA, and
sqrt and division are IEEE-exact in SIMD too, so the results are identical to
the numpy path (the conformance kit and tests/kernels/test_kernels.py check array_equal).

Statistics (`kernels.apply(..., stats=)`) are built from the same kernels by
kernels/stats.py.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import types
from dataclasses import dataclass

import numpy as np

from optreg.plugins.api import kernel_constants, kernel_slots

log = logging.getLogger("optreg.server")

try:  # pragma: no cover - exercised by whichever environment runs
    import numba
except ImportError:  # pragma: no cover
    numba = None

DTYPES = ("<f4", "<f8")
# Below this many elements the kernels keep the GIL: releasing and taking back the GIL on a busy
# gRPC server costs a thread hand-off, measured at tens of microseconds, many times the kernel itself.
HOLD_GIL_BELOW = 1 << 15


@dataclass
class Compiled:
    """A definition's kernel, built for one dtype (both builds accept read-only gradients)."""
    name: str
    fn: object  # releases the GIL: large tensors, on several threads
    held: object  # keeps the GIL: small tensors
    slots: tuple[str, ...]  # the slots the kernel takes (api.kernel_slots)
    defn: object
    kernel: object  # the plain Python loop (for the stats driver's compile)
    c_len: int  # how many scalars c holds

    def consts(self, hp, step, dtype, state=None) -> np.ndarray:
        """c for this step; a whole-tensor kernel's running scalars are advanced in `state`."""
        # Rounded to the array dtype as numpy rounds a Python float against it.
        return np.array(kernel_constants(self.defn, hp, step, state), dtype=dtype)


_ready: dict = {}  # (id(definition), dtype str) -> (definition, Compiled); the definition keeps the id valid
_state: dict = {}  # id(definition) -> (definition, "pending" | "ready" | "failed")
_lock = threading.Lock()
_jobs: queue.Queue = queue.Queue()
_worker: threading.Thread | None = None


def available() -> bool:
    return numba is not None and os.environ.get("OPTREG_KERNELS", "").lower() != "numpy"


def lookup(defn, dtype: np.dtype, narrow_slots: bool = False, whole: bool = False) -> Compiled | None:
    """The compiled kernel of `defn` for `dtype`; None (use the numpy update) when it declares none,
    numba is unavailable, or it is not compiled yet (then its compile is queued) or failed.
    A kernel over bfloat16 slots runs only as kernels/narrow.py rewrites it, which alone asks with
    `narrow_slots=True`, and a whole-tensor optimizer's only in kernels.apply (`whole=True`), which
    advances its running scalars once a step: every other caller gets None for them."""
    if defn.kernel is None or (not defn.elementwise and not whole):
        return None
    if not narrow_slots and any(s.dtype is not None for s in kernel_slots(defn)):
        return None
    hit = _ready.get((id(defn), dtype.str))
    if hit is not None and hit[0] is defn:
        return hit[1]
    if dtype.str in DTYPES and available():
        request(defn)
    return None


def request(defn) -> None:
    with _lock:
        known = _state.get(id(defn))
        if known is not None and known[0] is defn:
            return
        _state[id(defn)] = (defn, "pending")
    _jobs.put(defn)
    _start_worker()


def submit(job) -> None:
    """Run `job()` on the compile thread, after everything queued before it."""
    _jobs.put(job)
    _start_worker()


def _start_worker() -> None:
    global _worker
    with _lock:
        if _worker is None:
            _worker = threading.Thread(target=_work, name="optreg-jit", daemon=True)
            _worker.start()


def disk_cache_ok() -> bool:
    return not os.environ.get("OPTREG_NO_JIT_CACHE")


def njit(pyfunc, nogil: bool, **options):
    """numba.njit with the on-disk cache when it can be used (numba refuses some locations)."""
    if disk_cache_ok():
        try:
            return numba.njit(nogil=nogil, cache=True, **options)(pyfunc)
        except Exception:  # no writable cache location for this module: compile every start
            pass
    return numba.njit(nogil=nogil, **options)(pyfunc)


def renamed(fn, suffix: str):
    """A copy of `fn` under another qualified name: numba's disk cache keys entries by the function's
    name and bytecode, not by flags, so the GIL-keeping build needs a name of its own."""
    copy = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    copy.__qualname__ = fn.__qualname__ + suffix
    copy.__module__ = fn.__module__
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


def _compile_definition(defn) -> None:
    try:
        takes = tuple(s.name for s in kernel_slots(defn))
        c_len = len(kernel_constants(defn, defn.resolve({}), 1))
        narrays = 2 + len(takes)
        pyfunc = getattr(defn.kernel, "py_func", defn.kernel)  # a plugin may hand over a numba function
        # Lazy dispatch compiled by calling it: explicit signatures made each call ~20 us slower.
        fn = njit(pyfunc, True, error_model="numpy")
        held = njit(renamed(pyfunc, "__optreg_held"), False, error_model="numpy")
        built = {}
        for dt in DTYPES:
            for f in (fn, held):
                a = [np.zeros(4, dt) for _ in range(narrays)]
                c = np.full(c_len, 0.5, dt)
                f(*a, c)
                a[1].flags.writeable = False  # gradients may view read-only wire bytes
                f(*a, c)
            built[dt] = Compiled(defn.name, fn, held, takes, defn, pyfunc, c_len)
    except Exception as e:  # a kernel numba cannot compile must never break the server: numpy gives the same numbers
        log.warning("optimizer %s: its kernel does not compile with numba (%s: %s); using its numpy update",
                    defn.name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        with _lock:
            _state[id(defn)] = (defn, "failed")
        return
    with _lock:
        for dt, comp in built.items():
            _ready[(id(defn), dt)] = (defn, comp)
        _state[id(defn)] = (defn, "ready")


def status(defn) -> str | None:
    """'pending', 'ready' or 'failed' for a definition whose kernel was requested; None otherwise."""
    known = _state.get(id(defn))
    return known[1] if known is not None and known[0] is defn else None


def names() -> list[str]:
    """The optimizers whose kernels are compiled."""
    return sorted({comp.name for _, comp in _ready.values()})


def _work() -> None:
    while True:
        job = _jobs.get()
        try:
            if isinstance(job, threading.Event):  # a marker: everything queued before it is done
                job.set()
            elif callable(job):
                job()
            else:
                _compile_definition(job)
        except Exception:  # pragma: no cover - the compile jobs contain their own failures
            log.exception("kernel compile worker")


def wait_idle(timeout: float | None = None) -> bool:
    """Block until every compile queued so far is done (tests, benchmarks)."""
    done = threading.Event()
    _jobs.put(done)
    _start_worker()
    return done.wait(timeout)


_threads = None


def threads() -> int:
    global _threads
    if _threads is None:
        _threads = _count_threads()
    return _threads


def _count_threads() -> int:
    env = os.environ.get("OPTREG_KERNEL_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover
        return max(1, os.cpu_count() or 1)
