"""float16 and bfloat16 gradients widened inside the kernel pass (widenkernels.py): bit for bit what
widening with numpy first and then updating gives, for every optimizer with a kernel; and through a
real server's step."""
import ml_dtypes
import numpy as np
import pytest

from optreg.plugins.registry import Registry
from optreg.server.kernels import jit
from optreg.server.kernels import warmup
from optreg.server.kernels import apply as kernels
from optreg.server.kernels import widen as widenkernels
from optreg.server.steps.run import widen

from test_kernels import CASES, SETTINGS

pytestmark = pytest.mark.skipif(not jit.available(), reason="numba not installed")
BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def registry():
    warmup.warm(block=True)
    return Registry()


def _ready(defn, master, gdtype):
    widenkernels.lookup(defn, np.dtype(master), np.dtype(gdtype))
    jit.wait_idle(300)
    w = widenkernels.lookup(defn, np.dtype(master), np.dtype(gdtype))
    assert w is not None, widenkernels.status(defn, np.dtype(master), np.dtype(gdtype))
    return w


def _ready_with_statistics(defn, master, gdtype, hp):
    """_ready, plus the drivers over the statistics kernels (fused and copying), which the first call
    with statistics queues."""
    w = _ready(defn, master, gdtype)
    one = np.ones(1 << 15, master)
    for _ in range(2):
        kernels.apply(defn, one, one.astype(gdtype), {s.name: one.copy() for s in defn.slots}, 1, hp,
                      stats=np.zeros(kernels.STATS))
        jit.wait_idle(300)
    return w


def _every_half(conv) -> tuple[np.ndarray, np.ndarray]:
    """(what `conv` makes of each of the 65536 float16 bit patterns, numpy's astype of them)."""
    import numba
    out = np.empty(65536, np.float32)

    @numba.njit
    def run(bits, out):
        for i in range(bits.size):
            out[i] = conv(bits[i])

    bits = np.arange(65536, dtype=np.uint16)
    run(bits, out)
    return out, bits.view(np.float16).astype(np.float32)


def test_half_widening_equals_numpy_for_every_bit_pattern():
    import numba
    out, want = _every_half(numba.njit(widenkernels._half_to_float))
    np.testing.assert_array_equal(out.view(np.uint32), want.view(np.uint32))


def test_native_half_widening_equals_numpy_for_every_non_nan_bit_pattern():
    """The CPU's conversion (F16C) where the host has one: every number and infinity bit for bit; a NaN
    stays a NaN (a signalling one comes out quieted: NaN gradients never reach a kernel)."""
    native = widenkernels._native_half()
    if native is None:
        pytest.skip("this CPU has no half-precision conversion LLVM can use")
    out, want = _every_half(native)
    nan = np.isnan(want)
    assert nan.sum() == 2 * 1023 and np.isnan(out[nan]).all()
    np.testing.assert_array_equal(out[~nan].view(np.uint32), want[~nan].view(np.uint32))


def _compare(defn, hp, master, gdtype, size, parallel=True):
    rng = np.random.default_rng(11)
    p = rng.standard_normal(size).astype(master)
    st = {s.name: np.full(size, s.initial_value, master) for s in defn.slots}
    p_ref, st_ref = p.copy(), {k: v.copy() for k, v in st.items()}
    for t in range(1, 4):
        g = (rng.standard_normal(size) * 10.0 ** rng.integers(-7, 2, size)).astype(gdtype)
        g[:8] = np.array([0.0, -0.0, 6e-8, -6e-8, 1e-5, 65504 if gdtype == np.float16 else 1e30, -1, 1], gdtype)
        g.flags.writeable = False  # as wire bytes
        assert kernels.widens_in_pass(defn, np.dtype(master), g)
        kernels.apply(defn, p, g, st, t, hp, parallel=parallel)
        kernels.apply(defn, p_ref, widen(g, np.dtype(master)), st_ref, t, hp, parallel=parallel)
    np.testing.assert_array_equal(p, p_ref)
    for k in st:
        np.testing.assert_array_equal(st[k], st_ref[k])


@pytest.mark.parametrize("name,setting", CASES)
def test_float16_gradients_widened_in_the_kernel_equal_widen_then_update(registry, name, setting):
    defn = registry.get(name).definition
    _ready(defn, np.float32, np.float16)
    # above the threaded split and no multiple of the block; then one thread (a streamed chunk)
    _compare(defn, defn.resolve(SETTINGS[name][setting]), np.float32, np.float16, (1 << 18) + 17)
    _compare(defn, defn.resolve(SETTINGS[name][setting]), np.float32, np.float16, (1 << 15) + 3, parallel=False)


@pytest.mark.parametrize("master,gdtype", [(np.float32, BF16), (np.float64, np.float16), (np.float64, BF16)])
@pytest.mark.parametrize("name", ["adam", "torch.rmsprop"])
def test_bfloat16_and_float64_masters(registry, name, master, gdtype):
    defn = registry.get(name).definition
    _ready(defn, master, gdtype)
    _compare(defn, defn.resolve(SETTINGS[name][-1]), master, gdtype, (1 << 18) + 17)


def test_small_or_unknown_gradients_are_widened_by_numpy_first(registry):
    defn = registry.get("adam").definition
    small = np.ones(100, np.float16)
    assert not kernels.widens_in_pass(defn, np.dtype(np.float32), small)
    assert widenkernels.lookup(defn, np.dtype(np.float32), np.dtype(np.int16)) is None
    p, st = np.ones(100, np.float32), {"m": np.zeros(100, np.float32), "v": np.zeros(100, np.float32)}
    p_ref, st_ref = p.copy(), {k: v.copy() for k, v in st.items()}
    hp = defn.resolve({})
    kernels.apply(defn, p, small, st, 1, hp)  # widened with numpy inside apply: never updated in float16
    kernels.apply(defn, p_ref, small.astype(np.float32), st_ref, 1, hp)
    np.testing.assert_array_equal(p, p_ref)


