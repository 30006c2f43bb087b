"""optreg on a Ray cluster (issue 13): Ray's own multi-node test cluster on this machine
(ray.cluster_utils.Cluster: a head and two worker nodes, each a raylet of its own), a gRPC front end
in this process, clients in other processes.

Marked `ray` and left out of the default run (pyproject's addopts); `.ci/run` runs them with
`python -m pytest -m ray`. One cluster serves the module: the tests that kill or stop a node run
last and add a fresh node in its place."""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from book_reference import SGD, Adam  # noqa: E402
import grpc  # noqa: E402

from optreg.client import Client, RetryPolicy  # noqa: E402
from optreg.client.errors import OptregError  # noqa: E402
from optreg.server.cluster.directory import Directory, Host, NAMESPACE, connect  # noqa: E402
from optreg.server.cluster.host import MOVED, OK, SessionHost, pack, unpack  # noqa: E402
from optreg.server.cluster.serve import ClusterServer  # noqa: E402
from optreg.v1 import session_pb2, session_pb2_grpc, tensors  # noqa: E402

pytestmark = pytest.mark.ray
ROOT = pathlib.Path(__file__).resolve().parents[2]
SOURCE_PATH = os.pathsep.join(str(ROOT / p) for p in ("proto", "plugins", "server", "client", "app"))
# Node death found within ~2 s (the default, 5 checks 3 s apart, is ~15 s: docs/scale-out.md)
FAST_HEALTH = {"health_check_period_ms": 500, "health_check_timeout_ms": 500, "health_check_failure_threshold": 4}
SIZE = 64


def grad(i: int) -> np.ndarray:
    """Step i's gradient: the same whichever process sends it."""
    return np.sin(np.arange(SIZE) * 0.37 + i) * (1 + 0.1 * i)


def adam_after(steps: int, lr: float = 0.01) -> np.ndarray:
    params, opt = {"W": np.linspace(-1, 1, SIZE)}, Adam(lr=lr)
    for i in range(1, steps + 1):
        opt.update(params, {"W": grad(i)})
    return params["W"]


@contextlib.contextmanager
def running_cluster(head_cpus: int, nodes: int):
    """Ray's multi-node test cluster: a head with `head_cpus` CPUs and `nodes` worker nodes of one CPU,
    this process connected; at the end every session host is killed and the cluster shut down."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "include_dashboard": False,
                                                      "_system_config": FAST_HEALTH})
    for _ in range(nodes):
        c.add_node(num_cpus=1)
    c.wait_for_nodes()
    connect(c.address)
    end = time.monotonic() + 60  # until the scheduler sees every node (else hosts land off their node)
    while ray.available_resources().get("CPU", 0) < head_cpus + nodes and time.monotonic() < end:
        time.sleep(0.2)
    try:
        yield c
    finally:
        for name in Directory.host_names():
            try:
                ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
            except Exception:
                pass
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def cluster():
    with running_cluster(1, 2) as c:
        yield c


@pytest.fixture(scope="module")
def front(cluster, tmp_path_factory):
    server = ClusterServer(str(tmp_path_factory.mktemp("shared")), port=0, memory_budget_mb=1024)
    # every host up before the tests (placement passes over a host that is slow to answer)
    ray.get([server.directory.handle(n).info.remote() for n in server.directory.ensure_hosts()], timeout=300)
    server.start()
    yield server
    server.stop(0)


def call(host, method: str, session_id: str, message, take_over: int = 0):
    """A host's answer to one request: (status, epoch, replies or message or owner)."""
    status, epoch, body, ends, _ = ray.get(host.call.remote(method, session_id, *pack([message.SerializeToString()]),
                                                            take_over))
    if status == OK:
        body = [bytes(v) for v in unpack(body, ends)] if ends is not None else body
    return status, epoch, body


def create_request(session_id: str, optimizer: str = "adam", lr: float = 0.01, params=None):
    params = np.linspace(-1, 1, SIZE) if params is None else params
    return session_pb2.CreateSessionRequest(
        config=session_pb2.SessionConfig(optimizer=optimizer, session_id=session_id, hyperparameters={"lr": lr}),
        parameters=[tensors.from_numpy("W", params)])


def worker_host(front, cluster):
    """A host on a worker node (not the head, whose loss would end the cluster): (name, handle, node)."""
    head = cluster.head_node.node_id
    for name in front.directory.ensure_hosts():
        handle = front.directory.handle(name)
        info = ray.get(handle.info.remote(), timeout=120)  # (a host may take a while to start here)
        if info["node"] != head:
            return name, handle, info["node"]
    pytest.fail("no session host on a worker node")


def node_by_id(cluster, node_id):
    return next(n for n in cluster.worker_nodes if n.node_id == node_id)


CLIENT = r"""
import json, sys, time
import numpy as np
from optreg.client import Client, RetryPolicy
address, sid, n, size, pace = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
names = sys.argv[6].split(",")
def grad(i):
    return np.sin(np.arange(size) * 0.37 + i) * (1 + 0.1 * i)
with Client(address, timeout=120, retry=RetryPolicy(total_seconds=120)) as c:
    s = c.session(sid)
    while s.step_count < n:
        i, sent = s.step_count + 1, time.monotonic()
        r = s.step({name: grad(i + 7 * k) for k, name in enumerate(names)})
        print(json.dumps({"step": r.step, "t": time.monotonic(), "sent": sent, "replayed": r.replayed}), flush=True)
        time.sleep(pace)
"""


