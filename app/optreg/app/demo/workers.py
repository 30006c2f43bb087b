"""`optreg demo --workers N`: N worker processes train the demo's network through ONE session.

Each worker is a process of its own holding 1/N of the training data; every round it contributes
the gradient of a batch of its own, the session's sync round applies their mean (an effective batch
N times as large), and every worker gets the same new parameters. The same network is then trained
by one worker alone on all the data, and both losses, per round, go into workers.png: the loss
against one worker. Summary in workers.json beside it (docs/workers.md).

With `--diloco` the N workers train instead with DiLoCo (optreg.client.diloco: H local AdamW steps, then
the int8 pseudo-gradient to a Nesterov outer session answering bf16 deltas) against synchronous data
parallel with the same AdamW on the same samples: training loss per step and against the bytes the
Step calls carried, in diloco.png; diloco.json beside it (docs/slow-links.md).
"""
from __future__ import annotations

import multiprocessing as mp
import pathlib
import time

import numpy as np

BATCH = 100
HIDDEN = [100, 100]
OPTIMIZER, LR = "sgd", 0.1  # plain SGD: the mean of N gradients is exactly a batch N times as large
ROUNDS = 300
QUICK_ROUNDS = 30
# DiLoCo against sync DP (--diloco) in the bench's regime (bench/slow_links.py): every worker draws batches
# of 32 from the whole training set (a quarter of digits' is 374 images: 50 local steps of 100 would be 13
# passes over it a round, and the workers would learn their shards, not the task).
DILOCO_ROUNDS = 2000  # steps per worker (40 syncs of H = 50)
DILOCO_EVERY = 50  # H; a shorter run syncs every sixth of it
DILOCO_BATCH = 32
DILOCO_LR = 1e-3  # AdamW's: DiLoCo's inner one, and sync DP's on the server (weight decay 0.1 both)


def _worker(address: str, token: str | None, session_id: str, name: str, shard: int, shards: int, rounds: int,
            seed: int, data_args: tuple, out, kind: str = "sgd", every: int = 0) -> None:
    """One worker process: join, then contribute a batch gradient per round until `rounds` closed; or, for
    kind "diloco", `rounds` DiLoCo inner steps syncing every `every`. "sgd": batches of BATCH from its shard;
    otherwise of DILOCO_BATCH from all the data. Puts (name, [(step, loss, bytes so far)])."""
    from optreg.app.demo import _one_blas_thread, data
    from optreg.app.demo.network import MultiLayerNet
    from optreg.client import Client
    from optreg.client.compression import Int8Blocks
    from optreg.client.diloco import AdamW, DiLoCo
    from optreg.client.transport import Counted

    with _one_blas_thread():  # small matrices: more BLAS threads only contend with the other workers
        ds = data.load(*data_args)
        x, t = ds.x_train[shard::shards], ds.t_train[shard::shards]
        batch = BATCH
        if kind != "sgd":
            x, t, batch = ds.x_train, ds.t_train, DILOCO_BATCH
        net = MultiLayerNet(ds.input_size, HIDDEN, ds.classes, np.random.default_rng(0))
        rng = np.random.default_rng(seed)
        losses = []
        client = Client(address, token=token, timeout=120)
        client.transport = counted = Counted(client.transport)
        with client, client.join(session_id, name, net.params, heartbeat_every=2.0) as w:
            # A round waits for the live members only: start when all are members, so every round has N.
            deadline = time.monotonic() + 300
            while len(client.get_session(session_id).members) < shards and time.monotonic() < deadline:
                time.sleep(0.05)
            w.refresh()
            if kind == "diloco":
                loco = DiLoCo(w, AdamW(lr=DILOCO_LR), every=every, compress=Int8Blocks(256))
                net.params = loco.params  # trained in place; each sync restarts them from the outer answer
                for step in range(rounds):
                    i = rng.integers(0, len(x), batch)
                    loss, grads = net.gradient(x[i], t[i])
                    loco.step(grads)
                    losses.append((step, float(loss), counted.bytes))
            while kind != "diloco" and w.round < rounds:
                i = rng.integers(0, len(x), batch)
                loss, grads = net.gradient(x[i], t[i])
                step = w.round
                w.step(grads, metrics={"loss": float(loss)})  # net.params now hold the round's parameters
                losses.append((step, float(loss), counted.bytes))
        out.put((name, losses))


