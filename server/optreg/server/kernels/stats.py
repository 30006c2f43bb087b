"""Statistics in the update pass: the kernels of kernels/jit.py, also summing, per tensor,
[sum g^2, sum p_new^2, sum (p_new - p_old)^2, max |g|] in float64 (kernels.apply(stats=)).

Two ways, both leaving the update's bits as the kernel alone gives them:

fused: the kernel's own loop, rewritten (its AST) to read p[i] and g[i] before the body (the body's
  reads of p[i] before its store use that value; LLVM then shares g's load and g*g with the kernel's
  own) and to add the element's terms after it. The sums go through `_accumulate`, compiled
  separately with reassociation allowed: LLVM inlines it and keeps its flags, so the sums vectorize
  while the kernel's own operations keep theirs. max |g| is an unsigned max over the bits of |g| in
  the float's own width (kernels/bits.py: numba's integer max ran in 64-bit lanes and, in the kernel's
  loop, kept it from vectorizing); its NaN or Inf marks a non-finite gradient (steps/run.py StepRun.feed).
  The rewritten source is written to a file named by its hash so numba caches its compiled code.
  For float32 arrays a second rewrite runs the loop over blocks of BLOCK32 elements with float32
  sums (`_accumulate32`, range and error bound beside it) folded into float64 after each block:
  float64 sums made LLVM halve the whole loop's vector width (sqrt and division included).
  Variants without max |g| (`max_term=False`) serve callers whose finite check measured it already
  (kernels/finite.py abs_max, the check's own reduction; resident steps).
driver: for kernels the rewrite does not fit (several loops, break/continue, closures): the
  kernel over blocks of STATS_BLOCK elements, each block of p copied first, then the sums over
  the block while it is in L1.

What each choice cost and what was tried instead: docs/speed.md, "Kernel notes".
"""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from optreg.server.kernels import bits as bitops
from optreg.server.kernels.jit import DTYPES, Compiled, available, disk_cache_ok, log, njit, numba, renamed, submit

# Elements per block of the statistics driver: the copy of p, the kernel and the sums over one
# block stay in L1 (measured best between 128 and 256 at 1e7 float32).
STATS_BLOCK = 256
# Elements per block of a float32 kernel's fused sums (float32 within a block, float64 across):
# a block's relative error is at most about (BLOCK32 + 2) * 2^-24 (3.1e-5), typically far less;
# blocks of 2048 measured no faster.
BLOCK32 = 512
_lock = threading.Lock()

def _accumulate(s0, s1, s2, gi, old, new):
    g = np.float64(gi)
    n = np.float64(new)
    d = n - np.float64(old)
    return s0 + g * g, s1 + n * n, s2 + d * d


# The blocked sums of a float32 kernel are float32, so the loop keeps float32's vector width
# (a float64 sum makes LLVM pick float64's, which halves the width of the kernel's own sqrt and
# division); each block's sums then go into float64. A term x^2 is a normal float32 for |x| from
# 2^-63 to 2^64. A block of g or new p whose float32 sum left that range (an overflow, or every
# element tiny or zero) is summed again in float64 from the arrays, so those figures hold for
# every float32; the old values are gone by then, so the update's sum is +inf when an element's
# update exceeds 2^64 (1.8e19; float64 would give a finite number) and counts 0 for a block
# whose every update is below 2^-63 (1e-19). Within range each block's sum is within about
# (BLOCK32 + 2) * 2^-24 of float64's (a recursive float32 sum of non-negative terms).
# The update d = new - old is computed in the kernel's loop, outside this function: with
# reassociation allowed on that subtraction LLVM folded (old - x) - old into -x, the unrounded step.
def _accumulate32(a0, a1, a2, gi, d, new):
    return a0 + gi * gi, a1 + new * new, a2 + d * d


def _fold32(s, block_sum, x):
    """s + the float32 block sum of x squared, or x's sum in float64 where it left float32's range."""
    if block_sum >= 8.673617379884035e-19 and block_sum < np.inf:  # 2^-60: any lost subnormal is negligible
        return s + np.float64(block_sum)
    t = 0.0
    for i in range(x.size):
        xi = np.float64(x[i])
        t += xi * xi
    return s + t


