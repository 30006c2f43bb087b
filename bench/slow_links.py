"""Steps over a slow link (issue 26): bytes and seconds per step on 100 Mbit/s with a 20 ms round trip
(bench/slowlink.py), each against today's float32 dense step over the same link in the same run.

    python -m bench --only slowlinks [--quick]

Rows: a dense float32 step (the baseline); top-k 1% and int8 (blocks of 256) gradients with error
feedback, with float32 and with bf16-delta replies (step_reply "bf16_delta": the rounding fed back by the
server); DiLoCo syncing every H = 50 inner steps with int8 pseudo-gradients, per inner step (the sync's
bytes and seconds over 50, the local numpy AdamW steps' seconds included). Bytes are the step's
messages both ways (StepRequest + StepResponse, serialized; HTTP/2 and TCP framing not counted); a
reply is the session's float32 parameters, 4 bytes a parameter down, unless it is bf16 deltas (2). Skipped, saying why, where the link cannot be made (not root, no ip or tc).

The dense, top-k and int8 steps (bf16 replies) over loopback too: where compression does not pay; and
compression.WherePays(top-k 1%) on each, with the share of steps it sent compressed.

Then convergence on the demo network (two hidden layers of 64, on the demo's data set: Fashion-MNIST when
Debian's dataset-fashion-mnist is installed, else scikit-learn's digits) over loopback (the link changes the
time, not the loss), as paired runs (the same initial weights and batches for both arms of a seed): top-k 1%
with error feedback against uncompressed steps, one writer, with Adam and with momentum SGD; and DiLoCo
(4 worker threads, H = 50, int8 pseudo-gradients, inner AdamW, outer Nesterov) against synchronous data
parallel AdamW of 4 workers on the same samples; final test loss each, the per-seed ratios and their mean.
"""
from __future__ import annotations

import dataclasses
import functools
import time

import numpy as np

from bench.run import row
from bench import slowlink
from optreg.app.demo import _one_blas_thread
from optreg.client.transport import Counted

H = 50
WORKERS, BATCH, HIDDEN = 4, 32, [64, 64]
LR, WD = 1e-3, 0.1  # AdamW's: DiLoCo's inner one (0.1 its default weight decay) and sync DP's on the server
# the single writer's optimizers and lrs, dense and top-k 1% alike: each optimizer's lr that did best dense
# on Fashion-MNIST over 2,000 steps of 32 (docs/slow-links.md)
TOPK = {"adam": 1e-3, "momentum": 0.01}


