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

Statistics (`kernels.apply(..., stats=)`): see "statistics" below; the kernel's
loop is rewritten to add each element's terms, or run over small blocks.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import types
from dataclasses import dataclass

import numpy as np

log = logging.getLogger("optreg.server")

try:  # pragma: no cover - exercised by whichever environment runs
    import numba
except ImportError:  # pragma: no cover
    numba = None

DTYPES = ("<f4", "<f8")
# Below this many elements the kernels keep the GIL: releasing and taking back the GIL on a busy
# gRPC server costs a thread hand-off, measured at tens of microseconds, many times the kernel itself.
HOLD_GIL_BELOW = 1 << 15
# Elements per block of the statistics driver: the copy of p, the kernel and the sums over one
# block stay in L1 (measured best between 128 and 256 at 1e7 float32).
STATS_BLOCK = 256


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


def _start_worker() -> None:
    global _worker
    with _lock:
        if _worker is None:
            _worker = threading.Thread(target=_work, name="optreg-jit", daemon=True)
            _worker.start()


def _cache_ok() -> bool:
    return not os.environ.get("OPTREG_NO_JIT_CACHE")


def _jit(pyfunc, nogil: bool, **options):
    """numba.njit with the on-disk cache when it can be used (numba refuses some locations)."""
    if _cache_ok():
        try:
            return numba.njit(nogil=nogil, cache=True, **options)(pyfunc)
        except Exception:  # no writable cache location for this module: compile every start
            pass
    return numba.njit(nogil=nogil, **options)(pyfunc)


def _renamed(fn, suffix: str):
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
        held = _jit(_renamed(pyfunc, "__optreg_held"), False, error_model="numpy")
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
    comp = lookup(defn, np.dtype(DTYPES[0]))
    if comp is not None:
        stats_kernel(defn, comp)


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


# ---- statistics -----------------------------------------------------------------
#
# Two ways to compute [sum g^2, sum p_new^2, sum (p_new - p_old)^2, max |g|] in the update's pass:
#
# fused: the kernel's own loop, rewritten (its AST) to keep p[i] before the body and to add
#   the element's terms after it. The sums go through `_accumulate`, compiled separately with
#   reassociation allowed: LLVM inlines it and keeps its flags, so the sums vectorize while the
#   kernel's own operations keep theirs (bits unchanged). max |g| is an integer max over the
#   bits of g with the sign cleared (a float max stops the loop vectorizing).
#   Measured (Adam 1e7 float32, 2 threads, CPU time): 1.17x the kernel alone.
# driver: for kernels the rewrite does not fit (several loops, break/continue, closures): the
#   kernel over blocks of STATS_BLOCK elements, each block of p copied first, then the sums over
#   the block while it is in L1. Measured 1.4x.

def _accumulate(s0, s1, s2, gi, old, new):
    g = np.float64(gi)
    n = np.float64(new)
    d = n - np.float64(old)
    return s0 + g * g, s1 + n * n, s2 + d * d


def stats_loop(new, old, g, acc):
    """acc[:3] += [sum g^2, sum new^2, sum (new - old)^2] in float64 (the driver's sums)."""
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    for i in range(new.size):
        gi = np.float64(g[i])
        ni = np.float64(new[i])
        d = ni - np.float64(old[i])
        s0 += gi * gi
        s1 += ni * ni
        s2 += d * d
    acc[0] += s0
    acc[1] += s1
    acc[2] += s2


def _abs_bits_max(bits, mask, m):
    for i in range(bits.size):
        e = bits[i] & mask
        if e > m:
            m = e
    return m


# Reassociation lets the sums vectorize; they are statistics, not the update. No nnan/ninf:
# a NaN in a sum must stay NaN.
_SUM_MATH = {"reassoc", "contract", "nsz"}
_helpers: dict = {}


def _helper(name):
    with _lock:
        if not _helpers:
            _helpers["accumulate"] = numba.njit(fastmath=_SUM_MATH, error_model="numpy")(_accumulate)
            _helpers["stats_loop"] = numba.njit(nogil=True, fastmath=_SUM_MATH, error_model="numpy")(stats_loop)
            _helpers["abs_bits_max"] = numba.njit(nogil=True)(_abs_bits_max)
        return _helpers[name]


_P = "_optreg_"  # prefix of every name the rewrite adds


