"""Issue 9's hostile-client findings, one test each, against a real `optreg serve` through the generated stubs.

Each test does what the trial did (stalled streams, huge declarations, huge names, int64 edges,
poisoned state, token changes, odd host spellings) and asserts the behaviour the issue asks for.
A client that must stay alive but stalled is a request generator blocked on an Event in a thread
of this process: the server sees an open call that sends nothing more.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import SOURCE_ROOTS, ServerProcess
from optreg.v1 import session_pb2, session_pb2_grpc, tensor_pb2, tensors

DT = tensor_pb2.DataType
F32 = DT.DATA_TYPE_FLOAT32
MIB = 1 << 20
# A call that must not be blocked gets this long (the trial saw them blocked for 90 s and more).
PROMPT = 10
# Client input of hostile length; the reply's message must stay well under gRPC's 8 KiB metadata limit.
LONG_ID = "s" * 10 * 1024
LONG_NAME = "n" * 100_000
SHORT_MESSAGE = 2048


# -- helpers -----------------------------------------------------------------------------------
def stub_for(address: str) -> session_pb2_grpc.SessionServiceStub:
    return session_pb2_grpc.SessionServiceStub(grpc.insecure_channel(address))


def bearer(token: str) -> tuple:
    return (("authorization", f"Bearer {token}"),)


def status_of(fn) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        fn()
    return e.value


def refused(code, fn, *words) -> str:
    err = status_of(fn)
    assert err.code() == code, (err.code(), err.details()[:500])
    for w in words:
        assert w in err.details(), (w, err.details()[:500])
    return err.details()


def create(stub, params: dict, optimizer="adam", metadata=(), state=None, initial_step=0, **config):
    req = session_pb2.CreateSessionRequest(
        config=session_pb2.SessionConfig(optimizer=optimizer, **config),
        parameters=[tensors.from_numpy(n, a) for n, a in params.items()], initial_step=initial_step)
    for slot, arrays in (state or {}).items():
        req.state.add(slot=slot, tensors=[tensors.from_numpy(n, a) for n, a in arrays.items()])
    return stub.CreateSession(req, timeout=PROMPT, metadata=metadata).session


def grads_of(arrays: dict) -> list:
    return [tensors.from_numpy(n, a) for n, a in arrays.items()]


def digest(stub, session_id: str, metadata=()) -> str:
    """Everything observable about a session, hashed: step, hyperparameters, parameters, every slot."""
    r = stub.ReadState(session_pb2.ReadStateRequest(session_id=session_id), timeout=PROMPT, metadata=metadata)
    h = hashlib.sha256()
    h.update(repr((r.session.step, sorted(r.session.hyperparameters.items()))).encode())
    for t in list(r.parameters) + [t for s in r.state for t in s.tensors]:
        h.update(t.name.encode() + repr(list(t.shape)).encode() + t.data)
    return h.hexdigest()


def params_of(reply_tensors) -> dict[str, np.ndarray]:
    return {t.name: tensors.to_numpy(t) for t in reply_tensors}


def stream_params(replies) -> tuple[int, bool, dict[str, np.ndarray]]:
    """A StepStream's replies reassembled: (step, replayed, name -> array)."""
    step, replayed, out = None, None, {}
    for r in replies:
        step, replayed = r.step, r.replayed
        for t in r.chunks:
            a = out.get(t.name)
            if a is None:
                a = out[t.name] = np.empty(tuple(t.shape), tensors.DTYPES[t.dtype])
            data = np.frombuffer(bytes(t.data), tensors.DTYPES[t.dtype])
            a.reshape(-1)[t.offset:t.offset + data.size] = data
    return step, replayed, out


def step_messages(session_id, grads: dict, step=None, chunk_bytes=64 << 10, **first):
    """A StepStream's request messages: the first names the session, each carries one chunk."""
    chunks = [c for n, a in grads.items() for c in tensors.chunk(n, a, chunk_bytes)]
    head = session_pb2.StepStreamRequest(session_id=session_id, chunks=chunks[:1], **first)
    if step is not None:
        head.step = step
    return [head] + [session_pb2.StepStreamRequest(chunks=[c]) for c in chunks[1:]]


