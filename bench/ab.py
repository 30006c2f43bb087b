"""Interleaved A/B of a step between source trees (e.g. main's worktree and yours).

    python -m bench.ab /path/to/tree-a /path/to/tree-b [--rounds 7] [--steps 1000] [--size 1000]

`--size 10000000 --steps 5` measures the large step (the client streams it); `--shm plain` or
`--shm resident` steps through a same-host shared-memory segment instead.

Each tree gets its own `optreg serve --memory-only` and its own client (the tree's
client code); rounds alternate the trees against one gRPC echo measured in the same
round, so drift on a noisy machine hits all of them alike. Prints per-round and
median step times (Adam, 1e3 float32, durability none) and the ratio to the echo.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import numpy as np

CLIENT = r"""
import sys, time, numpy as np
from optreg.client import Client
rng = np.random.default_rng(0)
with Client(sys.argv[1]) as c:
    n = int(sys.argv[3])
    s = c.create_session("adam", {"w": rng.standard_normal(n).astype(np.float32)}, durability="none")
    g = {"w": rng.standard_normal(n).astype(np.float32)}
    if sys.argv[4]:  # the gradient written into the segment once; each step reads it there
        s.enable_shared_memory(resident=sys.argv[4] == "resident")
        s.gradients["w"][...] = g["w"]
        g = s.gradients
    for _ in range(100 if n < 1e5 else 2):
        s.step(g)
    xs = []
    for _ in range(int(sys.argv[2])):
        a = time.perf_counter(); s.step(g); xs.append(time.perf_counter() - a)
    s.delete()
print(np.median(xs))
"""


def _env(root):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(os.path.join(root, d) for d in ("proto", "plugins", "server", "client"))
    env["OPTREG_JIT_BLOCK"] = "1"
    return env


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.splitlines()[0])
    ap.add_argument("trees", nargs="+")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--size", type=int, default=1000, help="float32 parameters (default: 1000)")
    ap.add_argument("--shm", choices=["", "plain", "resident"], default="", help="step through shared memory")
    args = ap.parse_args(argv)
    import grpc

    from bench.echo import start_grpc
    servers = {}
    for root in args.trees:
        p = subprocess.Popen([sys.executable, "-m", "optreg.server", "serve", "--port", "0", "--memory-only",
                              "--log-level", "warning"], stdout=subprocess.PIPE, text=True, env=_env(root),
                             cwd="/")
        servers[root] = (p, p.stdout.readline().split()[-1])
    echo, port = start_grpc()
    ch = grpc.insecure_channel(f"127.0.0.1:{port}")
    eu = ch.unary_unary("/bench.Echo/Unary")
    payload = b"\1" * 4100  # about a 1e3 float32 StepRequest
    res = {k: [] for k in ["echo", *args.trees]}
    try:
        for rnd in range(args.rounds):
            for _ in range(100):
                eu(payload)
            xs = []
            for _ in range(args.steps):
                a = time.perf_counter()
                eu(payload)
                xs.append(time.perf_counter() - a)
            res["echo"].append(float(np.median(xs)))
            # every other round in reverse order: a tree's place in the round (what ran just before it,
            # a drift within the round) then weighs on every tree alike
            for root in (args.trees if rnd % 2 == 0 else args.trees[::-1]):
                out = subprocess.run([sys.executable, "-c", CLIENT, servers[root][1], str(args.steps), str(args.size), args.shm],
                                     capture_output=True, text=True, env=_env(root), cwd="/", check=True)
                res[root].append(float(out.stdout.split()[-1]))
            print(rnd, "  ".join(f"{k}: {v[-1] * 1e6:.0f} us" for k, v in res.items()), flush=True)
    finally:
        for p, _ in servers.values():
            p.terminate()
        echo.stop(0)
    e = float(np.median(res["echo"]))
    print(f"echo median {e * 1e6:.0f} us")
    first = np.array(res[args.trees[0]])
    for root in args.trees:
        m = float(np.median(res[root]))
        # paired: each round's ratio to the first tree, then their median (robust to rounds that were slow
        # for everyone, which the ratio of the medians is not)
        paired = float(np.median(np.array(res[root]) / first))
        print(f"{root}: median {m * 1e6:.0f} us, {m / e:.2f}x echo, {paired:.3f}x {args.trees[0]} (median of "
              f"per-round ratios)")


if __name__ == "__main__":
    main()
