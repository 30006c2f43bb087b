"""Runs an optimizer's update over a parameter: elementwise ones over cache-sized slices.

Slicing keeps the working set (parameter, gradient, slots, scratch) in cache (measured:
docs/speed.md, "Kernel notes").

An optimizer that declares a kernel (`Optimizer.kernel`) runs it compiled by numba
when numba is installed (kernels/jit.py: same numbers bit for bit, several times faster), split
over the available cores for tensors of PARALLEL_ABOVE elements or more (the kernels
release the GIL). Until the kernel is compiled, or without numba, the numpy update runs.

`stats`: a float64 array of 4 receives this tensor's [sum g^2, sum p_new^2,
sum (p_new - p_old)^2, max |g|] (float64 accumulation), computed in the same pass
as the update, slice by slice while each slice is in cache, in both paths (kernels/stats.py).
`grad_abs_max`: max |g|, when the caller's finite check measured it (kernels/finite.py abs_max); the
kernel then runs a variant without it.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from optreg.plugins import Optimizer
from optreg.server.kernels import jit
from optreg.server.kernels import narrow as narrowkernels
from optreg.server.kernels import stats as kernelstats
from optreg.server.kernels import widen as widenkernels

CHUNK_ELEMENTS = 1 << 16
# Below this a second thread costs more than it saves (measured: 2 threads win from ~2e5 elements).
PARALLEL_ABOVE = 1 << 18
# With `out`, the kernel runs over slices of this many elements, each copied out right after.
COPY_SLICE = 1 << 17
# What apply(stats=) writes, in order: sum g^2, sum p_new^2, sum (p_new - p_old)^2, max |g| (float64).
STATS_FIELDS = ("grad_sq_sum", "param_sq_sum", "update_sq_sum", "grad_abs_max")
STATS = len(STATS_FIELDS)

# The parallel split cuts a tensor into up to SPLIT_PIECES pieces a thread (of at least MIN_PIECE
# elements), each run by whichever thread is free. With fixed halves a helper thread the OS starts late
# (the other core busy with a request, another process, a vCPU waking up) held the whole step up by its
# delay; with pieces the caller takes over its share (see _split, and docs/speed.md).
SPLIT_PIECES = 8
MIN_PIECE = 1 << 17

_pool = None
_pool_lock = threading.Lock()


def executor(n: int):
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="optreg-kernel")
        return _pool


def _pieces(n: int, threads: int) -> list[int]:
    """The bounds of the pieces _split cuts n elements into (the same whichever thread runs which)."""
    count = 1 if threads == 1 else max(1, min(threads * SPLIT_PIECES, n // MIN_PIECE))
    return [n * k // count for k in range(count + 1)]


def _split(bounds: list[int], threads: int, work) -> None:
    """work(k, a, b) for every piece k = [a, b) of `bounds`, on this thread and threads - 1 of the pool;
    each piece goes to whichever thread asks first, and this returns once every piece is done (a helper
    that starts after the last piece was taken does nothing and is not waited for)."""
    count = len(bounds) - 1
    pieces = iter(range(count))  # next() on it is atomic under the GIL: each piece is taken once
    left, lock, done, errors = [count], threading.Lock(), threading.Event(), []

    def drain():
        for k in pieces:
            try:
                work(k, bounds[k], bounds[k + 1])
            except BaseException as e:  # raised on the caller's thread below
                errors.append(e)
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    if count > 1:
        pool = executor(threads)
        for _ in range(min(threads, count) - 1):
            pool.submit(drain)
    drain()
    done.wait()
    if errors:
        raise errors[0]


_local = threading.local()


def _scratch(count: int, size: int, dtype: np.dtype) -> list[np.ndarray]:
    """Per-thread work arrays, reused across steps and sessions."""
    if count == 0:
        return []
    cache = getattr(_local, "cache", None)
    if cache is None:
        cache = _local.cache = {}
    key = (dtype.str, count)
    bufs = cache.get(key)
    if bufs is None or bufs[0].size < size:
        bufs = cache[key] = [np.empty(max(size, CHUNK_ELEMENTS), dtype=dtype) for _ in range(count)]
    return [b[:size] for b in bufs]


def _stats_buffers(size: int, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per-thread: a copy of p before the update, and a float64 work array (numpy statistics)."""
    cache = getattr(_local, "stats", None)
    if cache is None:
        cache = _local.stats = {}
    bufs = cache.get(dtype.str)
    if bufs is None or bufs[0].size < size:
        bufs = cache[dtype.str] = (np.empty(size, dtype), np.empty(size, np.float64))
    return bufs[0][:size], bufs[1][:size]