def _fold32_update(s, block_sum):
    return s + np.float64(block_sum)


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
            _helpers["abs_bits_max"] = numba.njit(nogil=True)(_abs_bits_max)  # the driver's
            _helpers["accumulate32"] = numba.njit(fastmath=_SUM_MATH, error_model="numpy")(_accumulate32)
            _helpers["fold32"] = numba.njit(error_model="numpy")(_fold32)
            _helpers["fold32_update"] = numba.njit(error_model="numpy")(_fold32_update)
        return _helpers[name]


_P = "_optreg_"  # prefix of every name the rewrite adds


def fused_stats_source(kernel, blocked: bool = False, max_term: bool = True, copy: bool = False) -> str | None:
    """The source of `kernel` rewritten to also return its statistics, or None when its shape does
    not allow it: one `for` loop, directly in the body, without break, continue or return inside;
    no closure; no nested functions. The rewritten function takes one more argument (acc: float64[4])
    and returns max |g| as the bits of a float of g's width (kernels/bits.py abs_bits).
    `max_term=False`: without max |g| (the caller has it from its finite check); returns 0.
    `blocked` (for float32 arrays; the loop must be `for i in range(n)`): the loop split into blocks
    of BLOCK32 elements whose sums are float32 (`_accumulate32`), each block's folded into float64.
    `copy` (blocked only): the function takes, after acc, one source array per written array (p, then
    the slots) and copies each block from them before updating it, so p and the slots are computed
    from the sources and their own contents are never read (kernels.apply(src=))."""
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
    if copy and not blocked:
        return None
    if blocked:
        it = loop.iter
        if not (isinstance(it, ast.Call) and isinstance(it.func, ast.Name) and it.func.id == "range"
                and len(it.args) == 1 and not it.keywords):
            return None
        return _blocked_source(tree, fdef, loop, p, g, i, stmts, max_term, copy)
    loop.body = stmts(f"{_P}old = {p}[{i}]\n{_P}gq = {g}[{i}]") + _reads_as_old(loop.body, p, i) + stmts(f"""
        {_P}s0, {_P}s1, {_P}s2 = {_P}accumulate({_P}s0, {_P}s1, {_P}s2, {_P}gq, {_P}old, {p}[{i}])
    """) + stmts(_max_line(max_term))
    return _finish(tree, fdef, loop, [loop], stmts, "stats" + _nomax(max_term), g)


def _reads_as_old(body: list, p: str, i: str) -> list:
    """The loop's statements with each read of p[i] before the first store into p replaced by the
    value read before the body: LLVM reads p again after the kernel's stores into its slots (it cannot
    tell they are other arrays), a second load an element the kernel alone does not make."""
    import ast

    def stores_p(node) -> bool:
        return any(isinstance(n, ast.Subscript) and isinstance(n.value, ast.Name) and n.value.id == p
                   and not isinstance(n.ctx, ast.Load) for n in ast.walk(node))

    class Old(ast.NodeTransformer):
        def visit_Subscript(self, node):
            if (isinstance(node.ctx, ast.Load) and isinstance(node.value, ast.Name) and node.value.id == p
                    and isinstance(node.slice, ast.Name) and node.slice.id == i):
                return ast.Name(f"{_P}old", ast.Load())
            return self.generic_visit(node)

    if any(isinstance(n, ast.Name) and n.id == i and not isinstance(n.ctx, ast.Load)
           for st in body for n in ast.walk(st)):
        return body  # the body moves i: its p[i] may be another element
    out = []
    for at, st in enumerate(body):
        if not stores_p(st):
            out.append(Old().visit(st))
            continue
        if isinstance(st, ast.Assign) and not stores_p(st.value):  # its value is read before the store
            st.value = Old().visit(st.value)
        return out + [st] + body[at + 1:]
    return out


def _max_line(max_term: bool) -> str:
    # An unsigned max over the bits of |g| (kernels/bits.py): a float max, or numba's own integer max (done in
    # 64-bit lanes), kept LLVM from vectorizing the kernel's loop.
    return f"{_P}mx = {_P}umax({_P}mx, {_P}abs_bits({_P}gq))\n" if max_term else ""


def _nomax(max_term: bool) -> str:
    return "" if max_term else "_nomax"


