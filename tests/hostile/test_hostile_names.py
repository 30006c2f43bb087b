"""Hostile client, names family: hostile lengths of ids and names (issue 9, 5) and host spellings (issue 9, 13;
issue 22, 15).

Ids and names of hostile length get the right code and a message short enough for gRPC's metadata.
Loopback in every spelling is loopback for --host, --metrics-host and --dashboard-host (one check,
app.is_loopback), each tried with a real `optreg serve`; a mapped address that is not loopback is still
refused, and metrics off loopback need --allow-insecure."""
from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import grpc
import numpy as np
import pytest

from cli_helpers import free_port
from conftest import SOURCE_ROOTS
from hostile_helpers import PROMPT, create, digest, grads_of, health_ok, refused, step_messages, stub_for
from hostile_helpers import stub  # noqa: F401 (a fixture)
from optreg.client import Client
from optreg.v1 import session_pb2, tensors

MAPPED = "::ffff:127.0.0.1"  # 127.0.0.1 as an IPv6 socket carries it
MAPPED_PUBLIC = "::ffff:192.0.2.1"  # TEST-NET-1, mapped: not loopback
# Client input of hostile length; the reply's message must stay well under gRPC's 8 KiB metadata limit.
LONG_ID = "s" * 10 * 1024
LONG_NAME = "n" * 100_000
SHORT_MESSAGE = 2048


@pytest.mark.parametrize("host, metrics_host, dashboard_host, refused", [
    (MAPPED, MAPPED, MAPPED, [("--host", MAPPED_PUBLIC)]),
    ("0:0:0:0:0:0:0:1", "[::ffff:7f00:1]", "127.42.0.1",
     [("--metrics-host", MAPPED_PUBLIC, "--metrics-port", "0"), ("--dashboard-host", MAPPED_PUBLIC)]),
])
def test_loopback_in_every_spelling_serves_on_every_flag(start_server, host, metrics_host, dashboard_host, refused):
    port = free_port()
    s = start_server("--memory-only", "--host", host, "--metrics-host", metrics_host, "--metrics-port", str(port),
                     "--dashboard-host", dashboard_host, "--dashboard-port", "0")
    with Client(s.address, timeout=30) as c:
        session = c.create_session("sgd", {"w": np.zeros(3)}, session_id="loop", lr=0.5)
        session.step({"w": np.ones(3)})
        assert [x.session_id for x in c.list_sessions()] == ["loop"]
    assert "optreg_" in urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read().decode()
    line = s.proc.stdout.readline()
    assert line.startswith("optreg dashboard on http://"), line
    assert "loop" in urllib.request.urlopen(line.split()[-1] + "api/sessions", timeout=30).read().decode()
    s.stop()
    for args in refused:  # (the dashboard's refusal comes before its port is looked at)
        with pytest.raises(RuntimeError, match="refusing to bind .* to non-loopback address 192.0.2.1 "):
            start_server("--memory-only", *args, "--dashboard-port", "0")


