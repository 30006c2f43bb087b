"""optreg's benchmark suite: every figure beside a baseline measured in the same run.

    python -m bench            # the whole suite, a few minutes on 2 cores
    python -m bench --quick    # fewer repeats, sessions and client processes, ~2 min on 2 cores
    python -m bench --only small,large,shm --out bench/results.json

Prints a table (figure, value, baseline, baseline value, ratio, target) and
writes the same rows as JSON. Absolute times drift 20-35% on shared machines;
the ratios are what to compare across runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
for d in ("proto", "plugins", "server", "client", "examples/optreg-lion"):  # this tree's code, Lion included
    if str(ROOT / d) not in sys.path:
        sys.path.insert(0, str(ROOT / d))

ROWS: list[dict] = []


def row(figure, value, unit, baseline=None, base_value=None, target=None, note=""):
    ratio = value / base_value if base_value else None
    r = {"figure": figure, "value": value, "unit": unit, "baseline": baseline, "baseline_value": base_value,
         "ratio": ratio, "target": target, "note": note}
    if target is not None and ratio is not None:
        r["met"] = ratio <= target
    ROWS.append(r)
    _print_row(r)
    return r


def _fmt(v, unit):
    if v is None:
        return "-"
    if unit == "s":
        return f"{v * 1e3:.3f} ms" if v >= 1e-3 else f"{v * 1e6:.1f} us"
    return f"{v:.3g} {unit}"


def _print_row(r):
    ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
    tgt = "" if r["target"] is None else f"<= {r['target']:.3g}x {'ok' if r.get('met') else 'MISSED'}"
    print(f"{r['figure']:<48} {_fmt(r['value'], r['unit']):>12}  {r['baseline'] or '':<34} "
          f"{_fmt(r['baseline_value'], r['unit']):>12}  {ratio:>7}  {tgt}", flush=True)


def pct(xs, q):
    return float(np.percentile(np.asarray(xs), q))


def interleaved(fns: dict, reps: int) -> dict:
    """Median seconds of each fn, run in alternation so the machine's drift hits all alike."""
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            times[k] += timed(fn, 1)
    return {k: statistics.median(v) for k, v in times.items()}


def timed(fn, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


# -- processes -----------------------------------------------------------------
def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / d) for d in ("proto", "plugins", "server", "client",
                                                                   "examples/optreg-lion")]
                                        + [str(ROOT), env.get("PYTHONPATH", "")])
    env["OPTREG_JIT_BLOCK"] = "1"  # the server compiles its kernels before it listens
    return env


class Child:
    def __init__(self, args, ready_prefix):
        self.proc = subprocess.Popen([sys.executable, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=_env(), cwd=str(ROOT))
        line = self.proc.stdout.readline()
        if not line.startswith(ready_prefix):
            self.proc.kill()
            raise RuntimeError(f"{args} did not start: {line!r}")
        self.line = line.split()

    def rss(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for ln in f:
                if ln.startswith("VmRSS:"):
                    return int(ln.split()[1]) * 1024
        return 0

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_optreg(*extra) -> Child:
    # Memory only: the figures measure the service against transport baselines, not the disk (durability
    # costs are bench/durability.py's), and the bench must not write into the user's data directory.
    # (Before this flag the server took ~/.local/share/optreg with every-step durability: each step fsync'd.)
    c = Child(["-m", "optreg.server", "serve", "--host", "127.0.0.1", "--port", "0", "--log-level", "warning",
               "--memory-only", *extra], "optreg serving on ")
    c.address = c.line[-1]
    return c


def start_default(data_dir, *extra) -> Child:
    """A default server (durable, `log`) on its own data directory, as `optreg serve --data-dir` starts it."""
    c = Child(["-m", "optreg.server", "serve", "--host", "127.0.0.1", "--port", "0", "--log-level", "warning",
               "--data-dir", str(data_dir), *extra], "optreg serving on ")
    c.address = c.line[-1]
    return c


def start_echo() -> Child:
    c = Child(["-m", "bench.echo"], "echo ")
    c.grpc_port, c.tcp_port = int(c.line[2]), int(c.line[4])
    return c


def _channel(address):
    import grpc
    return grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 256 << 20),
                                                   ("grpc.max_send_message_length", 256 << 20)])


