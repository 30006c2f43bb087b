"""`optreg demo`: the book's chapter 6 through the service, with pictures.

Arguments, the output folder and the data set are checked first (_prepare),
so a typo fails in a second with one line, not after the first figure.

1. paths: SGD, Momentum, Nesterov, AdaGrad, RMSProp and Adam on
   f(x, y) = x²/20 + y² from (-7, 2), 30 updates each -> paths.png (figure 6-8);
2. training: a 4x100 ReLU network per optimizer, batch 128, 2,000 iterations,
   the same batches for all -> training.png (figure 6-9) and test accuracies;
3. a summary table on stdout, and summary.json beside the figures,
all in --out (default ./optreg-demo/).

`--workers N` runs instead the demo of several workers on one session
(optreg.app.demo.workers): N worker processes train the network through one
sync session, against one worker alone -> workers.png and workers.json.
`--workers N --diloco`: the N workers train with DiLoCo instead, against
synchronous data parallel on the same samples -> diloco.png and diloco.json.

Every optimizer runs in its own session on an optreg server: one started in
this process on a free loopback port, or the one at --address.
"""
from __future__ import annotations

import json
import pathlib
import sys
import time


DEFAULT_OUT = "optreg-demo"


def _positive(text: str) -> int:
    from optreg.server.cli import at_least_one
    return at_least_one(text)


def _port(text: str) -> int:
    from optreg.server.cli import port
    return port(text)


def add_arguments(parser) -> None:
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"folder for paths.png, training.png, summary.json (default: ./{DEFAULT_OUT}/)")
    parser.add_argument("--data", metavar="DIR",
                        help="MNIST or Fashion-MNIST IDX files (train-images-idx3-ubyte[.gz], ...), as the book's loader saves them; "
                             "default: Fashion-MNIST from Debian's dataset-fashion-mnist if installed, "
                             "else scikit-learn's digits")
    parser.add_argument("--dataset", default="auto", choices=("auto", "fashion-mnist", "digits"),
                        help="without --data: auto (Fashion-MNIST if installed, else digits), or force one")
    parser.add_argument("--quick", action="store_true", help="a small version that runs in seconds (for tests)")
    parser.add_argument("--iterations", type=_positive,
                        help="training iterations (default: 2000 on 28x28 images, 300 on the small digits set; "
                             "--quick: 200)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights and batches (default: 0)")
    parser.add_argument("--workers", type=_positive, metavar="N",
                        help="instead: N worker processes train the network through ONE session (sync rounds), "
                             "against one worker alone -> workers.png, workers.json (--iterations: rounds, "
                             "default 300; --quick: 30)")
    parser.add_argument("--diloco", action="store_true",
                        help="with --workers N: the N workers train with DiLoCo (H = 50 local AdamW steps, int8 "
                             "pseudo-gradients, bf16 answers) against synchronous data parallel with the same AdamW "
                             "on the same samples -> diloco.png, diloco.json (--iterations: each worker's steps, "
                             "default 2000; --quick: 30)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--dashboard", nargs="?", const=0, type=_port, metavar="PORT",
                        help="serve the live training dashboard on 127.0.0.1:PORT (default: a free port) and print "
                             "its URL; the page stays live while the demo trains (in-process server only)")
    from optreg.app.connect import add_client_arguments
    add_client_arguments(parser)  # --address: a running server instead of one started in-process


def _one_blas_thread():
    """A context limiting numpy's BLAS to one thread.

    The network's matrices are small (batch 128 x 100 units): a multi-threaded
    BLAS only contends with the server's threads for the cores, and on a
    loaded 2-core machine one gradient took 25x longer with it (137 ms vs 5.6 ms).
    """
    import contextlib
    import os
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        if "numpy" not in sys.modules:
            for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ.setdefault(var, "1")
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def main(args) -> int:
    with _one_blas_thread():
        return _main(args)