# -- issue 9, 5: hostile lengths get short answers with the right code
def _long_input_cases():
    g = np.ones(3, np.float32)
    NF, IA = grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT
    return {
        "GetSession 10 KiB id": (NF, lambda s, sid: s.GetSession(session_pb2.GetSessionRequest(session_id=LONG_ID))),
        "Step 10 KiB id": (NF, lambda s, sid: s.Step(session_pb2.StepRequest(
            session_id=LONG_ID, step=0, gradients=grads_of({"w": g})))),
        "StepStream 10 KiB id": (NF, lambda s, sid: list(s.StepStream(iter(step_messages(LONG_ID, {"w": g}, 0))))),
        "ReadParameters 10 KiB id": (NF, lambda s, sid: s.ReadParameters(
            session_pb2.ReadParametersRequest(session_id=LONG_ID))),
        "ReadState 10 KiB id": (NF, lambda s, sid: s.ReadState(session_pb2.ReadStateRequest(session_id=LONG_ID))),
        "DeleteSession 10 KiB id": (NF, lambda s, sid: s.DeleteSession(
            session_pb2.DeleteSessionRequest(session_id=LONG_ID))),
        "UpdateHyperparameters 10 KiB id": (NF, lambda s, sid: s.UpdateHyperparameters(
            session_pb2.UpdateHyperparametersRequest(session_id=LONG_ID, hyperparameters={"lr": 0.1}))),
        "CreateSession 10 KiB id": (IA, lambda s, sid: create(s, {"w": g}, session_id=LONG_ID)),
        "CreateSession 100 KB optimizer": (NF, lambda s, sid: create(s, {"w": g}, optimizer=LONG_NAME)),
        "CreateSessionStream 100 KB optimizer": (NF, lambda s, sid: s.CreateSessionStream(iter([
            session_pb2.CreateSessionStreamRequest(config=session_pb2.SessionConfig(optimizer=LONG_NAME)),
            session_pb2.CreateSessionStreamRequest(chunks=[tensors.from_numpy("w", g)])]))),
        "CreateSession 100 KB tensor name": (IA, lambda s, sid: create(s, {LONG_NAME: g})),
        "CreateSessionStream 100 KB tensor name": (IA, lambda s, sid: s.CreateSessionStream(iter([
            session_pb2.CreateSessionStreamRequest(config=session_pb2.SessionConfig(optimizer="adam")),
            session_pb2.CreateSessionStreamRequest(chunks=[tensors.from_numpy(LONG_NAME, g)])]))),
        "CreateSession 100 KB hyperparameter": (IA, lambda s, sid: create(s, {"w": g}, hyperparameters={
            LONG_NAME: 1.0})),
        "Step 100 KB gradient name": (IA, lambda s, sid: s.Step(session_pb2.StepRequest(
            session_id=sid, step=0, gradients=grads_of({LONG_NAME: g})))),
        "StepStream 100 KB gradient name": (IA, lambda s, sid: list(s.StepStream(iter(
            step_messages(sid, {LONG_NAME: g}, 0))))),
        "Step 100 KB hyperparameter": (IA, lambda s, sid: s.Step(session_pb2.StepRequest(
            session_id=sid, step=0, gradients=grads_of({"w": g}), hyperparameters={LONG_NAME: 0.1}))),
        "Step 100 KB metric": (IA, lambda s, sid: s.Step(session_pb2.StepRequest(
            session_id=sid, step=0, gradients=grads_of({"w": g}), metrics={LONG_NAME: 0.1}))),
        "ReadParameters 100 KB name": (IA, lambda s, sid: s.ReadParameters(
            session_pb2.ReadParametersRequest(session_id=sid, names=[LONG_NAME]))),
        "UpdateHyperparameters 100 KB name": (IA, lambda s, sid: s.UpdateHyperparameters(
            session_pb2.UpdateHyperparametersRequest(session_id=sid, hyperparameters={LONG_NAME: 0.1}))),
    }


@pytest.mark.parametrize("case", sorted(_long_input_cases()))
def test_hostile_lengths_get_the_right_code_and_a_short_message(stub, case):
    code, call = _long_input_cases()[case]
    sid = create(stub, {"w": np.ones(3, np.float32)}).session_id
    before = digest(stub, sid)
    details = refused(code, lambda: call(stub, sid))
    assert len(details.encode()) < SHORT_MESSAGE, f"{len(details)} characters: {details[:200]}..."
    assert digest(stub, sid) == before


# -- issue 9, 13: the metrics host and loopback spellings
def run_serve(*args, timeout=60) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(SOURCE_ROOTS), OPTREG_KERNELS="numpy")
    return subprocess.run([sys.executable, "-m", "optreg.server", "serve", "--port", "0", "--memory-only", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_metrics_off_loopback_is_refused_without_allow_insecure(start_server, host):
    r = run_serve("--metrics-port", "0", "--metrics-host", host)
    assert r.returncode != 0 and "optreg serving" not in r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "metrics" in lines[0] and "--allow-insecure" in lines[0], lines[0]

    srv = start_server("--memory-only", "--metrics-port", "0", "--metrics-host", host, "--allow-insecure",
                       env={"OPTREG_KERNELS": "numpy"})
    assert health_ok(srv.address)


@pytest.mark.parametrize("spelling", ["127.1", "0x7f000001"])
def test_loopback_in_other_spellings_serves_on_127_0_0_1(start_server, spelling):
    srv = start_server("--memory-only", "--host", spelling, env={"OPTREG_KERNELS": "numpy"})
    assert srv.address.startswith("127.0.0.1:"), srv.address
    assert health_ok(srv.address)
    assert stub_for(srv.address).ListSessions(session_pb2.ListSessionsRequest(), timeout=PROMPT).sessions == []
    assert srv.stop() == 0
    assert "Traceback" not in srv.proc.stderr.read()

