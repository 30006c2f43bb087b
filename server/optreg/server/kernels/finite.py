"""The finite check: is a gradient free of NaN and Inf, in one compiled pass over its bits.

A step refuses a gradient holding NaN or Inf before anything is applied (check_finite). The
compiled check is an unsigned max over each value's exponent bits (or |x|'s bits for float32 and
float64, which also gives max |g| for the step's statistics); numpy answers until it is built.
"""
from __future__ import annotations

import logging

import numpy as np

from optreg.server.kernels.bits import NONFINITE32, NONFINITE64, abs_bits, uand, umax
from optreg.server.kernels.jit import DTYPES, HOLD_GIL_BELOW, njit, renamed
from optreg.server.model.errors import InvalidArgument, shown

log = logging.getLogger("optreg.server")


def _exponent_max(bits, mask):
    # The largest exponent field: all ones (== mask) exactly when some value is NaN or Inf.
    # Integer max vectorizes where a float test with an early exit would not; in the bits' own width
    # (kernels/bits.py: numba's & and max widen 16-bit float16/bfloat16 bits to 64-bit lanes, a quarter as many).
    m = bits.dtype.type(0)
    for i in range(bits.size):
        m = umax(m, uand(bits[i], mask))
    return m


def _abs_bits_max(a):
    # float32/float64: the largest |x| as bits, in the float's own width (kernels/bits.py: numba's integer max runs
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


def built() -> bool:
    return bool(_FINITE)


def build() -> None:
    try:
        finite = []
        for nogil in (True, False):
            fin = njit(_exponent_max if nogil else renamed(_exponent_max, "__optreg_held"), nogil)
            for bits, mask in _FINITE_MASKS.values():
                a = np.zeros(4, bits)
                fin(a, a.dtype.type(mask))
                a.flags.writeable = False
                fin(a, a.dtype.type(mask))
            finite.append(fin)
        wide = []
        for nogil in (True, False):
            fin = njit(_abs_bits_max if nogil else renamed(_abs_bits_max, "__optreg_held"), nogil)
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


def check_finite(name: str, g: np.ndarray, start: int = 0) -> None:
    # numba when compiled: no temporary bool array, and small gradients keep the GIL.
    ok = all_finite(g)
    if ok is None:
        ok = bool(np.isfinite(g).all())
    if not ok:
        bad = int(g.size - np.count_nonzero(np.isfinite(g)))
        where = f" in elements {start}..{start + g.size}" if start else ""
        raise InvalidArgument(f"gradient {shown(name)} has {bad} NaN or Inf value(s){where}; the step was not applied")