# -- figures ---------------------------------------------------------------------
def bench_small(cfg, server, echo):
    """Adam, 1e3 float32: one step per call, unary and one-message streams, vs gRPC echo of the same bytes."""
    from optreg.client import Client
    from optreg.v1 import session_pb2, tensors

    n, reps = 1000, cfg.small_reps
    rng = np.random.default_rng(0)
    with Client(server.address) as c:
        s = c.create_session("adam", {"w": rng.standard_normal(n).astype(np.float32)})
        g = {"w": rng.standard_normal(n).astype(np.float32)}
        req = session_pb2.StepRequest(session_id=s.id, step=0, gradients=[tensors.from_numpy("w", g["w"])])
        reply_size = len(session_pb2.StepResponse(step=1, tensors=[tensors.from_numpy("w", g["w"])])
                         .SerializeToString())
        for _ in range(50):
            s.step(g)
        unary = timed(lambda: s.step(g), reps)
        s._sender = lambda grads: s._stream  # the same session over StepStream: one message each way
        for _ in range(20):
            s.step(g)
        stream = timed(lambda: s.step(g), reps)
        s.delete()
    ch = _channel(f"127.0.0.1:{echo.grpc_port}")
    up = req.SerializeToString()
    eu = ch.unary_unary("/bench.Echo/Unary")
    es = ch.stream_stream("/bench.Echo/Stream")
    payload = up + b"\0" * max(0, reply_size - len(up))  # the larger of request and reply, each way
    for _ in range(50):
        eu(payload)
    echo_unary = timed(lambda: eu(payload), reps)
    for _ in range(20):
        list(es(iter([payload])))
    echo_stream = timed(lambda: list(es(iter([payload]))), reps)
    ch.close()
    row("small step unary p50 (adam 1e3 f32)", pct(unary, 50), "s", "gRPC unary echo p50", pct(echo_unary, 50), 1.15)
    row("small step unary p99", pct(unary, 99), "s", "gRPC unary echo p99", pct(echo_unary, 99))
    row("small step stream p50", pct(stream, 50), "s", "gRPC bidi echo p50", pct(echo_stream, 50), 1.15)
    row("small step stream p99", pct(stream, 99), "s", "gRPC bidi echo p99", pct(echo_stream, 99))


def bench_large(cfg, server, echo):
    """Adam 1e7 float32 over StepStream vs raw TCP echo and chunked gRPC echo of the same bytes."""
    import ml_dtypes

    from optreg.client import Client

    n, reps = 10_000_000, cfg.large_reps
    rng = np.random.default_rng(1)
    w = rng.standard_normal(n).astype(np.float32)
    g32 = (rng.standard_normal(n) * 1e-2).astype(np.float32)
    nbytes = w.nbytes
    from bench.echo import TcpEchoClient
    tcp = TcpEchoClient(echo.tcp_port)
    payload = bytearray(nbytes)
    tcp.roundtrip(payload)
    tcp_t = timed(lambda: tcp.roundtrip(payload), reps)
    tcp.close()

    ch = _channel(f"127.0.0.1:{echo.grpc_port}")
    es = ch.stream_stream("/bench.Echo/Stream")
    chunk = 1 << 20
    mv = memoryview(payload)
    parts = [bytes(mv[i:i + chunk]) for i in range(0, nbytes, chunk)]
    list(es(iter(parts)))
    grpc_t = timed(lambda: sum(len(x) for x in es(iter(parts))), reps)
    ch.close()

    with Client(server.address) as c:
        s = c.create_session("adam", {"w": w})
        # The first narrow step queues the compile of the kernel that widens it in its pass (~1 s,
        # on the server's compile thread; numpy widens meanwhile): wait for it, as a long run would.
        g16 = g32.astype(np.float16)
        gbf = g32.astype(ml_dtypes.bfloat16)
        for g in (g32, g16, gbf):
            s.step({"w": g})
        time.sleep(4)
        # Interleaved, step by step: the machine's drift hits the three dtypes alike.
        step_t, f16_t, bf16_t = [], [], []
        for _ in range(reps):
            for g, out in ((g32, step_t), (g16, f16_t), (gbf, bf16_t)):
                out.extend(timed(lambda: s.step({"w": g}), 1))
        s.delete()
    tcp_m, grpc_m, step_m = statistics.median(tcp_t), statistics.median(grpc_t), statistics.median(step_t)
    row("large step p50 (adam 1e7 f32, 40 MB up+down)", step_m, "s", "raw TCP echo 40 MB p50", tcp_m, 1.5)
    row("large step p50", step_m, "s", "gRPC echo, 1 MiB chunks p50", grpc_m)
    row("large step, fp16 gradients p50", statistics.median(f16_t), "s", "large step f32 gradients", step_m,
        1 / 1.2, note="20 MB up, 40 MB down; target: at least 1.2x faster")
    row("large step, bf16 gradients p50", statistics.median(bf16_t), "s", "large step f32 gradients", step_m)


