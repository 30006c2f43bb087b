"""Gradients narrower than the master dtype (float16, bfloat16) widened inside the kernel pass.

Why: numpy's `astype` widens into a fresh full-size array, which costs more than the kernel
itself, so the halved upload bought nothing (measured: docs/speed.md, "Kernel notes"). Here a
numba driver walks the gradient in blocks of WIDEN_BLOCK elements, widens each block from its
bits into a per-thread buffer that stays in L1, and calls the optimizer's own compiled kernel
(kernels/jit.py) on the block right away. The widening is exact: by the CPU's own conversion
where it has one (`_native_half`: F16C on x86, ARMv8), else with integer operations (numba has
no float16 type on the CPU):

  float16: the exponent and mantissa bits shifted into a float32's place and multiplied
           by 2^112 (exact: a power of two; it also turns a subnormal half into the
           normal float32 it equals); NaN/Inf get the all-ones exponent back; the sign
           is or-ed in. Equal bit for bit to numpy's astype for all 65536 inputs.
  bfloat16: the 16 bits shifted into a float32's top half (what widen() does).

A float64 master takes the float32 value (exact). So the kernel sees exactly the numbers
widen-then-update gives it, and the results are the same bit for bit (tests/kernels/test_kernels.py).

With statistics (kernels.apply(stats=), the step's telemetry) the driver calls the optimizer's
kernel with the statistics fused into its loop (kernels/stats.py: float32 block sums for a float32
master, as a float64 driver ate what the halved upload saved) on each widened block, once that
kernel is compiled. Until then, or for a kernel the rewrite does not fit, a second driver copies
each block of p before the update and sums over it with kernels/stats.py's float64 helpers.

Each (definition, master dtype, gradient dtype) driver is compiled on first use in the
compile thread (jit.submit); until then, and without numba, kernels.apply widens
with numpy first (same numbers). Only the GIL-releasing build exists: below
jit.HOLD_GIL_BELOW elements numpy's widening costs microseconds.
"""
from __future__ import annotations

import threading

import numpy as np

from optreg.server.kernels import jit
from optreg.server.kernels import stats as kernelstats
from optreg.server.kernels.jit import DTYPES, numba
from optreg.v1 import tensor_pb2, tensors

# Elements widened per block: the block (4-8 bytes an element) stays in L1 beside the kernel's
# slices. Measured at 1e7 Adam: 1024-8192 within noise; 2048 kept.
_BF16 = tensors.DTYPES[tensor_pb2.DataType.DATA_TYPE_BFLOAT16]
WIDEN_BLOCK = 2048


def widen(g: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Exact widening to the master dtype; bfloat16 by bit shift (the top half of a float32), ~10x astype."""
    if g.dtype == dtype:
        return g
    if g.dtype == _BF16:
        w = np.empty(g.size, np.float32)
        bits = w.view(np.uint32)
        bits[...] = g.view(np.uint16)
        bits <<= 16
        return w if dtype == np.float32 else w.astype(dtype)
    return g.astype(dtype)


def _half_to_float(h):
    x = np.uint32(h)
    f = np.float32(np.uint32((x & np.uint32(0x7FFF)) << np.uint32(13)).view(np.float32)
                   * np.float32(5.192296858534828e+33))  # 2^112
    b = np.float32(f).view(np.uint32)
    if f >= np.float32(65536.0):  # was Inf or NaN: exponent all ones, mantissa kept
        b |= np.uint32(0x7F800000)
    return np.uint32(b | ((x & np.uint32(0x8000)) << np.uint32(16))).view(np.float32)


def _native_half() -> object | None:
    """float16 bits to float32 by LLVM's own `fpext half`, where the CPU converts in hardware (x86's
    F16C: vcvtph2ps, 8 at a time; ~2.8x _half_to_float measured at 1e7): the same value for every
    non-NaN input (a signalling NaN comes out a quiet NaN: still a NaN, which max |g| shows and the step refuses).
    None elsewhere: without F16C, LLVM would call a runtime routine numba may not link."""
    import platform

    try:
        import llvmlite.binding as llvm
        from llvmlite import ir
        from numba.core import types
        from numba.core.extending import intrinsic
    except ImportError:
        return None
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        if not llvm.get_host_cpu_features().get("f16c"):
            return None
    elif machine not in ("aarch64", "arm64"):  # ARMv8 converts half precision in hardware
        return None

    @intrinsic
    def half_to_float(typingctx, h):
        def codegen(context, builder, signature, args):
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
        return types.float32(types.uint16), codegen

    return half_to_float


def _bfloat_to_float(h):
    return np.uint32(np.uint32(h) << np.uint32(16)).view(np.float32)


# The drivers' first lines: a block of the gradient's bits widened into the per-thread buffer.
_WIDEN_SOURCE = """
def widen_into(gb, buf):
    w = buf[:gb.size]
    for i in range(gb.size):  # gb[i], not gbits[a + i]: a signed index stops LLVM vectorizing (~3.5x)
        w[i] = conv(gb[i])
    return w
