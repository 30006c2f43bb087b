"""`optreg demo --workers N`: N worker processes train the demo's network through ONE session.

Each worker is a process of its own holding 1/N of the training data; every round it contributes
the gradient of a batch of its own, the session's sync round applies their mean (an effective batch
N times as large), and every worker gets the same new parameters. The same network is then trained
by one worker alone on all the data, and both losses, per round, go into workers.png: the loss
against one worker. Summary in workers.json beside it (docs/workers.md).
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


def _worker(address: str, token: str | None, session_id: str, name: str, shard: int, shards: int, rounds: int,
            seed: int, data_args: tuple, out) -> None:
    """One worker process: join, then contribute a batch gradient per round until `rounds` closed."""
    from optreg.app.demo import _one_blas_thread, data
    from optreg.app.demo.network import MultiLayerNet
    from optreg.client import Client

    with _one_blas_thread():  # small matrices: more BLAS threads only contend with the other workers
        ds = data.load(*data_args)
        x, t = ds.x_train[shard::shards], ds.t_train[shard::shards]
        net = MultiLayerNet(ds.input_size, HIDDEN, ds.classes, np.random.default_rng(0))
        rng = np.random.default_rng(seed)
        losses = []
        client = Client(address, token=token, timeout=120)
        with client, client.join(session_id, name, net.params, heartbeat_every=2.0) as w:
            # A round waits for the live members only: start when all are members, so every round has N.
            deadline = time.monotonic() + 300
            while len(client.get_session(session_id).members) < shards and time.monotonic() < deadline:
                time.sleep(0.05)
            w.refresh()
            while w.round < rounds:
                i = rng.integers(0, len(x), BATCH)
                loss, grads = net.gradient(x[i], t[i])
                losses.append((w.round, float(loss)))
                w.step(grads, metrics={"loss": float(loss)})  # net.params now hold the round's parameters
        out.put((name, losses))


def train(client, address: str, token: str | None, dataset, data_args: tuple, workers: int, rounds: int,
          session_id: str | None = None) -> dict:
    """One sync session trained by `workers` processes; the mean loss per round and the last round."""
    from optreg.app.demo.network import MultiLayerNet
    net = MultiLayerNet(dataset.input_size, HIDDEN, dataset.classes, np.random.default_rng(0))
    s = client.create_session(OPTIMIZER, net.params, session_id=session_id, workers=workers, mode="sync",
                              round_deadline=60.0, durability="none", lr=LR)
    ctx = mp.get_context("spawn")  # fresh interpreters: no copy of this process's server threads
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(address, token, s.id, f"w{k}", k, workers, rounds, k, data_args,
                                               queue), daemon=True)
             for k in range(workers)]
    started = time.perf_counter()
    try:
        for p in procs:
            p.start()
        per_round: dict[int, list[float]] = {}
        for _ in procs:
            _, losses = queue.get(timeout=1800)
            for rnd, loss in losses:
                per_round.setdefault(rnd, []).append(loss)
        for p in procs:
            p.join(60)
            if p.exitcode != 0:
                raise RuntimeError(f"a worker process ended with exit code {p.exitcode}")
        seconds = time.perf_counter() - started
        info = client.get_session(s.id)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        s.delete()
    last = info.last_round
    return {"workers": workers, "rounds": info.step, "seconds": seconds,
            "contributions_per_round": sorted({len(v) for v in per_round.values()}),
            "losses": [float(np.mean(per_round[r])) for r in sorted(per_round)],
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
    by_round.set_ylabel("training batch loss (mean over workers)")
    by_round.set_yscale("log")
    fig.suptitle(f"the demo's network through one optreg session: {OPTIMIZER}, lr {LR}, {dataset_name}", fontsize=10)
    by_round.legend()
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
