"""Four worker processes train the demo's network through ONE optreg session (sync rounds), against
one worker alone; the loss of both, per round, goes into a figure (docs/workers.md). The same as
`optreg demo --workers 4`, against a server of your own:

    python examples/workers_train.py --address 127.0.0.1:50051 --rounds 300 --out workers.png

Each worker is a process holding a quarter of the training data and contributes the gradient of a
batch of its own each round; the round applies their mean (an effective batch four times as large),
and every worker gets the same new parameters (optreg.app.demo.workers holds the worker loop). Run
from a checkout with PYTHONPATH set as in the README (proto:plugins:server:client:app), or with
optreg installed.
"""
from __future__ import annotations

import argparse
import pathlib

import numpy as np


def main():
    from optreg.app.demo import data, workers
    from optreg.client import Client

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--address", default="127.0.0.1:50051", help="a running server (optreg serve)")
    ap.add_argument("--workers", type=int, default=4, help="worker processes (default: 4)")
    ap.add_argument("--rounds", type=int, default=workers.ROUNDS, help=f"rounds (default: {workers.ROUNDS})")
    ap.add_argument("--out", default="workers.png", help="the figure (default: workers.png; .png added if no suffix)")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out = out if out.suffix else out.with_suffix(".png")  # what matplotlib would write; say that name
    dataset = data.load()
    with Client(args.address, timeout=120) as client:
        many = workers.train(client, args.address, None, dataset, (None, "auto"), args.workers, args.rounds)
        one = workers.train(client, args.address, None, dataset, (None, "auto"), 1, args.rounds)
    last = many["last_round"] or {}
    print(f"last round: contributors {', '.join(last.get('contributors', []))}; "
          f"{workers.noise_words(last.get('noise_scale', 0.0))}")
    print(f"mean batch loss over the last 20 rounds: {args.workers} workers {np.mean(many['losses'][-20:]):.4f}, "
          f"1 worker {np.mean(one['losses'][-20:]):.4f}")
    import matplotlib
    matplotlib.use("Agg")
    workers.plot(many, one, dataset.name, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
