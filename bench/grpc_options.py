"""The large step (Adam 1e7 float32 over StepStream) under gRPC channel/server options, interleaved.

    python -m bench.grpc_options [--rounds 5] [--steps 3]

Each configuration gets its own `optreg serve --memory-only` started with extra gRPC server
options (OPTREG_BENCH_GRPC_OPTIONS, read by this module's server wrapper only) and a client
channel with the same extra options; rounds alternate the configurations and a chunked gRPC
echo of the same 40 MB, so the machine's drift hits all of them alike. Prints each
configuration's median step time and its ratio to the default configuration.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

CONFIGS = {
    "default": [],
    "frame 4 MiB": [("grpc.http2.max_frame_size", 4 << 20)],
    "frame 16 MiB-1": [("grpc.http2.max_frame_size", (1 << 24) - 1)],
    "frame 16 MiB-1 + TCP read chunks": [("grpc.http2.max_frame_size", (1 << 24) - 1),
                                         ("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
                                         ("grpc.experimental.tcp_max_read_chunk_size", 8 << 20),
                                         ("grpc.experimental.tcp_read_chunk_size", 4 << 20)],
    "no BDP probe": [("grpc.http2.bdp_probe", 0)],
    "write buffer 4 MiB": [("grpc.http2.write_buffer_size", 4 << 20)],
    "TCP read chunks 1-8 MiB": [("grpc.experimental.tcp_min_read_chunk_size", 1 << 20),
                                ("grpc.experimental.tcp_max_read_chunk_size", 8 << 20),
                                ("grpc.experimental.tcp_read_chunk_size", 4 << 20)],
}

SERVER = r"""
import json, os, sys, grpc
extra = [tuple(x) for x in json.loads(os.environ["OPTREG_BENCH_GRPC_OPTIONS"])]
real = grpc.server
def server(*a, options=None, **k):
    return real(*a, options=list(options or []) + extra, **k)
grpc.server = server
from optreg.server.cli import main
sys.exit(main(["serve", "--port", "0", "--memory-only", "--log-level", "warning"]))
"""


def _env(extra):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(root, d) for d in ("proto", "plugins", "server", "client")]
                                        + [root])
    env["OPTREG_JIT_BLOCK"] = "1"
    env["OPTREG_BENCH_GRPC_OPTIONS"] = json.dumps(extra)
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.grpc_options", description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated configuration names")
    args = ap.parse_args(argv)
    import grpc

    from optreg.client import Client
    from optreg.client.transport import GrpcTransport
    names = [n for n in args.only.split(",") if n] or list(CONFIGS)
    procs, clients = {}, {}
    n = 10_000_000
    rng = np.random.default_rng(1)
    w = rng.standard_normal(n).astype(np.float32)
    g = {"w": (rng.standard_normal(n) * 1e-2).astype(np.float32)}
    for name in names:
        p = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True,
                             env=_env(CONFIGS[name]))
        address = p.stdout.readline().split()[-1]
        procs[name] = p
        limit = 64 << 20
        ch = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", limit),
                                                     ("grpc.max_send_message_length", limit), *CONFIGS[name]])
        clients[name] = (ch, address)
    sessions = {}
    from bench.echo import start_grpc
    echo, port = start_grpc()
    ech = grpc.insecure_channel(f"127.0.0.1:{port}")
    es = ech.stream_stream("/bench.Echo/Stream")
    parts = [bytes(1 << 20) for _ in range(n * 4 >> 20)]
    res = {k: [] for k in ["echo", *names]}
    try:
        for name in names:
            ch, address = clients[name]
            c = Client(address, transport=GrpcTransport(address, channel=ch))
            s = c.create_session("adam", {"w": w}, durability="none")
            s.step(g)
            sessions[name] = (c, s)
        list(es(iter(parts)))
        for rnd in range(args.rounds):
            xs = []
            for _ in range(args.steps):
                t = time.perf_counter()
                sum(len(x) for x in es(iter(parts)))
                xs.append(time.perf_counter() - t)
            res["echo"].append(statistics.median(xs))
            for name in names:
                s = sessions[name][1]
                xs = []
                for _ in range(args.steps):
                    t = time.perf_counter()
                    s.step(g)
                    xs.append(time.perf_counter() - t)
                res[name].append(statistics.median(xs))
            print(rnd, "  ".join(f"{k}: {v[-1] * 1e3:.0f} ms" for k, v in res.items()), flush=True)
    finally:
        for c, s in sessions.values():
            s.delete()
            c.close()
        for p in procs.values():
            p.terminate()
        echo.stop(0)
    base = statistics.median(res[names[0]])
    print(f"echo (1 MiB chunks, default options): median {statistics.median(res['echo']) * 1e3:.1f} ms")
    for name in names:
        m = statistics.median(res[name])
        print(f"{name:<26} median {m * 1e3:.1f} ms  {m / base:.2f}x {names[0]}")


if __name__ == "__main__":
    main()