"""
_DRIVER_SOURCE = """
def drive(kernel, p, gbits, {slots}c, buf):
    n = p.size
    block = buf.size
    for a in range(0, n, block):
        b = min(a + block, n)
        w = widen_into(gbits[a:b], buf)
        kernel(p[a:b], w, {sliced}c)
"""
# With statistics (kernels.apply(stats=)): as kernels/stats.py's driver, over the widened block.
_STATS_SOURCE = """
def drive(kernel, p, gbits, {slots}c, buf, ubuf, mask, old, acc):
    n = p.size
    block = buf.size
    m = ubuf.dtype.type(0)
    for a in range(0, n, block):
        b = min(a + block, n)
        w = widen_into(gbits[a:b], buf)
        pb = p[a:b]
        o = old[:b - a]
        for i in range(pb.size):
            o[i] = pb[i]
        kernel(pb, w, {sliced}c)
        stats_loop(pb, o, w, acc)
        m = abs_bits_max(ubuf[:b - a], mask, m)
    return m
"""
# With statistics fused into the kernel (kernels/stats.py StatsKernel.fn / fn32): it sums and takes
# max |g| over the widened block itself.
_FUSED_SOURCE = """
def drive(kernel, p, gbits, {slots}c, buf, m, acc):
    n = p.size
    block = buf.size
    for a in range(0, n, block):
        b = min(a + block, n)
        w = widen_into(gbits[a:b], buf)
        mb = kernel(p[a:b], w, {sliced}c, acc)  # max |g|'s bits: a NaN's are the largest
        if mb > m:
            m = mb
    return m
"""
# The same over the kernel's copying variant (kernels/stats.py StatsKernel.copy32): p and the slots are
# computed from sources (kernels.apply(src=)), each block copied in inside the pass.
_COPY_SOURCE = """
def drive(kernel, p, gbits, {slots}c, buf, m, acc, src_p, {srcs}):
    n = p.size
    block = buf.size
    for a in range(0, n, block):
        b = min(a + block, n)
        w = widen_into(gbits[a:b], buf)
        mb = kernel(p[a:b], w, {sliced}c, acc, src_p[a:b], {srcs_sliced})
        if mb > m:
            m = mb
    return m
