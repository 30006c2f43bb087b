"""The large step's transfer: more than one stream per step, and the chunk pipeline depth (issue 15, item 4).

    python -m bench.streams [--rounds 7]     (or python -m bench --only streams; left out of --quick)

Three experiments, each against a baseline from the same rounds (interleaved, so the machine's
drift hits all alike); medians:
  - the chunked gRPC echo of 40 MB up and down carried by 1, 2 or 4 concurrent streams (each
    stream 1/k of the bytes, one client thread per stream, one channel);
  - the same echo with the client sending chunk i + d only once chunk i came back (pipeline
    depth d = 1, 4, 16) against the unbounded send (gRPC's flow control alone);
  - optreg itself: Adam over 1e7 float32 parameters as one session stepped by one StepStream,
    against the same parameters split over k sessions stepped at once from k threads (what
    several streams per step could give at best: no commit across them).
"""
from __future__ import annotations

import argparse
import queue
import threading

import numpy as np

CHUNK = 1 << 20
TOTAL = 40 << 20


def _echo(stream, parts):
    return sum(len(x) for x in stream(iter(parts)))


def _echo_window(stream, parts, depth):
    """Send chunk i + depth only after chunk i came back."""
    credits = queue.Queue()
    for _ in range(depth):
        credits.put(1)

    def requests():
        for p in parts:
            credits.get()
            yield p

    n = 0
    for x in stream(requests()):
        n += len(x)
        credits.put(1)
    return n


def _parallel(fns):
    out = [None] * len(fns)

    def run(i):
        out[i] = fns[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(1, len(fns))]
    for t in threads:
        t.start()
    run(0)
    for t in threads:
        t.join()
    return out


def echo_figures(echo_port: int, rounds: int, row) -> None:
    from bench.run import _channel, interleaved
    ch = _channel(f"127.0.0.1:{echo_port}")
    stream = ch.stream_stream("/bench.Echo/Stream")
    payload = bytes(TOTAL)
    parts = [payload[i:i + CHUNK] for i in range(0, TOTAL, CHUNK)]
    fns = {}
    for k in (1, 2, 4):
        split = [parts[j::k] for j in range(k)]
        fns[f"{k} streams"] = (lambda split=split: _parallel([lambda s=s: _echo(stream, s) for s in split]))
    for d in (1, 4, 16):
        fns[f"depth {d}"] = (lambda d=d: _echo_window(stream, parts, d))
    for fn in fns.values():
        fn()
    t = interleaved(fns, rounds)
    ch.close()
    for k in (2, 4):
        row(f"gRPC echo 40 MB, {k} streams at once", t[f"{k} streams"], "s", "one stream", t["1 streams"])
    for d in (1, 4, 16):
        row(f"gRPC echo 40 MB, pipeline depth {d} chunks", t[f"depth {d}"], "s", "unbounded (flow control)",
            t["1 streams"])


def optreg_figures(address: str, rounds: int, row) -> None:
    from bench.run import interleaved
    from optreg.client import Client
    n = 10_000_000
    rng = np.random.default_rng(5)
    w = rng.standard_normal(n).astype(np.float32)
    g = (rng.standard_normal(n) * 1e-2).astype(np.float32)
    with Client(address) as c:
        fns, made = {}, []
        for k in (1, 2, 4):
            bounds = [n * i // k for i in range(k + 1)]
            sessions = [c.create_session("adam", {"w": w[a:b].copy()}, keep=False) for a, b in zip(bounds, bounds[1:])]
            made += sessions
            grads = [{"w": g[a:b]} for a, b in zip(bounds, bounds[1:])]
            fns[k] = (lambda ss=sessions, gg=grads: _parallel([lambda s=s, x=x: s.step(x) for s, x in zip(ss, gg)]))
        for fn in fns.values():
            fn()
        t = interleaved(fns, rounds)
        for s in made:
            s.delete()
    for k in (2, 4):
        row(f"adam 1e7 f32 split over {k} sessions, stepped at once", t[k], "s", "one session, one stream", t[1])


def bench_streams(cfg, server, echo) -> None:
    """The `streams` section of python -m bench."""
    from bench.run import row
    if cfg.quick:
        print("(streams: skipped in --quick; python -m bench --only streams)", flush=True)
        return
    echo_figures(echo.grpc_port, 7, row)
    optreg_figures(server.address, 7, row)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.streams", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    from bench.run import row, start_echo, start_optreg
    server, echo = start_optreg(), start_echo()
    try:
        echo_figures(echo.grpc_port, args.rounds, row)
        optreg_figures(server.address, args.rounds, row)
    finally:
        server.stop()
        echo.stop()


if __name__ == "__main__":
    main()
