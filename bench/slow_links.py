"""Steps over a slow link (issue 26): bytes and seconds per step on 100 Mbit/s with a 20 ms round trip
(bench/slowlink.py), each against today's float32 dense step over the same link in the same run.

    python -m bench --only slowlinks [--quick]

Rows: a dense float32 step (the baseline); top-k 1% and int8 (blocks of 256) gradients with error
feedback, with float32 and with bf16-delta replies (step_reply "bf16_delta": the rounding fed back by the
server); DiLoCo syncing every H = 50 inner steps with int8 pseudo-gradients, per inner step (the sync's
bytes and seconds over 50, the local numpy AdamW steps' seconds included). Bytes are the step's
messages both ways (StepRequest + StepResponse, serialized; HTTP/2 and TCP framing not counted); a
reply is the session's float32 parameters, 4 bytes a parameter down, unless it is bf16 deltas (2). Skipped, saying why, where the link cannot be made (not root, no ip or tc).

Then convergence on the demo network (digits, two hidden layers of 64) over loopback (the link changes
the time, not the loss): top-k 1% with error feedback against dense Adam on the same batches, and DiLoCo
(4 worker threads, H = 50, int8 pseudo-gradients, inner AdamW, outer Nesterov) against synchronous data
parallel Adam of 4 workers on the same number of samples; final test loss each, and the ratio.
"""
from __future__ import annotations

import time

import numpy as np

from bench.run import row
from bench import slowlink

H = 50
WORKERS, BATCH, HIDDEN = 4, 32, [64, 64]


def bench_slow_links(cfg, server, echo):
    if (why := slowlink.unavailable()) is not None:
        print(f"(slowlinks: skipped, {why})", flush=True)
        return
    from optreg.client import Client
    from optreg.client.compression import Int8Blocks, TopK
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

        def per_step(encoding, step_reply=None):
            """(bytes, seconds) of one step, the median of `reps` after one untimed (which, with bf16 replies,
            is answered with the float32 parameters)."""
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

        dense_b, dense_s = per_step(None)
        figures = {"top-k 1% + error feedback": per_step(TopK(0.01)),
                   "int8 blocks of 256 + error feedback": per_step(Int8Blocks(256)),
                   "top-k 1% + EF, bf16 replies": per_step(TopK(0.01), "bf16_delta"),
                   "int8 + EF, bf16 replies": per_step(Int8Blocks(256), "bf16_delta")}

        # DiLoCo: H local AdamW steps, then one sync (int8 pseudo-gradient) to a Nesterov outer session.
        outer = c.create_session(**diloco_outer({"w": p0.copy()}), keep=False)
        loco = DiLoCo(outer, AdamW(lr=1e-3), every=H, compress=Int8Blocks(256))
        rounds = 1 if cfg.quick else 3
        t = time.perf_counter()
        sync_bytes = 0
        for i in range(rounds * H):
            if (i + 1) % H == 0:
                pseudo = {"w": loco.start["w"] - loco.params["w"]}
                msgs, _ = outer.compression.encode(pseudo)  # the bytes the sync sends (encoded again by it)
                sync_bytes += session_pb2.StepRequest(session_id=outer.id, step=outer.step_count,
                                                      compressed=msgs).ByteSize() + reply
            loco.step({"w": grads[i % len(grads)]})
        figures[f"DiLoCo H={H}, int8, per inner step"] = (sync_bytes / (rounds * H),
                                                          (time.perf_counter() - t) / (rounds * H))
        outer.delete()

    convergence(cfg, server.address)
    what = f"(adam {n:.0e} f32, {link_name})"
    print(f"(slowlinks: {what})", flush=True)
    row("slow link: dense f32 step bytes", dense_b, "B", note=what)
    row("slow link: dense f32 step time", dense_s, "s", note=what)
    for name, (b, s) in figures.items():
        row(f"slow link: {name} bytes", b, "B", "dense f32 step bytes", dense_b, note=what)
        row(f"slow link: {name} time", s, "s", "dense f32 step time", dense_s, note=what)


def convergence(cfg, address: str) -> None:
    import threading

    from optreg.app.demo.data import load_digits_dataset
    from optreg.app.demo.network import MultiLayerNet
    from optreg.client import Client
    from optreg.client.compression import Int8Blocks, TopK
    from optreg.client.diloco import AdamW, DiLoCo, diloco_outer

    data = load_digits_dataset()
    base = MultiLayerNet(data.input_size, HIDDEN, data.classes, np.random.default_rng(0))
    steps = 300 if cfg.quick else 2000

    def batch(rng):
        i = rng.integers(0, len(data.x_train), BATCH)
        return data.x_train[i], data.t_train[i]

    # a single writer: dense Adam against top-k 1% + error feedback, the same batches
    finals = {}
    with Client(address, timeout=120) as c:
        for name, encoding in (("dense", None), ("top-k 1%", TopK(0.01))):
            net = base.copy()
            s = c.create_session("adam", net.params, lr=1e-3, keep=False)
            s.compress(encoding)
            rng = np.random.default_rng(1)
            for _ in range(steps):
                s.step(net.gradient(*batch(rng))[1])
            finals[name] = net.loss(data.x_test, data.t_test)
            s.delete()
    row(f"convergence: top-k 1% + EF test loss ({steps} steps)", finals["top-k 1%"], "loss", "dense adam test loss",
        finals["dense"], 1.01, note="digits, single writer, same batches")

    def train(diloco: bool) -> float:
        with Client(address, timeout=120) as c:
            kw = dict(workers=WORKERS, round_deadline=120.0, keep=False)
            s = (c.create_session(**diloco_outer(base.copy().params, **kw)) if diloco
                 else c.create_session("adam", base.copy().params, lr=1e-3, mode="sync", **kw))
            errors = []
            joined = threading.Barrier(WORKERS, timeout=120)  # every round has every worker, from the first

            def work(k):
                try:
                    net, rng = base.copy(), np.random.default_rng([2, k])
                    with Client(address, timeout=120) as wc, wc.join(s.id, f"w{k}", net.params) as w:
                        joined.wait()
                        if not diloco:
                            for _ in range(steps):
                                w.step(net.gradient(*batch(rng))[1])
                            return
                        loco = DiLoCo(w, AdamW(lr=1e-3, weight_decay=0.0), every=H, compress=Int8Blocks(256))
                        net.params = loco.params
                        for _ in range(steps):
                            loco.step(net.gradient(*batch(rng))[1])
                except Exception as e:
                    errors.append(e)

            threads = [threading.Thread(target=work, args=(k,)) for k in range(WORKERS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            if errors:
                raise errors[0]
            net = base.copy()
            net.params = s.read_parameters()
            s.delete()
            return net.loss(data.x_test, data.t_test)

    sync, loco = train(False), train(True)
    row(f"convergence: DiLoCo H={H} int8 test loss", loco, "loss", f"sync DP adam x{WORKERS} test loss", sync, 1.02,
        note=f"digits, {WORKERS} workers x {steps} steps x {BATCH} samples each")