def bench_shm(cfg, server, echo):
    """Adam 1e7 float32 stepped through a same-host shared-memory segment vs the same kernel in-process:
    plain (the server's own master copy, updated parameters copied into the segment) and resident (the
    segment is the master copy, updated in place). Beside the in-process kernel over numpy memory, the
    same kernel with p and g in a shared-memory segment (m and v in numpy memory, as a resident session
    keeps them): /dev/shm pages are 4 KiB where numpy's large arrays get transparent huge pages, and the
    kernel is slower over them by itself. All rounds are interleaved."""
    from multiprocessing import shared_memory

    from optreg.client import Client
    from optreg.plugins.registry import Registry
    from optreg.server.kernels import jit
    from optreg.server.kernels import warmup
    from optreg.server.kernels import apply as kernels
    from optreg.server.steps import resident

    n, reps = 10_000_000, max(5, cfg.large_reps * 2)
    rng = np.random.default_rng(3)
    w = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 1e-2).astype(np.float32)
    defn, hp = Registry().get("adam").definition, {"lr": 0.001, "beta1": 0.9, "beta2": 0.999}
    warmup.warm(block=True, definitions=[defn], stats=True)
    jit.wait_idle(600)  # (the statistics kernels' compiles are queued by the jobs warm waited for)
    p, st, step = w.copy(), {"m": np.zeros(n, np.float32), "v": np.zeros(n, np.float32)}, [0]
    seg = shared_memory.SharedMemory(create=True, size=2 * w.nbytes)
    p_shm = np.ndarray(n, np.float32, buffer=seg.buf)
    g_shm = np.ndarray(n, np.float32, buffer=seg.buf, offset=w.nbytes)
    p_shm[...], g_shm[...] = w, g
    st_shm = {"m": np.zeros(n, np.float32), "v": np.zeros(n, np.float32)}

    def local():
        step[0] += 1
        kernels.apply(defn, p, g, st, step[0], hp)

    def local_shm():
        step[0] += 1
        kernels.apply(defn, p_shm, g_shm, st_shm, step[0], hp)

    def local_checked():  # what a resident step computes, without gRPC: the finite check (its reduction
        step[0] += 1      # is max |g|), then the update with the rest of the statistics
        top = resident._check_finite("w", g)
        kernels.apply(defn, p, g, st, step[0], hp, stats=np.zeros(kernels.STATS), grad_abs_max=top)
    try:
        with Client(server.address) as c:
            plain = c.create_session("adam", {"w": w}, keep=False)
            res = c.create_session("adam", {"w": w}, keep=False)
            steppers = []
            for s, in_segment in ((plain, False), (res, True)):
                s.enable_shared_memory(resident=in_segment)
                s.gradients["w"][...] = g  # the training program writes its gradients here
                grads = {"w": s.gradients["w"]}
                steppers.append(lambda s=s, grads=grads: s.step(grads))
            runs = {"local": local, "shm": local_shm, "checked": local_checked, "plain": steppers[0],
                    "resident": steppers[1]}
            times = {k: [] for k in runs}
            for _ in range(2):  # warm: compiled kernels, pages of m and v touched
                for fn in runs.values():
                    fn()
            for _ in range(reps):
                for k, fn in runs.items():
                    times[k] += timed(fn, 1)
            same = np.array_equal(res.arrays["w"], plain.arrays["w"])
            plain.delete()
            res.delete()
    finally:
        del p_shm, g_shm
        seg.close()
        seg.unlink()
    del p, st, st_shm
    med = {k: statistics.median(v) for k, v in times.items()}
    row("shared-memory step p50, resident (adam 1e7 f32)", med["resident"], "s",
        "in-process kernel update p50", med["local"], 1.2,
        note="" if same else "RESIDENT AND PLAIN PARAMETERS DIFFER")
    row("shared-memory step p50, resident", med["resident"], "s",
        "in-process kernel over shared-memory pages p50", med["shm"],
        note="p and g in a /dev/shm segment (4 KiB pages), m and v in numpy memory")
    row("in-process kernel over shared-memory pages p50", med["shm"], "s",
        "in-process kernel update p50", med["local"], note="the floor the segment's 4 KiB pages set")
    row("shared-memory step p50, resident", med["resident"], "s",
        "in-process finite check + kernel with statistics p50", med["checked"],
        note="the same passes over memory as the resident step, without gRPC")
    row("shared-memory step p50, plain (server copy)", med["plain"], "s",
        "in-process kernel update p50", med["local"])


