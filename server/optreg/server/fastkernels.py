"""Fused numba kernels for the six built-in optimizers, bit-for-bit equal to their numpy updates.

Why numba (measured on the 2-core bench machine, Adam, 1e7 float32, in place):
numpy over 64K slices ~3.3 ns/param; numexpr ~19 ns for part of the expression
(it evaluates float32 in its own temporaries and threads badly here); numba one
thread ~1.2, two threads over halves ~0.65; torch.optim fused Adam ~1.2-1.6.

Exactness: each kernel performs the numpy update's operations in the same order,
with the same scalars rounded to the array dtype first (numpy 2 treats a Python
float as a "weak" scalar, so `float32_array * 0.1` multiplies by float32(0.1)).
Without fastmath LLVM neither reassociates nor contracts a*b+c into an FMA, and
sqrt and division are IEEE-exact in SIMD too, so the results are identical to
the numpy path (tests/test_kernels.py checks array_equal). Only in-place kernels
are used: an out-of-place variant (7 arrays) failed to vectorize.

numba is optional (`pip install optreg[fast]`): without it, or until the JIT has
compiled (in a background thread started by `warm()`), kernels.apply uses the
plugins' numpy updates, which give the same numbers.
"""
from __future__ import annotations

import logging
import math
import os
import threading

import numpy as np

log = logging.getLogger("optreg.server")

try:  # pragma: no cover - exercised by whichever environment runs
    import numba
except ImportError:  # pragma: no cover
    numba = None

_KERNELS: dict = {}  # (update function, dtype str) -> (kernel, scalars(hp, step, dtype) -> tuple, slot names)
_lock = threading.Lock()
_started = False
ready = threading.Event()


def _specs():
    """(plugin update function, slot names, scalar builder, python kernel) for each built-in."""
    from optreg.plugins.builtins import BOOK_EPS, adagrad, adam, momentum, nesterov, rmsprop, sgd

    def k_sgd(p, g, c):
        lr = c[0]
        for i in range(p.size):
            p[i] = p[i] - g[i] * lr

    def k_momentum(p, g, v, c):
        lr, mu = c[0], c[1]
        for i in range(p.size):
            vi = v[i] * mu - g[i] * lr
            v[i] = vi
            p[i] = p[i] + vi

    def k_nesterov(p, g, v, k):
        mu2, c, lr, mu = k[0], k[1], k[2], k[3]
        for i in range(p.size):
            gi = g[i]
            vi = v[i]
            p[i] = (p[i] + vi * mu2) - gi * c
            v[i] = vi * mu - gi * lr

    def k_adagrad(p, g, h, c):
        lr, eps = c[0], c[1]
        for i in range(p.size):
            gi = g[i]
            hi = h[i] + gi * gi
            h[i] = hi
            p[i] = p[i] - (gi * lr) / (math.sqrt(hi) + eps)

    def k_rmsprop(p, g, h, c):
        decay, a, lr, eps = c[0], c[1], c[2], c[3]
        for i in range(p.size):
            gi = g[i]
            hi = h[i] * decay + (gi * a) * gi
            h[i] = hi
            p[i] = p[i] - (gi * lr) / (math.sqrt(hi) + eps)

    def k_adam(p, g, m, v, c):
        a1, a2, lr_t, eps = c[0], c[1], c[2], c[3]
        for i in range(p.size):
            gi = g[i]
            mi = m[i] + (gi - m[i]) * a1
            vi = v[i] + (gi * gi - v[i]) * a2
            m[i] = mi
            v[i] = vi
            p[i] = p[i] - (mi * lr_t) / (math.sqrt(vi) + eps)

    def adam_scalars(hp, step):
        b1, b2 = hp["beta1"], hp["beta2"]
        lr_t = hp["lr"] * math.sqrt(1.0 - b2 ** step) / (1.0 - b1 ** step)
        return (1 - b1, 1 - b2, lr_t, BOOK_EPS)

    return [
        (sgd.update, (), lambda hp, t: (hp["lr"],), k_sgd),
        (momentum.update, ("v",), lambda hp, t: (hp["lr"], hp["momentum"]), k_momentum),
        (nesterov.update, ("v",), lambda hp, t: (hp["momentum"] * hp["momentum"],
                                                 (1 + hp["momentum"]) * hp["lr"], hp["lr"], hp["momentum"]),
         k_nesterov),
        (adagrad.update, ("h",), lambda hp, t: (hp["lr"], BOOK_EPS), k_adagrad),
        (rmsprop.update, ("h",), lambda hp, t: (hp["decay_rate"], 1 - hp["decay_rate"], hp["lr"], BOOK_EPS),
         k_rmsprop),
        (adam.update, ("m", "v"), adam_scalars, k_adam),
    ]


