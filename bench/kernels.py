"""Declared kernels at 1e7 float32: ns/param of torch.adam, adamw, the Lion example and
Adam with statistics, each against the built-in adam measured in the same rounds.

    python -m bench --only declared        # inside the suite
    python -m bench.kernels [--quick]      # alone

Rounds interleave the variants (one step of each per round) so drift on a shared
machine hits all of them alike; the figure is each variant's median over the rounds.
A second set of rows gives the CPU time of the calling thread (its share of the split
update), which a loaded machine's preemptions do not inflate.
Targets: issue 9 (torch.adam and Lion at most 1.3x adam), issue 24 (adamw-bf16, its bfloat16 slots
read and stored by adamw's rewritten kernel, and schedulefree.adamw, at most 1.3x adam), issue 12
(statistics at most 1.03x the update without).
"""
from __future__ import annotations

import statistics
import time

import numpy as np

N = 10_000_000
VARIANTS = [  # (figure, optimizer, hyperparameter overrides, with statistics, target ratio)
    ("kernel adam @1e7 f32", "adam", {}, False, None),
    ("kernel torch.adam @1e7 f32", "torch.adam", {}, False, 1.3),
    ("kernel adamw @1e7 f32", "adamw", {}, False, None),
    ("kernel lion (example plugin) @1e7 f32", "lion", {}, False, 1.3),
    ("kernel adamw-bf16 @1e7 f32 (bfloat16 m, v, max_v)", "adamw-bf16", {}, False, 1.3),
    ("kernel schedulefree.adamw @1e7 f32", "schedulefree.adamw", {}, False, 1.3),
    ("kernel adam + statistics @1e7 f32", "adam", {}, True, 1.03),
]


def server_kernels():
    """(apply, jit, stats): the server's kernel modules."""
    from optreg.server.kernels import apply, jit, stats
    return apply, jit, stats


def compile_now(defns: list, stats_for: list = ()) -> str:
    """Compile the kernels of `defns` and the statistics kernels of `stats_for` (some of them) and wait
    for them, so no timed call runs the numpy update; returns the engine's name for the bench's header."""
    _, jit, kernelstats = server_kernels()
    from optreg.server.kernels import warmup
    warmup.warm(block=True, definitions=list(defns))
    for defn in stats_for:
        comp = jit.lookup(defn, np.dtype(np.float32))
        if comp is not None:
            kernelstats.stats_kernel(defn, comp)
    jit.wait_idle()
    return f"{'numba' if jit.available() else 'numpy'}, {jit.threads()} thread(s)"


def run(cfg, row) -> None:
    from optreg.plugins.registry import Registry

    kernels, _, _ = server_kernels()
    reg = Registry()
    missing = [name for _, name, _, _, _ in VARIANTS if name not in reg.optimizers]
    if missing:
        print(f"  (declared kernels: {', '.join(missing)} not registered; pip install -e examples/optreg-lion)")
    variants = [v for v in VARIANTS if v[1] in reg.optimizers]
    defns = {name: reg.get(name).definition for _, name, _, _, _ in variants}
    engine = compile_now(list(defns.values()), [defns[name] for _, name, _, with_stats, _ in variants if with_stats])
    print(f"  (declared kernels: {engine}, 1e7 float32)", flush=True)

    rng = np.random.default_rng(4)
    base = rng.standard_normal(N).astype(np.float32)
    g = (rng.standard_normal(N) * 1e-2).astype(np.float32)
    g.flags.writeable = False
    runs = []
    for figure, name, overrides, with_stats, target in variants:
        defn = defns[name]
        p = base.copy()
        st = {s.name: np.full(*s.layout((N,), np.float32)[:1], s.initial_value, s.layout((N,), np.float32)[1])
              for s in defn.slots}
        hp = defn.resolve(overrides)
        stats = np.zeros(4) if with_stats else None
        step = [0]

        def one(defn=defn, p=p, st=st, hp=hp, stats=stats, step=step):
            step[0] += 1
            kernels.apply(defn, p, g, st, step[0], hp, stats=stats)
        one()
        one()
        runs.append((figure, one, target, [], []))
    rounds = 5 if cfg.quick else 15
    for _ in range(rounds):
        for _, one, _, wall, cpu in runs:
            t, c = time.perf_counter(), time.thread_time()
            one()
            cpu.append(time.thread_time() - c)
            wall.append(time.perf_counter() - t)
    for kind, at in (("", 3), (" (CPU, this thread)", 4)):
        base_ns = statistics.median(runs[0][at]) / N * 1e9
        for run_ in runs:
            figure, target = run_[0] + kind, run_[2]
            ns = statistics.median(run_[at]) / N * 1e9
            if run_ is runs[0]:
                row(figure, ns, "ns/param", note=f"median of {rounds} interleaved rounds")
            else:
                row(figure, ns, "ns/param", f"kernel adam @1e7 f32{kind}", base_ns, target)


def main(argv=None):
    import argparse

    from bench.run import Config, row
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    run(Config(args.quick), row)


if __name__ == "__main__":
    main()
