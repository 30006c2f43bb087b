"""Train a PyTorch model through optreg: RemoteOptimizer + OneCycleLR + GradScaler, on CPU.

    python examples/torch_train.py                          # starts a memory-only server for the run
    python examples/torch_train.py --address 127.0.0.1:50051 --steps 600 --checkpoint run.pt

An MLP on scikit-learn's digits (the demo's fallback data). The loop is an ordinary torch loop:
autocast to bfloat16, GradScaler (unscale_ then clip_grad_norm_ on the local gradients), a
scheduler that cycles lr and Adam's beta1, and a torch-layout checkpoint at the end. Only the
optimizer differs: its master weights and Adam state live in the optreg server.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys

import torch
from sklearn.datasets import load_digits

from optreg.client.torch import RemoteOptimizer


@contextlib.contextmanager
def server(address: str | None):
    """The given address, or a memory-only `optreg serve` on a free loopback port for this run."""
    if address:
        yield address
        return
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen([sys.executable, "-m", "optreg.server", "serve", "--host", "127.0.0.1", "--port", "0",
                             "--memory-only", "--log-level", "warning"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        line = proc.stdout.readline()
        if not line.startswith("optreg serving on "):
            raise RuntimeError(f"the server did not start: {line!r}")
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--address", help="an optreg server (default: start one for this run)")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--checkpoint", help="write model, optimizer, scheduler and scaler state here (torch.save)")
    args = ap.parse_args(argv)

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    train_x, train_y, test_x, test_y = x[:1500], y[:1500], x[1500:], y[1500:]

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    # No weight decay on biases: each param group is its own session with its own hyperparameters.
    groups = [{"params": [p for n, p in model.named_parameters() if n.endswith("weight")], "weight_decay": 1e-2},
              {"params": [p for n, p in model.named_parameters() if n.endswith("bias")], "weight_decay": 0.0}]

    with server(args.address) as address, \
            RemoteOptimizer(groups, "adamw", address=address, lr=1e-3) as opt:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=args.steps)  # lr and beta1
        scaler = torch.amp.GradScaler("cpu")
        gen = torch.Generator().manual_seed(1)
        for step in range(1, args.steps + 1):
            idx = torch.randint(0, len(train_x), (args.batch,), generator=gen)
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = torch.nn.functional.cross_entropy(model(train_x[idx]), train_y[idx])
            scaler.scale(loss).backward()
            scaler.unscale_(opt)  # the local .grad tensors, before clipping
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(opt)  # skipped (no call to the server) if a gradient is inf/NaN
            scaler.update()
            sched.step()
            if step % max(1, args.steps // 6) == 0 or step == args.steps:
                print(f"step {step:5d}  loss {loss.item():.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                      f"server step {opt.sessions[0].refresh().step}", flush=True)
        with torch.no_grad():
            accuracy = (model(test_x).argmax(1) == test_y).float().mean().item()
        print(f"test accuracy {accuracy:.3f} on {len(test_x)} held-out digits")
        if args.checkpoint:
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(), "scaler": scaler.state_dict()}, args.checkpoint)
            print(f"checkpoint (torch's layout; loads into torch.optim.AdamW too): {args.checkpoint}")


if __name__ == "__main__":
    main()
