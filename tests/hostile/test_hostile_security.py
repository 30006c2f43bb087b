"""Hostile client, security family: memory a client can make the server take (issue 9: 3, 4; issue 22, 5), and
sessions of a server without tokens served with tokens (issue 9, 12).

Issue 22, finding 5: every expansion of client input is bounded and counted against the memory budget.

A 1 MB ImportTelemetry request (`zlib.compress(b' ' * (1000 << 20), 9)`) used to grow the server by
2 GB, under `--memory-budget-mb 64` too. The server's peak resident memory (VmHWM) is read before and
after: a bound on memory (loose: it must only tell hundreds of MiB from gigabytes), not on time.
"""
from __future__ import annotations

import math
import os
import zlib

import grpc
import numpy as np
import pytest

from hostile_helpers import (F32, PROMPT, bearer, create, grads_of, health_ok, refused, step_messages, stream_params,
                             stub_for)
from optreg.client import Client
from optreg.v1 import session_pb2, telemetry_pb2, telemetry_pb2_grpc, tensor_pb2, tensors

MIB = 1 << 20


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return zlib.compress(b" " * (1000 * MIB), 9)


def _peak_rss(server) -> int:
    with open(f"/proc/{server.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def _import(server, session_id: str, data: bytes):
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 64 * MIB)]) as ch:
        stub = telemetry_pb2_grpc.TelemetryServiceStub(ch)
        return stub.ImportTelemetry(telemetry_pb2.ImportTelemetryRequest(session_id=session_id, data=data),
                                    timeout=120)


def _stepped_session(client):
    s = client.create_session("sgd", {"w": np.ones(16, np.float32)}, lr=0.1)
    s.step({"w": np.ones(16, np.float32)})
    return s


@pytest.mark.parametrize("budget_mb,code,words", [
    ("64", grpc.StatusCode.RESOURCE_EXHAUSTED, "memory budget"),
    (None, grpc.StatusCode.INVALID_ARGUMENT, "inflates to more than 256 MiB"),
])
def test_import_telemetry_bomb_is_bounded(start_server, bomb, budget_mb, code, words):
    srv = start_server(*(["--memory-budget-mb", budget_mb] if budget_mb else []))
    with Client(srv.address, timeout=60) as c:
        s = _stepped_session(c)
        good = c.transport.unary("ExportTelemetry", telemetry_pb2.ExportTelemetryRequest(session_id=s.id),
                                 timeout=30).data
        before = _peak_rss(srv)
        with pytest.raises(grpc.RpcError) as e:
            _import(srv, s.id, bomb)
        assert e.value.code() == code and words in e.value.details(), e.value.details()
        assert srv.proc.poll() is None
        grew = _peak_rss(srv) - before  # the bound, plus room for what a fresh server does meanwhile (numba)
        assert grew < (64 if budget_mb else 512) * MIB + 256 * MIB, f"the server grew by {grew / MIB:.0f} MiB"
        # nothing was changed, the server serves, and a real export still imports
        s.step({"w": np.ones(16, np.float32)})
        assert _import(srv, s.id, good).last_step == 1