def _compile() -> None:
    try:
        for update, slots, scalars, pyfunc in _specs():
            nargs = pyfunc.__code__.co_argcount
            narrays = 2 + len(slots)
            # Lazy dispatch compiled by calling it: explicit signatures made each call ~20 us slower.
            # Two builds: one releasing the GIL (large tensors, on several threads) and one keeping it
            # (small tensors: releasing and taking back the GIL on a busy gRPC server costs a thread
            # hand-off, measured at tens of microseconds, many times the kernel itself).
            fn = numba.njit(nogil=True, error_model="numpy", cache=_cache_ok())(pyfunc)
            held = numba.njit(error_model="numpy", cache=_cache_ok())(pyfunc)
            for dt in ("<f4", "<f8"):
                for f in (fn, held):
                    a = [np.zeros(4, dt) for _ in range(narrays)]
                    scal = [np.full(4, 0.5, dt)]  # the scalars travel as one small array: cheaper to pass
                    f(*a, *scal)
                    a[1].flags.writeable = False  # gradients may view read-only wire bytes
                    f(*a, *scal)
                _KERNELS[(update, dt)] = (fn, scalars, slots)
                _HELD[fn] = held
        finite = []
        for nogil in (True, False):
            fin = numba.njit(nogil=nogil, cache=_cache_ok())(_exponent_max)
            for bits, mask in _FINITE_MASKS.values():
                a = np.zeros(4, bits)
                fin(a, a.dtype.type(mask))
                a.flags.writeable = False
                fin(a, a.dtype.type(mask))
            finite.append(fin)
        _FINITE[:] = finite  # both at once: steps may run while this thread compiles
        log.info("numba kernels ready for the built-in optimizers")
    except Exception as e:  # a broken numba must never break the server: numpy gives the same numbers
        log.warning("numba kernels unavailable (%s: %s); using numpy", type(e).__name__, e)
        _KERNELS.clear()
        _HELD.clear()
        _FINITE.clear()
    finally:
        ready.set()


def _exponent_max(bits, mask):
    # The largest exponent field: all ones (== mask) exactly when some value is NaN or Inf.
    # Integer max vectorizes where a float test with an early exit would not.
    m = bits.dtype.type(0)
    for i in range(bits.size):
        e = bits[i] & mask
        if e > m:
            m = e
    return m


# float dtype str -> (unsigned view of the same width, exponent mask)
_FINITE_MASKS = {"<f2": ("<u2", 0x7C00), "<f4": ("<u4", 0x7F800000), "<f8": ("<u8", 0x7FF0000000000000),
                 "bfloat16": ("<u2", 0x7F80)}
_FINITE: list = []  # [releases the GIL, keeps it]
_HELD: dict = {}  # GIL-releasing kernel -> the same kernel keeping the GIL
# Below this many elements the kernels keep the GIL (see _compile).
HOLD_GIL_BELOW = 1 << 15


def held(fn):
    """The build of kernel `fn` that keeps the GIL (for small tensors)."""
    return _HELD.get(fn, fn)


def all_finite(a: np.ndarray) -> bool | None:
    """True when a contiguous float array has no NaN or Inf; None when no kernel fits (use numpy)."""
    if not _FINITE or not a.flags.c_contiguous:
        return None
    spec = _FINITE_MASKS.get(a.dtype.str if a.dtype.kind == "f" else a.dtype.name)
    if spec is None:
        return None
    bits = a.reshape(-1).view(spec[0])
    mask = bits.dtype.type(spec[1])
    return bool(_FINITE[bits.size < HOLD_GIL_BELOW](bits, mask) != mask)


def _cache_ok() -> bool:
    return os.access(os.path.dirname(os.path.abspath(__file__)), os.W_OK) or bool(os.environ.get("NUMBA_CACHE_DIR"))


def available() -> bool:
    return numba is not None and os.environ.get("OPTREG_KERNELS", "").lower() != "numpy"


def warm(block: bool = False) -> None:
    """Compile the kernels (once, in a background thread unless `block`)."""
    global _started
    block = block or os.environ.get("OPTREG_JIT_BLOCK") == "1"
    if not available():
        ready.set()
        return
    with _lock:
        if not _started:
            _started = True
            if block:
                _compile()
            else:
                threading.Thread(target=_compile, name="optreg-jit", daemon=True).start()
    if block:
        ready.wait()


def lookup(update, dtype: np.dtype):
    """The fused kernel for a built-in's update function and dtype, or None (not built in, or not compiled yet)."""
    if not _KERNELS:
        return None
    return _KERNELS.get((update, dtype.str))


def run(kernel, param: np.ndarray, grad: np.ndarray, state: dict, step: int, hp: dict) -> None:
    """Apply a fused kernel to flat, contiguous, same-dtype arrays (slices of them on threads)."""
    fn, scalars, slots = kernel
    # Rounded to the array dtype as numpy rounds a Python float against it.
    consts = np.array(scalars(hp, step), dtype=param.dtype)
    fn(param, grad, *[state[s] for s in slots], consts)


def names() -> list[str]:
    return sorted({u.__module__.rsplit(".", 1)[-1] for u, _ in _KERNELS})


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