def _finish(tree, fdef, loop, replacement: list, stmts, suffix: str, g: str, setup: str = "",
            sources: tuple = ()) -> str:
    """Put `replacement` where `loop` was, between the sums' set-up and their store into acc, and
    give the function its extra argument, max |g|'s return and a new name."""
    import ast

    at = fdef.body.index(loop)
    fdef.body[at:at + 1] = stmts(setup + f"""
{_P}s0 = 0.0
{_P}s1 = 0.0
{_P}s2 = 0.0
{_P}zero = {g}.dtype.type(0)
{_P}mx = {_P}abs_bits({_P}zero)
""") + replacement + stmts(f"""
        {_P}acc[0] += {_P}s0
        {_P}acc[1] += {_P}s1
        {_P}acc[2] += {_P}s2
        return {_P}mx
    """)
    fdef.args.args += [ast.arg(f"{_P}acc")] + [ast.arg(a) for a in sources]
    fdef.decorator_list = []
    fdef.name = f"{fdef.name}{_P}{suffix}"
    return ast.unparse(ast.fix_missing_locations(tree))


def _blocked_source(tree, fdef, loop, p, g, i, stmts, max_term: bool = True, copy: bool = False) -> str | None:
    """The loop run over blocks; within a block it walks slices of the arrays from 0 (LLVM
    vectorizes that loop; one running from the block's start it left scalar)."""
    import ast

    arrays = [a.arg for a in fdef.args.args[:-1]]  # p, g, the slots; the last argument is the scalars
    if any(isinstance(n, ast.Name) and n.id in arrays and not isinstance(n.ctx, ast.Load)
           for n in ast.walk(loop)):
        return None  # the loop rebinds an array's name

    class Sliced(ast.NodeTransformer):
        def visit_Name(self, node):
            return ast.Name(f"{_P}{node.id}", node.ctx) if node.id in arrays else node

    body = [Sliced().visit(st) for st in _reads_as_old(loop.body, p, i)]
    total = ast.unparse(loop.iter.args[0])
    sums = ", ".join(f"{_P}a{j}" for j in range(3))
    sp, sg = f"{_P}{p}", f"{_P}{g}"
    # g[i] is read before the kernel's body: LLVM then shares the load (and g*g) with the kernel's own.
    inner = ast.For(target=ast.Name(i, ast.Store()), iter=ast.parse(
        f"range({_P}e - {_P}a)", mode="eval").body, orelse=[],
        body=stmts(f"{_P}old = {sp}[{i}]\n{_P}gq = {sg}[{i}]") + body + stmts(f"""
            {_P}d = {sp}[{i}] - {_P}old
            {sums} = {_P}accumulate32({sums}, {_P}gq, {_P}d, {sp}[{i}])
        """) + stmts(_max_line(max_term)))
    outer = stmts(f"""
for {_P}a in range(0, {_P}n, {BLOCK32}):
    {sums} = {_P}zero32, {_P}zero32, {_P}zero32
    {_P}e = min({_P}a + {BLOCK32}, {_P}n)
    {_P}s1 = {_P}fold32({_P}s1, {_P}a1, {sp})
    {_P}s2 = {_P}fold32_update({_P}s2, {_P}a2)
    {_P}s0 = {_P}fold32({_P}s0, {_P}a0, {sg})""")[0]
    outer.body[2:2] = stmts("\n".join(f"{_P}{x} = {x}[{_P}a:{_P}e]" for x in arrays)) + [inner]
    written = [x for x in arrays if x != g]
    if copy:  # each block copied in from its source just before the update: it is in L1 when read
        at = outer.body.index(inner)
        outer.body[at:at] = stmts("\n".join(f"""
for {_P}k in range({_P}e - {_P}a):
    {_P}{x}[{_P}k] = {_P}from_{x}[{_P}a + {_P}k]""" for x in written))
    return _finish(tree, fdef, loop, [outer], stmts, "stats32" + _nomax(max_term) + ("_copy" if copy else ""), g,
                   setup=f"{_P}n = {total}", sources=tuple(f"{_P}from_{x}" for x in written) if copy else ())


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
    fn32: object = None  # fused with float32 block sums, for float32 arrays (None: fn serves them too)
    held32: object = None
    nomax: object = None  # fused, releasing the GIL, without max |g| (max_known)
    nomax32: object = None
    copy32: object = None  # fn32 copying each block in from the sources first (src=)
    copy32_nomax: object = None

    def __call__(self, nogil: bool, p, g, slots, consts, acc, old=None, max_known: bool = False,
                 src=None) -> None:
        """Update the flat contiguous slices `p`, `slots` with `g`; acc[:3] += sums, acc[3] = max.
        `old`: a work array of STATS_BLOCK elements like p (the driver only). `max_known`: the caller
        has max |g| already (finite.abs_max) and sets acc[3] itself afterwards; then a variant
        without it runs where there is one. `src`: [p's source, the slots' sources] (kernels.apply(src=)):
        p and the slots are computed from these, copied in block by block inside the pass by the
        copying variants, else before it."""
        f32 = self.fn32 is not None and p.dtype == np.float32
        if src is not None:
            copying = (self.copy32_nomax if max_known else self.copy32) if f32 and nogil else None
            if copying is not None:
                m = copying(p, g, *slots, consts, acc, *src)
                if not max_known:
                    _fold_max(m, p.dtype, acc)
                return
            for dst, s in zip([p, *slots], src):
                np.copyto(dst, s)
        if max_known and nogil and self.nomax is not None:
            (self.nomax32 if f32 else self.nomax)(p, g, *slots, consts, acc)
            return
        if self.fused:
            m = ((self.fn32 if nogil else self.held32) if f32 else (self.fn if nogil else self.held))(
                p, g, *slots, consts, acc)
        else:
            ubits, mask = _SIGN_CLEARED[p.dtype.str]
            gbits = g.view(ubits)
            kern = self.kernel.fn if nogil else self.kernel.held
            m = (self.fn if nogil else self.held)(kern, p, g, gbits, gbits.dtype.type(mask), *slots, consts, old,
                                                  acc, STATS_BLOCK)
        _fold_max(m, p.dtype, acc)