def _book(name, hp):
    """Book-style numpy expressions (fresh temporaries, as chapter 6 writes them)."""
    def sgd(p, g, st, t):
        p -= hp["lr"] * g

    def momentum(p, g, st, t):
        st["v"] = hp["momentum"] * st["v"] - hp["lr"] * g
        p += st["v"]

    def nesterov(p, g, st, t):
        mu, lr = hp["momentum"], hp["lr"]
        p += mu * mu * st["v"] - (1 + mu) * lr * g
        st["v"] = mu * st["v"] - lr * g

    def adagrad(p, g, st, t):
        st["h"] += g * g
        p -= hp["lr"] * g / (np.sqrt(st["h"]) + 1e-7)

    def rmsprop(p, g, st, t):
        d = hp["decay_rate"]
        st["h"] *= d
        st["h"] += (1 - d) * g * g
        p -= hp["lr"] * g / (np.sqrt(st["h"]) + 1e-7)

    def adam(p, g, st, t):
        b1, b2 = hp["beta1"], hp["beta2"]
        lr_t = hp["lr"] * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
        st["m"] += (1 - b1) * (g - st["m"])
        st["v"] += (1 - b2) * (g ** 2 - st["v"])
        p -= lr_t * st["m"] / (np.sqrt(st["v"]) + 1e-7)

    return locals()[name]


def _torch_opt(name, hp, p):
    import torch
    kinds = {"sgd": lambda: (torch.optim.SGD, dict(lr=hp["lr"])),
             "momentum": lambda: (torch.optim.SGD, dict(lr=hp["lr"], momentum=hp["momentum"])),
             "nesterov": lambda: (torch.optim.SGD, dict(lr=hp["lr"], momentum=hp["momentum"], nesterov=True)),
             "adagrad": lambda: (torch.optim.Adagrad, dict(lr=hp["lr"])),
             "rmsprop": lambda: (torch.optim.RMSprop, dict(lr=hp["lr"], alpha=hp["decay_rate"])),
             "adam": lambda: (torch.optim.Adam, dict(lr=hp["lr"]))}
    cls, kw = kinds[name]()
    for mode in ("fused", "foreach"):
        try:
            opt = cls([p], **kw, **{mode: True})
            opt.step()
            return opt, mode
        except (RuntimeError, TypeError, ValueError):
            continue
    raise RuntimeError(f"torch {name}: neither fused nor foreach")


