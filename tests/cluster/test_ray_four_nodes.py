"""A four-node Ray cluster (issue 25) whose session hosts each have a memory budget below one
session's size: a Ray Train job training through one optreg session (examples/ray_train.py), a
worker and a node killed under it; and a sharded session over the four nodes trained 200 fenced
steps with a node holding a shard killed 20 times.

Marked `ray` (run with `python -m pytest -m ray`, as .ci/run does). Its own cluster: the head has
no CPU (Ray Train's workers land on the worker nodes, which the tests kill; the head's loss would
end the cluster) and its session host holds shards like the others."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("ray.train")
torch = pytest.importorskip("torch")

import grpc  # noqa: E402
from optreg.client import Client  # noqa: E402
from optreg.client.errors import OptregError  # noqa: E402
from optreg.server.cluster import ownership  # noqa: E402
from optreg.server.cluster.directory import host_name  # noqa: E402
from optreg.server.cluster.serve import ClusterServer  # noqa: E402
from test_ray_cluster import (ROOT, Trainer, assert_same_state, node_by_id, one_server_state,  # noqa: E402
                              running_cluster)

pytestmark = pytest.mark.ray
WORKER_NODES = 3
# Each host's budget (MiB): a shard's 4 tensors stepped hold ~0.75 MiB (parameters, moments and the
# spare set), so a host holds two shards (one adopted after a kill) but not the session (3 MiB).
BUDGET_MB = 2.0
TENSORS, LENGTH = 16, 4096  # float64: 32 KiB a tensor


@pytest.fixture(scope="module")
def cluster():
    with running_cluster(0, WORKER_NODES) as c:
        yield c


@pytest.fixture(scope="module")
def front(cluster, tmp_path_factory):
    server = ClusterServer(str(tmp_path_factory.mktemp("shared")), port=0, memory_budget_mb=BUDGET_MB)
    ray.get([server.directory.handle(n).info.remote() for n in server.directory.ensure_hosts()], timeout=300)
    server.start()
    yield server
    server.stop(0)


def host_pid(front, node_id: str) -> int | None:
    handle = front.directory.handle(host_name(node_id))
    try:
        return ray.get(handle.pid.remote(), timeout=60) if handle is not None else None
    except Exception:  # (no host there yet)
        return None


def kill_node(front, cluster, node_id: str, pids=()) -> None:
    """A node's raylet and processes, SIGKILL: a machine lost. Its workers outlive the raylet for a
    moment (answering calls meanwhile): they are killed with it (its session host, and `pids`)."""
    doomed = [p for p in [host_pid(front, node_id), *pids] if p]
    cluster.remove_node(node_by_id(cluster, node_id), allow_graceful=False)
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def replace_node(front, cluster) -> None:
    """A fresh node in place of a killed one, its session host up (so adoptions spread over four)."""
    name, end = host_name(cluster.add_node(num_cpus=1).node_id), time.monotonic() + 120
    while name not in front.directory.ensure_hosts():  # (until Ray lists the node as alive)
        assert time.monotonic() < end, "the new node's session host was not made"
        time.sleep(0.2)
    ray.get(front.directory.handle(name).info.remote(), timeout=300)


# -- Ray Train ------------------------------------------------------------------------------------------


def load_example():
    spec = importlib.util.spec_from_file_location("optreg_ray_train_example", ROOT / "examples" / "ray_train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (cloudpickle pickles by value only a module imported by name)
    spec.loader.exec_module(module)
    ray.cloudpickle.register_pickle_by_value(module)  # (the workers cannot import it by name)
    return module


def local_run(example, steps: int, workers: int = 2, lr: float = 0.01) -> dict:
    """What the session should hold: torch.optim.Adam on the mean of the workers' gradients (a sync
    round's), each batch the one the example's worker takes at that step."""
    net, (x, y) = example.model(), example.data()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for step in range(steps):
        grads = []
        for rank in range(workers):
            example.gradients(net, x, y, rank, step)
            grads.append([p.grad.clone() for p in net.parameters()])
        for p, *gs in zip(net.parameters(), *grads):
            p.grad = sum(gs[1:], gs[0]) / workers
        opt.step()
    return {name: p.detach().numpy() for name, p in net.named_parameters()}


def test_ray_train_trains_through_one_session_across_a_worker_and_a_node_killed(front, cluster, tmp_path):
    """examples/ray_train.py: a TorchTrainer with 2 workers (ScalingConfig(num_workers=2), CPU) trains
    through one shared optreg session (RemoteOptimizer(..., worker=f"w{rank}")). A worker is killed
    (SIGKILL), then the node of a worker with its session host (the raylet and its processes): Ray
    Train restarts the group (FailureConfig), each worker joins the session again and goes on from
    its step. The run ends at its step count, every round the mean of both workers' gradients:
    the parameters equal torch.optim.Adam's run on those means (to 1e-5: the server's kernel is
    torch's formula, not its code)."""
    example = load_example()
    sid, steps, log = "ray-train-1", 60, tmp_path / "workers.jsonl"
    trainer = example.trainer(front.address, sid, 2, steps, str(tmp_path / "results"), log=str(log),
                              max_failures=4)
    outcome = {}

    def fit():
        try:
            outcome["result"] = trainer.fit()
        except BaseException as e:  # reported below
            outcome["error"] = e

    thread = threading.Thread(target=fit, daemon=True)
    thread.start()

    def step_count() -> int:
        try:
            return c.get_session(f"{sid}.g0").step
        except OptregError as e:
            if e.code != grpc.StatusCode.NOT_FOUND:
                raise
            return 0

    def wait_step(k: int, timeout: float = 300) -> None:
        end = time.monotonic() + timeout
        while step_count() < k:
            assert thread.is_alive() or step_count() >= k, outcome
            assert time.monotonic() < end, f"the session is at step {step_count()}"
            time.sleep(0.1)

    def started() -> dict:
        """The last start of each rank: {rank: {pid, node}}."""
        return {r["rank"]: r for r in map(json.loads, log.read_text().splitlines())}

    with Client(front.address, timeout=120) as c:
        wait_step(15)
        os.kill(started()[0]["pid"], signal.SIGKILL)  # a worker
        wait_step(35)
        victim = started()[1]  # a node: rank 1's (no worker is on the head), with its session host
        kill_node(front, cluster, victim["node"], [victim["pid"]])
        replace_node(front, cluster)
        thread.join(600)
        assert not thread.is_alive() and "error" not in outcome, outcome
        starts = log.read_text().splitlines()
        assert len(starts) >= 6, starts  # (2 workers, started 3 times at least)
        s = c.session(f"{sid}.g0", {})
        assert s.step_count == steps
        want = local_run(example, steps)
        got = s.read_parameters()
        assert got.keys() == want.keys()
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
        info = c.get_session(f"{sid}.g0")
        c.delete_session(f"{sid}.g0")
    assert info.step == steps