def _fold_max(m, dtype, acc) -> None:
    """acc[3] = max(acc[3], the float whose sign-cleared bits are m), keeping a NaN (Python's max
    would keep acc[3]): it marks a non-finite g."""
    top = float(np.array(m, _SIGN_CLEARED[dtype.str][0]).view(dtype))
    if acc[3] == acc[3] and not top <= acc[3]:  # a NaN, in either, stays
        acc[3] = top


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
    helpers = "".join(inspect.getsource(f) for f in (_accumulate, _accumulate32, _fold32, _fold32_update, bitops))
    # numba's cached code names the helpers' modules: a renamed module must not load the old entries.
    digest = hashlib.sha256((source + helpers + __name__ + bitops.__name__).encode()).hexdigest()[:20]
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
        if fused_stats_source(comp.kernel) is None:
            raise LookupError("its kernel's shape does not allow the fused rewrite")
        builds = {}
        for blocked, copy in ((False, False), (True, False), (True, True)):
            for max_term in (True, False):
                src = fused_stats_source(comp.kernel, blocked=blocked, max_term=max_term, copy=copy)
                if src is None:
                    continue
                pyfunc = _define(defn, comp, src)
                options = dict(error_model="numpy", cache=_source_file(src) is not None)
                builds[blocked, max_term, True, copy] = numba.njit(nogil=True, **options)(pyfunc)
                if max_term and not copy:  # small tensors keep the GIL; they never skip the max
                    builds[blocked, max_term, False, copy] = numba.njit(**options)(
                        renamed(pyfunc, "__optreg_held"))
        b = builds.get
        sk = StatsKernel(True, b((False, True, True, False)), b((False, True, False, False)), comp,
                         b((True, True, True, False)), b((True, True, False, False)), b((False, False, True, False)),
                         b((True, False, True, False)), b((True, True, True, True)), b((True, False, True, True)))
    else:
        sk = StatsKernel(False, _driver(n, True), _driver(n, False), comp)
    c_len = comp.c_len
    for dt in DTYPES:
        for nogil, max_known in ((True, False), (False, False), (True, True)):
            a = [np.zeros(4, dt) for _ in range(2 + n)]
            c, acc, old = np.full(c_len, 0.5, dt), np.zeros(4), np.zeros(STATS_BLOCK, dt)
            src = [np.zeros(4, dt) for _ in range(1 + n)]  # the copying variants' (a live set's arrays)
            for writeable in (True, False):  # gradients may view read-only wire bytes
                a[1].flags.writeable = writeable
                sk(nogil, a[0], a[1], a[2:], c, acc, old, max_known)
                if nogil:
                    sk(nogil, a[0], a[1], a[2:], c, acc, old, max_known, src)
    return sk