class Trainer:
    """A client in another process stepping `sid` to `n` steps, `pace` seconds apart (so that what a test
    does after wait_for(k) lands near step k, not after the last step); its acknowledged steps."""

    def __init__(self, address: str, sid: str, n: int, pace: float = 0.02, names=("W",), size: int = SIZE):
        env = dict(os.environ, PYTHONPATH=SOURCE_PATH)
        self.proc = subprocess.Popen([sys.executable, "-c", CLIENT, address, sid, str(n), str(size), str(pace),
                                      ",".join(names)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.acks: list[dict] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.acks.append(json.loads(line))

    def wait_for(self, count: int, timeout: float = 120) -> None:
        end = time.monotonic() + timeout
        while len(self.acks) < count:
            assert self.proc.poll() is None or len(self.acks) >= count, self.proc.stderr.read()
            assert time.monotonic() < end, f"only {len(self.acks)} steps acknowledged"
            time.sleep(0.005)

    def finish(self, timeout: float = 180) -> list[dict]:
        assert self.proc.wait(timeout) == 0, self.proc.stderr.read()
        self.reader.join(10)
        return self.acks


def check_training(front, sid: str, acks: list[dict], n: int) -> float:
    """Every step acknowledged once, in order; the state equals the local recomputation. The longest
    wait between two acknowledgements."""
    assert [a["step"] for a in acks] == list(range(1, n + 1))
    with Client(front.address) as c:
        state = c.session(sid, {}).read_state()
    assert state.info.step == n
    np.testing.assert_allclose(state.parameters["W"], adam_after(n), rtol=1e-12, atol=0)
    return max(b["t"] - a["t"] for a, b in zip(acks, acks[1:]))


# -- one owner ---------------------------------------------------------------------------------------


def test_hosts_get_or_create_by_name_makes_one_actor(front):
    """100 concurrent get-or-create calls for one detached named actor: one actor, one constructor."""
    handles, errors = [], []

    def make():
        try:
            handles.append(Host.options(name="optreg-host-race", namespace=NAMESPACE, get_if_exists=True,
                                        lifetime="detached", max_restarts=-1, max_task_retries=-1,
                                        max_concurrency=4, num_cpus=0)
                           .remote("optreg-host-race", str(front.directory.root), 64))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=make) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    infos = ray.get([h.info.remote() for h in handles])
    assert len({h._actor_id.hex() for h in handles}) == 1
    assert len({(i["pid"], i["incarnation"]) for i in infos}) == 1
    ray.kill(handles[0], no_restart=True)


def test_concurrent_takeovers_of_one_session_leave_one_owner(front, tmp_path):
    """A session whose owner is gone, asked for by 100 concurrent calls spread over the three hosts,
    each allowed to take it over: one host wins the epoch, every other call is sent to it."""
    sid = "orphan-1"
    gone = SessionHost("optreg-host-gone", str(front.directory.root), 64)  # an owner that is not an actor
    status, epoch, *_ = gone.call("CreateSession", sid, *pack([create_request(sid).SerializeToString()]))
    assert (status, epoch) == (OK, 1)
    gone.janitor.stop()
    hosts = [front.directory.handle(n) for n in front.directory.ensure_hosts()]
    assert len(hosts) == 3
    request = session_pb2.GetSessionRequest(session_id=sid)
    refs = [hosts[k % 3].call.remote("GetSession", sid, *pack([request.SerializeToString()]), 1) for k in range(100)]
    answers = ray.get(refs)
    epoch, holder = front.directory.ownership.current(sid)
    assert epoch == 2 and holder["host"] != "optreg-host-gone"
    assert {a[0] for a in answers} <= {OK, MOVED}
    assert all(a[1] == 2 for a in answers if a[0] == OK)
    assert all(a[2]["host"] == holder["host"] for a in answers if a[0] == MOVED)
    owners = [i["host"] for h in hosts for i in ray.get(h.sessions.remote()) if i["session_id"] == sid]
    assert owners == [holder["host"]]
    # and through the front end, which routes to the winner
    with Client(front.address) as c:
        assert c.get_session(sid).step == 0


def test_front_end_serves_telemetry_health_and_reflection_like_one_server(front):
    """TelemetryService through the front end, forwarded to the owner: a session stepped by an owner
    that is gone is adopted with its telemetry (the ring moves with it); WatchSession from step 1
    replays those steps, then streams a new one; health and reflection name TelemetryService; bad
    input gets the single server's status and words."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
    from optreg.v1 import telemetry_pb2, telemetry_pb2_grpc

    sid = "watched-1"
    gone = SessionHost("optreg-host-gone-t", str(front.directory.root), 64)  # an owner that is not an actor
    assert gone.call("CreateSession", sid, *pack([create_request(sid).SerializeToString()]))[0] == OK
    for i in range(1, 4):
        step = session_pb2.StepRequest(session_id=sid, step=i - 1, gradients=[tensors.from_numpy("W", grad(i))])
        assert gone.call("Step", sid, *pack([step.SerializeToString()]))[0] == OK
    gone.janitor.stop()
    gone.telemetry.close()  # its ring written to storage, as a host's saver does every 5 s
    epoch, _ = front.directory.ownership.current(sid)
    # (its holder is no Ray actor: to the front end it is gone, and a live host adopts the session)

    import grpc
    with grpc.insecure_channel(front.address) as channel:
        stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        got = stub.GetTelemetry(telemetry_pb2.GetTelemetryRequest(session_id=sid), timeout=120)
        assert [r.step for r in got.steps] == [1, 2, 3] and got.steps[0].tensors[0].name == "W"
        watch = stub.WatchSession(telemetry_pb2.WatchSessionRequest(session_id=sid, from_step=1), timeout=120)
        seen = [next(watch).step.step for _ in range(3)]
        with Client(front.address) as c:
            c.session(sid).step({"W": grad(4)})
        seen.append(next(watch).step.step)
        watch.cancel()
        assert seen == [1, 2, 3, 4]
        for request, code, words in [
                (telemetry_pb2.GetTelemetryRequest(session_id="no-such-1"), grpc.StatusCode.NOT_FOUND,
                 "session 'no-such-1' not found"),
                (telemetry_pb2.GetTelemetryRequest(session_id=sid, from_step=-1), grpc.StatusCode.INVALID_ARGUMENT,
                 "from_step and to_step must be >= 0 (0: unbounded on that side)")]:
            with pytest.raises(grpc.RpcError) as e:
                stub.GetTelemetry(request)  # no deadline, as grpcurl and a bare stub send
            assert (e.value.code(), e.value.details()) == (code, words)
        with pytest.raises(grpc.RpcError) as e:
            next(stub.WatchSession(telemetry_pb2.WatchSessionRequest(session_id="no-such-1"), timeout=60))
        assert (e.value.code(), e.value.details()) == (grpc.StatusCode.NOT_FOUND, "session 'no-such-1' not found")
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="optreg.v1.TelemetryService"), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        listed = next(reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10))
        assert "optreg.v1.TelemetryService" in {s.name for s in listed.list_services_response.service}
    assert front.directory.ownership.current(sid)[0] > epoch
    with Client(front.address) as c:
        c.delete_session(sid)


def every_call(channel, metadata=()) -> dict[str, grpc.StatusCode]:
    """Every method of the session, telemetry and registry services called once with an empty request:
    {"Service/Method": the status it ended with (OK when it answered)}."""
    from optreg.v1 import registry_pb2, telemetry_pb2
    out = {}
    for module, name in ((session_pb2, "SessionService"), (telemetry_pb2, "TelemetryService"),
                         (registry_pb2, "OptimizerRegistryService")):
        service = module.DESCRIPTOR.services_by_name[name]
        for m in service.methods:
            path = f"/{service.full_name}/{m.name}"
            kind = ("stream" if m.client_streaming else "unary") + "_" + ("stream" if m.server_streaming else "unary")
            rpc = getattr(channel, kind)(path)
            request = iter([b""]) if m.client_streaming else b""
            try:
                reply = rpc(request, metadata=metadata, timeout=60)
                if m.server_streaming:
                    next(reply, None)
                    reply.cancel()
                out[f"{name}/{m.name}"] = grpc.StatusCode.OK
            except grpc.RpcError as e:
                out[f"{name}/{m.name}"] = e.code()
    return out


def test_front_end_tokens_and_tls_like_one_server(front, tmp_path):
    """`--token-file`, `--tls-cert`/`--tls-key` on the front end, as on `optreg serve`: every RPC refused
    without a token or with a wrong one (UNAUTHENTICATED), none with a good one; plaintext to the TLS
    port fails; a session created with one token is another token's PERMISSION_DENIED, as on one
    server (the hosts check the caller's token hash the front end passes)."""
    from test_auth_tls_metrics import _self_signed
    tokens = tmp_path / "tokens"
    tokens.write_text("alice-token\nbob-token\n")
    cert, key, pem = _self_signed(tmp_path)
    server = ClusterServer(str(front.directory.root), port=0, memory_budget_mb=1024, token_file=str(tokens),
                           tls_cert=cert, tls_key=key)
    server.start()
    try:
        with grpc.secure_channel(server.address, grpc.ssl_channel_credentials(pem)) as channel:
            for metadata in ((), (("authorization", "Bearer mallory"),), (("authorization", "Basic alice-token"),)):
                codes = every_call(channel, metadata)
                assert len(codes) > 20 and set(codes.values()) == {grpc.StatusCode.UNAUTHENTICATED}, codes
            codes = every_call(channel, (("authorization", "Bearer alice-token"),))
            assert grpc.StatusCode.UNAUTHENTICATED not in codes.values(), codes
        with Client(server.address, token="alice-token", root_certificates=pem) as alice, \
                Client(server.address, token="bob-token", root_certificates=pem) as bob:
            s = alice.create_session("adam", {"W": np.linspace(-1, 1, SIZE)}, session_id="alice-ray", lr=0.01)
            s.step({"W": grad(1)})
            for foreign in (lambda: bob.get_session("alice-ray"), lambda: bob.session("alice-ray", {}).read_state(),
                            lambda: bob.session("alice-ray", {}).step({"W": grad(2)})):
                with pytest.raises(OptregError) as e:
                    foreign()
                assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
            assert "alice-ray" not in [i.session_id for i in bob.list_sessions()]  # (earlier tests' are open)
            assert "alice-ray" in [i.session_id for i in alice.list_sessions()]
            assert alice.get_session("alice-ray").step == 1
            alice.delete_session("alice-ray")
        with Client(server.address, token="alice-token", timeout=5, retry=RetryPolicy(total_seconds=0)) as plain:
            with pytest.raises(OptregError) as e:
                plain.list_sessions()
            assert e.value.code == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(0)


# -- sharded sessions (issue 25) -----------------------------------------------------------------------
NAMES = ("W", "b", "c")


def sharded_grads(i: int) -> dict:
    """Step i's gradients of a sharded session (the Trainer's, with names=NAMES)."""
    return {name: grad(i + 7 * k) for k, name in enumerate(NAMES)}


def sharded_init() -> dict:
    return {name: np.linspace(-1, 1, SIZE) * (k + 1) for k, name in enumerate(NAMES)}


def one_server_state(start_server, n: int, init=sharded_init, grads=sharded_grads):
    """The same session on one server (memory only), stepped n times: its read_state."""
    with Client(start_server("--memory-only").address) as c:
        s = c.create_session("adam", init(), lr=0.01)
        for i in range(1, n + 1):
            s.step(grads(i))
        return s.read_state()


def assert_same_state(got, want) -> None:
    """Bit for bit: step, every parameter and every slot."""
    assert got.info.step == want.info.step
    assert list(got.parameters) == list(want.parameters)
    for name in want.parameters:
        np.testing.assert_array_equal(got.parameters[name], want.parameters[name])
    assert got.state.keys() == want.state.keys()
    for slot in want.state:
        for name in want.state[slot]:
            np.testing.assert_array_equal(got.state[slot][name], want.state[slot][name])


def shard_host(front, sid: str, i: int):
    _, holder = front.directory.ownership.current(f"{sid}.shard{i}")
    return holder["host"], front.directory.handle(holder["host"])


def test_a_sharded_session_steps_like_one_server(front, start_server):
    """create_session(shards=2): the tensors on two hosts; fenced steps; reads see one session; the
    state equals one server's run bit for bit. Refusals name config.shards / gradients."""
    sid, n = "sharded-1", 8
    with Client(front.address) as c:
        s = c.create_session("adam", sharded_init(), session_id=sid, shards=2, lr=0.01)
        assert list(s.info.parameters) == list(NAMES)
        for i in range(1, n + 1):
            assert s.step(sharded_grads(i)).step == i
        assert c.get_session(sid).step == n
        assert set(c.session(sid, {}).read_parameters(["b"])) == {"b"}
        state = c.session(sid, {}).read_state()
        listed = {i.session_id: i for i in c.list_sessions()}
        assert listed[sid].step == n and list(listed[sid].parameters) == list(NAMES)
        assert not [k for k in listed if k.startswith(f"{sid}.shard")]
        with pytest.raises(OptregError) as e:
            c.create_session("adam", {f"t{k}": np.ones(3) for k in range(5)}, session_id="sharded-4", shards=4)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "config.shards 4" in e.value.details  # 3 hosts
        with pytest.raises(OptregError) as e:
            c.create_session("adam", {"W": np.ones(3)}, session_id="sharded-w", shards=2)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "config.shards 2" in e.value.details
        with pytest.raises(OptregError) as e:
            c.create_session("adam", sharded_init(), session_id="../sharded-out", shards=2)
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "config.session_id" in e.value.details
        assert not (front.directory.root / "sharded-out").exists()
        # a shard's name already taken by someone's session: refused, that session left as it was
        c.create_session("adam", {"W": np.ones(3)}, session_id="taken.shard1").step({"W": np.ones(3)})
        with pytest.raises(OptregError) as e:
            c.create_session("adam", sharded_init(), session_id="taken", shards=2)
        assert e.value.code == grpc.StatusCode.ALREADY_EXISTS and "taken.shard1" in e.value.details
        assert c.get_session("taken.shard1").step == 1
        with pytest.raises(OptregError) as e:
            c.get_session("taken")
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        c.delete_session("taken.shard1")
        with pytest.raises(OptregError) as e:
            c.session(sid, {}).step({"W": grad(1)})
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "gradients" in e.value.details
    assert shard_host(front, sid, 0)[0] != shard_host(front, sid, 1)[0]
    assert_same_state(state, one_server_state(start_server, n))
    with Client(start_server("--memory-only").address) as one:
        with pytest.raises(OptregError) as e:
            one.create_session("adam", sharded_init(), shards=2)
        assert e.value.code == grpc.StatusCode.FAILED_PRECONDITION and "config.shards 2" in e.value.details
    with Client(front.address) as c:
        c.delete_session(sid)
        with pytest.raises(OptregError) as e:
            c.get_session(sid)
        assert e.value.code == grpc.StatusCode.NOT_FOUND


BIG = 300_000  # float64: 2.4 MB a tensor, above the Python client's 2 MiB: every call streamed


def big_init() -> dict:
    return {name: np.linspace(-1, 1, BIG) * (k + 1) for k, name in enumerate(NAMES)}


def big_grads(i: int) -> dict:
    return {name: np.sin(np.arange(BIG) * 0.37 + i + 7 * k) for k, name in enumerate(NAMES)}


def test_a_large_sharded_session_streams_like_one_server(front, start_server):
    """A session above 2 MiB a call (the Python client streams: CreateSessionStream, StepStream,
    ReadParametersStream, ReadStateStream) sharded over 3 hosts: every call split by shard and the
    replies merged; the state equals one server's bit for bit."""
    sid, n = "sharded-big-1", 3
    with Client(front.address, timeout=300) as c:
        s = c.create_session("adam", big_init(), session_id=sid, shards=3, lr=0.01)
        for i in range(1, n + 1):
            r = s.step(big_grads(i))
            assert r.step == i and not r.replayed
        want = one_server_state(start_server, n, big_init, big_grads)
        for name in NAMES:  # the step's reply, reassembled from every shard's chunks
            np.testing.assert_array_equal(s.arrays[name], want.parameters[name])
        assert_same_state(c.session(sid, {}).read_state(), want)
        np.testing.assert_array_equal(c.session(sid, {}).read_parameters(["c"])["c"], want.parameters["c"])
        c.delete_session(sid)


def test_a_shard_ahead_of_the_commit_record_is_rolled_back(front, start_server):
    """The protocol's points, each state made by real calls: (after log, before the commit record) a
    shard that applied step k whose commit was never written (a front end that died between: here
    the shard's host is called directly with other gradients) is rolled back by a reader and by the
    client's step k, which is then applied once, with the client's gradients; (after commit) the
    client's retry of a committed step is a replay, nothing applied again; (before log) the hosts of
    both shards killed (SIGKILL) while a client in another process steps. Final state: one server's."""
    sid, n = "sharded-2", 24
    with Client(front.address) as c:
        s = c.create_session("adam", sharded_init(), session_id=sid, shards=2, lr=0.01)
        for i in range(1, 4):
            s.step(sharded_grads(i))
    stub = session_pb2_grpc.SessionServiceStub(grpc.insecure_channel(front.address))

    def uncommitted(k):
        """Shard 0 applies step k (fence k-1) with wrong gradients, and no commit record is written."""
        _, host = shard_host(front, sid, 0)
        sub = f"{sid}.shard0"
        names = [nm for nm, i in front.frontend.sharded.layout(sid)["assign"].items() if i == 0]
        wrong = session_pb2.StepRequest(session_id=sub, step=k - 1,
                                        gradients=[tensors.from_numpy(nm, np.full(SIZE, 5.0)) for nm in names])
        status, _, body = call(host, "Step", sub, wrong)
        assert status == OK and session_pb2.StepResponse.FromString(body[0]).step == k

    uncommitted(4)
    with Client(front.address) as c:  # a reader sees the committed step, shard 0 rolled back to it
        assert c.get_session(sid).step == 3
        assert_same_state(c.session(sid, {}).read_state(), one_server_state(start_server, 3))
    uncommitted(4)
    with Client(front.address) as c:  # the client's step 4 after the same: applied once, its gradients
        s = c.session(sid, sharded_init())
        assert s.step(sharded_grads(4)).step == 4
    # after the commit record: the retry of step 4 (fence 3) is a replay, nothing applied twice
    again = stub.Step(session_pb2.StepRequest(session_id=sid, step=3, gradients=[
        tensors.from_numpy(nm, g) for nm, g in sharded_grads(4).items()]), timeout=120)
    assert again.step == 4 and again.replayed
    # a shard past the record moved by a drain: its host's flush keeps the older snapshot and the log,
    # the adopting host takes it only up to the record, and the client's step 5 is applied once
    uncommitted(5)
    node = ray.get(shard_host(front, sid, 0)[1].info.remote(), timeout=120)["node"]
    front.directory.drain(node)
    try:
        with Client(front.address) as c:
            assert c.session(sid, sharded_init()).step(sharded_grads(5)).step == 5
        assert shard_host(front, sid, 0)[0] != node and front.frontend.sharded.committed(sid) == 5
    finally:
        front.directory.undrain(node)
        front.directory.ensure_hosts()
    # before the log: each shard's host process killed while a client in another process steps
    trainer = Trainer(front.address, sid, n, names=NAMES)
    kills = 0
    for i, at in ((1, 8), (0, 14)):
        trainer.wait_for(at - 4)
        _, host = shard_host(front, sid, i)
        os.kill(ray.get(host.pid.remote(), timeout=120), signal.SIGKILL)
        kills += 1
    acks = trainer.finish()
    assert [a["step"] for a in acks] == list(range(6, n + 1))
    with Client(front.address) as c:
        assert_same_state(c.session(sid, {}).read_state(), one_server_state(start_server, n))
        c.delete_session(sid)


def test_a_shared_sessions_round_through_the_front_end(front):
    """Two workers of a sync shared session step at once through the front end: the round waits on
    its host with the client's deadline (the host's context answers time_remaining) and closes with
    the mean of both, the same reply to each."""
    with Client(front.address, timeout=120) as c:
        session = c.create_session("sgd", {"W": np.zeros(4)}, lr=1.0, workers=2)
        workers = [c.join(session.id, name) for name in ("a", "b")]
        replies, errors = [], []

        def step(w, g):
            try:
                w.step({"W": np.full(4, g)})
                replies.append(w.arrays["W"].copy())
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        threads = [threading.Thread(target=step, args=(w, g)) for w, g in zip(workers, (1.0, 3.0))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        for got in replies + [c.session(session.id, {}).read_parameters()["W"]]:
            np.testing.assert_allclose(got, np.full(4, -2.0))  # 0 - 1.0 * mean(1, 3)
        session.delete()


def test_a_large_stream_is_forwarded_as_it_arrives(front):
    """A 12 MB create and step (CreateSessionStream, StepStream) reach the host in groups while the
    client still sends (cluster/feed.py): the result is the formula's, bit for bit."""
    w = np.random.default_rng(3).standard_normal(3_000_000).astype(np.float32)
    g = np.random.default_rng(4).standard_normal(w.size).astype(np.float32)
    with Client(front.address, timeout=120) as c:
        s = c.create_session("sgd", {"W": w.copy()}, lr=0.5)  # (a session's steps write into its arrays)
        s.step({"W": g})
        np.testing.assert_array_equal(s.read_parameters()["W"], w - np.float32(0.5) * g)
        s.delete()


def test_a_stream_whose_groups_stop_coming_is_sent_again():
    """A fed call whose next group never comes (the front end died, or Ray retried the call in a new
    incarnation and the groups went to the old one) answers MOVED, with nothing applied, so a front
    end that is still there sends the whole request again; a late group for it is dropped."""
    from optreg.server.cluster.feed import FEED_BYTES  # noqa: F401 - the module under test
    sid = "fed-1"
    host = SessionHost("optreg-host-fed", str(pathlib.Path(tempfile.mkdtemp())), 64)
    host.feeds.seconds = 0.5
    try:
        assert host.call("CreateSession", sid, *pack([create_request(sid).SerializeToString()]))[0] == OK
        head = session_pb2.StepStreamRequest(session_id=sid, step=0).SerializeToString()
        status, *_ = host.call("StepStream", sid, *pack([head]), 0, None, "call-1")
        assert status == MOVED
        assert host.feed("call-1", 0, *pack([b""]), True) is False  # late: dropped
        assert host.store.get(sid).step == 0
    finally:
        host.janitor.stop()
        host.telemetry.close()


def test_a_stopped_owner_is_fenced_out(front, tmp_path):
    """A session host in another process owns a session and steps it; it is SIGSTOPped, a second
    host takes the session over and steps on, then the first is SIGCONTed: its next write is refused
    and nothing it does reaches the session."""
    root = str(front.directory.root)
    sid = "fenced-1"
    script = r"""
import json, sys, time
import numpy as np
from optreg.server.cluster.host import SessionHost, pack
from optreg.v1 import session_pb2, tensors
root, sid, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
def grad(i):
    return np.sin(np.arange(size) * 0.37 + i) * (1 + 0.1 * i)
host = SessionHost("optreg-host-old", root, 64)
req = session_pb2.CreateSessionRequest(config=session_pb2.SessionConfig(optimizer="adam", session_id=sid,
      hyperparameters={"lr": 0.01}), parameters=[tensors.from_numpy("W", np.linspace(-1, 1, size))])
print(json.dumps({"create": host.call("CreateSession", sid, *pack([req.SerializeToString()]))[0]}), flush=True)
for i in range(1, 300):
    step = session_pb2.StepRequest(session_id=sid, step=i - 1, gradients=[tensors.from_numpy("W", grad(i))])
    status, epoch, *_ = host.call("Step", sid, *pack([step.SerializeToString()]))
    print(json.dumps({"step": i, "status": status, "epoch": epoch}), flush=True)
    if status != "OK":
        break
    time.sleep(0.02)
"""
    proc = subprocess.Popen([sys.executable, "-c", script, root, sid, str(SIZE)], stdout=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=SOURCE_PATH))
    lines = []
    while len(lines) < 6:
        lines.append(json.loads(proc.stdout.readline()))
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        acked = max(x["step"] for x in lines if x.get("status") == OK)
        new = SessionHost("optreg-host-new", root, 64)
        assert new.adopt(sid, 1) == 2
        at = new.store.get(sid).step
        assert at >= acked  # every acknowledged step is there (one more if it was written, not yet answered)
        for i in range(at + 1, at + 4):
            step = session_pb2.StepRequest(session_id=sid, step=i - 1, gradients=[tensors.from_numpy("W", grad(i))])
            assert new.call("Step", sid, *pack([step.SerializeToString()]))[:2] == (OK, 2)
        final = at + 3
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    rest = [json.loads(line) for line in proc.stdout]
    assert proc.wait(30) == 0
    assert rest and rest[-1]["status"] != OK, rest  # its first write after the takeover: refused
    assert all(x["status"] == OK for x in rest[:-1])  # (a step it had finished before the stop)
    time.sleep(1.0)  # its janitor, had it written anything, would have by now
    new.janitor.stop()
    reader = SessionHost("optreg-host-reader", root, 64)
    assert reader.adopt(sid, 2) == 3
    s = reader.store.get(sid)
    assert s.step == final
    np.testing.assert_allclose(s.live.params["W"], adam_after(final), rtol=1e-12, atol=0)
    reader.janitor.stop()


def test_a_sparse_step_through_the_front_end(front):
    """A sparse step is logged by the host's fenced journal (its rows and values go in as whole arrays)
    and applied to the rows it names."""
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    with Client(front.address, timeout=120) as c:
        s = c.create_session("sgd", {"E": table.copy()}, lr=0.5)
        s.step_sparse("E", np.array([1, 3]), np.ones((2, 4), np.float32))
        want = table.copy()
        want[[1, 3]] -= np.float32(0.5)
        np.testing.assert_array_equal(s.read_parameters()["E"], want)
        s.delete()


def test_the_journal_refuses_a_superseded_owners_writes(tmp_path):
    """Below the host's check on each call: a step already past it when the takeover happens is refused
    by the journal at its commit (after its record is written, before it is applied or answered), and
    so are snapshots; the new owner never sees either."""
    from optreg.server.cluster.context import Abort, ActorContext
    from optreg.server.cluster.ownership import StaleOwner
    old = SessionHost("optreg-host-a", str(tmp_path), 64)
    assert old.call("CreateSession", "j-1", *pack([create_request("j-1").SerializeToString()]))[0] == OK
    step = session_pb2.StepRequest(session_id="j-1", step=0, gradients=[tensors.from_numpy("W", grad(1))])
    assert old.call("Step", "j-1", *pack([step.SerializeToString()]))[0] == OK
    session = old.store.get("j-1")
    new = SessionHost("optreg-host-b", str(tmp_path), 64)
    assert new.adopt("j-1", 1) == 2
    second = session_pb2.StepRequest(session_id="j-1", step=1, gradients=[tensors.from_numpy("W", grad(2))])
    with pytest.raises(Abort) as refused:  # straight into the servicer, as a call already in flight would be
        old.servicer.Step(second, ActorContext())
    assert refused.value.code.name == "UNAVAILABLE" and "taken over" in refused.value.message
    with pytest.raises(StaleOwner):
        old.journal._snapshot(session)
    assert "j-1" not in old.journal.claims and not old.store.index_has("j-1")
    for host in (old, new):
        host.janitor.stop()
    reader = SessionHost("optreg-host-c", str(tmp_path), 64)
    assert reader.adopt("j-1", 2) == 3
    assert reader.store.get("j-1").step == 1
    np.testing.assert_allclose(reader.store.get("j-1").live.params["W"], adam_after(1), rtol=1e-12, atol=0)
    reader.janitor.stop()


# -- many sessions, draining --------------------------------------------------------------------------


def test_thousand_sessions_over_three_nodes_and_a_drain(front, cluster):
    n, lr = 1000, 0.1
    ids = [f"many-{i:04d}" for i in range(n)]
    start = {sid: np.full(4, float(i)) for i, sid in enumerate(ids)}

    def run(fn, items, threads=8):
        chunks = [items[k::threads] for k in range(threads)]
        errors = []

        def work(chunk):
            try:
                with Client(front.address, timeout=120) as c:
                    for item in chunk:
                        fn(c, item)
            except Exception as e:  # pragma: no cover - reported below
                errors.append(e)

        ts = [threading.Thread(target=work, args=(ch,)) for ch in chunks]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors, errors[:3]

    def g(sid, k):
        return np.full(4, 0.5 * k) + np.arange(4)

    run(lambda c, sid: c.create_session("sgd", {"W": start[sid].copy()}, session_id=sid, lr=lr), ids)
    run(lambda c, sid: c.session(sid, {}).step({"W": g(sid, 1)}), ids)
    rows = {r["session_id"]: r for r in front.directory.sessions() if r["session_id"] in start}
    by_node: dict[str, list] = {}
    for sid, r in rows.items():
        by_node.setdefault(r["node"], []).append(sid)
    assert len(rows) == n and len(by_node) == 3, {k: len(v) for k, v in by_node.items()}
    victim = max(by_node, key=lambda k: len(by_node[k]))
    moved = front.directory.drain(victim)
    try:
        assert {sid for sid in moved if sid in start} == set(by_node[victim])  # (and earlier tests' sessions)
        run(lambda c, sid: c.session(sid, {}).step({"W": g(sid, 2)}), ids)
        after = {r["session_id"]: r for r in front.directory.sessions() if r["session_id"] in start}
        assert all(r["node"] != victim for r in after.values())
        with Client(front.address) as c:
            for sid in ids[::37] + by_node[victim][:20]:
                state = c.session(sid, {}).read_state()
                assert state.info.step == 2
                params, opt = {"W": start[sid].copy()}, SGD(lr=lr)
                for k in (1, 2):
                    opt.update(params, {"W": g(sid, k)})
                np.testing.assert_allclose(state.parameters["W"], params["W"], rtol=1e-12)
            for sid in ids:
                c.delete_session(sid)
    finally:
        front.directory.undrain(victim)
        front.directory.ensure_hosts()


class FrontEndProcess:
    """`optreg serve --ray ADDRESS` in a process of its own, on a fixed port (so that a client keeps its
    address across a kill and a restart)."""

    def __init__(self, cluster, root: str, port: int):
        env = dict(os.environ, PYTHONPATH=SOURCE_PATH)
        self.proc = subprocess.Popen([sys.executable, "-m", "optreg.server", "serve", "--ray", cluster.address,
                                      "--data-dir", root, "--port", str(port), "--log-level", "warning"],
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        line = self.proc.stdout.readline()
        assert line.startswith("optreg serving on "), line

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


def test_front_end_killed_mid_step_over_and_over(front, cluster, start_server):
    """The front end of a sharded session SIGKILLed at random moments while a client in another process
    steps (a kill mid-step leaves shards that applied the step with no commit record: the state the
    protocol's rollback is for), a new front end started on the same port each time: every step
    acknowledged once, in order, and the final state equals one server's run bit for bit."""
    from test_auth_tls_metrics import _free_port
    sid, n, kills = "sharded-front-1", 50, 8
    port = _free_port()
    proc = FrontEndProcess(cluster, str(front.directory.root), port)
    address = f"127.0.0.1:{port}"
    with Client(address) as c:
        c.create_session("adam", sharded_init(), session_id=sid, shards=2, lr=0.01)
    trainer = Trainer(address, sid, n, pace=0.0, names=NAMES)
    rng, ahead = np.random.default_rng(25), 0
    try:
        for k in range(kills):
            trainer.wait_for(3 + k * 5)
            time.sleep(rng.uniform(0, 0.05))  # (somewhere inside a step: they take ~10-50 ms here)
            proc.kill()
            time.sleep(0.2)  # (a call the dead front end sent may still be running on a host)
            committed = front.frontend.sharded.committed(sid)
            steps = [session_pb2.GetSessionResponse.FromString(call(
                shard_host(front, sid, i)[1], "GetSession", f"{sid}.shard{i}",
                session_pb2.GetSessionRequest(session_id=f"{sid}.shard{i}"))[2][0]).session.step for i in (0, 1)]
            assert all(committed <= st <= committed + 1 for st in steps), (committed, steps)
            ahead += any(st > committed for st in steps)
            proc = FrontEndProcess(cluster, str(front.directory.root), port)
        acks = trainer.finish()
    finally:
        proc.kill()
    print(f"\n{kills} front end kills, {ahead} of them left a shard past the commit record")
    assert [a["step"] for a in acks] == list(range(1, n + 1))
    with Client(front.address) as c:
        assert_same_state(c.session(sid, {}).read_state(), one_server_state(start_server, n))
        c.delete_session(sid)


# -- losing a node (last: they take nodes away) -------------------------------------------------------


def test_killing_the_host_process_mid_training(front, cluster):
    """The host's process dies (SIGKILL; its node lives): Ray restarts the actor in place and retries
    the call it was running; the new incarnation takes the session over from its predecessor's epoch."""
    name, host, node_id = worker_host(front, cluster)
    sid = "killed-process-1"
    assert call(host, "CreateSession", sid, create_request(sid))[0] == OK
    old = ray.get(host.info.remote())
    trainer = Trainer(front.address, sid, 30)
    trainer.wait_for(10)
    os.kill(old["pid"], signal.SIGKILL)
    check_training(front, sid, trainer.finish(), 30)
    new = ray.get(host.info.remote())
    assert new["incarnation"] != old["incarnation"] and new["node"] == node_id
    epoch, holder = front.directory.ownership.current(sid)
    assert epoch == 2 and holder["incarnation"] == new["incarnation"]


def test_killing_the_hosting_node_mid_training(front, cluster):
    name, host, node_id = worker_host(front, cluster)
    sid = "killed-node-1"
    assert call(host, "CreateSession", sid, create_request(sid))[0] == OK
    host_pid = ray.get(host.pid.remote())
    n = 40
    trainer = Trainer(front.address, sid, n)
    trainer.wait_for(12)
    # The node's raylet and processes, SIGKILL. A worker outlives its raylet for a moment (and answers
    # calls meanwhile, as the issue saw): the host process is killed with it, as a machine's loss would.
    cluster.remove_node(node_by_id(cluster, node_id), allow_graceful=False)
    os.kill(host_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    acks = trainer.finish()
    recovery = check_training(front, sid, acks, n)
    first_after = next(a["t"] for a in acks if a["t"] > killed_at)
    print(f"\nnode killed: the session answered again after {first_after - killed_at:.1f} s "
          f"(longest gap between steps {recovery:.1f} s)")
    assert first_after - killed_at < 20  # the bound
    epoch, holder = front.directory.ownership.current(sid)
    assert epoch >= 2 and holder["node"] != node_id
    cluster.add_node(num_cpus=1)
    front.directory.ensure_hosts()


def test_killing_a_node_holding_a_shard_mid_training(front, cluster, start_server):
    """A sharded session (2 shards) stepped by a client in another process; the node of a shard killed
    (its raylet and host, SIGKILL) mid-training: a surviving host adopts the shard, no acknowledged
    step is lost or applied twice, and the state equals one server's run bit for bit."""
    sid, n = "sharded-node-1", 30
    with Client(front.address) as c:
        c.create_session("adam", sharded_init(), session_id=sid, shards=2, lr=0.01)
    head = cluster.head_node.node_id
    infos = [ray.get(shard_host(front, sid, i)[1].info.remote(), timeout=120) for i in (0, 1)]
    victim = next(i for i in (0, 1) if infos[i]["node"] != head)
    node_id, host_pid = infos[victim]["node"], infos[victim]["pid"]
    trainer = Trainer(front.address, sid, n, names=NAMES)
    trainer.wait_for(10)
    cluster.remove_node(node_by_id(cluster, node_id), allow_graceful=False)
    os.kill(host_pid, signal.SIGKILL)
    killed_at = time.monotonic()
    acks = trainer.finish()
    assert [a["step"] for a in acks] == list(range(1, n + 1))
    first_after = next((a["t"] for a in acks if a["t"] > killed_at), None)
    if first_after is not None:
        print(f"\nshard's node killed: the session answered again after {first_after - killed_at:.1f} s")
    with Client(front.address) as c:
        assert_same_state(c.session(sid, {}).read_state(), one_server_state(start_server, n))
    assert front.directory.ownership.current(f"{sid}.shard{victim}")[1]["node"] != node_id
    cluster.add_node(num_cpus=1)
    front.directory.ensure_hosts()


def test_stopping_the_owner_node_then_resuming_it(front, cluster):
    """SIGSTOP the raylet and the host of the session's node: Ray finds the node dead and restarts the
    host elsewhere, which takes the session over; then SIGCONT: the old host's writes go nowhere."""
    name, host, node_id = worker_host(front, cluster)
    sid = "stopped-node-1"
    assert call(host, "CreateSession", sid, create_request(sid))[0] == OK
    old_epoch = front.directory.ownership.current(sid)[0]
    host_pid = ray.get(host.pid.remote())
    node = node_by_id(cluster, node_id)
    raylet_pid = node.all_processes["raylet"][0].process.pid
    n = 30
    trainer = Trainer(front.address, sid, n)
    trainer.wait_for(8)
    for pid in (raylet_pid, host_pid):
        os.kill(pid, signal.SIGSTOP)
    try:
        trainer.wait_for(18, timeout=60)  # training went on, elsewhere
    finally:
        for pid in (raylet_pid, host_pid):
            os.kill(pid, signal.SIGCONT)
    acks = trainer.finish()
    time.sleep(2)  # the resumed process runs until it learns it is dead
    check_training(front, sid, acks, n)
    epoch, holder = front.directory.ownership.current(sid)
    assert epoch > old_epoch and holder["node"] != node_id


def test_serve_ray_needs_shared_storage():
    """`optreg serve --ray` with nothing to keep sessions in: one line naming the fix, exit 2."""
    out = subprocess.run([sys.executable, "-m", "optreg.server", "serve", "--ray", "--memory-only"],
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=SOURCE_PATH), timeout=60)
    assert out.returncode == 2
    assert "--data-dir" in out.stderr and "shared" in out.stderr