def apply(defn: Optimizer, param: np.ndarray, grad: np.ndarray, state: dict[str, np.ndarray], step: int,
          hp: dict, out: np.ndarray | None = None, parallel: bool = True, stats: np.ndarray | None = None,
          grad_abs_max: float | None = None, src: tuple | None = None) -> None:
    """Update `param` and `state` in place with one gradient; then copy the new `param` into `out`
    (same shape and dtype) when given -- slice by slice while each slice is still in cache.
    `parallel=False` keeps the update on this thread (a streamed chunk: a hand-off per chunk costs
    more than it saves while gRPC's threads want the other core). `stats` (float64, 4 elements)
    receives [sum g^2, sum p_new^2, sum (p_new - p_old)^2, max |g|] for this tensor. `grad_abs_max`:
    max |g| over the whole of `grad`, measured already by the caller's finite check
    (finite.abs_max); the update pass then leaves it out where its kernel allows.
    `src` = (param's values, {slot: its values}), arrays shaped like param: `param` and `state` are
    computed from these (a staging set from the live one) and their own contents are not read. A
    compiled kernel with statistics copies them in block by block inside its pass (the block is in L1
    when the update reads it); otherwise they are copied first."""
    if stats is not None and (stats.dtype != np.float64 or stats.shape != (STATS,)):
        raise ValueError(f"stats must be a float64 array of shape ({STATS},), got {stats.dtype} {stats.shape}")
    if defn.every is not None and defn.refresh_due(step, hp):
        if src is not None:  # the refresh reads the state the step starts from
            _copy_in(param, state, src)
            src = None
        _refresh(defn, param, grad, state, step, hp)
    _apply(defn, param, grad, state, step, hp, out, parallel, stats, grad_abs_max is not None, src)
    if stats is not None and grad_abs_max is not None:
        stats[3] = grad_abs_max


class Refreshes:
    """Optimizer.every's work, counted by optimizer: {name: [refreshes, seconds]} (telemetry/metrics.py
    reports them); replayed steps' refreshes count too (they are work the server did)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.by_optimizer: dict[str, list] = {}

    def add(self, name: str, seconds: float) -> None:
        with self.lock:
            done = self.by_optimizer.setdefault(name, [0, 0.0])
            done[0] += 1
            done[1] += seconds

    def snapshot(self) -> dict[str, tuple[int, float]]:
        with self.lock:
            return {k: (v[0], v[1]) for k, v in self.by_optimizer.items()}


REFRESHES = Refreshes()


def _refresh(defn, param, grad, state, step, hp) -> None:
    """The every-k-steps work, before the update, in the same call: every path that applies a step (live,
    resident, replay) runs it, so the log's replay gives the same bits."""
    if grad.dtype != param.dtype:
        grad = widenkernels.widen(grad, param.dtype)
    start = time.perf_counter()
    defn.every[1](param, grad, state, step, hp)
    REFRESHES.add(defn.name, time.perf_counter() - start)


def _copy_in(param, state, src) -> None:
    """param and state take the values of `src` = (param's values, {slot: its values})."""
    np.copyto(param, src[0])
    for slot, values in src[1].items():
        np.copyto(state[slot], values)


def _fold(stats: np.ndarray, accs: np.ndarray) -> None:
    """stats = the pieces' partial statistics (one row each) folded, in order."""
    stats[:3] = accs[:, :3].sum(axis=0)
    stats[3] = accs[:, 3].max()


def _apply(defn, param, grad, state, step, hp, out, parallel, stats, max_known, src=None) -> None:
    n = param.size
    narrow = narrowkernels.lookup(defn, param.dtype) if narrowkernels.narrows(defn) else None
    if narrow is not None:
        _run_narrow(narrow, param, widenkernels.widen(grad, param.dtype), state, step, hp, out, parallel, stats,
                    src)
        return
    if not defn.elementwise:  # its kernel, if any, once over the whole tensor: running scalars advance once
        whole = jit.lookup(defn, param.dtype, whole=True) if defn.kernel is not None else None
        if whole is not None:
            if src is not None:
                _copy_in(param, state, src)
            consts = whole.consts(hp, step, param.dtype, state)
            _run_fast(defn, whole, param, widenkernels.widen(grad, param.dtype), state, step, hp, out, parallel,
                      stats, max_known, consts=consts)
            return
    fast = jit.lookup(defn, param.dtype) if grad.dtype == param.dtype else None
    wide = None
    if fast is None and grad.dtype != param.dtype and out is None and n >= jit.HOLD_GIL_BELOW:
        wide = widenkernels.lookup(defn, param.dtype, grad.dtype)  # widened block by block in the pass
    if src is not None:
        compiled = fast if fast is not None else wide.comp if wide is not None else None
        if stats is not None and compiled is not None:  # copied in block by block inside the pass
            src = [src[0].reshape(-1)] + [src[1][s].reshape(-1) for s in compiled.slots]
        else:
            _copy_in(param, state, src)
            src = None
    if wide is not None:
        _run_widening(wide, param, grad, state, step, hp, parallel, stats, src)
        return
    if fast is None and grad.dtype != param.dtype:  # a narrower gradient (float16, bfloat16)
        grad = widenkernels.widen(grad, param.dtype)
        fast = jit.lookup(defn, param.dtype)
    if fast is not None:
        _run_fast(defn, fast, param, grad, state, step, hp, out, parallel, stats, max_known, src)
        return
    acc = None if stats is None else np.zeros(STATS)
    _apply_numpy(defn, param, grad, state, step, hp, n, acc)
    if out is not None:
        np.copyto(out, param)
    if stats is not None:
        stats[:] = acc


