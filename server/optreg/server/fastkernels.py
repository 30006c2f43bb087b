"""Compiles the fused kernels optimizers declare (`Optimizer.kernel`) with numba.

This module names no optimizer: any definition with a `kernel` (a plain Python
scalar loop beside its numpy update, see optreg.plugins.api) is compiled here,
once per (definition, dtype), in a background thread; until it is ready, and
whenever numba is missing or fails on it, kernels.apply runs the numpy update,
which gives the same numbers.

Why numba (measured on the 2-core bench machine, Adam, 1e7 float32, in place):
numpy over 64K slices ~3.3 ns/param; numexpr ~19 ns for part of the expression
(it evaluates float32 in its own temporaries and threads badly here); numba one
thread ~1.2, two threads over halves ~0.65; torch.optim fused Adam ~1.2-1.6.

Exactness: a kernel performs the numpy update's operations in the same order,
with the same scalars rounded to the array dtype first (numpy 2 treats a Python
float as a "weak" scalar, so `float32_array * 0.1` multiplies by float32(0.1)).
Without fastmath LLVM neither reassociates nor contracts a*b+c into an FMA, and
sqrt and division are IEEE-exact in SIMD too, so the results are identical to
the numpy path (the conformance kit and tests/test_kernels.py check array_equal).

Statistics (`kernels.apply(..., stats=)`) are built from the same kernels by
kernelstats.py.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import types
from dataclasses import dataclass

import numpy as np

from optreg.server.bitops import NONFINITE32, NONFINITE64, abs_bits, uand, umax

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
    slots: tuple[str, ...]
    scalars: object  # kernel_scalars(hp, step)
    kernel: object  # the plain Python loop (for the stats driver's compile)

    def consts(self, hp, step, dtype) -> np.ndarray:
        # Rounded to the array dtype as numpy rounds a Python float against it.
        return np.array(self.scalars(hp, step), dtype=dtype)


_ready: dict = {}  # (id(definition), dtype str) -> (definition, Compiled); the definition keeps the id valid
_state: dict = {}  # id(definition) -> (definition, "pending" | "ready" | "failed")
_lock = threading.Lock()
_jobs: queue.Queue = queue.Queue()
_worker: threading.Thread | None = None
ready = threading.Event()  # set once warm()'s batch (the finite check and the registered kernels) is built


def available() -> bool:
    return numba is not None and os.environ.get("OPTREG_KERNELS", "").lower() != "numpy"


def lookup(defn, dtype: np.dtype) -> Compiled | None:
    """The compiled kernel of `defn` for `dtype`; None (use the numpy update) when it declares none,
    numba is unavailable, or it is not compiled yet (then its compile is queued) or failed."""
    if defn.kernel is None or not defn.elementwise:
        return None
    hit = _ready.get((id(defn), dtype.str))
    if hit is not None and hit[0] is defn:
        return hit[1]
    if dtype.str in DTYPES and available():
        _request(defn)
    return None


def _request(defn) -> None:
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


def _jit(pyfunc, nogil: bool, **options):
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
        narrays = 2 + len(defn.slots)
        pyfunc = getattr(defn.kernel, "py_func", defn.kernel)  # a plugin may hand over a numba function
        # Lazy dispatch compiled by calling it: explicit signatures made each call ~20 us slower.
        fn = _jit(pyfunc, True, error_model="numpy")
        held = _jit(renamed(pyfunc, "__optreg_held"), False, error_model="numpy")
        built = {}
        for dt in DTYPES:
            for f in (fn, held):
                a = [np.zeros(4, dt) for _ in range(narrays)]
                c = np.full(len(defn.kernel_scalars(defn.resolve({}), 1)), 0.5, dt)
                f(*a, c)
                a[1].flags.writeable = False  # gradients may view read-only wire bytes
                f(*a, c)
            built[dt] = Compiled(defn.name, fn, held, tuple(s.name for s in defn.slots), defn.kernel_scalars,
                                 pyfunc)
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


def _request_all(definitions, stats: bool = False) -> None:
    if definitions is None:
        from optreg.plugins.registry import Registry
        definitions = [r.definition for r in Registry().optimizers.values()]
    for defn in definitions:
        if defn.kernel is not None and defn.elementwise:
            _request(defn)
            if stats:  # runs after the kernel's own compile (one worker, in order)
                _jobs.put(lambda defn=defn: _request_stats(defn))


def _request_stats(defn) -> None:
    from optreg.server import kernelstats
    comp = lookup(defn, np.dtype(DTYPES[0]))
    if comp is not None:
        kernelstats.stats_kernel(defn, comp)


def status(defn) -> str | None:
    """'pending', 'ready' or 'failed' for a definition whose kernel was requested; None otherwise."""
    known = _state.get(id(defn))
    return known[1] if known is not None and known[0] is defn else None


def warm(block: bool = False, definitions=None, stats: bool = False) -> None:
    """Compile the finite check and the kernels of `definitions` (default: the registered optimizers)
    in the background thread, with `stats` their statistics kernels too (otherwise built on first
    use); with `block` (or OPTREG_JIT_BLOCK=1) wait until they are built."""
    block = block or os.environ.get("OPTREG_JIT_BLOCK") == "1"
    if not available():
        ready.set()
        return
    done = threading.Event()
    if not _FINITE:
        _jobs.put("finite")
    _jobs.put(lambda: _request_all(definitions, stats))  # the registry is read on the worker, not the caller
    _jobs.put(lambda: _jobs.put(done))  # after the kernels _request_all queues
    _start_worker()
    threading.Thread(target=lambda: (done.wait(), ready.set()), name="optreg-jit-ready", daemon=True).start()
    if block:
        done.wait()


def names() -> list[str]:
    """The optimizers whose kernels are compiled."""
    return sorted({comp.name for _, comp in _ready.values()})


def _work() -> None:
    while True:
        job = _jobs.get()
        try:
            if isinstance(job, threading.Event):  # a marker: everything queued before it is done
                job.set()
            elif job == "finite":
                _compile_finite()
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


# ---- the finite check ---------------------------------------------------------------

def _exponent_max(bits, mask):
    # The largest exponent field: all ones (== mask) exactly when some value is NaN or Inf.
    # Integer max vectorizes where a float test with an early exit would not; in the bits' own width
    # (bitops: numba's & and max widen 16-bit float16/bfloat16 bits to 64-bit lanes, a quarter as many).
    m = bits.dtype.type(0)
    for i in range(bits.size):
        m = umax(m, uand(bits[i], mask))
    return m


def _abs_bits_max(a):
    # float32/float64: the largest |x| as bits, in the float's own width (bitops: numba's integer max runs
    # in 64-bit lanes); at or above the exponent mask exactly when some value is NaN or Inf.
    m = abs_bits(a.dtype.type(0))
    for i in range(a.size):
        m = umax(m, abs_bits(a[i]))
    return m


# float dtype str -> (unsigned view of the same width, exponent mask)
_FINITE_MASKS = {"<f2": ("<u2", 0x7C00), "<f4": ("<u4", 0x7F800000), "<f8": ("<u8", 0x7FF0000000000000),
                 "bfloat16": ("<u2", 0x7F80)}
_FINITE: list = []  # [releases the GIL, keeps it]
_FINITE_WIDE: list = []  # the same for float32/float64 arrays (_abs_bits_max)


def _compile_finite() -> None:
    try:
        finite = []
        for nogil in (True, False):
            fin = _jit(_exponent_max if nogil else renamed(_exponent_max, "__optreg_held"), nogil)
            for bits, mask in _FINITE_MASKS.values():
                a = np.zeros(4, bits)
                fin(a, a.dtype.type(mask))
                a.flags.writeable = False
                fin(a, a.dtype.type(mask))
            finite.append(fin)
        wide = []
        for nogil in (True, False):
            fin = _jit(_abs_bits_max if nogil else renamed(_abs_bits_max, "__optreg_held"), nogil)
            for dt in DTYPES:
                a = np.zeros(4, dt)
                fin(a)
                a.flags.writeable = False
                fin(a)
            wide.append(fin)
        _FINITE_WIDE[:] = wide
        _FINITE[:] = finite  # both at once: steps may run while this thread compiles
    except Exception as e:  # a broken numba must never break the server
        log.warning("numba finite check unavailable (%s: %s); using numpy", type(e).__name__, e)


def all_finite(a: np.ndarray) -> bool | None:
    """True when a contiguous float array has no NaN or Inf; None when no kernel fits (use numpy)."""
    if not _FINITE or not a.flags.c_contiguous:
        return None
    if a.dtype.str in DTYPES and _FINITE_WIDE:
        limit = NONFINITE32 if a.dtype.itemsize == 4 else NONFINITE64
        return bool(int(_FINITE_WIDE[a.size < HOLD_GIL_BELOW](a.reshape(-1))) < limit)
    spec = _FINITE_MASKS.get(a.dtype.str if a.dtype.kind == "f" else a.dtype.name)
    if spec is None:
        return None
    bits = a.reshape(-1).view(spec[0])
    mask = bits.dtype.type(spec[1])
    return bool(_FINITE[bits.size < HOLD_GIL_BELOW](bits, mask) != mask)


def abs_max(a: np.ndarray) -> float | None:
    """max |x| of a contiguous float32/float64 array in the finite check's own pass: NaN or Inf exactly when
    some element is (the max of |x|'s bits reaches the exponent mask); None when no kernel fits."""
    if not _FINITE_WIDE or a.dtype.str not in DTYPES or not a.flags.c_contiguous:
        return None
    flat = a.reshape(-1)
    m = _FINITE_WIDE[a.size < HOLD_GIL_BELOW](flat)
    return float(np.array(m, "<u4" if a.dtype.itemsize == 4 else "<u8").view(a.dtype)[()]) if flat.size else 0.0


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