# -- a sharded session larger than a node ----------------------------------------------------------------
NAMES = tuple(f"t{k:02d}" for k in range(TENSORS))


def init() -> dict:
    return {name: np.linspace(-1, 1, LENGTH) * (k + 1) for k, name in enumerate(NAMES)}


def grads(i: int) -> dict:
    """Step i's gradients: test_ray_cluster.CLIENT's (the Trainer's) with names=NAMES, size=LENGTH."""
    return {name: np.sin(np.arange(LENGTH) * 0.37 + j) * (1 + 0.1 * j)
            for name, j in ((name, i + 7 * k) for k, name in enumerate(NAMES))}


def test_a_session_larger_than_any_node_survives_twenty_node_kills(front, cluster, start_server):
    """16 Adam tensors (3 MiB stepped) over 4 shards on 4 nodes whose hosts hold 2 MiB each (the session
    whole on one host is refused RESOURCE_EXHAUSTED); a client in another process steps it 200 times,
    fenced, while the node of a shard (not the head's) is killed 20 times at random moments (SIGKILL
    of its raylet and host; a fresh node added each time, the client paused meanwhile so that the
    kills fall within the 200 steps): every step acknowledged once, in order;
    the commit record holds each step once; every shard ends at the record; the state equals one
    server's run bit for bit."""
    sid, n, kills = "four-nodes-1", 200, 20
    with Client(front.address, timeout=120) as c:
        whole = c.create_session("adam", init(), session_id="four-nodes-whole", lr=0.01)
        with pytest.raises(OptregError) as e:  # its spare set does not fit one host's budget
            whole.step(grads(1))
        assert e.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "memory budget" in e.value.details
        whole.delete()
        c.create_session("adam", init(), session_id=sid, shards=4, lr=0.01)
    shards = [ownership.shard_id(sid, i) for i in range(4)]
    assert len({front.directory.ownership.current(s)[1]["host"] for s in shards}) == 4
    head = cluster.head_node.node_id
    trainer = Trainer(front.address, sid, n, pace=0.0, names=NAMES, size=LENGTH)
    rng, gaps = np.random.default_rng(2520), []
    try:
        for k in range(kills):
            trainer.wait_for(len(trainer.acks) + int(rng.integers(1, 5)), timeout=180)
            holders = {front.directory.ownership.current(s)[1]["node"] for s in shards} - {head}
            victim = sorted(holders)[rng.integers(len(holders))]
            time.sleep(rng.uniform(0, 0.08))  # (somewhere in a step: they take ~20-80 ms here)
            acked = len(trainer.acks)
            kill_node(front, cluster, victim)
            killed_at = time.monotonic()
            end = time.monotonic() + 180
            while not any(a["sent"] > killed_at for a in trainer.acks[acked:]):  # a step sent after the kill
                assert time.monotonic() < end and trainer.proc.poll() is None, trainer.proc.stderr.read()
                time.sleep(0.01)
            gaps.append(next(a["t"] for a in trainer.acks[acked:] if a["sent"] > killed_at) - killed_at)
            # the client paused while a fresh node comes up (~3-5 s), so that the 20 kills fit in the 200 steps
            os.kill(trainer.proc.pid, signal.SIGSTOP)
            try:
                replace_node(front, cluster)
            finally:
                os.kill(trainer.proc.pid, signal.SIGCONT)
            assert len(trainer.acks) < n, f"training ended at kill {k + 1}"
        acks = trainer.finish(timeout=600)
    finally:
        if trainer.proc.poll() is None:
            trainer.proc.kill()
    print(f"\n{kills} node kills; the first step sent after a kill was acknowledged {min(gaps):.1f}-{max(gaps):.1f} s "
          f"after it (median {np.median(gaps):.1f} s)")
    assert [a["step"] for a in acks] == list(range(1, n + 1))
    commits = (front.directory.ownership.dir / sid / "commits").read_text().split()
    assert [int(x) for x in commits] == list(range(n + 1))  # (0: the record's start)
    with Client(front.address, timeout=120) as c:
        for s in shards:  # no shard ahead of the record, nor behind it
            assert c.get_session(s).step == n
        assert_same_state(c.session(sid, {}).read_state(), one_server_state(start_server, n, init, grads))
        c.delete_session(sid)
