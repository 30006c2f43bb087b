"""A Ray Train job whose optimizer is one optreg session on the same Ray cluster (docs/scale-out.md,
"Ray Train"): `ray.train.torch.TorchTrainer` runs N workers; each computes the gradient of a batch of
its own, and `RemoteOptimizer(..., worker=f"w{rank}")` contributes it to one shared session (sync
rounds: every round applies the workers' mean, and every worker gets the same parameters back).

    optreg serve --ray auto --data-dir /shared/optreg --port 50051     # the front end, on the cluster
    python examples/ray_train.py --ray auto --address 127.0.0.1:50051 --workers 2 --steps 200

The session holds the optimizer (its parameters, Adam's moments and the step count) in the cluster's
shared storage, so no Ray Train checkpoint is needed to resume: when a worker or a node dies, Ray Train
restarts the worker group (FailureConfig(max_failures)), each worker joins the session again under
its name, takes the session's parameters and goes on from the session's step (the batches are a
function of the step, so the run is the one it would have been). The lease (60 s) is longer than a
restart, so a round waits for the restarted worker instead of closing without it.
Needs `pip install 'optreg[ray-train]'` (Ray Train and torch).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib

FEATURES, SAMPLES, BATCH = 8, 512, 32


def model():
    import torch
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(FEATURES, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def data():
    """A fixed regression problem: (inputs, targets), float32."""
    import torch
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    return x, torch.sin(x @ torch.linspace(-1, 1, FEATURES)).unsqueeze(1)


def batch(x, y, rank: int, step: int):
    """Worker `rank`'s batch for the round at session step `step`: the same whoever computes it, so a
    restarted worker sends what the dead one would have."""
    at = ((step * 7 + rank * 3) * BATCH) % SAMPLES
    idx = [(at + k) % SAMPLES for k in range(BATCH)]
    return x[idx], y[idx]


def gradients(net, x, y, rank: int, step: int):
    """net's loss on the batch, its gradients left in .grad."""
    import torch
    xb, yb = batch(x, y, rank, step)
    net.zero_grad()
    loss = torch.nn.functional.mse_loss(net(xb), yb)
    loss.backward()
    return loss


def train_loop(config: dict) -> None:
    """One Ray Train worker. config: address (an optreg front end), session, steps, lr, token (or
    None), log (a file each worker appends a line to when it starts: rank, pid, node)."""
    import ray
    import ray.train
    import torch
    from optreg.client.torch import RemoteOptimizer

    ctx = ray.train.get_context()
    rank, size = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("log"):
        with open(config["log"], "a") as f:
            f.write(json.dumps({"rank": rank, "pid": os.getpid(),
                                "node": ray.get_runtime_context().get_node_id()}) + "\n")
    net = model()
    x, y = data()
    # joins the shared session (the first worker creates it) and copies its parameters into `net`
    opt = RemoteOptimizer(net.named_parameters(), "torch.adam", config["address"], token=config.get("token"),
                          session_id=config["session"], worker=f"w{rank}", workers=size, lease=60.0,
                          lr=config["lr"])
    try:
        # Every worker has joined before any contributes: else, after the session's host was lost (its
        # members with it), the first worker back would close a round alone.
        if torch.distributed.is_initialized():
            torch.distributed.barrier()
        step = opt.sessions[0].info.step  # where the session is: a restarted worker goes on from there
        while step < config["steps"]:
            loss = gradients(net, x, y, rank, step)
            opt.step()  # this worker's contribution; returns with the round's mean applied
            step += 1
            if step % 20 == 0 or step == config["steps"]:
                ray.train.report({"step": step, "loss": float(loss)})
    finally:
        opt.close()  # leaves the session and keeps it


def trainer(address: str, session: str, workers: int, steps: int, storage: str, lr: float = 0.01,
            max_failures: int = 3, log: str | None = None, token: str | None = None):
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        train_loop, scaling_config=ScalingConfig(num_workers=workers, use_gpu=False),
        train_loop_config={"address": address, "session": session, "steps": steps, "lr": lr, "log": log,
                           "token": token},
        run_config=RunConfig(name=session, storage_path=storage,
                             failure_config=FailureConfig(max_failures=max_failures)))


def main():
    import ray
    from optreg.client import Client
    from optreg.server.cluster.directory import runtime_env

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ray", default="auto", help="the Ray cluster (default: auto, this machine's)")
    ap.add_argument("--address", default="127.0.0.1:50051", help="an optreg front end (optreg serve --ray)")
    ap.add_argument("--session", default="ray-train", help="the shared session's name (default: ray-train)")
    ap.add_argument("--workers", type=int, default=2, help="Ray Train workers (default: 2)")
    ap.add_argument("--steps", type=int, default=200, help="steps (default: 200)")
    ap.add_argument("--storage", default=str(pathlib.Path.cwd() / "ray-results"),
                    help="Ray Train's storage path (shared by every node; default: ./ray-results)")
    args = ap.parse_args()
    ray.init(address=args.ray, runtime_env=runtime_env() or None)  # (from a checkout: its path to the workers)
    trainer(args.address, args.session, args.workers, args.steps, args.storage).fit()
    with Client(args.address) as c:
        s = c.session(f"{args.session}.g0", {})  # RemoteOptimizer's session of param group 0
        net, (x, y) = model(), data()
        import torch
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(torch.from_numpy(s.read_parameters([name])[name]))
            print(f"session at step {s.step_count}; loss on all data {float(torch.nn.functional.mse_loss(net(x), y)):.4f}")


if __name__ == "__main__":
    main()