def widens_in_pass(defn: Optimizer, master: np.dtype, grad: np.ndarray) -> bool:
    """True when apply() will widen this narrower gradient inside the kernel pass (the caller need
    not widen it first); the first ask queues the compile of its widening kernel."""
    return (grad.dtype != master and grad.size >= jit.HOLD_GIL_BELOW
            and widenkernels.lookup(defn, master, grad.dtype) is not None)


def _run_widening(wide, param, grad, state, step, hp, parallel, stats=None, src: list | None = None) -> None:
    n = param.size
    threads = jit.threads() if parallel and n >= PARALLEL_ABOVE else 1
    consts = wide.comp.consts(hp, step, param.dtype)
    p = param.reshape(-1)
    gbits = np.ascontiguousarray(grad).reshape(-1).view(np.uint16)
    slots = [state[s].reshape(-1) for s in wide.comp.slots]
    bounds = _pieces(n, threads)
    accs = None if stats is None else np.zeros((len(bounds) - 1, STATS))

    def part(k, a, b):
        wide(p[a:b], gbits[a:b], [v[a:b] for v in slots], consts, None if accs is None else accs[k],
             None if src is None else [x[a:b] for x in src])

    _split(bounds, threads, part)
    if stats is not None:
        _fold(stats, accs)


def _run_narrow(narrow, param, grad, state, step, hp, out, parallel, stats, src) -> None:
    """A kernel over bfloat16 slots (kernels/narrow.py), split over threads as _run_fast splits."""
    if src is not None:
        _copy_in(param, state, src)
    n = param.size
    threads = jit.threads() if parallel and n >= PARALLEL_ABOVE else 1
    consts = narrow.comp.consts(hp, step, param.dtype)
    p, g = param.reshape(-1), np.ascontiguousarray(grad).reshape(-1)
    slots = [narrowkernels.bits(state[s]) for s in narrow.comp.slots]
    o = None if out is None else out.reshape(-1)
    bounds = _pieces(n, threads)
    accs = None if stats is None else np.zeros((len(bounds) - 1, STATS))

    def part(k, a, b):
        acc = None if accs is None else accs[k]
        if o is None:
            narrow(p[a:b], g[a:b], [v[a:b] for v in slots], consts, acc)
            return
        for x in range(a, b, COPY_SLICE):
            y = min(x + COPY_SLICE, b)
            narrow(p[x:y], g[x:y], [v[x:y] for v in slots], consts, acc)
            o[x:y] = p[x:y]

    _split(bounds, threads, part)
    if stats is not None:
        _fold(stats, accs)


def _apply_numpy(defn, param, grad, state, step, hp, n, acc=None) -> None:
    if not defn.elementwise or n <= CHUNK_ELEMENTS:
        if defn.elementwise or defn.scratch == 0:
            scratch = [s.reshape(param.shape) for s in _scratch(defn.scratch, n, param.dtype)]
        else:  # a whole-tensor update may keep references: give it arrays of its own
            scratch = [np.empty_like(param) for _ in range(defn.scratch)]
        if acc is None:
            defn.update(param, grad, state, step, hp, scratch)
            return
        old = param.copy() if not defn.elementwise else _stats_buffers(n, param.dtype)[0]
        np.copyto(old.reshape(-1), param.reshape(-1))
        defn.update(param, grad, state, step, hp, scratch)
        work = np.empty(n, np.float64) if n > CHUNK_ELEMENTS else _stats_buffers(n, param.dtype)[1]
        numpy_stats(param.reshape(-1), old.reshape(-1), np.asarray(grad).reshape(-1), acc, work)
        return
    p, g = param.reshape(-1), grad.reshape(-1)
    flat_state = {k: v.reshape(-1) for k, v in state.items()}
    bufs = _scratch(defn.scratch, CHUNK_ELEMENTS, param.dtype)
    if acc is not None:
        old_buf, work_buf = _stats_buffers(CHUNK_ELEMENTS, param.dtype)
    for start in range(0, n, CHUNK_ELEMENTS):
        end = min(start + CHUNK_ELEMENTS, n)
        size = end - start
        if acc is not None:
            np.copyto(old_buf[:size], p[start:end])
        defn.update(p[start:end], g[start:end], {k: v[start:end] for k, v in flat_state.items()}, step, hp,
                    [b[:size] for b in bufs])
        if acc is not None:
            numpy_stats(p[start:end], old_buf[:size], g[start:end], acc, work_buf[:size])


