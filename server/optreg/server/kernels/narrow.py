"""bfloat16 slots (contract v2, `Slot(dtype="bfloat16")`) under an optimizer's own compiled kernel.

Why: a kernel is written over arrays of the master dtype, so without this a bfloat16 slot sends the step
through the numpy update, which widens every slot into a full-size array and rounds it back. Widening
blocks into buffers around the kernel cost 2.4x adam's kernel (docs/speed.md, "bfloat16 slots in the
kernel pass"): here the kernel's source is rewritten instead, so its one pass reads and writes the slots'
16 bits, a read `m[i]` becoming `bfloat_to_float(m[i])` and a store `m[i] = x` becoming
`m[i] = float_to_bfloat(float32(x))` (kernels/bits.py), and a slot the step leaves alone (max_v without
amsgrad) is not touched at all.

Exactness: widening is exact; narrowing rounds the float32 to nearest even and gives NaN as the
canonical quiet NaN with its sign, as ml_dtypes does for the numpy update's
`np.copyto(slot, wide, casting="unsafe")`. A kernel that reads a slot back after storing it would see
the rounded value where the numpy update sees the float32 one: each rewritten kernel is checked against
widen-run-round on random data when it is compiled, and one that differs (or whose source does not fit
the rewrite) is not used: the numpy update runs (tests/kernels/test_narrow.py).
float32 masters only: ml_dtypes rounds a float64 to bfloat16 directly, which a float32 in between would
round twice; a float64 session with bfloat16 slots runs the numpy update.
"""
from __future__ import annotations

import ast
import inspect
import textwrap
import threading

import numpy as np

from optreg.server.kernels import bits as bitops
from optreg.server.kernels import jit
from optreg.server.kernels import stats as kernelstats

MASTER = np.dtype(np.float32)
_P = "_optreg_"  # prefix of the names the rewrite adds
_lock = threading.Lock()
_ready: dict = {}  # id(defn) -> (defn, Narrowed)
_state: dict = {}  # id(defn) -> (defn, "pending" | "ready" | "failed")


def narrows(defn) -> bool:
    """Whether `defn` declares a kernel over one or more bfloat16 slots."""
    return defn.kernel is not None and defn.elementwise and any(s.dtype == "bfloat16" for s in defn.slots)


def narrowed_source(kernel, narrow: set[str]) -> str | None:
    """`kernel`'s source with the arrays named in `narrow` read and stored as bfloat16 bits, or None when
    it does not fit: such an array used other than as `a[...]` or the single target `a[...] = x`."""
    if getattr(kernel, "__closure__", None):
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(kernel)))
    except (OSError, TypeError, SyntaxError):
        return None
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return None
    fdef = tree.body[0]
    nodes = list(ast.walk(fdef))
    if any(isinstance(n, ast.Name) and n.id.startswith(_P) for n in nodes):
        return None

    def is_slot(node) -> bool:
        return isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id in narrow

    def call(name, arg):
        return ast.Call(ast.Name(_P + name, ast.Load()), [arg], [])

    class Rewrite(ast.NodeTransformer):
        def visit_Assign(self, node):
            if len(node.targets) == 1 and is_slot(node.targets[0]):
                node.targets[0].slice = self.visit(node.targets[0].slice)
                node.value = call("f2b", call("f32", self.visit(node.value)))
                return node
            return self.generic_visit(node)

        def visit_Subscript(self, node):
            if not is_slot(node):
                return self.generic_visit(node)
            if not isinstance(node.ctx, ast.Load):
                raise ValueError("a bfloat16 slot stored other than by a plain assignment")
            node.slice = self.visit(node.slice)
            return call("b2f", node)

        def visit_Name(self, node):
            if node.id in narrow:  # reached only outside a[...]: the array itself is used
                raise ValueError(f"bfloat16 slot {node.id} used as an array")
            return node

    try:
        fdef.body = [Rewrite().visit(st) for st in fdef.body]
    except ValueError:
        return None
    fdef.decorator_list = []
    fdef.name = f"{fdef.name}{_P}bf16"
    return ast.unparse(ast.fix_missing_locations(tree))