def train(client, address: str, token: str | None, dataset, data_args: tuple, workers: int, rounds: int,
          session_id: str | None = None, kind: str = "sgd", every: int = 0) -> dict:
    """One sync session trained by `workers` processes; the mean loss per round and the last round. `kind`:
    "sgd" (the session's SGD), "adamw" (AdamW, for the DiLoCo comparison) or "diloco" (an outer session;
    the workers sync every `every` local steps)."""
    from optreg.app.demo.network import MultiLayerNet
    from optreg.client.diloco import diloco_outer
    net = MultiLayerNet(dataset.input_size, HIDDEN, dataset.classes, np.random.default_rng(0))
    shared = dict(session_id=session_id, workers=workers, mode="sync", round_deadline=60.0, durability="none")
    if kind == "diloco":
        s = client.create_session(**diloco_outer(net.params, **shared))
    elif kind == "adamw":
        s = client.create_session("adamw", net.params, lr=DILOCO_LR, weight_decay=0.1, **shared)
    else:
        s = client.create_session(OPTIMIZER, net.params, lr=LR, **shared)
    ctx = mp.get_context("spawn")  # fresh interpreters: no copy of this process's server threads
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(address, token, s.id, f"w{k}", k, workers, rounds, k, data_args,
                                               queue, kind, every), daemon=True)
             for k in range(workers)]
    started = time.perf_counter()
    try:
        for p in procs:
            p.start()
        per_round: dict[int, list[float]] = {}
        sent: dict[int, int] = {}  # step -> bytes all workers' Step calls carried up to it
        for _ in procs:
            _, losses = queue.get(timeout=1800)
            for rnd, loss, nbytes in losses:
                per_round.setdefault(rnd, []).append(loss)
                sent[rnd] = sent.get(rnd, 0) + nbytes
        for p in procs:
            p.join(60)
            if p.exitcode != 0:
                raise RuntimeError(f"a worker process ended with exit code {p.exitcode}")
        seconds = time.perf_counter() - started
        info = client.get_session(s.id)
        net.params = s.read_parameters()
        test_loss = net.loss(dataset.x_test, dataset.t_test)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        if session_id is None:  # named (--dashboard): kept, so the page still shows the run after training
            s.delete()
    last = info.last_round
    return {"workers": workers, "rounds": info.step, "seconds": seconds,
            "contributions_per_round": sorted({len(v) for v in per_round.values()}),
            "losses": [float(np.mean(per_round[r])) for r in sorted(per_round)],
            "bytes": [sent[r] for r in sorted(sent)], "test_loss": float(test_loss),
            "last_round": None if last is None else {"contributors": list(last.contributors),
                                                     "stragglers": list(last.stragglers),
                                                     "noise_scale": last.noise_scale}}


def noise_words(noise_scale: float) -> str:
    """The last round's noise scale for people. The server reports 0 when its estimate of the mean gradient's
    squared norm was not positive: the workers' gradients disagreed more than their mean showed, i.e. the
    noise dominated (a large noise scale), the opposite of what "0.00" reads as."""
    if noise_scale > 0:
        return f"last round's noise scale {noise_scale:.2f} worker batches (~{noise_scale * BATCH:.0f} examples)"
    return "last round's noise scale not measurable (the workers' gradients disagreed more than their mean showed)"


def plot(many: dict, one: dict, dataset_name: str, path: pathlib.Path) -> None:
    """Loss per round (left: where more workers per round would help) and per example seen (right: what
    they cost); per round the two lines can lie on each other, per example they part."""
    import matplotlib.pyplot as plt
    fig, (by_round, by_example) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for run, style in ((one, "-"), (many, "--")):
        k = run["workers"]
        label = (f"1 worker (batch {BATCH})" if k == 1 else f"{k} workers, one session, sync ({k} x {BATCH})")
        rounds = np.arange(1, len(run["losses"]) + 1)
        by_round.plot(rounds, run["losses"], style, label=label, alpha=0.85)
        by_example.plot(rounds * k * BATCH, run["losses"], style, label=label, alpha=0.85)
    by_round.set_xlabel("round (= step)")
    by_example.set_xlabel("training examples seen (all workers)")
    _save(fig, by_round, f"the demo's network through one optreg session: {OPTIMIZER}, lr {LR}, {dataset_name}", path)