"""
# gradient dtype str (or name) -> converter of its bits
KINDS = {"<f2": "half", "bfloat16": "bfloat"}
_SIGN_CLEARED = {"<f4": ("<u4", 0x7FFFFFFF), "<f8": ("<u8", 0x7FFFFFFFFFFFFFFF)}
_lock = threading.Lock()
_convs: dict = {}
_drivers: dict = {}  # (slot count, kind) -> dispatcher taking the kernel as its first argument
_ready: dict = {}  # (id(defn), master dtype str, kind) -> (defn, Widening)
_state: dict = {}  # same key -> (defn, "pending" | "ready" | "failed")


def kind_of(dtype: np.dtype) -> str | None:
    return KINDS.get(dtype.str if dtype.kind == "f" else dtype.name)


def _driver(nslots: int, kind: str, stats: bool | str = False):
    """stats: False, True (the float64 block driver), "fused" (the kernel sums itself) or "copy" (the
    kernel also copies p and the slots in from sources)."""
    key = (nslots, kind, stats)
    with _lock:
        d = _drivers.get(key)
        if not _convs:
            native = _native_half()
            if native is not None:
                _convs["half"] = numba.njit(inline="always", error_model="numpy")(lambda h: native(h))
            else:
                _convs["half"] = numba.njit(inline="always", error_model="numpy")(_half_to_float)
            _convs["bfloat"] = numba.njit(inline="always", error_model="numpy")(_bfloat_to_float)
    if d is None:
        slots = "".join(f"s{i}, " for i in range(nslots))
        sliced = "".join(f"s{i}[a:b], " for i in range(nslots))
        srcs = "".join(f"src{i}, " for i in range(nslots))
        srcs_sliced = "".join(f"src{i}[a:b], " for i in range(nslots))
        ns = {"conv": _convs[kind], "min": min}
        exec(_WIDEN_SOURCE, ns)  # noqa: S102 - a fixed template
        ns["widen_into"] = numba.njit(inline="always", error_model="numpy")(ns["widen_into"])
        if stats is True:
            ns.update(stats_loop=kernelstats._helper("stats_loop"), abs_bits_max=kernelstats._helper("abs_bits_max"))
        source = {False: _DRIVER_SOURCE, True: _STATS_SOURCE, "fused": _FUSED_SOURCE, "copy": _COPY_SOURCE}[stats]
        exec(source.format(slots=slots, sliced=sliced, srcs=srcs, srcs_sliced=srcs_sliced), ns)  # noqa: S102
        with _lock:
            d = _drivers.setdefault(key, numba.njit(nogil=True, error_model="numpy")(ns["drive"]))
    return d


class Widening:
    """A definition's compiled kernel behind a driver that widens its gradient block by block."""

    def __init__(self, defn, comp: jit.Compiled, kind: str, driver, stats_driver, dtype: np.dtype):
        self.defn, self.comp, self.kind = defn, comp, kind
        self.driver, self.stats_driver, self.dtype = driver, stats_driver, dtype
        self.ubits, mask = _SIGN_CLEARED[dtype.str]
        self.mask = np.dtype(self.ubits).type(mask)
        self.zero = np.dtype(self.ubits).type(0)
        self.local = threading.local()
        self.fused = None  # (driver, kernel with statistics) once both are compiled
        self.copying = None  # (driver, the kernel's copying variant) likewise, where it has one
        self.fused_asked = False

    def _fused(self):
        """The driver over the kernel with fused statistics, or None (not compiled yet, or none fits);
        the first call that finds the statistics kernel ready queues the driver's compile."""
        if self.fused is not None or self.fused_asked:
            return self.fused
        sk = kernelstats.stats_kernel(self.defn, self.comp)
        if sk is None:
            if kernelstats.stats_status(self.defn) in ("failed", "driver"):
                self.fused_asked = True  # never: the float64 driver it is
            return None
        self.fused_asked = True
        if not sk.fused:
            return None
        kernel = sk.fn32 if self.dtype == np.float32 and sk.fn32 is not None else sk.fn
        copying = sk.copy32 if self.dtype == np.float32 else None
        jit.submit(lambda: self._compile_fused(kernel, copying))
        return None

    def _compile_fused(self, kernel, copying) -> None:
        n = len(self.comp.slots)
        c = np.full(self.comp.c_len, 0.5, self.dtype)
        buf = np.empty(4, self.dtype)
        for stats, fn in (("fused", kernel), ("copy", copying)):
            if fn is None:
                continue
            try:
                driver = _driver(n, self.kind, stats)
                for writeable in (True, False):
                    a = [np.zeros(4, self.dtype) for _ in range(1 + n)]
                    g = np.zeros(4, np.uint16)
                    g.flags.writeable = writeable
                    src = [np.zeros(4, self.dtype) for _ in range(1 + n)] if stats == "copy" else []
                    driver(fn, a[0], g, *a[1:], c, buf, self.zero, np.zeros(4), *src)
            except Exception as e:  # the float64 driver (or copying first) stays: same update, same figures
                jit.log.info("optimizer %s: widening with %s statistics unavailable (%s: %s)",
                                     self.defn.name, stats, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                return
            if stats == "fused":
                self.fused = (driver, fn)
            else:
                self.copying = (driver, fn)

    def buffers(self) -> tuple[np.ndarray, np.ndarray]:
        """Per thread: the widened block, and (statistics) a copy of p's block before the update."""
        bufs = getattr(self.local, "bufs", None)
        if bufs is None:
            bufs = self.local.bufs = (np.empty(WIDEN_BLOCK, self.dtype), np.empty(WIDEN_BLOCK, self.dtype))
        return bufs

    def __call__(self, p, gbits, slots, consts, acc=None, src=None) -> None:
        """Update flat contiguous `p` and `slots` with the gradient given as its bits (uint16); with
        `acc` (float64[4]) add [sum g^2, sum p_new^2, sum (p_new - p_old)^2] and fold max |g| in.
        `src`: [p's source, the slots' sources] to compute them from (kernels.apply(src=))."""
        buf, old = self.buffers()
        fused = None if acc is None else self._fused()
        if src is not None and fused is not None and self.copying is not None:
            m = self.copying[0](self.copying[1], p, gbits, *slots, consts, buf, self.zero, acc, *src)
        else:
            if src is not None:
                for dst, values in zip([p, *slots], src):
                    np.copyto(dst, values)
            if acc is None:
                self.driver(self.comp.fn, p, gbits, *slots, consts, buf)
                return
            if fused is not None:
                m = fused[0](fused[1], p, gbits, *slots, consts, buf, self.zero, acc)
            else:
                m = self.stats_driver(self.comp.fn, p, gbits, *slots, consts, buf, buf.view(self.ubits),
                                      self.mask, old, acc)
        kernelstats._fold_max(m, self.dtype, acc)


def lookup(defn, master: np.dtype, grad: np.dtype) -> Widening | None:
    """The widening driver of `defn` for these dtypes; None (widen with numpy) when there is none or it
    is not compiled yet (its compile is then queued)."""
    kind = kind_of(grad)
    if kind is None or master.str not in DTYPES:
        return None
    key = (id(defn), master.str, kind)
    hit = _ready.get(key)
    if hit is not None and hit[0] is defn:
        return hit[1]
    comp = jit.lookup(defn, master)
    if comp is None:
        return None
    with _lock:
        known = _state.get(key)
        if known is not None and known[0] is defn:
            return None
        _state[key] = (defn, "pending")
    jit.submit(lambda: _compile(defn, comp, master, kind, key))
    return None


def _compile(defn, comp, master: np.dtype, kind: str, key) -> None:
    try:
        w = Widening(defn, comp, kind, _driver(len(comp.slots), kind), _driver(len(comp.slots), kind, stats=True),
                     master)
        c = np.full(comp.c_len, 0.5, master)
        for writeable in (True, False):  # wire bytes are read-only, shared memory is not
            for acc in (None, np.zeros(4)):
                a = [np.zeros(4, master) for _ in range(1 + len(comp.slots))]
                g = np.zeros(4, np.uint16)
                g.flags.writeable = writeable
                w(a[0], g, a[1:], c, acc)
    except Exception as e:  # never break a step: numpy's widening gives the same numbers
        jit.log.warning("optimizer %s: widening kernel for %s gradients unavailable (%s: %s); "
                                "widening with numpy", defn.name, kind, type(e).__name__,
                                str(e).splitlines()[0] if str(e) else "")
        with _lock:
            _state[key] = (defn, "failed")
        return
    with _lock:
        _ready[key] = (defn, w)
        _state[key] = (defn, "ready")


def status(defn, master: np.dtype, grad: np.dtype) -> str | None:
    kind = kind_of(grad)
    known = _state.get((id(defn), master.str, kind))
    return known[1] if known is not None and known[0] is defn else None
