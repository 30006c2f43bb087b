"""optreg's Adam beside torch.optim.Adam(fused=True), DeepSpeed's DeepSpeedCPUAdam and the memory-bandwidth
floor, float32, in one process.

    python -m bench.kernels_vs [--sizes 1e7,1e8] [--rounds N] [--quick]
    python -m bench --only vs                  # inside the suite (--quick: 1e6, 5 rounds, for CI)

Each round runs every contender once, in an order shuffled every round (a rotation would keep each one's
predecessor), so the machine's drift and what a contender inherits from the one before it (its data in
L3, another's OpenMP threads still spinning) hit all alike; the figure is each contender's median
over the rounds. (The best of back-to-back calls flatters whoever finds its own arrays still in L3.)

- optreg adam: the server's update path, kernels.apply with the registered Adam definition, compiled first.
- torch fused: torch.optim.Adam(fused=True), torch.set_num_threads(the kernels' thread count).
- DeepSpeed: deepspeed.ops.adam.DeepSpeedCPUAdam(adamw_mode=False), built by DeepSpeed's JIT on first
  use (g++ and ninja, 1-2 min once); skipped, with the reason printed, when it cannot be imported or built.
- floor: p += s*g, m += s*g, v += s*g in one pass over arrays of the same size (Adam's memory traffic:
  4 arrays read, 3 written, next to no arithmetic), numba nogil over halves on 2 threads (a thread pool
  of its own, as the server's kernels split).
Every contender has arrays of its own (p, g and its state), allocated and touched before the rounds.
Ratios: to the faster of torch fused and DeepSpeed (the goal, issue 23: at most 1.0x) and to the floor.
"""
from __future__ import annotations

import statistics
import time

import numpy as np

FLOOR_THREADS = 2
HP = {"lr": 1e-3, "beta1": 0.9, "beta2": 0.999}


def _floor_kernel(p, g, m, v, s):
    for i in range(p.size):
        x = g[i] * s
        p[i] += x
        m[i] += x
        v[i] += x


def _floor(n, rng):
    import numba
    from concurrent.futures import ThreadPoolExecutor

    kern = numba.njit(nogil=True)(_floor_kernel)
    p, g, m, v = (rng.standard_normal(n).astype(np.float32) for _ in range(4))
    s = np.float32(1e-7)
    bounds = [n * i // FLOOR_THREADS for i in range(FLOOR_THREADS + 1)]
    pool = ThreadPoolExecutor(FLOOR_THREADS - 1, thread_name_prefix="bench-floor")

    def part(i):
        a, b = bounds[i], bounds[i + 1]
        kern(p[a:b], g[a:b], m[a:b], v[a:b], s)

    def one():
        futures = [pool.submit(part, i) for i in range(1, FLOOR_THREADS)]
        part(0)
        for f in futures:
            f.result()
    return one


def _optreg(n, rng):
    from optreg.plugins.registry import Registry

    from bench.kernels import server_kernels
    kernels = server_kernels()[0]
    defn = Registry().get("adam").definition
    p, g = rng.standard_normal(n).astype(np.float32), (rng.standard_normal(n) * 1e-2).astype(np.float32)
    st = {s.name: np.full(n, s.initial_value, np.float32) for s in defn.slots}
    hp, step = defn.resolve(HP), [0]

    def one():
        step[0] += 1
        kernels.apply(defn, p, g, st, step[0], hp)
    return one


def _torch_param(n, rng):
    import torch
    tp = torch.from_numpy(rng.standard_normal(n).astype(np.float32)).requires_grad_()
    tp.grad = torch.from_numpy((rng.standard_normal(n) * 1e-2).astype(np.float32))
    return tp


def _torch_fused(n, rng):
    import torch
    tp = _torch_param(n, rng)
    opt = torch.optim.Adam([tp], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), fused=True)

    def one():
        with torch.no_grad():
            opt.step()
    return one