def _save(fig, left, title: str, path: pathlib.Path) -> None:
    """The loss axis (log, on the left panel, with the legend), the title, and the file."""
    import matplotlib.pyplot as plt
    left.set_ylabel("training batch loss (mean over workers)")
    left.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    left.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(client, address: str, token: str | None, dataset, data_args: tuple, workers: int, rounds: int,
        out: pathlib.Path, named: bool = False) -> dict:
    """Both runs, the figure and the summary; returns the summary (also written as workers.json)."""
    import json
    many = train(client, address, token, dataset, data_args, workers, rounds,
                 session_id=f"demo-{workers}-workers" if named else None)
    one = train(client, address, token, dataset, data_args, 1, rounds,
                session_id="demo-1-worker" if named else None)
    png = out / "workers.png"
    plot(many, one, dataset.name, png)
    window = min(20, rounds)
    summary = {"dataset": dataset.name, "optimizer": OPTIMIZER, "lr": LR, "batch": BATCH, "rounds": rounds,
               "runs": {"many": many, "one": one}, "loss_window": window,
               "final_loss": {"many": float(np.mean(many["losses"][-window:])),
                              "one": float(np.mean(one["losses"][-window:]))},
               "figure": str(png)}
    (out / "workers.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def plot_diloco(loco: dict, sync: dict, dataset_name: str, every: int, path: pathlib.Path) -> None:
    """Training loss per step (the same samples each step) and against the bytes on the wire so far."""
    import matplotlib.pyplot as plt
    fig, (by_step, by_bytes) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    k = loco["workers"]
    for run, label in ((sync, f"sync data parallel, AdamW ({k} x {DILOCO_BATCH} a step)"),
                       (loco, f"DiLoCo, H = {every}, int8 up, bf16 down")):
        steps = np.arange(1, len(run["losses"]) + 1)
        by_step.plot(steps, run["losses"], label=label, alpha=0.85)
        sent = np.array(run["bytes"])
        by_bytes.plot(sent[sent > 0], np.array(run["losses"])[sent > 0], label=label, alpha=0.85)  # from a first sync
    by_step.set_xlabel(f"step (each worker's; {k} x {DILOCO_BATCH} examples)")
    by_bytes.set_xlabel("bytes of Step calls so far, all workers")
    by_bytes.set_xscale("log")
    _save(fig, by_step, f"the demo's network, {k} workers through one optreg session: DiLoCo against sync DP, "
                        f"{dataset_name}", path)


def run_diloco(client, address: str, token: str | None, dataset, data_args: tuple, workers: int, rounds: int,
               out: pathlib.Path, named: bool = False) -> dict:
    """DiLoCo against sync DP, the same samples; the figure and the summary (also written as diloco.json)."""
    import json
    every = min(DILOCO_EVERY, max(1, rounds // 6))
    sync = train(client, address, token, dataset, data_args, workers, rounds,
                 session_id=f"demo-{workers}-sync-dp" if named else None, kind="adamw")
    loco = train(client, address, token, dataset, data_args, workers, rounds,
                 session_id=f"demo-{workers}-diloco" if named else None, kind="diloco", every=every)
    png = out / "diloco.png"
    plot_diloco(loco, sync, dataset.name, every, png)
    per_step = {name: run["bytes"][-1] / (workers * rounds) for name, run in (("diloco", loco), ("sync", sync))}
    summary = {"dataset": dataset.name, "batch": DILOCO_BATCH, "steps": rounds, "every": every, "workers": workers,
               "runs": {"diloco": loco, "sync": sync}, "bytes_per_worker_step": per_step,
               "test_loss": {"diloco": loco["test_loss"], "sync": sync["test_loss"]}, "figure": str(png)}
    (out / "diloco.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
