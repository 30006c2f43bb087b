"""Hostile client, time family: stalled, idle and trickling streams (issue 9: 1, 2; issue 22) are ended after
--stream-idle-seconds, with a status naming it, and never hold another caller's thread or stream slot."""
from __future__ import annotations

import time

import grpc
import numpy as np
import pytest

from conftest import ServerProcess
from hostile_helpers import (F32, PROMPT, Stalled, create, digest, grads_of, health_ok, params_of, refused,
                             step_messages, stream_params, stub_for)
from hostile_helpers import stalls  # noqa: F401 (a fixture)
from optreg.v1 import session_pb2, tensor_pb2, tensors


# -- issue 9, 1: a stalled StepStream blocks nobody and ends after the idle timeout
IDLE = 3


@pytest.fixture(scope="module")
def idle_server():
    """Two stream slots, as many as a test here stalls at once: a stream that kept its slot would show."""
    s = ServerProcess("--memory-only", "--stream-idle-seconds", str(IDLE), "--max-streams", "2")
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


# -- issue 9, 2: stalled uploads cannot take the server's workers
def test_stalled_create_streams_never_make_the_server_unresponsive(start_server, stalls):
    srv = start_server("--memory-only", "--threads", "4", "--max-streams", "2", "--stream-idle-seconds", "4")
    stub = stub_for(srv.address)
    other = create(stub, {"w": np.ones(4, np.float32)}).session_id
    config = session_pb2.CreateSessionStreamRequest(config=session_pb2.SessionConfig(optimizer="adam"))
    part = session_pb2.CreateSessionStreamRequest(chunks=[tensor_pb2.Tensor(
        name="w", dtype=F32, shape=[1 << 20], offset=0, data=np.ones(1000, np.float32).tobytes())])
    # --max-streams 2: at most 2 streams at once. Twice that many hostile uploads, all alive and stalled.
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


def test_stream_of_empty_chunks_ends_after_idle_timeout(idle_server, stalls):
    # Only tensor data counts as progress: a stream of zero-byte chunks is ended like a silent one.
    check_stalled_step_stream(idle_server, stalls, "empty chunks")


def test_idle_ended_stream_says_why(idle_server, stalls):
    # The paced reader ends the call from the handler, so the status carries the reason.
    stub = stub_for(idle_server.address)
    sid = create(stub, {"w": np.ones(4, np.float32)}).session_id
    s = Stalled(stub.StepStream, [session_pb2.StepStreamRequest(session_id=sid, step=0)])
    stalls.append(s)
    err = s.wait_end()
    assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "--stream-idle-seconds" in err.details(), err.details()


def test_retry_trickling_empty_messages_ends_after_idle_timeout_and_frees_its_slot(idle_server, stalls):
    # A retry of the session's last step (fence = step - 1) only drains its stream before answering again;
    # there too only tensor data is progress. Two trickles, of empty messages and of zero-byte chunks, take
    # both of idle_server's stream slots: once they are ended, a stream step is admitted again.
    stub = stub_for(idle_server.address)
    g = {"w": np.ones(4, np.float32)}
    sid = create(stub, {"w": np.zeros(4, np.float32)}).session_id
    assert stub.Step(session_pb2.StepRequest(session_id=sid, step=0, gradients=grads_of(g)), timeout=PROMPT).step == 1
    after_step = digest(stub, sid)
    empty_chunk = tensor_pb2.Tensor(name="w", dtype=F32, shape=[4], offset=0, data=b"")
    for keep in (session_pb2.StepStreamRequest(), session_pb2.StepStreamRequest(chunks=[empty_chunk])):
        stalls.append(Stalled(stub.StepStream, [session_pb2.StepStreamRequest(session_id=sid, step=0)], keep,
                              period=0.2))
    for s in stalls:
        err = s.wait_end(PROMPT + 4 * IDLE)
        assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED, err
        assert "--stream-idle-seconds" in err.details(), err.details()
    assert digest(stub, sid) == after_step
    step, replayed, out = stream_params(stub.StepStream(iter(step_messages(sid, g, step=1)), timeout=PROMPT))
    assert (step, replayed) == (2, False) and out["w"].shape == (4,)