def fused_stats_source(kernel) -> str | None:
    """The source of `kernel` rewritten to also return its statistics, or None when its shape does
    not allow it: one `for` loop, directly in the body, without break, continue or return inside;
    no closure; no nested functions. The rewritten function takes three more arguments
    (acc: float64[4], gbits: g viewed as unsigned ints, mask) and returns max |g| as bits."""
    import ast
    import inspect
    import textwrap

    if getattr(kernel, "__closure__", None):
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(kernel)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return None
    fdef = tree.body[0]
    args = fdef.args
    if args.vararg or args.kwonlyargs or args.kwarg or len(args.args) < 3 or args.defaults:
        return None
    nodes = list(ast.walk(fdef))
    loops = [n for n in nodes if isinstance(n, (ast.For, ast.While, ast.AsyncFor, ast.comprehension))]
    if (len(loops) != 1 or not isinstance(loops[0], ast.For) or loops[0] not in fdef.body
            or not isinstance(loops[0].target, ast.Name) or loops[0].orelse):
        return None
    if any(isinstance(n, (ast.Break, ast.Continue, ast.Return, ast.Yield, ast.YieldFrom, ast.Lambda,
                          ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Global, ast.Nonlocal))
           for n in nodes if n is not fdef):
        return None
    if any(isinstance(n, ast.Name) and n.id.startswith(_P) for n in nodes):
        return None
    loop = loops[0]
    p, g, i = args.args[0].arg, args.args[1].arg, loop.target.id
    stmts = lambda src: ast.parse(textwrap.dedent(src)).body  # noqa: E731
    loop.body = stmts(f"{_P}old = {p}[{i}]") + loop.body + stmts(f"""
        {_P}s0, {_P}s1, {_P}s2 = {_P}accumulate({_P}s0, {_P}s1, {_P}s2, {g}[{i}], {_P}old, {p}[{i}])
        {_P}b = {_P}gbits[{i}] & {_P}mask
        if {_P}b > {_P}mx:
            {_P}mx = {_P}b
    """)
    at = fdef.body.index(loop)
    fdef.body[at:at + 1] = stmts(f"""
        {_P}s0 = 0.0
        {_P}s1 = 0.0
        {_P}s2 = 0.0
        {_P}mx = {_P}gbits.dtype.type(0)
    """) + [loop] + stmts(f"""
        {_P}acc[0] += {_P}s0
        {_P}acc[1] += {_P}s1
        {_P}acc[2] += {_P}s2
    """)
    fdef.body += stmts(f"return {_P}mx")
    fdef.args.args += [ast.arg(f"{_P}acc"), ast.arg(f"{_P}gbits"), ast.arg(f"{_P}mask")]
    fdef.decorator_list = []
    fdef.name = f"{fdef.name}{_P}stats"
    return ast.unparse(ast.fix_missing_locations(tree))


_DRIVER_SOURCE = """
def drive(kernel, p, g, gbits, mask, {slots}c, old, acc, block):
    n = p.size
    m = gbits.dtype.type(0)
    for a in range(0, n, block):
        b = min(a + block, n)
        o = old[:b - a]
        for i in range(b - a):
            o[i] = p[a + i]
        kernel(p[a:b], g[a:b], {sliced}c)
        stats_loop(p[a:b], o, g[a:b], acc)
        m = abs_bits_max(gbits[a:b], mask, m)
    return m
"""
_drivers: dict = {}  # (slot count, nogil) -> numba dispatcher taking the kernel as its first argument


def _driver(nslots: int, nogil: bool):
    key = (nslots, nogil)
    with _lock:
        d = _drivers.get(key)
    if d is None:
        slots = "".join(f"s{i}, " for i in range(nslots))
        sliced = "".join(f"s{i}[a:b], " for i in range(nslots))
        ns = {"stats_loop": _helper("stats_loop"), "abs_bits_max": _helper("abs_bits_max"), "min": min}
        exec(_DRIVER_SOURCE.format(slots=slots, sliced=sliced), ns)  # noqa: S102 - a fixed template
        with _lock:
            d = _drivers.setdefault(key, numba.njit(nogil=nogil, error_model="numpy")(ns["drive"]))
    return d


_SIGN_CLEARED = {"<f4": ("<u4", 0x7FFFFFFF), "<f8": ("<u8", 0x7FFFFFFFFFFFFFFF)}


@dataclass
class StatsKernel:
    """A kernel that also computes the statistics (fused into its loop, or the block driver)."""
    fused: bool
    fn: object  # releases the GIL
    held: object  # keeps it
    kernel: Compiled

    def __call__(self, nogil: bool, p, g, slots, consts, acc, old=None) -> None:
        """Update the flat contiguous slices `p`, `slots` with `g`; acc[:3] += sums, acc[3] = max.
        `old`: a work array of STATS_BLOCK elements like p (the driver only)."""
        ubits, mask = _SIGN_CLEARED[p.dtype.str]
        gbits = g.view(ubits)
        mask = gbits.dtype.type(mask)
        if self.fused:
            m = (self.fn if nogil else self.held)(p, g, *slots, consts, acc, gbits, mask)
        else:
            kern = self.kernel.fn if nogil else self.kernel.held
            m = (self.fn if nogil else self.held)(kern, p, g, gbits, mask, *slots, consts, old, acc, STATS_BLOCK)
        acc[3] = max(acc[3], float(np.array(m, gbits.dtype).view(p.dtype)))


_stats_ready: dict = {}  # id(definition) -> (definition, StatsKernel)
_stats_state: dict = {}  # id(definition) -> (definition, "pending" | "fused" | "driver" | "failed")


