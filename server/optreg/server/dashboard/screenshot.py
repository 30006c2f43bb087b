"""Train something real through a server with the dashboard, and photograph the page in chromium.

    python -m optreg.server.dashboard.screenshot docs/dashboard.png [--steps 300]

The demo's network (the book's multi-layer perceptron, digits data) trains through one `torch.adam`
session with every step carrying the loss and the batch accuracy as client metrics; a second session
runs plain SGD with a learning rate far too high, so the update/param-ratio alert fires; one step
with a NaN gradient is sent (and refused) so the refused-step alert shows. Needs playwright (the
test extra) and Debian's chromium (`apt-get install chromium`; no browser download).
"""
from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np


def train(address: str, steps: int) -> None:
    import grpc
    from optreg.client import Client
    from optreg.server.demo.data import load
    from optreg.server.demo.network import MultiLayerNet
    from optreg.v1 import session_pb2, session_pb2_grpc, tensors

    data = load(which="digits")
    rng = np.random.default_rng(0)
    runs = []
    for sid, optimizer, hp in (("mlp-adam", "torch.adam", {"lr": 1e-3}), ("mlp-sgd-lr-too-high", "sgd", {"lr": 3.0})):
        net = MultiLayerNet(data.input_size, [100, 100], data.classes, rng)
        with Client(address) as c:
            c.create_session(optimizer, net.params, session_id=sid, reply="parameters", **hp)
        runs.append((sid, net))
    channel = grpc.insecure_channel(address)
    stub = session_pb2_grpc.SessionServiceStub(channel)
    for i in range(steps):
        idx = rng.choice(len(data.x_train), 128)
        x, t = data.x_train[idx], data.t_train[idx]
        for sid, net in runs:
            loss, grads = net.gradient(x, t)
            if not np.isfinite(loss):
                continue
            acc = float(np.mean(net.predict(x).argmax(axis=1) == t))
            if sid == "mlp-adam" and i == steps // 2:  # one poisoned batch: refused, alerted, nothing applied
                bad = {k: v.copy() for k, v in grads.items()}
                bad["W2"][3, 7] = np.nan
                try:
                    stub.Step(session_pb2.StepRequest(session_id=sid, step=i, gradients=[
                        tensors.from_numpy(k, v) for k, v in bad.items()]))
                except grpc.RpcError:
                    pass
            reply = stub.Step(session_pb2.StepRequest(
                session_id=sid, step=i, gradients=[tensors.from_numpy(k, v) for k, v in grads.items()],
                metrics={"loss": float(loss), "batch_accuracy": acc}))
            for tensor in reply.tensors:
                net.params[tensor.name][...] = tensors.to_numpy(tensor)
    channel.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--chromium", default=os.environ.get("OPTREG_CHROMIUM") or shutil.which("chromium")
                    or "/usr/bin/chromium")
    args = ap.parse_args(argv)
    from playwright.sync_api import sync_playwright
    from optreg.server.app import OptregServer, Settings
    srv = OptregServer(Settings(port=0, data_dir="", dashboard_port=0))
    srv.start()
    try:
        train(srv.address, args.steps)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(srv.dashboard.url + "#session=mlp-adam")
            page.wait_for_function(f"window.optregDash.steps.length >= {args.steps}")
            page.wait_for_function("window.optregDash.alerts.length >= 1")
            time.sleep(2.5)  # the sessions list refreshes every 2 s
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        srv.stop(0)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
