"""Statistics in the update pass: the kernels of fastkernels.py, also summing, per tensor,
[sum g^2, sum p_new^2, sum (p_new - p_old)^2, max |g|] in float64 (kernels.apply(stats=)).

Two ways, both leaving the update's bits as the kernel alone gives them:

fused: the kernel's own loop, rewritten (its AST) to keep p[i] before the body and to add
  the element's terms after it. The sums go through `_accumulate`, compiled separately with
  reassociation allowed: LLVM inlines it and keeps its flags, so the sums vectorize while the
  kernel's own operations keep theirs. max |g| is an integer max over the bits of g with the
  sign cleared (a float max stops the loop vectorizing). The rewritten source is written to a
  file named by its hash so numba caches its compiled code on disk.
driver: for kernels the rewrite does not fit (several loops, break/continue, closures): the
  kernel over blocks of STATS_BLOCK elements, each block of p copied first, then the sums over
  the block while it is in L1.

Measured (Adam 1e7 float32, 2 threads, CPU time of the calling thread, a loaded 2-core
machine): fused ~1.15-1.2x the kernel alone, driver ~1.4x. The floor is arithmetic: three
float32->float64 conversions and three float64 multiply-adds per element, which also halve
the loop's vector width (LLVM picks it from the widest type); the kernel alone is memory-bound
but these do not hide behind its stalls.
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from optreg.server.fastkernels import DTYPES, Compiled, disk_cache_ok, log, numba, renamed, submit

# Elements per block of the statistics driver: the copy of p, the kernel and the sums over one
# block stay in L1 (measured best between 128 and 256 at 1e7 float32).
STATS_BLOCK = 256
_lock = threading.Lock()

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
    submit(lambda: _compile_stats(defn, comp))
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

    if not disk_cache_ok():
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
                         numba.njit(**options)(renamed(pyfunc, "__optreg_held")), comp)
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