def _prepare(args):
    """Everything that can fail on the user's input, before any work: the figure library, the output
    folder, the data set. Returns (out, dataset, iterations); raises OSError/ValueError with one line."""
    try:
        import matplotlib
    except ImportError:
        raise OSError("optreg demo draws its figures with matplotlib: pip install 'optreg[demo]' "
                      "(matplotlib, scikit-learn, tqdm)") from None
    matplotlib.use("Agg")
    from optreg.app.demo import data as data_mod
    from optreg.app.demo import training

    out = pathlib.Path(args.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file, not a folder")
    dataset = data_mod.load(args.data, args.dataset)  # a missing or broken data set stops here
    out.mkdir(parents=True, exist_ok=True)
    probe = out / ".optreg-demo-write-test"
    probe.write_bytes(b"")  # an unwritable folder stops here too, not after minutes of training
    probe.unlink()
    if getattr(args, "diloco", False) and not getattr(args, "workers", None):
        raise ValueError("--diloco: DiLoCo trains with several workers; give --workers N as well (4, say)")
    if getattr(args, "workers", None):
        from optreg.app.demo import workers
        full = workers.DILOCO_ROUNDS if getattr(args, "diloco", False) else workers.ROUNDS
        iterations = args.iterations or (workers.QUICK_ROUNDS if args.quick else full)
    else:
        iterations = args.iterations or (200 if args.quick else training.default_iterations(dataset))
    return out, dataset, iterations


def _workers(args, client, address: str, dataset, rounds: int, out: pathlib.Path) -> int:
    from optreg.app.connect import _token
    from optreg.app.demo import workers
    n = args.workers
    if getattr(args, "diloco", False):
        return _diloco(args, client, address, dataset, rounds, out)
    print(f"{n} worker processes, one {workers.OPTIMIZER} session (sync rounds, lr {workers.LR}, batch "
          f"{workers.BATCH} each), {rounds} rounds; then 1 worker alone", flush=True)
    summary = workers.run(client, address, _token(args) if args.address else None, dataset,
                          (args.data, args.dataset), n, rounds, out, named=getattr(args, "dashboard", None) is not None)
    many, one = summary["runs"]["many"], summary["runs"]["one"]
    print(f"{n} workers: {many['rounds']} rounds in {many['seconds']:.1f} s, every round combined "
          f"{'/'.join(map(str, many['contributions_per_round']))} contributions; "
          f"{workers.noise_words((many['last_round'] or {}).get('noise_scale', 0.0))}")
    print(f"1 worker:  {one['rounds']} rounds in {one['seconds']:.1f} s")
    if n > 1 and many["seconds"] > one["seconds"]:
        import os
        print(f"{n} workers took {many['seconds'] / one['seconds']:.1f}x the wall time of 1: every round waits for "
              f"the slowest of {n} processes, which share this machine's {os.cpu_count()} cores with each other and "
              f"the server; on machines of their own a round costs about one worker's batch (docs/workers.md)")
    print(f"mean batch loss over the last {summary['loss_window']} rounds: {n} workers "
          f"{summary['final_loss']['many']:.4f}, 1 worker {summary['final_loss']['one']:.4f}")
    print(f"wrote {summary['figure']}, {out / 'workers.json'}")
    return 0


def _diloco(args, client, address: str, dataset, rounds: int, out: pathlib.Path) -> int:
    from optreg.app.connect import _token
    from optreg.app.demo import workers
    n = args.workers
    print(f"{n} worker processes, {rounds} steps of batch {workers.DILOCO_BATCH} each: synchronous data parallel (AdamW, "
          f"a round a step), then DiLoCo (local AdamW, int8 pseudo-gradients, bf16 answers)", flush=True)
    summary = workers.run_diloco(client, address, _token(args) if args.address else None, dataset,
                                 (args.data, args.dataset), n, rounds, out,
                                 named=getattr(args, "dashboard", None) is not None)
    sync, loco = summary["runs"]["sync"], summary["runs"]["diloco"]
    per_step = summary["bytes_per_worker_step"]
    for name, run in (("sync DP", sync), (f"DiLoCo H={summary['every']}", loco)):
        print(f"{name}: {run['rounds']} server steps in {run['seconds']:.1f} s, "
              f"{per_step['sync' if run is sync else 'diloco']:.0f} bytes per worker step, "
              f"test loss {run['test_loss']:.4f}")
    print(f"DiLoCo sent {per_step['diloco'] / per_step['sync']:.4f}x sync DP's bytes; test loss "
          f"{summary['test_loss']['diloco'] / summary['test_loss']['sync']:.2f}x (the same samples)")
    print(f"wrote {summary['figure']}, {out / 'diloco.json'}")
    return 0


def _main(args) -> int:
    if getattr(args, "dashboard", None) is not None and args.address:
        raise ValueError("--dashboard serves the dashboard of the server this demo starts; with --address, "
                         "open that server's own dashboard (optreg serve --dashboard-port PORT)")
    out, dataset, iterations = _prepare(args)
    from optreg.app.connect import client_for
    from optreg.client import Client

    print(f"data set: {dataset.describe()}")
    server = None
    address = args.address
    if not address:
        from optreg.server.assembly import OptregServer, Settings
        server = OptregServer(Settings(host="127.0.0.1", port=0, dashboard_port=getattr(args, "dashboard", None)))
        server.start()
        address = server.address
        print(f"optreg server started in-process on {address}")
        if server.dashboard is not None:
            print(f"dashboard: {server.dashboard.url} (live while the demo trains, and after until Ctrl-C)",
                  flush=True)
    else:
        print(f"using the optreg server at {address}")
    try:
        with (client_for(args) if args.address else Client(address, timeout=120)) as client:
            if getattr(args, "workers", None):
                code = _workers(args, client, address, dataset, iterations, out)
            else:
                code = _train(args, client, dataset, iterations, out)
        if server is not None and server.dashboard is not None:
            _serve_until_interrupted(server.dashboard.url)
        return code
    finally:
        if server is not None:
            server.stop(grace=1.0)


def _serve_until_interrupted(url: str) -> None:
    """Keep the in-process server, and so the page, up after training: the runs stay on it to read and
    compare; Ctrl-C (SIGINT) ends the demo cleanly."""
    import threading
    print(f"dashboard: {url} stays up with every run; press Ctrl-C to stop", flush=True)
    try:
        while not threading.Event().wait(0.5):  # in slices: the main thread runs the SIGINT handler between them
            pass
    except KeyboardInterrupt:
        print("stopped", flush=True)


def _train(args, client, dataset, iterations: int, out: pathlib.Path) -> int:
    from optreg.app.demo import paths, training
    names = {o.name for o in client.optimizers()}
    print(f"optimizers on the server: {', '.join(sorted(names))}")

    path_results = paths.run(client)
    paths_png = out / "paths.png"
    paths.plot(path_results, paths_png)
    print(f"paths: {len(path_results)} optimizers x {paths.UPDATES} updates -> {paths_png}")

    started = time.perf_counter()
    train_results = training.run(client, dataset, iterations=iterations, seed=args.seed,
                                 progress=not args.no_progress,
                                 named=getattr(args, "dashboard", None) is not None)
    elapsed = time.perf_counter() - started
    training_png = out / "training.png"
    axes = training.plot(train_results, dataset, training.BATCH, training_png)
    print(f"training: {iterations} iterations x {len(train_results)} optimizers in {elapsed:.1f} s "
          f"-> {training_png}")

    summary = {
        "dataset": dataset.name,
        "address": args.address or "in-process",
        "paths": {t: {k: r[k] for k in ("optimizer", "hyperparameters", "start_f", "final_f")}
                  | {"final": r["path"][-1]} for t, r in path_results.items()},
        "training": {"iterations": iterations, "batch": training.BATCH, "hidden": training.HIDDEN, "axes": axes,
                     "seconds": elapsed,
                     "optimizers": {t: {k: v for k, v in r.items() if k != "losses"}
                                    for t, r in train_results.items()}},
        "figures": {"paths": str(paths_png), "training": str(training_png)},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    print()
    print(f"Data set: {dataset.name}")
    w = max(len(t) for t in train_results)
    print(f"{'optimizer'.ljust(w)}  {'final loss':>10}  {'test acc':>8}  {'steps/s':>8}   (final loss: mean of the "
          f"last {next(iter(train_results.values()))['loss_window']} iterations' training loss)")
    for t, r in train_results.items():
        print(f"{t.ljust(w)}  {r['final_loss']:10.4f}  {100 * r['test_accuracy']:7.2f}%  {r['steps_per_second']:8.1f}")
    print(f"{'path':<{w}}  f(x,y) after {paths.UPDATES} updates: "
          + ", ".join(f"{t} {r['final_f']:.3g}" for t, r in path_results.items()))
    print("steps/s: optimizer steps through the service per second (one network, all its parameters per step)")
    print(f"wrote {paths_png}, {training_png}, {out / 'summary.json'}")
    return 0