def bench_slow_links(cfg, server, echo):
    if (why := slowlink.unavailable()) is not None:
        print(f"(slowlinks: skipped, {why})", flush=True)
        return
    from optreg.client import Client
    from optreg.client.compression import Int8Blocks, TopK, WherePays
    from optreg.client.diloco import AdamW, DiLoCo, diloco_outer
    from optreg.v1 import session_pb2, tensors

    n = 200_000 if cfg.quick else 1_000_000
    reps = 2 if cfg.quick else 5
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(n).astype(np.float32)
    grads = [rng.standard_normal(n).astype(np.float32) for _ in range(4)]
    reply = session_pb2.StepResponse(step=1, tensors=[tensors.from_numpy("w", p0)]).ByteSize()
    reply_bf16 = session_pb2.StepResponse(step=1, tensors=[tensors.from_numpy("w", p0.astype(tensors.DTYPES[
        tensors.DataType.DATA_TYPE_BFLOAT16]))]).ByteSize()
    link_name = "100 Mbit/s, 20 ms RTT"
    with slowlink.SlowLink(int(server.address.rsplit(":", 1)[1]), mbit=100, rtt_ms=20) as link, \
            Client(link.address, timeout=600) as c:

        def per_step(encoding, step_reply=None, c=c):
            """(bytes, seconds) of one step, the median of `reps` after one untimed (which, with bf16 replies,
            is answered with the float32 parameters); `c`: a client over the link, or over loopback."""
            s = c.create_session("adam", {"w": p0.copy()}, lr=1e-3, keep=False, step_reply=step_reply)
            down = reply if step_reply is None else reply_bf16
            s.compress(encoding)
            times, sizes = [], []
            for i in range(reps + 1):
                g = {"w": grads[i % len(grads)]}
                if encoding is None:
                    up = session_pb2.StepRequest(session_id=s.id, step=s.step_count,
                                                 gradients=[tensors.from_numpy("w", g["w"])]).ByteSize()
                else:
                    msgs, _ = s.compression.encode(g)
                    up = session_pb2.StepRequest(session_id=s.id, step=s.step_count, compressed=msgs).ByteSize()
                t = time.perf_counter()
                s.step(g)
                if i:
                    times.append(time.perf_counter() - t)
                    sizes.append(up + down)
            s.delete()
            return float(np.median(sizes)), float(np.median(times))

        def where_pays(c=c, steps=12 if cfg.quick else 30):
            """WherePays(top-k 1%) with bf16 replies: (share of steps sent compressed after its first three,
            median seconds a step over them)."""
            s = c.create_session("adam", {"w": p0.copy()}, lr=1e-3, keep=False, step_reply="bf16_delta")
            s.compress(WherePays(TopK(0.01), probe_every=10))
            ways, times = [], []
            for i in range(steps):
                t = time.perf_counter()
                s.step({"w": grads[i % len(grads)]})
                if i >= 3:
                    ways.append(s.compression.now)
                    times.append(time.perf_counter() - t)
            s.delete()
            return float(np.mean(ways)), float(np.median(times))

        dense_b, dense_s = per_step(None)
        figures = {"top-k 1% + error feedback": per_step(TopK(0.01)),
                   "int8 blocks of 256 + error feedback": per_step(Int8Blocks(256)),
                   "top-k 1% + EF, bf16 replies": per_step(TopK(0.01), "bf16_delta"),
                   "int8 + EF, bf16 replies": per_step(Int8Blocks(256), "bf16_delta")}
        # Where compression does not pay: the same steps over loopback (what an off-switch would measure)
        with Client(server.address, timeout=600) as local:
            loopback = {"dense f32": per_step(None, c=local),
                        "top-k 1% + EF, bf16 replies": per_step(TopK(0.01), "bf16_delta", c=local),
                        "int8 + EF, bf16 replies": per_step(Int8Blocks(256), "bf16_delta", c=local)}
            switched = {"loopback": where_pays(local), "slow link": where_pays()}

        # DiLoCo: H local AdamW steps, then one sync (int8 pseudo-gradient, bf16 answer) to a Nesterov outer
        # session; its Step calls' bytes counted as they cross. The first answer is the parameters (the copy
        # the bf16 deltas start from), once a session: left out, as the first untimed step above.
        outer = c.create_session(**diloco_outer({"w": p0.copy()}), keep=False)
        loco = DiLoCo(outer, AdamW(lr=1e-3), every=H, compress=Int8Blocks(256))
        rounds = 2 if cfg.quick else 4
        counted = c.transport = Counted(c.transport)
        t = 0.0
        for i in range(rounds * H):
            if i == H:  # the second round on
                counted.bytes, t = 0, time.perf_counter()
            loco.step({"w": grads[i % len(grads)]})
        figures[f"DiLoCo H={H}, int8 up, bf16 down, per inner step"] = (
            counted.bytes / ((rounds - 1) * H), (time.perf_counter() - t) / ((rounds - 1) * H))
        c.transport = counted.inner
        outer.delete()

    what = f"(adam {n:.0e} f32, {link_name})"
    print(f"(slowlinks: {what})", flush=True)
    row("slow link: dense f32 step bytes", dense_b, "B", note=what)
    row("slow link: dense f32 step time", dense_s, "s", note=what)
    for name, (b, s) in figures.items():
        target = 0.01 if name.startswith("DiLoCo") else None  # the issue's: 1/100 of a dense step's bytes
        row(f"slow link: {name} bytes", b, "B", "dense f32 step bytes", dense_b, target, note=what)
        row(f"slow link: {name} time", s, "s", "dense f32 step time", dense_s, note=what)
    for where, (share, seconds) in switched.items():
        print(f"(slowlinks: WherePays(top-k 1%) over {where}: {share:.0%} of steps compressed after the first 3)",
              flush=True)
        base = dense_s if where == "slow link" else loopback["dense f32"][1]
        row(f"{where}: WherePays(top-k 1%), bf16 replies, step time", seconds, "s", f"dense f32 step time, {where}",
            base, note=f"{share:.0%} of steps compressed after the first 3")
    for name, (_, seconds) in loopback.items():
        row(f"loopback: {name} step time", seconds, "s", "dense f32 step time, loopback", loopback["dense f32"][1],
            note=f"(adam {n:.0e} f32, loopback)")
    convergence(cfg, server.address)
    wall_clock(cfg, server.address, link_name)


@functools.lru_cache(maxsize=1)
def _data():
    """The demo's data set, "auto": Fashion-MNIST when Debian's dataset-fashion-mnist is installed, else
    scikit-learn's digits (optreg.app.demo.data); its images as float32 (Fashion-MNIST's 70,000: 220 MB, kept
    for the process), loaded once."""
    from optreg.app.demo.data import load

    data = load(which="auto")
    return dataclasses.replace(data, x_train=data.x_train.astype(np.float32), x_test=data.x_test.astype(np.float32))