def test_a_server_step_with_float16_gradients_equals_float32_widened_ones(server):
    """Fenced steps over the wire: the server compiles the widening kernel on the first float16 step
    (numpy widens until it is ready), so the later steps take the in-kernel path; either way the
    parameters equal a twin session's stepped with the same gradients widened by the client."""
    import time

    from optreg.client import Client
    rng = np.random.default_rng(4)
    n = 300_000
    w = rng.standard_normal(n).astype(np.float32)
    grads = [(rng.standard_normal(n) * 1e-2).astype(np.float16) for _ in range(6)]
    with Client(server.address) as c:
        a = c.create_session("adam", {"w": w})
        b = c.create_session("adam", {"w": w})
        for i, g in enumerate(grads):
            a.step({"w": g})
            b.step({"w": g.astype(np.float32)})
            if i == 0:
                time.sleep(4)  # the compile thread builds the widening kernel meanwhile
        np.testing.assert_array_equal(a.read_parameters()["w"], b.read_parameters()["w"])


@pytest.mark.parametrize("master,gdtype", [(np.float32, np.float16), (np.float32, BF16), (np.float64, np.float16)])
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("name", ["adam", "torch.sgd"])
def test_statistics_in_the_widening_pass(registry, name, master, gdtype, parallel):
    """apply(stats=) with a narrow gradient: the update bit for bit as widen-then-update, and the
    statistics of the widened gradient (sums to float64 rounding, max |g| exact)."""
    defn = registry.get(name).definition
    hp = defn.resolve(SETTINGS[name][-1])
    w = _ready_with_statistics(defn, master, gdtype, hp)
    assert w.fused is not None  # every built-in's kernel takes the fused statistics
    rng = np.random.default_rng(5)
    size = (1 << 18) + 17
    p = rng.standard_normal(size).astype(master)
    st = {s.name: np.full(size, s.initial_value, master) for s in defn.slots}
    p_ref, st_ref = p.copy(), {k: v.copy() for k, v in st.items()}
    for t in range(1, 3):
        g = (rng.standard_normal(size) * 1e-2).astype(gdtype)
        old = p.copy()
        got, want = np.zeros(kernels.STATS), np.zeros(kernels.STATS)
        kernels.apply(defn, p, g, st, t, hp, parallel=parallel, stats=got)
        wide = widen(g, np.dtype(master))
        kernels.apply(defn, p_ref, wide, st_ref, t, hp, parallel=parallel, stats=want)
        np.testing.assert_array_equal(p, p_ref)
        for k in st:
            np.testing.assert_array_equal(st[k], st_ref[k])
        g64, n64 = wide.astype(np.float64), p.astype(np.float64)
        exact = [g64 @ g64, n64 @ n64, (n64 - old) @ (n64 - old), np.abs(g64).max()]
        # a float32 master's sums are the fused kernel's: float32 within blocks of 512 (at most ~3.1e-5),
        # in both paths (the widening driver calls the same kernel on each widened block)
        rtol = 4e-5 if np.dtype(master) == np.float32 else 1e-9
        np.testing.assert_allclose(got, exact, rtol=rtol)
        np.testing.assert_allclose(got, want, rtol=2 * rtol)
        assert got[3] == want[3] == exact[3]


@pytest.mark.parametrize("master,gdtype", [(np.float32, np.float16), (np.float32, BF16), (np.float64, np.float16)])
@pytest.mark.parametrize("parallel", [True, False])
@pytest.mark.parametrize("name", ["adam", "torch.rmsprop"])
def test_widening_from_sources_equals_copy_then_update(registry, name, master, gdtype, parallel):
    """apply(src=) with a narrow gradient (a staging set computed from the live one): the float32 master's
    widening driver runs the kernel's copying variant; the update bit for bit as copy-then-update, the
    statistics alike, the sources untouched, the staging arrays' own contents (NaN) never read."""
    defn = registry.get(name).definition
    hp = defn.resolve(SETTINGS[name][-1])
    w = _ready_with_statistics(defn, master, gdtype, hp)
    assert (w.copying is not None) == (np.dtype(master) == np.float32)
    rng = np.random.default_rng(6)
    size = (1 << 18) + 17
    live = rng.standard_normal(size).astype(master)
    live_st = {s.name: np.abs(rng.standard_normal(size)).astype(master) for s in defn.slots}
    frozen = [live.copy()] + [v.copy() for v in live_st.values()]
    for t in (1, 2):
        g = (rng.standard_normal(size) * 1e-2).astype(gdtype)
        p, st = np.full(size, np.nan, master), {k: np.full(size, np.nan, master) for k in live_st}
        got, want = np.zeros(kernels.STATS), np.zeros(kernels.STATS)
        kernels.apply(defn, p, g, st, t, hp, parallel=parallel, stats=got, src=(live, live_st))
        p_ref, st_ref = live.copy(), {k: v.copy() for k, v in live_st.items()}
        kernels.apply(defn, p_ref, g, st_ref, t, hp, parallel=parallel, stats=want)
        np.testing.assert_array_equal(p, p_ref)
        for k in st:
            np.testing.assert_array_equal(st[k], st_ref[k])
        rtol = 4e-5 if np.dtype(master) == np.float32 else 1e-9  # each compiled variant orders its sums
        np.testing.assert_allclose(got, want, rtol=rtol)
        assert got[3] == want[3]
        for a, b in zip([live, *live_st.values()], frozen):
            np.testing.assert_array_equal(a, b)