def vm(pid: int, key: str = "VmRSS") -> float:
    """A /proc/<pid>/status figure in MiB (VmRSS: resident now; VmHWM: the peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"{key} not in /proc/{pid}/status")



# -- issue 9, 3: a huge declaration is refused before anything is allocated
def test_huge_declared_tensor_refused_by_default_budget_before_allocation(start_server):
    srv = start_server("--memory-only", env={"OPTREG_KERNELS": "numpy"})  # no --memory-budget-mb
    stub = stub_for(srv.address)
    # [2**32] float32 is 16 GiB; on a machine where that fits half the memory, declare more.
    physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    shape = [1 << 32] if 16 << 30 > physical // 2 else [1 << 32, math.ceil(physical / (16 << 30))]
    piece = np.ones(MIB // 4, np.float32)
    sent = []

    def upload():
        yield session_pb2.CreateSessionStreamRequest(config=session_pb2.SessionConfig(optimizer="sgd"))
        for i in range(300):  # 300 MiB if nobody stops us: an allocating server would hold it all
            sent.append(i)
            yield session_pb2.CreateSessionStreamRequest(chunks=[tensor_pb2.Tensor(
                name="huge", dtype=F32, shape=shape, offset=i * piece.size, data=piece.tobytes())])

    before = vm(srv.proc.pid)
    details = refused(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      lambda: stub.CreateSessionStream(upload(), timeout=60), "memory budget", "--memory-budget-mb")
    assert f"{(math.prod(shape) * 4) / MIB:.1f} MiB" in details, details
    assert len(sent) < 100, f"the server read {len(sent)} MiB of a tensor it could never hold"
    assert vm(srv.proc.pid) - before < 100, (before, vm(srv.proc.pid))
    assert health_ok(srv.address)
    assert not stub.ListSessions(session_pb2.ListSessionsRequest(), timeout=PROMPT).sessions


# -- issue 9, 4: the budget counts stream steps' staging copies
def test_budget_counts_stream_staging_and_refuses_with_resource_exhausted(start_server):
    budget = 220
    srv = start_server("--memory-only", "--memory-budget-mb", str(budget), env={"OPTREG_KERNELS": "numpy"})
    stub = stub_for(srv.address)
    warm = create(stub, {"w": np.ones(4, np.float32)}).session_id
    list(stub.StepStream(iter(step_messages(warm, {"w": np.ones(4, np.float32)}, step=0)), timeout=PROMPT))
    base = vm(srv.proc.pid)
    n = 6 * (1 << 20)  # Adam: parameters, m and v of 24 MiB each, one 72 MiB set a session
    rng = np.random.default_rng(4)
    g = {"w": rng.standard_normal(n).astype(np.float32)}

    def create_by_stream(sid):
        msgs = [session_pb2.CreateSessionStreamRequest(config=session_pb2.SessionConfig(optimizer="adam",
                                                                                        session_id=sid))]
        msgs += [session_pb2.CreateSessionStreamRequest(chunks=[c])
                 for c in tensors.chunk("w", np.zeros(n, np.float32))]
        return stub.CreateSessionStream(iter(msgs), timeout=120).session.session_id

    def step_by_stream(sid, step):
        return stream_params(stub.StepStream(iter(step_messages(sid, g, step=step, chunk_bytes=MIB)), timeout=120))

    trace = [("start", base)]  # (phase, RSS after it): the failure message shows where memory went
    for sid in ("a", "b"):
        create_by_stream(sid)
        trace.append((f"create {sid}", vm(srv.proc.pid)))
    for step in range(2):
        for sid in ("a", "b"):
            assert step_by_stream(sid, step)[0] == step + 1
            trace.append((f"step {sid}", vm(srv.proc.pid)))
    # A third session does not fit beside two stepped ones and their staging: refused, naming sizes.
    for action in (lambda: create_by_stream("c"), lambda: step_by_stream("c", 0)):
        try:
            action()
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
            assert "72.0 MiB" in e.details() and f"{budget:.1f} MiB" in e.details(), e.details()
            break
    else:
        raise AssertionError("a third 72 MiB session was created and stepped within a 220 MiB budget")
    # A tensor larger than the whole budget: RESOURCE_EXHAUSTED naming its size and the budget.
    big = session_pb2.CreateSessionStreamRequest(chunks=[tensor_pb2.Tensor(
        name="big", dtype=F32, shape=[300 * MIB // 4], offset=0, data=np.ones(1024, np.float32).tobytes())])
    refused(grpc.StatusCode.RESOURCE_EXHAUSTED, lambda: stub.CreateSessionStream(iter([
        session_pb2.CreateSessionStreamRequest(config=session_pb2.SessionConfig(optimizer="sgd")), big]),
        timeout=PROMPT), "300.0 MiB", f"{budget:.1f} MiB")
    # Stepping on works, and the process never held much more than the budget.
    trace.append(("refusals", vm(srv.proc.pid)))
    assert step_by_stream("a", 2)[0] == 3
    trace.append(("step a", vm(srv.proc.pid)))
    peak = vm(srv.proc.pid, "VmHWM")
    assert peak - base < budget + 150, f"peak RSS {peak:.0f} MiB, budget {budget} MiB; RSS after each: {trace}"


# -- issue 9, 12: sessions from a server without tokens, served with tokens
def test_ownerless_sessions_open_to_every_token_and_owned_ones_private(start_server, tmp_path):
    data = str(tmp_path / "data")
    token_file = tmp_path / "tokens"
    token_file.write_text("alice-token\nbob-token\n")
    w = {"w": np.ones(3, np.float32)}
    plain = start_server("--data-dir", data)
    stub = stub_for(plain.address)
    create(stub, w, session_id="open-1")
    create(stub, w, session_id="open-2")
    stub.Step(session_pb2.StepRequest(session_id="open-1", step=0, gradients=grads_of(w)), timeout=PROMPT)
    assert plain.stop() == 0

    srv = start_server("--data-dir", data, "--token-file", str(token_file))
    stub = stub_for(srv.address)
    alice, bob = bearer("alice-token"), bearer("bob-token")
    for who, step in ((alice, 1), (bob, 2)):  # open-1 was stepped once by the plain server
        listed = {s.session_id for s in stub.ListSessions(session_pb2.ListSessionsRequest(), metadata=who,
                                                          timeout=PROMPT).sessions}
        assert listed == {"open-1", "open-2"}, listed
        assert stub.GetSession(session_pb2.GetSessionRequest(session_id="open-1"), metadata=who,
                               timeout=PROMPT).session.step == step
        assert stub.Step(session_pb2.StepRequest(session_id="open-1", step=step, gradients=grads_of(w)),
                         metadata=who, timeout=PROMPT).step == step + 1
        assert stub.ReadParameters(session_pb2.ReadParametersRequest(session_id="open-2"), metadata=who,
                                   timeout=PROMPT).step == 0
    stub.DeleteSession(session_pb2.DeleteSessionRequest(session_id="open-2"), metadata=bob, timeout=PROMPT)
    refused(grpc.StatusCode.UNAUTHENTICATED,
            lambda: stub.GetSession(session_pb2.GetSessionRequest(session_id="open-1"), timeout=PROMPT))

    # A session created with a token is invisible to every other token.
    create(stub, w, session_id="alice-only", metadata=alice)
    denied = grpc.StatusCode.PERMISSION_DENIED
    refused(denied, lambda: stub.GetSession(session_pb2.GetSessionRequest(session_id="alice-only"), metadata=bob))
    refused(denied, lambda: stub.Step(session_pb2.StepRequest(session_id="alice-only", step=0, gradients=grads_of(w)),
                                      metadata=bob))
    refused(denied, lambda: stub.ReadParameters(session_pb2.ReadParametersRequest(session_id="alice-only"),
                                                metadata=bob))
    refused(denied, lambda: stub.DeleteSession(session_pb2.DeleteSessionRequest(session_id="alice-only"),
                                               metadata=bob))
    refused(denied, lambda: create(stub, w, session_id="alice-only", metadata=bob))
    assert "alice-only" not in {s.session_id for s in stub.ListSessions(
        session_pb2.ListSessionsRequest(), metadata=bob).sessions}
    assert stub.GetSession(session_pb2.GetSessionRequest(session_id="alice-only"), metadata=alice).session.step == 0