def _demo(seed: int = 0):
    """(the data set's name, the demo network's initial float32 weights drawn with `seed`, batch(rng),
    test_loss(params)). A seed's two arms start from the same weights and draw the same batches."""
    from optreg.app.demo.network import MultiLayerNet

    data = _data()
    x_train, x_test = data.x_train, data.x_test
    base = MultiLayerNet(data.input_size, HIDDEN, data.classes, np.random.default_rng(seed))
    base.params = {n: a.astype(np.float32) for n, a in base.params.items()}

    def batch(rng):
        i = rng.integers(0, len(x_train), BATCH)
        return x_train[i], data.t_train[i]

    def test_loss(params) -> float:
        net = base.copy()
        net.params = params
        return net.loss(x_test, data.t_test)

    return data.name, base, batch, test_loss


def train_workers(address: str, diloco: bool, seed: int, steps: int, every: int = 50):
    """The demo network trained by WORKERS worker threads, each with its own client and its own batches
    (seeded by `seed`, as are the initial weights): synchronous data parallel (each round the mean of the
    workers' gradients, one AdamW step on the server) or DiLoCo (inner AdamW on each worker, H = 50, int8
    pseudo-gradients, bf16 answers, outer Nesterov lr 0.7 momentum 0.9). The same AdamW (lr 1e-3, weight
    decay 0.1) either way, and the same samples: WORKERS x steps x BATCH. Returns (final test loss,
    [(seconds, test loss)] from worker 0, every `every` steps for sync DP, every round for DiLoCo; bytes of
    Step calls per worker step)."""
    import threading

    from optreg.client import Client
    from optreg.client.compression import Int8Blocks
    from optreg.client.diloco import AdamW, DiLoCo, diloco_outer

    _, base, batch, test_loss = _demo(seed)
    with Client(address, timeout=300) as c:
        # a lease of 300 s, not the server's 10: a DiLoCo worker calls once a round, and under load its first
        # round (joins, the wait for the others, 50 local steps on Fashion-MNIST) outlasted 10 s: the round
        # closed without it and its contribution was refused as stale
        kw = dict(workers=WORKERS, round_deadline=300.0, lease=300.0, keep=False)
        s = (c.create_session(**diloco_outer(base.copy().params, **kw)) if diloco
             else c.create_session("adamw", base.copy().params, lr=LR, weight_decay=WD, mode="sync", **kw))
        errors, curve, sent = [], [], []
        joined = threading.Barrier(WORKERS, timeout=120)  # every round has every worker, from the first

        def work(k):
            try:
                net, rng = base.copy(), np.random.default_rng([seed, k])
                with Client(address, timeout=300) as wc, wc.join(s.id, f"w{k}", net.params) as w:
                    wc.transport = counted = Counted(wc.transport)
                    joined.wait()
                    t0 = time.perf_counter()
                    if diloco:
                        loco = DiLoCo(w, AdamW(lr=LR), every=H, compress=Int8Blocks(256))
                        net.params = loco.params
                        step = loco.step
                    else:
                        step = w.step
                    for i in range(steps):
                        step(net.gradient(*batch(rng))[1])
                        if k == 0 and (i + 1) % (H if diloco else every) == 0:  # the weights the round left
                            curve.append((time.perf_counter() - t0, test_loss(net.params)))
                    sent.append(counted.bytes / steps)
            except Exception as e:
                errors.append(e)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(WORKERS)]
        # one BLAS thread: 4 workers' small matrices on 2 cores with a threaded BLAS each took 10x the time
        # (a DiLoCo run on Fashion-MNIST: 49-76 s against 5-7 s)
        with _one_blas_thread():
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        if errors:
            raise errors[0]
        final = test_loss(s.read_parameters())
        s.delete()
    return final, curve, float(np.mean(sent))


def single_writer(address: str, optimizer: str, lr: float, encoding, seed: int, steps: int) -> float:
    """The demo network trained by one client through the server, a step per batch of BATCH, its gradients
    compressed with `encoding` (None: dense); the initial weights and the batches drawn with `seed`, so a
    dense and a compressed run of one seed see the same samples in the same order. Returns the final test
    loss."""
    from optreg.client import Client

    _, base, batch, test_loss = _demo(seed)
    with Client(address, timeout=120) as c, _one_blas_thread():
        net = base.copy()
        s = c.create_session(optimizer, net.params, lr=lr, keep=False)
        s.compress(encoding)
        rng = np.random.default_rng([seed, 99])
        for _ in range(steps):
            s.step(net.gradient(*batch(rng))[1])
        s.delete()
        return test_loss(net.params)


def paired(compressed: list[float], baseline: list[float]) -> str:
    """Per-seed ratios of paired runs, their mean and spread, for a figure's note."""
    r = np.asarray(compressed) / np.asarray(baseline)
    return (f"per seed {np.round(r, 3).tolist()}, mean {r.mean():.3f}, range {r.min():.3f}-{r.max():.3f}"
            + (f", sd {r.std(ddof=1):.3f}" if len(r) > 1 else ""))


