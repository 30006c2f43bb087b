"""Four worker processes train the demo's network through ONE optreg session (sync rounds), against
one worker alone; the loss of both, per round, goes into a figure (docs/workers.md).

    python examples/workers_train.py                       # starts a memory-only server of its own
    python examples/workers_train.py --address 127.0.0.1:50051 --rounds 300 --out docs/workers.png

Each worker holds a quarter of the training data and contributes the gradient of a batch of its
own each round; the round applies their mean (an effective batch four times as large), and every
worker gets the same new parameters. Run from a checkout with PYTHONPATH set as in the README
(proto:plugins:server:client:app), or with optreg installed.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import subprocess
import sys

import numpy as np

BATCH = 100


def worker(address, session_id, name, shard, rounds, seed, losses):
    from optreg.app.demo import data
    from optreg.app.demo.network import MultiLayerNet
    from optreg.client import Client

    ds = data.load()
    x, t = ds.x_train[shard::4] if shard >= 0 else ds.x_train, ds.t_train[shard::4] if shard >= 0 else ds.t_train
    net = MultiLayerNet(ds.input_size, [100, 100], ds.classes, np.random.default_rng(0))
    rng = np.random.default_rng(seed)
    with Client(address, timeout=120) as client, client.join(session_id, name, net.params) as w:
        out = []
        while w.round < rounds:
            i = rng.integers(0, len(x), BATCH)
            loss, grads = net.gradient(x[i], t[i])
            out.append((w.round, loss))
            w.step(grads)  # net.params now hold the round's parameters
        losses.put((name, out))


def run(address, workers, rounds, optimizer, lr):
    from optreg.app.demo import data
    from optreg.app.demo.network import MultiLayerNet
    from optreg.client import Client

    ds = data.load()
    net = MultiLayerNet(ds.input_size, [100, 100], ds.classes, np.random.default_rng(0))
    with Client(address) as client:
        s = client.create_session(optimizer, net.params, workers=workers, mode="sync", round_deadline=30.0,
                                  durability="none", lr=lr)
        ctx = mp.get_context("spawn")
        q = ctx.Queue()
        procs = [ctx.Process(target=worker, args=(address, s.id, f"w{k}", k if workers > 1 else -1, rounds, k, q))
                 for k in range(workers)]
        for p in procs:
            p.start()
        per_round = {}
        for _ in procs:
            _, out = q.get()
            for rnd, loss in out:
                per_round.setdefault(rnd, []).append(loss)
        for p in procs:
            p.join()
        info = client.get_session(s.id)
        s.delete()
    return [float(np.mean(per_round[r])) for r in sorted(per_round)], info


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", help="a running server (default: start a memory-only one)")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--optimizer", default="sgd")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--out", default="workers.png")
    args = ap.parse_args()
    server = None
    address = args.address
    if address is None:
        server = subprocess.Popen([sys.executable, "-m", "optreg.server", "serve", "--memory-only", "--port", "0",
                                   "--log-level", "warning"], stdout=subprocess.PIPE, text=True)
        address = server.stdout.readline().split()[-1]
    try:
        four, info = run(address, 4, args.rounds, args.optimizer, args.lr)
        one, _ = run(address, 1, args.rounds, args.optimizer, args.lr)
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    print(f"last round: {info.last_round}")
    print(f"mean batch loss over the last 20 rounds: 4 workers {np.mean(four[-20:]):.4f}, "
          f"1 worker {np.mean(one[-20:]):.4f}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(one, label="1 worker (batch 100)", alpha=0.8)
    ax.plot(four, label="4 workers, one session, sync (4 x 100)", alpha=0.8)
    ax.set_xlabel("round (= step)")
    ax.set_ylabel("training batch loss (mean over workers)")
    ax.set_yscale("log")
    ax.set_title(f"{args.optimizer}, lr {args.lr}: the demo's network through one optreg session")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
