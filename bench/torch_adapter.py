"""RemoteOptimizer's per-step overhead against the raw client at the same size, same server, same run.

    python -m bench.torch_adapter [--quick]          # standalone (starts a memory-only server)
    python -m bench --only torch                     # as a section of the suite

Both sides step `torch.adam` with the same parameter count and tensors: the raw
client sends numpy gradients and gets the parameters back into numpy arrays; RemoteOptimizer
reads `.grad` from the model's float32 tensors, sends them, and writes the reply into the
tensors. Runs alternate in blocks (A, B, A, B...) so drift on a shared machine hits both; the
figure is the median step time, and the ratio is RemoteOptimizer over raw.
"""
from __future__ import annotations

import statistics
import sys
import time

import numpy as np

# (label, tensor shapes, param groups, shared memory): a 1e3 vector, a 10-tensor small model in one
# and in two groups, and a 1e6 model (over the client's 2 MiB streaming size) streamed and through
# shared memory (RemoteOptimizer's default for a large group on a server on this host).
CASES = [("1e3 params, 1 tensor", [(1000,)], 1, False),
         ("1e5 params, 10 tensors", [(100, 199)] * 5 + [(5,)] * 5, 1, False),
         ("1e5 params, 10 tensors, 2 groups", [(100, 199)] * 5 + [(5,)] * 5, 2, False),
         ("1e6 params, 4 tensors, streamed", [(500, 500)] * 4, 1, False),
         ("1e6 params, 4 tensors, shared memory", [(500, 500)] * 4, 1, True)]


def _times(step, n):
    out = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        out.append(time.perf_counter() - t)
    return out


def measure(address: str, shapes, groups: int, shm: bool, blocks: int, per_block: int) -> tuple[float, float]:
    """(raw median s/step, RemoteOptimizer median s/step); the raw side is one session of every tensor,
    the optimizer's tensors are dealt into `groups` param groups (one session each, stepped together).
    `shm`: both sides step through a shared-memory segment (else both take gRPC, streamed when large)."""
    import torch

    from optreg.client import Client
    from optreg.client.torch import RemoteOptimizer

    rng = np.random.default_rng(0)
    arrays = {f"p{i}": rng.standard_normal(s).astype(np.float32) for i, s in enumerate(shapes)}
    grads = {n: (rng.standard_normal(a.shape) * 1e-3).astype(np.float32) for n, a in arrays.items()}
    params = [torch.nn.Parameter(torch.from_numpy(a.copy())) for a in arrays.values()]
    for p, g in zip(params, grads.values()):
        p.grad = torch.from_numpy(g.copy())
    with Client(address) as client:
        raw = client.create_session("torch.adam", arrays, master_dtype="float32", lr=1e-3)
        if shm:
            raw.enable_shared_memory()  # the gradients passed are copied into the segment: as the optimizer does
        opt = RemoteOptimizer([{"params": params[i::groups]} for i in range(groups)], "torch.adam", client=client,
                              lr=1e-3, shared_memory=shm)
        try:
            for _ in range(5):  # warm both paths (channel, buffers)
                raw.step(grads)
                opt.step()
            a, b = [], []
            for _ in range(blocks):
                a += _times(lambda: raw.step(grads), per_block)
                b += _times(opt.step, per_block)
        finally:
            raw.delete()
            opt.close()
    return statistics.median(a), statistics.median(b)


def bench_torch(cfg, server, _echo):
    """A section of `python -m bench`."""
    from bench.run import row
    for label, shapes, groups, shm in CASES:
        big = sum(int(np.prod(s)) for s in shapes) >= 1_000_000
        blocks, per_block = (4, 3 if cfg.quick else 8) if big else (6, 30 if cfg.quick else 150)
        raw, remote = measure(server.address, shapes, groups, shm, blocks, per_block)
        row(f"RemoteOptimizer step ({label})", remote, "s", "raw client step, same size", raw,
            note="torch.adam float32; median of interleaved blocks")


def main(argv=None) -> None:
    import argparse

    from bench.run import Config, start_optreg
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    server = start_optreg()
    try:
        print(f"{'figure':<48} {'value':>12}  {'baseline':<34} {'base value':>12}  {'ratio':>7}")
        bench_torch(Config(args.quick), server, None)
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