def stats_kernel(defn, comp: Compiled) -> StatsKernel | None:
    """`defn`'s kernel with statistics, or None while it compiles (queued on first request) or if it failed."""
    hit = _stats_ready.get(id(defn))
    if hit is not None and hit[0] is defn:
        return hit[1]
    with _lock:
        known = _stats_state.get(id(defn))
        if known is not None and known[0] is defn:
            return None
        _stats_state[id(defn)] = (defn, "pending")
    _jobs.put(("stats", defn, comp))
    _start_worker()
    return None


def stats_status(defn) -> str | None:
    """'pending', 'fused', 'driver' or 'failed' once statistics were requested for `defn`."""
    known = _stats_state.get(id(defn))
    return known[1] if known is not None and known[0] is defn else None


def _source_file(source: str) -> str | None:
    """The rewritten kernel written to a file named by its hash, so numba can cache its compiled code
    on disk like a module's (a compile costs ~0.5 s per dtype and build); None when nowhere is writable."""
    import hashlib
    import inspect
    import tempfile

    if not _cache_ok():
        return None
    # _accumulate's code is part of the compiled result: a change to it must change the file.
    digest = hashlib.sha256((source + inspect.getsource(_accumulate)).encode()).hexdigest()[:20]
    base = os.environ.get("NUMBA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache")
    folder = os.path.join(base, "optreg", "stats-kernels")
    path = os.path.join(folder, f"stats_{digest}.py")
    try:
        if not os.path.exists(path):
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                f.write(source)
            os.replace(tmp, path)  # atomic: another process may be writing the same file
        return path
    except OSError:
        return None


def _try_build(defn, comp: Compiled, fused: bool) -> StatsKernel:
    n = len(comp.slots)
    if fused:
        source = fused_stats_source(comp.kernel)
        if source is None:
            raise LookupError("its kernel's shape does not allow the fused rewrite")
        path = _source_file(source)
        ns = dict(comp.kernel.__globals__)
        ns[f"{_P}accumulate"] = _helper("accumulate")
        exec(compile(source, path or f"<{defn.name} kernel with statistics>", "exec"), ns)  # noqa: S102
        pyfunc = ns[f"{comp.kernel.__name__}{_P}stats"]
        options = dict(error_model="numpy", cache=path is not None)
        sk = StatsKernel(True, numba.njit(nogil=True, **options)(pyfunc),
                         numba.njit(**options)(_renamed(pyfunc, "__optreg_held")), comp)
    else:
        sk = StatsKernel(False, _driver(n, True), _driver(n, False), comp)
    c_len = len(defn.kernel_scalars(defn.resolve({}), 1))
    for dt in DTYPES:
        for nogil in (True, False):
            a = [np.zeros(4, dt) for _ in range(2 + n)]
            c, acc, old = np.full(c_len, 0.5, dt), np.zeros(4), np.zeros(STATS_BLOCK, dt)
            sk(nogil, a[0], a[1], a[2:], c, acc, old)
            a[1].flags.writeable = False
            sk(nogil, a[0], a[1], a[2:], c, acc, old)
    return sk


def _compile_stats(defn, comp: Compiled) -> None:
    sk, why = None, ""
    for fused in (True, False):
        try:
            sk = _try_build(defn, comp, fused)
            break
        except Exception as e:
            why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if fused and not isinstance(e, LookupError):
                log.info("optimizer %s: statistics fused into its kernel do not compile (%s); using blocks",
                         defn.name, why)
    with _lock:
        if sk is None:
            log.warning("optimizer %s: statistics kernel unavailable (%s); using numpy for statistics",
                        defn.name, why)
            _stats_state[id(defn)] = (defn, "failed")
            return
        _stats_ready[id(defn)] = (defn, sk)
        _stats_state[id(defn)] = (defn, "fused" if sk.fused else "driver")


def _work() -> None:
    while True:
        job = _jobs.get()
        try:
            if isinstance(job, threading.Event):  # a marker: everything queued before it is done
                job.set()
            elif job == "finite":
                _compile_finite()
            elif isinstance(job, tuple) and job[0] == "stats":
                _compile_stats(job[1], job[2])
            elif callable(job):
                job()
            else:
                _compile_definition(job)
        except Exception:  # pragma: no cover - _compile_* contain their own failures
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


def _compile_finite() -> None:
    try:
        finite = []
        for nogil in (True, False):
            fin = _jit(_exponent_max if nogil else _renamed(_exponent_max, "__optreg_held"), nogil)
            for bits, mask in _FINITE_MASKS.values():
                a = np.zeros(4, bits)
                fin(a, a.dtype.type(mask))
                a.flags.writeable = False
                fin(a, a.dtype.type(mask))
            finite.append(fin)
        _FINITE[:] = finite  # both at once: steps may run while this thread compiles
    except Exception as e:  # a broken numba must never break the server
        log.warning("numba finite check unavailable (%s: %s); using numpy", type(e).__name__, e)


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