def numpy_stats(new: np.ndarray, old: np.ndarray, g: np.ndarray, acc: np.ndarray, work: np.ndarray) -> None:
    """acc += [sum g^2, sum new^2, sum (new - old)^2], acc[3] = max(acc[3], max |g|) over flat arrays,
    in float64 (`work`: a float64 array of their size)."""
    if new.size == 0:
        return
    np.copyto(work, g, casting="unsafe")
    acc[0] += np.dot(work, work)
    acc[3] = max(acc[3], float(np.abs(work, out=work).max()))
    np.copyto(work, new, casting="unsafe")
    acc[1] += np.dot(work, work)
    np.subtract(new, old, out=work, dtype=np.float64)
    acc[2] += np.dot(work, work)


def _run_fast(defn, kernel, param, grad, state, step, hp, out=None, parallel=True, stats=None,
              max_known=False, src: list | None = None, consts=None) -> None:
    """`src` (with `stats` only): [param's source, the slots' sources], flat (see apply). `consts`: c,
    when the caller computed it (a whole-tensor kernel's, which advanced its running scalars)."""
    n = param.size
    threads = jit.threads() if parallel else 1
    if threads == 1 or n < PARALLEL_ABOVE:
        threads = 1
    if consts is None:
        consts = kernel.consts(hp, step, param.dtype)
    if stats is None and threads == 1 and out is None:  # the small-step path: as little Python as possible
        fn = kernel.held if n < jit.HOLD_GIL_BELOW else kernel.fn
        if param.ndim == 1 and grad.flags.c_contiguous:
            fn(param, grad, *[state[s] for s in kernel.slots], consts)
        else:
            fn(param.reshape(-1), np.ascontiguousarray(grad).reshape(-1),
               *[state[s].reshape(-1) for s in kernel.slots], consts)
        return
    p, g = param.reshape(-1), np.ascontiguousarray(grad).reshape(-1)
    flat_slots = [state[s].reshape(-1) for s in kernel.slots]
    o = None if out is None else out.reshape(-1)
    nogil = n >= jit.HOLD_GIL_BELOW
    fn = kernel.fn if nogil else kernel.held
    with_stats = None if stats is None else kernelstats.stats_kernel(defn, kernel)
    bounds = _pieces(n, threads)
    accs = np.zeros((len(bounds) - 1, STATS))

    def run(a, b, acc):
        if stats is None:
            fn(p[a:b], g[a:b], *[v[a:b] for v in flat_slots], consts)
        elif with_stats is not None:
            old = _stats_buffers(kernelstats.STATS_BLOCK, param.dtype)[0]
            with_stats(nogil, p[a:b], g[a:b], [v[a:b] for v in flat_slots], consts, acc, old, max_known,
                       None if src is None else [x[a:b] for x in src])
        else:  # the statistics kernel is still compiling: the kernel per slice, numpy sums (same numbers)
            if src is not None:
                for dst, values in zip([p, *flat_slots], src):
                    dst[a:b] = values[a:b]
            for x in range(a, b, CHUNK_ELEMENTS):
                y = min(x + CHUNK_ELEMENTS, b)
                old, work = _stats_buffers(y - x, param.dtype)
                old[:] = p[x:y]
                fn(p[x:y], g[x:y], *[v[x:y] for v in flat_slots], consts)
                numpy_stats(p[x:y], old, g[x:y], acc, work)

    def part(k, a, b):
        if o is None:
            run(a, b, accs[k])
            return
        for x in range(a, b, COPY_SLICE):
            y = min(x + COPY_SLICE, b)
            run(x, y, accs[k])
            o[x:y] = p[x:y]

    _split(bounds, threads, part)
    if stats is not None:
        _fold(stats, accs)