def convergence(cfg, address: str) -> None:
    """Final test losses over loopback (the link changes the time, not the loss), of paired runs: the two arms
    of a seed start from the same weights and see the same batches; the figure is the mean of the per-seed
    ratios (on Fashion-MNIST a seed's ratio still varies by ~5% for top-k, ~1% for DiLoCo)."""
    from optreg.client.compression import TopK

    name = _demo()[0]
    steps = 300 if cfg.quick else 2000
    seeds = (0, 1) if cfg.quick else tuple(range(5))
    # a single writer, dense against top-k 1% + error feedback, the same optimizer and lr: Adam (its second
    # moment is what top-k upsets) and momentum SGD (linear in the gradient: what error feedback's analysis
    # covers); docs/slow-links.md
    for optimizer, lr in TOPK.items():
        dense = [single_writer(address, optimizer, lr, None, sd, steps) for sd in seeds]
        topk = [single_writer(address, optimizer, lr, TopK(0.01), sd, steps) for sd in seeds]
        note = paired(topk, dense)
        print(f"(slowlinks: {name}, top-k 1% + EF, {optimizer} lr {lr:g}: dense test losses "
              f"{np.round(dense, 4).tolist()}, top-k {np.round(topk, 4).tolist()}; {note})", flush=True)
        row(f"convergence: top-k 1% + EF / dense, {optimizer} lr {lr:g}, test loss ({steps} steps)",
            float(np.mean(np.divide(topk, dense))), "x", "uncompressed, same seeds", 1.0, 1.01,
            note=f"{name}, single writer, batches of {BATCH}, {len(seeds)} paired seeds: {note}")

    seeds = (0,) if cfg.quick else (0, 1, 2)
    sync = [train_workers(address, False, sd, steps)[0] for sd in seeds]
    loco = [train_workers(address, True, sd, steps)[0] for sd in seeds]
    note = paired(loco, sync)
    print(f"(slowlinks: {name}, sync DP test losses {np.round(sync, 4).tolist()}, DiLoCo "
          f"{np.round(loco, 4).tolist()}; {note})", flush=True)
    row(f"convergence: DiLoCo H={H} int8 / sync DP, test loss", float(np.mean(np.divide(loco, sync))), "x",
        f"sync DP adamw x{WORKERS}, same seeds", 1.0, 1.02,
        note=f"{name}, {WORKERS} workers x {steps} steps x {BATCH} samples each, {len(seeds)} paired seeds: {note}")


def wall_clock(cfg, address: str, link_name: str) -> None:
    """Seconds over the shaped link for the same samples (whose final losses: see convergence), and to the same
    test loss: sync DP's final one within 2% on Fashion-MNIST (a seed's DiLoCo/sync DP ratio varies by ~1%
    there), within 10% on digits (one run's test loss varies by ~9% from seed to seed: a DiLoCo run 8% above
    sync DP's, within that spread, would never get within 2%)."""
    port = int(address.rsplit(":", 1)[1])
    steps = 300 if cfg.quick else 2000
    with slowlink.SlowLink(port, mbit=100, rtt_ms=20) as link:
        sync, sync_curve, sync_bytes = train_workers(link.address, False, 0, steps)
        loco, loco_curve, loco_bytes = train_workers(link.address, True, 0, steps)
    within = 0.02 if _demo()[0] == "Fashion-MNIST" else 0.10
    target = sync * (1 + within)

    def reached(curve):
        return next((t for t, loss in curve if loss <= target), float("inf"))

    t_sync, t_loco = reached(sync_curve), reached(loco_curve)
    print(f"(slowlinks: over {link_name}, final test loss sync DP {sync:.4f}, DiLoCo {loco:.4f}; to {target:.4f}: "
          f"sync DP {t_sync:.1f} s, DiLoCo {t_loco:.1f} s; DiLoCo's loss each round "
          f"{[round(x, 4) for _, x in loco_curve]})", flush=True)
    what = f"{_demo()[0]}, {WORKERS} workers x {steps} steps, {link_name}"
    row("demo net: sync DP step bytes per worker step", sync_bytes, "B", note=what)
    row(f"demo net: DiLoCo H={H} bytes per worker step", loco_bytes, "B", "sync DP bytes per worker step",
        sync_bytes, 0.01, note=what)
    row("demo net: DiLoCo seconds, same samples", loco_curve[-1][0], "s", "sync DP seconds, same samples",
        sync_curve[-1][0], 0.2, note=what)
    row(f"demo net: DiLoCo seconds to sync DP's final loss +{within:.0%}", t_loco, "s",
        f"sync DP seconds to its final loss +{within:.0%}", t_sync, 0.2, note=what)
