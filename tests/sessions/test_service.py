"""The service as generic tools see it: CLI listing, health checking, reflection, draining on SIGTERM."""
import json
import os
import signal
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from conftest import SOURCE_ROOTS

BOOK_DEFAULTS = {"sgd": {"lr": 0.01}, "momentum": {"lr": 0.01, "momentum": 0.9},
                 "nesterov": {"lr": 0.01, "momentum": 0.9}, "adagrad": {"lr": 0.01},
                 "rmsprop": {"lr": 0.01, "decay_rate": 0.99}, "adam": {"lr": 0.001, "beta1": 0.9, "beta2": 0.999}}


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(SOURCE_ROOTS))
    return subprocess.run([sys.executable, "-m", "optreg.app", *args], capture_output=True, text=True,
                          env=env, check=True).stdout


def test_optimizers_json_lists_builtins_with_defaults():
    listing = json.loads(run_cli("optimizers", "--json"))
    found = {o["name"]: o for o in listing["optimizers"]}
    for name, defaults in BOOK_DEFAULTS.items():
        assert {h["name"]: h["default"] for h in found[name]["hyperparameters"]} == defaults
        assert found[name]["distribution"] == "optreg"
        assert found[name]["summary"]
    assert [s["name"] for s in found["adam"]["slots"]] == ["m", "v"]


def test_optimizers_table_and_address(server):
    table = run_cli("optimizers")
    assert "adam" in table and "lr=0.001" in table
    remote = json.loads(run_cli("optimizers", "--json", "--address", server.address))
    assert set(BOOK_DEFAULTS) <= {o["name"] for o in remote["optimizers"]}


def test_health_serving_and_reflection_lists_services(server):
    with grpc.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "optreg.v1.SessionService", "optreg.v1.OptimizerRegistryService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == \
                health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"optreg.v1.SessionService", "optreg.v1.OptimizerRegistryService", "grpc.health.v1.Health"} <= names


# tgkill(2) by architecture: a signal sent to one thread of the server, not to the process
_TGKILL = {"x86_64": 234, "aarch64": 131}


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.uname().machine not in _TGKILL,
                    reason="tgkill numbers known for Linux x86_64/aarch64 only")
def test_sigterm_delivered_to_another_thread_still_stops_the_server(start_server):
    """The kernel may hand a process's SIGTERM to any of its threads (gRPC's among them): the server
    must still drain and exit. Its main thread waited untimed and never ran the handler (the server
    kept serving; seen once in a few dozen shutdowns, made certain here by aiming at one thread)."""
    import ctypes
    import time
    srv = start_server()
    others = [int(t) for t in os.listdir(f"/proc/{srv.proc.pid}/task") if int(t) != srv.proc.pid]
    assert others
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(_TGKILL[os.uname().machine], srv.proc.pid, others[-1], signal.SIGTERM) == 0, \
        os.strerror(ctypes.get_errno())
    t0 = time.monotonic()
    try:
        rc = srv.proc.wait(30)
    except subprocess.TimeoutExpired:
        rc = None
    assert rc == 0, f"the server had not exited {time.monotonic() - t0:.0f} s after SIGTERM to thread {others[-1]}"


def test_sigterm_drains_inflight_step(start_server):
    from optreg.client import Client
    srv = start_server()
    n = 8_000_000
    params = {"w": np.zeros(n, np.float32)}
    outcome = {}
    with Client(srv.address) as c:
        s = c.create_session("sgd", params, lr=1.0)

        def step():
            try:
                s.step({"w": np.ones(n, np.float32)})
                outcome["step"] = s.step_count
            except Exception as e:  # recorded for the assertion below
                outcome["error"] = e
        t = threading.Thread(target=step)
        t.start()
        # wait until the server has the call, then ask it to stop
        import time
        time.sleep(0.05)
        srv.proc.send_signal(signal.SIGTERM)
        t.join()
        assert srv.proc.wait(60) == 0
    # either the step finished (drained) or it was refused before starting; never half-done
    if "step" in outcome:
        assert outcome["step"] == 1 and params["w"][0] == -1.0 and params["w"][-1] == -1.0
    else:
        assert params["w"][0] == 0.0
