"""A worker process for tests/steps/test_workers.py: joins a sync session and contributes deterministic
gradients round after round, recording every reply as a JSON line.

    python workers_proc.py ADDRESS SESSION WORKER ROUNDS SEED OUT [DIE_AT ...]

At a round listed in DIE_AT (if it is still open when the worker gets there) the worker sends
part of its contribution in a StepStream and kills itself with SIGKILL mid-stream. Some rounds
it sends the same (worker, round) from two threads at once (a retry racing its original).
"""
from __future__ import annotations

import json
import os
import random
import signal
import sys
import threading
import time

import grpc
import numpy as np

from optreg.client import Client, StepMismatch
from optreg.v1 import session_pb2, session_pb2_grpc, tensors

SIZE = 64


def gradient(seed: int, worker: str, rnd: int) -> np.ndarray:
    """The contribution of `worker` to round `rnd`: the test recomputes it from the same inputs."""
    rng = np.random.default_rng([seed, int(worker[1:]), rnd])
    return rng.standard_normal(SIZE).astype(np.float32)


def die_mid_stream(address: str, session_id: str, worker: str, rnd: int, g: np.ndarray) -> None:
    channel = grpc.insecure_channel(address)
    stub = session_pb2_grpc.SessionServiceStub(channel)
    sent = threading.Event()

    def messages():
        half = tensors.from_numpy("w", g)  # the first half only: the stream never completes
        half.data = g[:SIZE // 2].tobytes()
        yield session_pb2.StepStreamRequest(session_id=session_id, worker=worker, round=rnd, chunks=[half])
        sent.set()
        time.sleep(3600)

    call = stub.StepStream(messages(), timeout=60)
    threading.Thread(target=lambda: list(call), daemon=True).start()
    sent.wait(10)
    time.sleep(0.05)  # let the chunk reach the server
    os.kill(os.getpid(), signal.SIGKILL)


def main():
    address, session_id, worker, rounds, seed, out = sys.argv[1:7]
    rounds, seed = int(rounds), int(seed)
    die_at = {int(x) for x in sys.argv[7:]}
    rng = random.Random(f"{seed}-{worker}-{os.getpid()}")
    with Client(address, timeout=60) as client, open(out, "a") as f:
        w = client.join(session_id, worker)
        while w.round < rounds:
            rnd = w.round
            g = gradient(seed, worker, rnd)
            time.sleep(rng.random() * 0.004)
            if rnd in die_at:
                die_mid_stream(address, session_id, worker, rnd, g)
            try:
                if rng.random() < 0.05:  # the same contribution twice at once: applied once
                    twin = Client(address, timeout=60).join(session_id, worker)
                    twin.round = rnd
                    other = {}
                    t = threading.Thread(target=lambda: other.update(r=twin.step({"w": g})))
                    t.start()
                    r = w.step({"w": g})
                    t.join()
                    assert other["r"].step == r.step and np.array_equal(twin.arrays["w"], w.arrays["w"])
                else:
                    r = w.step({"w": g})
            except StepMismatch:  # the round closed without this worker: start again from the open one
                w.refresh()
                continue
            f.write(json.dumps({"worker": worker, "round": r.round, "step": r.step, "replayed": r.replayed,
                                "contributors": list(r.contributors), "w": w.arrays["w"].tolist()}) + "\n")
            f.flush()
        w.leave()


if __name__ == "__main__":
    main()