class Narrowed:
    """A definition's kernel rewritten over bfloat16 slots, and its statistics driver."""

    def __init__(self, defn, comp: jit.Compiled, fn):
        self.comp, self.fn = comp, fn
        self.stats_driver = kernelstats._driver(len(defn.slots), True)
        self.local = threading.local()

    def __call__(self, p, g, slots, consts, acc=None) -> None:
        """Update flat contiguous float32 `p` and `slots` (bfloat16 ones as their uint16 bits) with `g`;
        with `acc` (float64[4]) add [sum g^2, sum p_new^2, sum (p_new - p_old)^2] and fold max |g| in."""
        if acc is None:
            self.fn(p, g, *slots, consts)
            return
        old = getattr(self.local, "old", None)
        if old is None:
            old = self.local.old = np.empty(kernelstats.STATS_BLOCK, MASTER)
        gbits = g.view(np.uint32)
        m = self.stats_driver(self.fn, p, g, gbits, np.uint32(0x7FFFFFFF), *slots, consts, old, acc,
                              kernelstats.STATS_BLOCK)
        kernelstats._fold_max(m, MASTER, acc)


def bits(slot: np.ndarray) -> np.ndarray:
    """A slot as the kernel takes it: flat, a bfloat16 one as its uint16 bits."""
    flat = slot.reshape(-1)
    return flat if flat.dtype.kind == "f" and flat.dtype.name != "bfloat16" else flat.view(np.uint16)


def lookup(defn, master: np.dtype) -> Narrowed | None:
    """The rewritten kernel of `defn` for a `master` session; None (the numpy update) when there is none
    or it is not compiled yet (its compile is then queued)."""
    if master != MASTER or not narrows(defn):
        return None
    hit = _ready.get(id(defn))
    if hit is not None and hit[0] is defn:
        return hit[1]
    comp = jit.lookup(defn, master, narrow_slots=True)
    if comp is None:
        return None
    with _lock:
        known = _state.get(id(defn))
        if known is not None and known[0] is defn:
            return None
        _state[id(defn)] = (defn, "pending")
    jit.submit(lambda: _compile(defn, comp))
    return None


def _compile(defn, comp) -> None:
    try:
        narrow = {a for a, s in zip(list(inspect.signature(comp.kernel).parameters)[2:], defn.slots)
                  if s.dtype == "bfloat16"}
        source = narrowed_source(comp.kernel, narrow)
        if source is None:
            raise ValueError("its kernel does not fit the rewrite (a slot used other than as a[i] or a[i] = x)")
        ns = dict(comp.kernel.__globals__, **{_P + "b2f": bitops.bfloat_to_float, _P + "f2b": bitops.float_to_bfloat,
                                               _P + "f32": np.float32})
        exec(compile(source, f"<{defn.name} over bfloat16 slots>", "exec"), ns)  # noqa: S102 - the plugin's own code
        fn = jit.numba.njit(nogil=True, error_model="numpy")(ns[f"{comp.kernel.__name__}{_P}bf16"])
        narrowed = Narrowed(defn, comp, fn)
        _check(defn, comp, narrowed)
    except Exception as e:  # never break a step: the numpy update gives the same numbers
        jit.log.warning("optimizer %s: kernel over bfloat16 slots unavailable (%s: %s); using its numpy "
                                "update", defn.name, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        with _lock:
            _state[id(defn)] = (defn, "failed")
        return
    with _lock:
        _ready[id(defn)] = (defn, narrowed)
        _state[id(defn)] = (defn, "ready")


def _check(defn, comp, narrowed: Narrowed) -> None:
    """The rewritten kernel gives widen, run the kernel, round back, bit for bit (with and without
    statistics, read-only gradients), on random data and every hyperparameter's default."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    n = 1031
    p = rng.standard_normal(n).astype(MASTER)
    wide = [np.abs(rng.standard_normal(n)).astype(MASTER) for _ in defn.slots]
    low = [w.astype(ml_dtypes.bfloat16) if s.dtype == "bfloat16" else w for w, s in zip(wide, defn.slots)]
    wide = [x.astype(MASTER) for x in low]
    ref, got = p.copy(), p.copy()
    mine = [bits(x).copy() for x in low]
    hp = defn.resolve({})
    for step in (1, 2, 3):
        g = rng.standard_normal(n).astype(MASTER)
        g.flags.writeable = False
        c = comp.consts(hp, step, MASTER)
        comp.fn(ref, g, *wide, c)
        for w, x in zip(wide, low):
            if x.dtype != MASTER:
                np.copyto(x, w, casting="unsafe")
                np.copyto(w, x.astype(MASTER))
        narrowed(got, g, mine, c, None if step == 2 else np.zeros(4))
    same = np.array_equal(ref, got) and all(np.array_equal(bits(x), y) for x, y in zip(low, mine))
    if not same:
        raise ValueError("the rewritten kernel's numbers differ from the widened kernel's (does it read a "
                         "bfloat16 slot after storing it?)")


def status(defn) -> str | None:
    known = _state.get(id(defn))
    return known[1] if known is not None and known[0] is defn else None