def _deepspeed(n, rng):
    import contextlib
    import io
    import logging

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):  # its accelerator and build chatter
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        tp = _torch_param(n, rng)
        opt = DeepSpeedCPUAdam([tp], lr=HP["lr"], betas=(HP["beta1"], HP["beta2"]), adamw_mode=False)
    return opt.step


CONTENDERS = {"optreg adam": _optreg, "torch fused": _torch_fused, "DeepSpeed": _deepspeed, "floor": _floor}
REFERENCES = ("torch fused", "DeepSpeed")


def measure(n: int, rounds: int, skip=()) -> dict[str, list[float]]:
    """Seconds per call of each contender that could be built, over `rounds` interleaved rounds."""
    rng = np.random.default_rng(7)
    runs = {}
    for name, build in CONTENDERS.items():
        if name in skip:
            continue
        try:
            one = build(n, rng)
            one()
            one()  # lazily allocated state touched, compiled code loaded
        except Exception as e:  # a missing or unbuildable contender is reported, never fatal
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"  ({name} skipped: {type(e).__name__}: {first[:160]})", flush=True)
            continue
        runs[name] = (one, [])
    order = list(runs.values())
    shuffle = np.random.default_rng(11)
    for _ in range(rounds):
        for i in shuffle.permutation(len(order)):
            one, times = order[i]
            t = time.perf_counter()
            one()
            times.append(time.perf_counter() - t)
    return {name: times for name, (_, times) in runs.items()}


def run(cfg, row, sizes=None, rounds=None) -> None:
    from bench.kernels import compile_now
    from optreg.plugins.registry import Registry

    sizes = sizes or ([1_000_000] if cfg.quick else [10_000_000, 100_000_000])
    rounds = rounds or (5 if cfg.quick else 15)
    engine = compile_now([Registry().get("adam").definition])
    try:
        import torch
        from bench.kernels import server_kernels
        torch.set_num_threads(server_kernels()[1].threads())
        threads = f"torch {torch.get_num_threads()} thread(s)"
    except ImportError:
        threads = "no torch"
    print(f"  (kernels vs: optreg {engine}; {threads}; floor numba, {FLOOR_THREADS} threads; "
          f"median of {rounds} interleaved rounds)", flush=True)
    for n in sizes:
        times = measure(n, rounds)
        ns = {k: statistics.median(v) / n * 1e9 for k, v in times.items()}
        refs = [k for k in REFERENCES if k in ns]
        ref = min(refs, key=ns.get) if refs else None
        for name, value in ns.items():
            q = np.percentile(np.asarray(times[name]) / n * 1e9, [25, 75])
            note = f"median of {rounds} interleaved rounds, p25-p75 {q[0]:.3g}-{q[1]:.3g}"
            figure = f"vs: {name} @{n:.0e} f32"
            if ref is not None and name != ref and name != "floor":
                row(figure, value, "ns/param", f"{ref} (the faster reference)", ns[ref],
                    1.0 if name == "optreg adam" and n >= 10_000_000 else None, note=note)
            if "floor" in ns and name != "floor":
                row(figure, value, "ns/param", "bandwidth floor (p,m,v += s*g)", ns["floor"], note=note)
            elif name == "floor" or ref is None:
                row(figure, value, "ns/param", note=note)


def main(argv=None):
    import argparse

    from bench.run import Config, row
    ap = argparse.ArgumentParser(prog="python -m bench.kernels_vs", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1e6 elements, 5 rounds (a smoke run)")
    ap.add_argument("--sizes", default="", help="comma-separated element counts, e.g. 1e7,1e8")
    ap.add_argument("--rounds", type=int, default=0)
    args = ap.parse_args(argv)
    sizes = [int(float(s)) for s in args.sizes.split(",") if s]
    run(Config(args.quick), row, sizes, args.rounds)


if __name__ == "__main__":
    main()