def vm(pid: int, key: str = "VmRSS") -> float:
    """A /proc/<pid>/status figure in MiB (VmRSS: resident now; VmHWM: the peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"{key} not in /proc/{pid}/status")


class Stalled:
    """A client call that sends `messages`, then stays open sending nothing (or `keep` every
    `period` s) until `release()`; its replies and its final error are collected in a thread."""

    def __init__(self, method, messages, keep=None, period=0.3, unary_reply=False, metadata=()):
        self.released = threading.Event()
        self.first_reply = threading.Event()
        self.ended = threading.Event()
        self.replies, self.error, self.sent = [], None, 0

        def requests():
            for m in messages:
                self.sent += 1
                yield m
            while not self.released.wait(period if keep is not None else None):
                self.sent += 1
                yield keep

        if unary_reply:
            self.call = method.future(requests(), metadata=metadata)
        else:
            self.call = method(requests(), metadata=metadata)
        self.thread = threading.Thread(target=self._collect, args=(unary_reply,), daemon=True)
        self.thread.start()

    def _collect(self, unary_reply):
        try:
            if unary_reply:
                self.replies.append(self.call.result())
                self.first_reply.set()
            else:
                for r in self.call:
                    self.replies.append(r)
                    self.first_reply.set()
        except grpc.RpcError as e:
            self.error = e
        finally:
            self.first_reply.set()
            self.ended.set()

    def wait_end(self, timeout=60) -> grpc.RpcError | None:
        assert self.ended.wait(timeout), "the stalled call was never ended by the server"
        return self.error

    def release(self):
        self.call.cancel()  # first: the generator's return must not half-close a live call
        self.released.set()


@pytest.fixture
def stalls():
    made = []
    yield made
    for s in made:
        s.release()


def health_ok(address: str) -> bool:
    with grpc.insecure_channel(address) as ch:
        r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=PROMPT)
    return r.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as ch:
        yield session_pb2_grpc.SessionServiceStub(ch)


# -- 1. a stalled StepStream blocks nobody and ends after the idle timeout ------------------------
IDLE = 3


@pytest.fixture(scope="module")
def idle_server():
    s = ServerProcess("--memory-only", "--stream-idle-seconds", str(IDLE))
    yield s
    s.stop()


def _stall_kinds(sid, w_grad):
    """name -> (messages sent before the stall, what is sent over and over while stalled)."""
    part = tensor_pb2.Tensor(name="w", dtype=F32, shape=list(w_grad.shape), offset=0,
                             data=w_grad.reshape(-1)[:1000].tobytes())
    empty_chunk = tensor_pb2.Tensor(name="w", dtype=F32, shape=list(w_grad.shape), offset=0, data=b"")
    return {
        "part of the first chunk": ([session_pb2.StepStreamRequest(session_id=sid, step=0, chunks=[part])], None),
        "empty messages": ([session_pb2.StepStreamRequest(session_id=sid, step=0)],
                           session_pb2.StepStreamRequest()),
        "empty chunks": ([session_pb2.StepStreamRequest(session_id=sid, step=0, chunks=[empty_chunk])],
                         session_pb2.StepStreamRequest(chunks=[empty_chunk])),
    }


@pytest.mark.parametrize("kind", ["part of the first chunk", "empty messages"])
def test_stalled_step_stream_blocks_no_other_call_and_ends_after_idle_timeout(idle_server, stalls, kind):
    check_stalled_step_stream(idle_server, stalls, kind)


def check_stalled_step_stream(idle_server, stalls, kind):
    stub = stub_for(idle_server.address)
    rng = np.random.default_rng(1)
    p = {"w": rng.standard_normal((256, 256)).astype(np.float32), "b": rng.standard_normal(8).astype(np.float32)}
    g = {"w": rng.standard_normal((256, 256)).astype(np.float32), "b": np.ones(8, np.float32)}
    a = create(stub, p).session_id
    b = create(stub, p).session_id
    for sid in (a, b):
        first, keep = _stall_kinds(sid, g["w"])[kind]
        stalls.append(Stalled(stub.StepStream, first, keep))
    if kind == "part of the first chunk":
        # The server answers the updated slice as soon as it has it: proof it is inside the step.
        assert stalls[0].first_reply.wait(PROMPT) and stalls[0].error is None
    else:
        time.sleep(0.5)  # the first message has no reply to wait for; let it reach the server

    # While both streams stall: reads, a step, and a delete on the stalled sessions all answer.
    r = stub.ReadParameters(session_pb2.ReadParametersRequest(session_id=a), timeout=PROMPT)
    assert r.step == 0
    np.testing.assert_array_equal(params_of(r.parameters)["w"], p["w"])
    stepped = stub.Step(session_pb2.StepRequest(session_id=a, step=0, gradients=grads_of(g)), timeout=PROMPT)
    assert stepped.step == 1 and not stepped.replayed
    after_step = digest(stub, a)
    assert stub.ReadParameters(session_pb2.ReadParametersRequest(session_id=a), timeout=PROMPT).step == 1
    stub.DeleteSession(session_pb2.DeleteSessionRequest(session_id=b), timeout=PROMPT)
    assert not stalls[0].ended.is_set(), "the stalled stream ended before the idle timeout could"

    # The server ends both stalled streams (the senders are still alive), and they change nothing.
    for s in stalls:
        err = s.wait_end()
        assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
        assert "--stream-idle-seconds" in err.details(), err.details()
    assert digest(stub, a) == after_step
    refused(grpc.StatusCode.NOT_FOUND, lambda: stub.GetSession(session_pb2.GetSessionRequest(session_id=b),
                                                                timeout=PROMPT))
    # The session still steps normally afterwards.
    assert stub.Step(session_pb2.StepRequest(session_id=a, step=1, gradients=grads_of(g)), timeout=PROMPT).step == 2


# -- 2. stalled uploads cannot take the server's workers -------------------------------------------
def test_stalled_create_streams_never_make_the_server_unresponsive(start_server, stalls):
    srv = start_server("--memory-only", "--threads", "4", "--stream-idle-seconds", "4")
    stub = stub_for(srv.address)
    other = create(stub, {"w": np.ones(4, np.float32)}).session_id
    config = session_pb2.CreateSessionStreamRequest(config=session_pb2.SessionConfig(optimizer="adam"))
    part = session_pb2.CreateSessionStreamRequest(chunks=[tensor_pb2.Tensor(
        name="w", dtype=F32, shape=[1 << 20], offset=0, data=np.ones(1000, np.float32).tobytes())])
    # --workers 4: at most 2 streams at once. Twice that many hostile uploads, all alive and stalled.
    for _ in range(2):
        stalls.append(Stalled(stub.CreateSessionStream, [config, part], unary_reply=True))
    time.sleep(0.5)  # the first two hold their slots
    for _ in range(6):
        stalls.append(Stalled(stub.CreateSessionStream, [config, part], unary_reply=True))

    assert health_ok(srv.address)
    assert stub.GetSession(session_pb2.GetSessionRequest(session_id=other), timeout=PROMPT).session.step == 0
    assert stub.Step(session_pb2.StepRequest(session_id=other, step=0, gradients=grads_of(
        {"w": np.ones(4, np.float32)})), timeout=PROMPT).step == 1
    excess = stalls[2:]
    for s in excess:
        err = s.wait_end(PROMPT)
        assert err is not None and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err
        assert "--max-streams" in err.details(), err.details()
    assert not any(s.ended.is_set() for s in stalls[:2])
    assert health_ok(srv.address)

    # The slot holders end after the idle timeout; their slots come back.
    for s in stalls[:2]:
        err = s.wait_end()
        assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
        assert "--stream-idle-seconds" in err.details(), err.details()
    done = stub.CreateSessionStream(iter([config, session_pb2.CreateSessionStreamRequest(
        chunks=[tensors.from_numpy("w", np.ones(8, np.float32))])]), timeout=PROMPT)
    assert done.session.parameters[0].shape == [8]
    assert len(stub.ListSessions(session_pb2.ListSessionsRequest(), timeout=PROMPT).sessions) == 2


# -- 3. a huge declaration is refused before anything is allocated ---------------------------------
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


# -- 4. the budget counts stream steps' staging copies --------------------------------------------
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


# -- 5. hostile lengths get short answers with the right code ------------------------------------
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


# -- 6. the largest step number ---------------------------------------------------------------------
def test_step_numbers_at_int64_max_are_refused_and_every_read_keeps_working(start_server, tmp_path):
    data = str(tmp_path / "data")
    srv = start_server("--data-dir", data)
    stub, other = stub_for(srv.address), stub_for(srv.address)
    w = {"w": np.ones(3, np.float32)}
    bystander = create(stub, w).session_id
    top = (1 << 63) - 1
    refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: create(stub, w, session_id="at-max", initial_step=top),
            "initial_step")
    refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: create(stub, w, session_id="negative", initial_step=-1),
            "initial_step")
    names = {s.session_id for s in stub.ListSessions(session_pb2.ListSessionsRequest(), timeout=PROMPT).sessions}
    assert names == {bystander}, names

    sid = create(stub, w, session_id="edge", initial_step=top - 1).session_id
    r = stub.Step(session_pb2.StepRequest(session_id=sid, gradients=grads_of(w)), timeout=PROMPT)  # unfenced
    assert r.step == top and not r.replayed
    at_top = digest(stub, sid)
    refused(grpc.StatusCode.FAILED_PRECONDITION,
            lambda: stub.Step(session_pb2.StepRequest(session_id=sid, gradients=grads_of(w)), timeout=PROMPT))
    refused(grpc.StatusCode.FAILED_PRECONDITION,
            lambda: stub.Step(session_pb2.StepRequest(session_id=sid, step=top, gradients=grads_of(w)),
                              timeout=PROMPT))
    refused(grpc.StatusCode.FAILED_PRECONDITION,
            lambda: list(stub.StepStream(iter(step_messages(sid, w)), timeout=PROMPT)))
    # A retry of the last step is still answered, without applying anything.
    retry = stub.Step(session_pb2.StepRequest(session_id=sid, step=top - 1, gradients=grads_of(w)), timeout=PROMPT)
    assert retry.step == top and retry.replayed
    assert digest(stub, sid) == at_top

    def reads_work(stubs):
        for s in stubs:
            assert s.GetSession(session_pb2.GetSessionRequest(session_id=sid), timeout=PROMPT).session.step == top
            listed = {i.session_id: i.step for i in
                      s.ListSessions(session_pb2.ListSessionsRequest(), timeout=PROMPT).sessions}
            assert listed == {bystander: 0, sid: top}, listed
            assert s.ReadState(session_pb2.ReadStateRequest(session_id=sid), timeout=PROMPT).session.step == top
    reads_work([stub, other])
    srv.stop()
    again = start_server("--data-dir", data)
    reads_work([stub_for(again.address), stub_for(again.address)])
    assert digest(stub_for(again.address), sid) == at_top


# -- 7. shape [] -------------------------------------------------------------------------------
def test_scalar_parameter_round_trips_as_shape_empty(stub):
    p = {"s": np.array(2.0, np.float32), "w": np.ones(3, np.float32)}
    g = {"s": np.array(0.5, np.float32), "w": np.ones(3, np.float32)}
    info = create(stub, p)
    sid = info.session_id
    assert {t.name: list(t.shape) for t in info.parameters} == {"s": [], "w": [3]}

    unary = stub.Step(session_pb2.StepRequest(session_id=sid, step=0, gradients=grads_of(g)), timeout=PROMPT)
    assert {t.name: list(t.shape) for t in unary.tensors} == {"s": [], "w": [3]}
    assert params_of(unary.tensors)["s"].shape == ()

    replies = list(stub.StepStream(iter(step_messages(sid, g, step=1)), timeout=PROMPT))
    assert {t.name: list(t.shape) for r in replies for t in r.chunks} == {"s": [], "w": [3]}
    step, _, streamed = stream_params(replies)
    assert step == 2 and streamed["s"].shape == ()

    read = stub.ReadParameters(session_pb2.ReadParametersRequest(session_id=sid), timeout=PROMPT)
    assert {t.name: list(t.shape) for t in read.parameters} == {"s": [], "w": [3]}
    assert params_of(read.parameters)["s"] == streamed["s"]
    chunks = [t for r in stub.ReadParametersStream(session_pb2.ReadParametersStreamRequest(session_id=sid),
                                                   timeout=PROMPT) for t in r.chunks]
    assert {t.name: list(t.shape) for t in chunks} == {"s": [], "w": [3]}
    state = stub.ReadState(session_pb2.ReadStateRequest(session_id=sid), timeout=PROMPT)
    assert all(list(t.shape) == ([] if t.name == "s" else [3])
               for t in list(state.parameters) + [t for s in state.state for t in s.tensors])
    assert {t.name: list(t.shape) for t in state.session.parameters} == {"s": [], "w": [3]}

    # Restored from what ReadState gave: still a scalar, and it steps on from the same state.
    restored = stub.CreateSession(session_pb2.CreateSessionRequest(
        config=session_pb2.SessionConfig(optimizer="adam"), parameters=state.parameters, state=state.state,
        initial_step=state.session.step), timeout=PROMPT).session
    assert {t.name: list(t.shape) for t in restored.parameters} == {"s": [], "w": [3]}
    a = stub.Step(session_pb2.StepRequest(session_id=sid, step=2, gradients=grads_of(g)), timeout=PROMPT)
    b = stub.Step(session_pb2.StepRequest(session_id=restored.session_id, step=2, gradients=grads_of(g)),
                  timeout=PROMPT)
    assert [(t.name, list(t.shape), t.data) for t in a.tensors] == [(t.name, list(t.shape), t.data) for t in b.tensors]
    # And created by stream.
    by_stream = stub.CreateSessionStream(iter([
        session_pb2.CreateSessionStreamRequest(config=session_pb2.SessionConfig(optimizer="sgd")),
        session_pb2.CreateSessionStreamRequest(chunks=list(tensors.chunk("s", p["s"])))]), timeout=PROMPT)
    assert [list(t.shape) for t in by_stream.session.parameters] == [[]]


# -- 8. restored state is checked ------------------------------------------------------------------
def _poisoned(slot, value):
    shape = (2, 3)
    state = {"m": {"layer.w": np.zeros(shape, np.float32)}, "v": {"layer.w": np.ones(shape, np.float32)}}
    state[slot]["layer.w"][1, 2] = value
    return state


# +-inf is in the domains (a step can overflow an accumulator: tests/test_hostile_numbers.py); NaN and a
# negative v are not.
@pytest.mark.parametrize("slot,value", [("m", np.nan), ("v", -1.0), ("v", -np.inf), ("v", np.nan)])
@pytest.mark.parametrize("how", ["unary", "stream"])
def test_restored_state_outside_its_domain_is_refused(stub, slot, value, how):
    check_restored_state_refused(stub, slot, value, how)


def check_restored_state_refused(stub, slot, value, how):
    state = _poisoned(slot, value)
    params = {"layer.w": np.ones((2, 3), np.float32)}
    sid = f"poisoned-{how}-{slot}-{value}".replace(".", "_")
    if how == "unary":
        call = lambda: create(stub, params, state=state, initial_step=10, session_id=sid)  # noqa: E731
    else:
        msgs = [session_pb2.CreateSessionStreamRequest(
            config=session_pb2.SessionConfig(optimizer="adam", session_id=sid), initial_step=10,
            chunks=[tensors.from_numpy("layer.w", params["layer.w"])])]
        msgs += [session_pb2.CreateSessionStreamRequest(slot=s, chunks=[tensors.from_numpy("layer.w", a["layer.w"])])
                 for s, a in state.items()]
        call = lambda: stub.CreateSessionStream(iter(msgs), timeout=PROMPT)  # noqa: E731
    details = refused(grpc.StatusCode.INVALID_ARGUMENT, call, "layer.w")
    assert re.search(rf"\b{slot}\b", details), details
    refused(grpc.StatusCode.NOT_FOUND, lambda: stub.GetSession(session_pb2.GetSessionRequest(session_id=sid)))
    assert sid not in {s.session_id for s in stub.ListSessions(session_pb2.ListSessionsRequest()).sessions}


def test_valid_restored_state_is_accepted_and_steps_finite(stub):
    state = {"m": {"w": np.full(3, -0.5, np.float32)}, "v": {"w": np.full(3, 0.25, np.float32)}}
    sid = create(stub, {"w": np.ones(3, np.float32)}, state=state, initial_step=10).session_id
    r = stub.Step(session_pb2.StepRequest(session_id=sid, step=10, gradients=grads_of({"w": np.ones(3, np.float32)})),
                  timeout=PROMPT)
    assert r.step == 11 and np.isfinite(params_of(r.tensors)["w"]).all()


# -- 12. sessions from a server without tokens, served with tokens ----------------------------------
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


# -- 13. the metrics host and loopback spellings ---------------------------------------------------
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


# -- hyperparameters carried by a step ------------------------------------------------------------
def test_step_hyperparameters_apply_from_that_step_and_are_not_reapplied_on_retry(stub):
    p0 = np.array([1.0, -2.0, 3.0, 0.5])
    g = np.array([0.5, 1.0, -1.0, 2.0])
    sid = create(stub, {"w": p0}, optimizer="sgd", hyperparameters={"lr": 0.1}).session_id

    def lr():
        return stub.GetSession(session_pb2.GetSessionRequest(session_id=sid), timeout=PROMPT).session.hyperparameters["lr"]

    r1 = stub.Step(session_pb2.StepRequest(session_id=sid, step=0, gradients=grads_of({"w": g}),
                                           hyperparameters={"lr": 0.5}), timeout=PROMPT)
    p1 = p0 - g * 0.5
    np.testing.assert_array_equal(params_of(r1.tensors)["w"], p1)
    assert lr() == 0.5
    r2 = stub.Step(session_pb2.StepRequest(session_id=sid, step=1, gradients=grads_of({"w": g})), timeout=PROMPT)
    p2 = p1 - g * 0.5  # the new rate stays in force
    np.testing.assert_array_equal(params_of(r2.tensors)["w"], p2)

    before = digest(stub, sid)
    for bad, word in (({"lr": -1.0}, "lr"), ({"lr": float("nan")}, "lr"), ({"nope": 1.0}, "nope")):
        refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.Step(session_pb2.StepRequest(
            session_id=sid, step=2, gradients=grads_of({"w": g}), hyperparameters=bad), timeout=PROMPT), word)
        refused(grpc.StatusCode.INVALID_ARGUMENT, lambda: list(stub.StepStream(iter(step_messages(
            sid, {"w": g}, step=2, hyperparameters=bad)), timeout=PROMPT)), word)
    assert digest(stub, sid) == before

    # A retry of step 2 (fence 1) with other values is answered as the original; nothing changes.
    again = stub.Step(session_pb2.StepRequest(session_id=sid, step=1, gradients=grads_of({"w": g}),
                                              hyperparameters={"lr": 5.0}), timeout=PROMPT)
    assert again.replayed and again.step == 2
    np.testing.assert_array_equal(params_of(again.tensors)["w"], p2)
    assert lr() == 0.5 and digest(stub, sid) == before

    # The streamed step carries them in its first message, the same way.
    step, replayed, out = stream_params(stub.StepStream(iter(step_messages(
        sid, {"w": g}, step=2, hyperparameters={"lr": 0.25})), timeout=PROMPT))
    p3 = p2 - g * 0.25
    assert (step, replayed) == (3, False)
    np.testing.assert_array_equal(out["w"], p3)
    assert lr() == 0.25
    step, replayed, out = stream_params(stub.StepStream(iter(step_messages(
        sid, {"w": g}, step=2, hyperparameters={"lr": 9.0})), timeout=PROMPT))
    assert (step, replayed) == (3, True)
    np.testing.assert_array_equal(out["w"], p3)
    assert lr() == 0.25


# -- one fence, two clients ---------------------------------------------------------------------------
WHOLE_TENSOR_PLUGIN = textwrap.dedent('''
    import numpy as np
    from optreg.plugins import Hyperparameter, Optimizer, hookimpl

    def update(param, grad, state, step, hp, scratch):
        param -= hp["lr"] * grad / (np.sqrt(np.sum(grad * grad)) + 1e-12)

    @hookimpl
    def optreg_optimizers():
        return [Optimizer(name="normsgd", summary="SGD on the tensor's normalized gradient.", update=update,
                          hyperparameters=(Hyperparameter("lr", 0.1, "step size", minimum=0.0),),
                          elementwise=False)]
''')


@pytest.fixture(scope="module")
def race_server(tmp_path_factory):
    """A server that also has a whole-tensor optimizer (elementwise=False), installed as a real plugin."""
    root = tmp_path_factory.mktemp("plugin")
    (root / "optreg_normsgd.py").write_text(WHOLE_TENSOR_PLUGIN)
    info = root / "optreg_normsgd-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: optreg-normsgd\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[optreg]\nnormsgd = optreg_normsgd\n")
    s = ServerProcess("--memory-only", "--stream-idle-seconds", "60", env={"PYTHONPATH": str(root)})
    yield s
    s.stop()


@pytest.mark.parametrize("optimizer", ["adam"])
def test_same_fence_from_two_clients_while_one_streams_applies_once(race_server, stalls, optimizer):
    check_same_fence_while_one_streams(race_server, stalls, optimizer)


def check_same_fence_while_one_streams(race_server, stalls, optimizer):
    """Client A streams step 0 and holds the stream open before its end; client B sends step 0 whole.
    One of them is applied; the other is answered as its replay, with the same parameters."""
    a_stub, b_stub = stub_for(race_server.address), stub_for(race_server.address)
    rng = np.random.default_rng(7)
    p = {"w": rng.standard_normal(5000).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    g = {"w": rng.standard_normal(5000).astype(np.float32), "b": rng.standard_normal(7).astype(np.float32)}
    sid = create(a_stub, p, optimizer=optimizer).session_id
    twin = create(a_stub, p, optimizer=optimizer).session_id  # stepped once, alone: the expected result
    expected = params_of(b_stub.Step(session_pb2.StepRequest(session_id=twin, step=0, gradients=grads_of(g)),
                                     timeout=PROMPT).tensors)

    a = Stalled(a_stub.StepStream, step_messages(sid, g, step=0, chunk_bytes=4096))
    stalls.append(a)
    time.sleep(1.0)  # every chunk of A reaches the server; its end does not
    b = b_stub.Step(session_pb2.StepRequest(session_id=sid, step=0, gradients=grads_of(g)), timeout=PROMPT)
    a.released.set()  # A's generator returns: the stream ends and A's step can finish
    assert a.wait_end(PROMPT) is None, a.error
    a_step, a_replayed, a_params = stream_params(a.replies)

    assert (b.step, a_step) == (1, 1)
    assert sorted([b.replayed, a_replayed]) == [False, True]
    for name in p:
        np.testing.assert_array_equal(params_of(b.tensors)[name], a_params[name])
        np.testing.assert_array_equal(a_params[name], expected[name])
    info = a_stub.GetSession(session_pb2.GetSessionRequest(session_id=sid), timeout=PROMPT).session
    assert info.step == 1


@pytest.mark.parametrize("optimizer", ["adam"])
def test_same_fence_from_two_clients_at_once_applies_once(race_server, optimizer):
    check_same_fence_at_once(race_server, optimizer)


def check_same_fence_at_once(race_server, optimizer):
    stubs = [stub_for(race_server.address), stub_for(race_server.address)]
    rng = np.random.default_rng(8)
    p = {"w": rng.standard_normal(20000).astype(np.float32)}
    sid = create(stubs[0], p, optimizer=optimizer).session_id
    rounds = 15
    for k in range(rounds):
        g = {"w": rng.standard_normal(20000).astype(np.float32)}
        barrier, answers = threading.Barrier(2), [None, None]

        def send(i):
            barrier.wait()
            try:
                answers[i] = stubs[i].Step(session_pb2.StepRequest(session_id=sid, step=k, gradients=grads_of(g)),
                                           timeout=PROMPT)
            except grpc.RpcError as e:
                answers[i] = e

        threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for ans in answers:
            assert not isinstance(ans, grpc.RpcError), (k, ans.code(), ans.details())
        assert [a.step for a in answers] == [k + 1, k + 1], (k, answers[0].step, answers[1].step)
        assert sorted(a.replayed for a in answers) == [False, True], k
        assert answers[0].tensors[0].data == answers[1].tensors[0].data, k
    assert stubs[0].GetSession(session_pb2.GetSessionRequest(session_id=sid), timeout=PROMPT).session.step == rounds