def _define(defn, comp: Compiled, src: str):
    """The rewritten kernel's Python function, compiled from its cached file when there is one."""
    path = _source_file(src)
    ns = dict(comp.kernel.__globals__)
    ns.update({f"{_P}accumulate": _helper("accumulate"), f"{_P}accumulate32": _helper("accumulate32"),
               f"{_P}fold32": _helper("fold32"), f"{_P}fold32_update": _helper("fold32_update"),
               f"{_P}abs_bits": bitops.abs_bits, f"{_P}umax": bitops.umax, f"{_P}zero32": np.float32(0),
               "min": min})
    exec(compile(src, path or f"<{defn.name} kernel with statistics>", "exec"), ns)  # noqa: S102
    return ns[src.split("def ", 1)[1].split("(", 1)[0]]


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


# ---- a small tensor's statistics, after its update (the update pass's statistics pay a setup per call) ----

def tensor_stats(grad: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The four sums of one tensor in float64: one compiled pass when numba has built it (a small step
    would otherwise spend more on numpy's temporaries and reductions than on its update), else numpy."""
    g, o, n = grad, old, new
    if not (type(g) is type(o) is type(n) is np.ndarray and g.ndim == o.ndim == n.ndim == 1):
        g, o, n = np.asarray(g).reshape(-1), np.asarray(o).reshape(-1), np.asarray(n).reshape(-1)
    dt = g.dtype
    fast = _SUMS.get(dt.str) if dt is o.dtype is n.dtype or dt == o.dtype == n.dtype else None
    if fast is not None and g.size:
        out = np.empty(4)
        fast(n, o, g, out)  # all four, max |g| included: no reductions or temporaries of numpy's
        return out
    if _SUMS_STATE == "idle":
        _build_sums()
    return reference_stats(g, o, n)


def small_sums(new, old, g, out):
    """out[:] = [sum g^2, sum new^2, sum (new - old)^2, max |g|] in float64, one pass (compiled by
    _build_sums; plain Python here). max |g| propagates NaN as numpy's max does."""
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    top = 0.0
    for i in range(new.size):
        gi = np.float64(g[i])
        ni = np.float64(new[i])
        d = ni - np.float64(old[i])
        s0 += gi * gi
        s1 += ni * ni
        s2 += d * d
        a = abs(gi)
        if a > top or a != a:
            top = a
    out[0] = s0
    out[1] = s1
    out[2] = s2
    out[3] = top


def reference_stats(grad: np.ndarray, old: np.ndarray, new: np.ndarray) -> np.ndarray:
    """The four sums by plain numpy in float64: the reference every other path must equal."""
    g = np.asarray(grad).astype(np.float64).reshape(-1)
    n = np.asarray(new).astype(np.float64).reshape(-1)
    d = n - np.asarray(old).reshape(-1)
    if not g.size:
        return np.zeros(4)
    return np.array([g @ g, n @ n, d @ d, max(g.max(), -g.min())])


# dtype str -> small_sums compiled (float32 and float64 arrays). It repeats stats_loop's three
# sums on purpose: that one is compiled with reassociation for the large driver and leaves the max to
# another loop; this one sums in order and takes max |g| in the same pass (a small step's one call).
_SUMS: dict = {}
_SUMS_STATE = "idle"


def _build_sums() -> None:
    """Compile the small-tensor sums in a background thread (numpy gives the same figures until then)."""
    global _SUMS_STATE
    _SUMS_STATE = "building"

    def build():
        try:
            if not available():
                return
            # From numba's disk cache after the first start: compiling it took the GIL for seconds
            # of a new server's first steps (half the server's samples in a 16-client profile).
            fn = njit(small_sums, False)
            for dt in ("<f4", "<f8"):
                a = np.zeros(2, dt)
                fn(a, a, a, np.zeros(4))
                _SUMS[dt] = fn
        except Exception:  # no numba, or it failed: numpy stays
            pass

    threading.Thread(target=build, name="optreg-stats-jit", daemon=True).start()


def merge_stats(acc: np.ndarray, part: np.ndarray) -> None:
    """Fold one chunk's four figures into a tensor's (sums add, the max of |g| is the max)."""
    acc[:3] += part[:3]
    if acc[3] == acc[3] and not part[3] <= acc[3]:  # a NaN, in either, stays (Python's max would drop it)
        acc[3] = part[3]