def bench_kernels(cfg, server, echo):
    """ns/param of the server's kernel per built-in, vs the book's numpy expression and torch.optim."""
    from optreg.plugins.registry import Registry
    from optreg.server.kernels import jit
    from optreg.server.kernels import warmup
    from optreg.server.kernels import apply as kernels

    warmup.warm(block=True)
    threads = jit.threads()
    try:
        import torch
        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    reg = Registry()
    hps = {"sgd": {"lr": 0.01}, "momentum": {"lr": 0.01, "momentum": 0.9},
           "nesterov": {"lr": 0.01, "momentum": 0.9}, "adagrad": {"lr": 0.01},
           "rmsprop": {"lr": 0.01, "decay_rate": 0.99}, "adam": {"lr": 0.001, "beta1": 0.9, "beta2": 0.999}}
    rng = np.random.default_rng(2)
    print(f"  (kernels: {'numba' if jit.names() else 'numpy'}, {threads} thread(s))", flush=True)
    for size in (1_000, 100_000, 10_000_000):
        reps = cfg.kernel_reps(size)
        base_p = rng.standard_normal(size).astype(np.float32)
        g = (rng.standard_normal(size) * 1e-2).astype(np.float32)
        for name in ("sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam"):
            defn, hp = reg.get(name).definition, hps[name]
            p = base_p.copy()
            st = {s.name: np.full(size, s.initial_value, np.float32) for s in defn.slots}
            step = [0]

            def ours():
                step[0] += 1
                kernels.apply(defn, p, g, st, step[0], hp)
            ours()
            t_ours = min(timed(ours, reps)) / size * 1e9
            book = _book(name, hp)
            bp, bst = base_p.copy(), {k: v.copy() for k, v in st.items()}
            bstep = [0]

            def run_book():
                bstep[0] += 1
                book(bp, g, bst, bstep[0])
            run_book()
            t_book = min(timed(run_book, max(2, reps // 2))) / size * 1e9
            label = f"kernel {name} @{size:.0e}"
            row(label, t_ours, "ns/param", "book numpy expression", t_book,
                (1 / 3) if size == 10_000_000 else None)
            if torch is not None:
                tp = torch.from_numpy(base_p.copy()).requires_grad_()
                tp.grad = torch.from_numpy(g.copy())
                opt, mode = _torch_opt(name, hp, tp)
                with torch.no_grad():
                    t_torch = min(timed(opt.step, reps)) / size * 1e9
                row(label, t_ours, "ns/param", f"torch.optim {name} {mode}", t_torch,
                    1.0 if (size == 10_000_000 and name == "adam") else None)
                del opt, tp
        del base_p, g
    _bench_widening(cfg, reg, hps["adam"], rng)


def _bench_widening(cfg, reg, hp, rng):
    """Adam 1e7 with a float16 gradient: widened inside the kernel pass vs numpy astype then the kernel."""
    from optreg.server.kernels import jit
    from optreg.server.kernels import warmup
    from optreg.server.kernels import apply as kernels
    from optreg.server.kernels import widen as widenkernels
    from optreg.server.steps.run import widen

    defn, n, f32 = reg.get("adam").definition, 10_000_000, np.dtype(np.float32)
    widenkernels.lookup(defn, f32, np.dtype(np.float16))
    jit.wait_idle()
    p = rng.standard_normal(n).astype(np.float32)
    st = {"m": np.zeros(n, np.float32), "v": np.zeros(n, np.float32)}
    g16 = (rng.standard_normal(n) * 1e-2).astype(np.float16)
    g32 = g16.astype(np.float32)
    reps = cfg.kernel_reps(n)
    runs = {"in": [], "astype": [], "f32": []}
    for _ in range(reps):  # interleaved
        runs["in"] += timed(lambda: kernels.apply(defn, p, g16, st, 1, hp), 1)
        runs["astype"] += timed(lambda: kernels.apply(defn, p, widen(g16, f32), st, 1, hp), 1)
        runs["f32"] += timed(lambda: kernels.apply(defn, p, g32, st, 1, hp), 1)
    ns = {k: min(v) / n * 1e9 for k, v in runs.items()}
    row("kernel adam @1e7, fp16 gradient widened in pass", ns["in"], "ns/param", "numpy widen, then the kernel",
        ns["astype"])
    row("kernel adam @1e7, fp16 gradient widened in pass", ns["in"], "ns/param", "the kernel, f32 gradient",
        ns["f32"])


def bench_declared(cfg, _server, _echo):
    """Declared kernels (torch.adam, adamw, Lion) and Adam with statistics vs the built-in adam kernel."""
    from bench import kernels as declared
    declared.run(cfg, row)


def bench_vs(cfg, _server, _echo):
    """optreg's Adam beside torch fused, DeepSpeed's CPU Adam and the bandwidth floor (bench/kernels_vs.py)."""
    from bench import kernels_vs
    kernels_vs.run(cfg, row)


def bench_memory(cfg, _server, _echo):
    """Resident memory per small session beyond its arrays, in a fresh server."""
    from optreg.client import Client

    server = start_optreg()
    try:
        n_sessions, n = cfg.sessions, 1000
        with Client(server.address) as c:
            w = {"w": np.zeros(n, np.float32)}
            warm = [c.create_session("adam", w) for _ in range(20)]  # imports, caches, thread stacks
            for s in warm:
                s.step({"w": np.ones(n, np.float32)})
            before = server.rss()
            ss = [c.create_session("adam", w) for _ in range(n_sessions)]
            for s in ss:
                s.step({"w": np.ones(n, np.float32)})
            after = server.rss()
        arrays = n * 4 * 3  # w, m, v
        per = (after - before) / n_sessions
        row(f"RSS per small session (adam 1e3 f32, {n_sessions})", (per - arrays) / 1024, "KiB",
            "target 10 KiB", 10.0, 1.0, note=f"{per / 1024:.1f} KiB total incl. {arrays / 1024:.1f} KiB arrays")
    finally:
        server.stop()


def _clients(address, k, seconds, durability=None):
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    start_q, done_q = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=_worker_entry, args=(address, seconds, start_q, done_q, durability))
             for _ in range(k)]
    for p in procs:
        p.start()
    time.sleep(1.5 + 0.2 * k)  # let them connect and warm up
    for _ in procs:
        start_q.put(1)
    counts = [done_q.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    failed = [c for c in counts if isinstance(c, str)]
    if failed:  # a worker's own error, not a bare queue timeout two minutes later
        raise RuntimeError(f"{len(failed)} of {k} bench clients failed: {failed[0]}")
    return sum(counts) / seconds


def _worker_entry(address, seconds, start_q, done_q, durability=None):
    from optreg.client import Client
    rng = np.random.default_rng()
    count = 0
    try:
        # wait_for_ready: on a loaded machine a new connection can time out before the server's first
        # HTTP/2 frame (UNAVAILABLE); waiting for it is what a client that means to train would do.
        with Client(address, wait_for_ready=True) as c:
            s = c.create_session("adam", {"w": rng.standard_normal(1000).astype(np.float32)}, durability=durability)
            g = {"w": rng.standard_normal(1000).astype(np.float32)}
            for _ in range(20):
                s.step(g)
            start_q.get()
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                s.step(g)
                count += 1
            s.delete()
    except Exception as e:  # reported to the parent, which raises it
        count = f"{type(e).__name__}: {e}"
    done_q.put(count)


def bench_concurrency(cfg, server, _echo):
    one = _clients(server.address, 1, cfg.conc_seconds)
    many = _clients(server.address, cfg.clients, cfg.conc_seconds)
    row(f"{cfg.clients} clients aggregate steps/s (adam 1e3)", many, "steps/s", "1 client steps/s", one,
        note="higher is better; 2 cores shared by server and clients")


def bench_small_parts(cfg, server, echo):
    from bench.small_parts import bench_small_parts as run
    run(cfg, server, echo, row, _channel)


def bench_torch(cfg, server, echo):
    from bench.torch_adapter import bench_torch as run  # imports torch only when this section runs
    run(cfg, server, echo)


def bench_durability(cfg, server, echo):
    from bench.durability import bench_durability as run
    run(cfg, server, echo)


def bench_resident_durability(cfg, server, echo):
    from bench.durability import bench_resident_durability as run  # fast steps: the memory log
    run(cfg, server, echo)


def bench_workers(cfg, server, echo):
    from bench.workers import bench_workers as run  # several workers on one session (docs/workers.md)
    run(cfg, server, echo)


def bench_sparse(cfg, server, echo):
    from bench.sparse import bench_sparse as run  # sparse rows: 1% of a 1e6x64 table vs the dense step
    run(cfg, server, echo)


def bench_wal(cfg, server, echo):
    from bench.wal import bench_wal as run  # the log/snapshot library's figures (no server involved)
    run(cfg, server, echo)


def bench_telemetry(cfg, server, echo):
    from bench.telemetry import bench_telemetry as run  # statistics cost, commit-to-browser latency
    run(cfg, server, echo)


def bench_streams(cfg, server, echo):
    from bench.streams import bench_streams as run  # several streams per step, chunk pipeline depth
    run(cfg, server, echo)


def bench_chaos(cfg, server, echo):
    from bench.chaos import bench_chaos as run  # workers and the server killed under a sync session (issue 22)
    run(cfg, server, echo)


def bench_waiting(cfg, server, echo):
    from bench.waiting import bench_waiting as run  # 1,000 waiting members, watchers, stalled uploads (issue 23)
    run(cfg, server, echo)


def bench_sessions(cfg, server, echo):
    from bench.sessions import bench_sessions as run  # 100,000 durable sessions vs 100 (issue 23)
    run(cfg, server, echo)


def bench_v2(cfg, server, echo):
    from bench.v2 import bench_v2 as run  # contract v2: factored and bfloat16 state bytes, a Muon step (issue 24)
    run(cfg, server, echo)


def bench_slow_links(cfg, server, echo):
    from bench.slow_links import bench_slow_links as run  # steps over 100 Mbit/s, 20 ms RTT (issue 26)
    run(cfg, server, echo)


def bench_ray(cfg, server, echo):
    from bench.ray_step import bench_ray as run  # Ray clusters; --quick runs it only when named (--only)
    run(cfg, server, echo)


SECTIONS = {"small": bench_small, "smallparts": bench_small_parts, "large": bench_large, "shm": bench_shm, "kernels": bench_kernels,
            "declared": bench_declared, "vs": bench_vs, "memory": bench_memory, "concurrency": bench_concurrency,
            "torch": bench_torch, "wal": bench_wal, "durability": bench_durability,
            "resident-durability": bench_resident_durability, "telemetry": bench_telemetry,
            "workers": bench_workers, "sparse": bench_sparse, "streams": bench_streams, "chaos": bench_chaos,
            "waiting": bench_waiting, "sessions": bench_sessions, "v2": bench_v2, "slowlinks": bench_slow_links,
            "ray": bench_ray}


class Config:
    def __init__(self, quick: bool):
        self.quick = quick
        self.small_reps = 300 if quick else 2000
        self.large_reps = 3 if quick else 11
        self.sessions = 300 if quick else 1000
        self.conc_seconds = 2.0 if quick else 5.0
        # client processes in the concurrency runs: spawning 16 took most of --quick's time on 2 cores
        self.clients = 4 if quick else 16

    def kernel_reps(self, size):
        if size >= 10_000_000:
            return 3 if self.quick else 7
        return 20 if self.quick else 200


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and client processes (~2 min on 2 cores)")
    ap.add_argument("--only", default="", help="comma-separated sections: " + ",".join(SECTIONS))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results.json"))
    args = ap.parse_args(argv)
    cfg = Config(args.quick)
    names = [s for s in args.only.split(",") if s] or list(SECTIONS)
    cfg.selected = set(names) if args.only else set()  # (a section left out of --quick runs when named)
    t0 = time.time()
    print(f"optreg bench ({'quick' if cfg.quick else 'full'}) on {os.cpu_count()} cores, "
          f"python {platform.python_version()}, numpy {np.__version__}", flush=True)
    print(f"{'figure':<48} {'value':>12}  {'baseline':<34} {'base value':>12}  {'ratio':>7}  target")
    server, echo = start_optreg(), start_echo()
    seconds = {}  # per section: what makes a run long (the --quick smoke run in .ci/run must stay short)
    try:
        for name in names:
            t = time.time()
            SECTIONS[name](cfg, server, echo)
            seconds[name] = round(time.time() - t, 1)
    finally:
        server.stop()
        echo.stop()
    meta = {"cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "machine": platform.machine(), "quick": cfg.quick, "seconds": round(time.time() - t0, 1),
            "section_seconds": seconds, "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    pathlib.Path(args.out).write_text(json.dumps({"meta": meta, "rows": ROWS}, indent=1))
    print("seconds per section: " + ", ".join(f"{k} {v}" for k, v in seconds.items()))
    print(f"wrote {args.out} ({meta['seconds']} s)")


if __name__ == "__main__":
    main()
