"""The client above its transport, with a scripted fake in the transport's place: retries keep
the step fence, the retry window is bounded, which RPC a step takes, usage errors send nothing,
broken replies are the client's ReassemblyError."""
from __future__ import annotations

import numpy as np
import pytest

from optreg.client import (Client, DeadlineExceeded, InvalidArgument, ReassemblyError, RetryPolicy, StepMismatch,
                           Unavailable, UsageError)
from optreg.v1 import session_pb2, tensor_pb2, tensors


def info(session_id="s1", shapes=None, step=0, reply=session_pb2.STEP_REPLY_PARAMETERS, dtype="float32"):
    code = tensor_pb2.DATA_TYPE_FLOAT32 if dtype == "float32" else tensor_pb2.DATA_TYPE_FLOAT64
    return session_pb2.SessionInfo(
        session_id=session_id, optimizer="sgd", hyperparameters={"lr": 0.1}, step=step, master_dtype=code,
        step_reply=reply, slots=[], durability=session_pb2.DURABILITY_NONE, persisted_step=-1, loaded=True,
        parameters=[session_pb2.TensorInfo(name=n, dtype=code, shape=s) for n, s in (shapes or {"w": (3,)}).items()])


class FakeTransport:
    """Answers each method from a script: a list of replies or exceptions, taken in order (the
    last one repeats). Records every call as (method, request or list of stream messages)."""

    address = "127.0.0.1:1"

    def __init__(self, **script):
        self.script = {m: list(v) for m, v in script.items()}
        self.calls: list[tuple[str, object]] = []
        self.waited: list[float] = []

    def _answer(self, method, request):
        self.calls.append((method, request))
        replies = self.script.get(method)
        if not replies:
            raise AssertionError(f"unexpected call {method}")
        reply = replies.pop(0) if len(replies) > 1 else replies[0]
        if isinstance(reply, BaseException):
            raise reply
        return reply(request) if callable(reply) else reply

    def unary(self, method, request, *, timeout):
        return self._answer(method, request)

    def stream_in(self, method, requests, *, timeout):
        return self._answer(method, list(requests))

    def stream_out(self, method, request, *, timeout):
        return iter(self._answer(method, request))

    def stream_both(self, method, requests, *, timeout):
        return iter(self._answer(method, [r if isinstance(r, bytes) else r.SerializeToString() for r in requests]))

    def wait_until_ready(self, seconds):
        self.waited.append(seconds)
        return False

    def is_local(self):
        return False

    def close(self):
        pass


def step_reply(step, values, replayed=False):
    return session_pb2.StepResponse(step=step, replayed=replayed,
                                    tensors=[tensors.from_numpy(n, v) for n, v in values.items()])


def created(shapes=None, **kw):
    return session_pb2.CreateSessionResponse(session=info(shapes=shapes, **kw))


FAST = RetryPolicy(total_seconds=0.5, initial_backoff=0.001, max_backoff=0.01)


def make_session(fake, shapes=None, retry=FAST, **kw):
    fake.script.setdefault("CreateSession", [created(shapes, **kw)])
    fake.script.setdefault("CreateSessionStream", [session_pb2.CreateSessionStreamResponse(
        session=info(shapes=shapes, **kw))])
    client = Client(transport=fake, retry=retry)
    shapes = shapes or {"w": (3,)}
    params = {n: np.zeros(s, np.float32) for n, s in shapes.items()}
    return client, client.create_session("sgd", params, lr=0.1), params


def test_a_step_retried_after_unavailable_keeps_its_step_number_and_carries_hyperparameters_and_metrics():
    fake = FakeTransport(Step=[Unavailable("connection reset"), Unavailable("refused"),
                               step_reply(1, {"w": np.full(3, -0.1, np.float32)})])
    _, s, params = make_session(fake)
    result = s.step({"w": np.ones(3, np.float32)}, hyperparameters={"lr": 0.2}, metrics={"loss": 1.5})
    steps = [r for m, r in fake.calls if m == "Step"]
    assert [r.step for r in steps] == [0, 0, 0]  # the fence: the server applies it once
    assert all(dict(r.hyperparameters) == {"lr": 0.2} and dict(r.metrics) == {"loss": 1.5} for r in steps)
    assert (result.step, result.replayed) == (1, False) and result.arrays is s.arrays
    np.testing.assert_array_equal(params["w"], np.full(3, -0.1, np.float32))
    assert s.step_count == 1 and s.info.step == 1


def test_a_retry_answered_as_replay_is_success_but_a_first_send_answered_as_replay_is_refused():
    fake = FakeTransport(Step=[Unavailable("reply lost"), step_reply(1, {"w": np.ones(3, np.float32)}, replayed=True)])
    _, s, params = make_session(fake)
    assert s.step({"w": np.ones(3, np.float32)}).replayed
    fake.script["Step"] = [step_reply(2, {"w": np.full(3, 2, np.float32)}, replayed=True)]
    with pytest.raises(StepMismatch, match="NOT applied") as e:
        s.step({"w": np.ones(3, np.float32)})
    assert e.value.server_step == 2 and s.step_count == 2
    np.testing.assert_array_equal(params["w"], 2)  # the earlier call's result is in the arrays


def test_the_retry_window_is_bounded():
    now = [0.0]
    policy = RetryPolicy(total_seconds=3.0, initial_backoff=0.5, max_backoff=1.0)
    attempts = []

    def attempt(n, remaining):
        attempts.append((n, now[0], remaining))
        raise Unavailable("down")

    with pytest.raises(Unavailable, match="attempts in 3.0 s"):
        policy.run(attempt, clock=lambda: now[0], sleep=lambda s: now.__setitem__(0, now[0] + s))
    assert [t for _, t, _ in attempts] == [0.0, 0.5, 1.5, 2.5, 3.0]  # backoff 0.5, 1, 1, then the window's end
    assert attempts[-1][2] == 0.0


def test_no_retry_without_a_window_and_never_after_a_deadline_or_a_refusal():
    fake = FakeTransport(Step=[Unavailable("down")])
    _, s, _ = make_session(fake, retry=RetryPolicy(total_seconds=0))
    with pytest.raises(Unavailable):
        s.step({"w": np.ones(3, np.float32)})
    assert sum(m == "Step" for m, _ in fake.calls) == 1
    for error in (DeadlineExceeded("slow"), InvalidArgument("gradient 'w' has NaN")):
        fake = FakeTransport(Step=[error, step_reply(1, {"w": np.ones(3, np.float32)})])
        _, s, _ = make_session(fake)
        with pytest.raises(type(error)):
            s.step({"w": np.ones(3, np.float32)})
        assert sum(m == "Step" for m, _ in fake.calls) == 1


def test_wait_for_ready_waits_on_the_transport_instead_of_backing_off():
    fake = FakeTransport(ListSessions=[Unavailable("not up yet"), session_pb2.ListSessionsResponse(sessions=[info()])])
    client = Client(transport=fake, wait_for_ready=True, timeout=7.0, retry=FAST)
    assert [i.session_id for i in client.list_sessions()] == ["s1"]
    assert len(fake.waited) == 1 and 0 < fake.waited[0] <= 7.0


def test_large_steps_stream_and_small_ones_are_unary():
    n = 1_000_000  # 4 MB of float32: above STREAM_ABOVE_BYTES
    reply = tensors.encode_stream_message(tensors.response_head(1), [
        c for c in tensors.chunk_views("w", np.full(n, 0.5, np.float32))])
    fake = FakeTransport(StepStream=[[tensors.decode_step_response(reply)]])
    _, s, params = make_session(fake, shapes={"w": (n,)})
    s.step({"w": np.ones(n, np.float32)}, metrics={"loss": 0.25})
    sent = [r for m, r in fake.calls if m == "StepStream"][0]
    head = session_pb2.StepStreamRequest.FromString(sent[0])
    assert (head.session_id, head.step, dict(head.metrics)) == ("s1", 0, {"loss": 0.25})
    assert sum(len(session_pb2.StepStreamRequest.FromString(m).chunks) for m in sent[1:]) == 4  # 1 MiB chunks
    assert params["w"][0] == 0.5 and params["w"][-1] == 0.5
    fake = FakeTransport(Step=[step_reply(1, {"w": np.ones(10, np.float32)})])
    _, s, _ = make_session(fake, shapes={"w": (10,)})
    s.step({"w": np.ones(10, np.float32)})
    assert [m for m, _ in fake.calls] == ["CreateSession", "Step"]


def test_a_broken_reply_stream_is_the_clients_reassembly_error_not_the_servers_data_loss():
    n = 1_000_000
    chunks = list(tensors.chunk_views("w", np.zeros(n, np.float32)))
    gap = tensors.encode_stream_message(tensors.response_head(1), [chunks[0], chunks[2], chunks[3]])
    short = tensors.encode_stream_message(tensors.response_head(1), chunks[:2])
    for replies, match in (([gap], "offset"), ([short], "ended after"), ([], "empty")):
        fake = FakeTransport(StepStream=[[tensors.decode_step_response(r) for r in replies]])
        _, s, _ = make_session(fake, shapes={"w": (n,)})
        with pytest.raises(ReassemblyError, match=match) as e:
            s.step({"w": np.ones(n, np.float32)})
        assert e.value.code is None  # the client's finding, not a status from the server


def test_usage_errors_are_raised_before_any_call():
    fake = FakeTransport()
    client = Client(transport=fake)
    p = {"w": np.zeros(3)}
    for call, match in [
            (lambda: client.create_session("", p), "optimizer"),
            (lambda: client.create_session("sgd", [np.zeros(3)]), "mapping"),
            (lambda: client.create_session("sgd", p, master_dtype="float16"), "master_dtype"),
            (lambda: client.create_session("sgd", p, step_reply="params"), "step_reply"),
            (lambda: client.create_session("sgd", p, durability="always"), "durability"),
            (lambda: client.create_session("sgd", p, resume=True), "resume=True needs the session_id"),
            (lambda: client.create_session("sgd", p, lr="fast"), "lr='fast' is not a number"),
            (lambda: client.create_session("sgd", p, keep="maybe"), "keep="),
            (lambda: client.create_session("sgd", p, periodic_steps=-1), "periodic_steps"),
            (lambda: Client(transport=fake, timeout=0), "timeout")]:
        with pytest.raises(UsageError, match=match):
            call()
        assert isinstance(UsageError("x"), ValueError)
    assert fake.calls == []


def test_create_with_an_id_retries_and_finds_its_own_session_when_the_reply_was_lost():
    from optreg.client import AlreadyExists
    fake = FakeTransport(CreateSession=[Unavailable("reply lost"), AlreadyExists("session 'run' already exists")],
                         GetSession=[session_pb2.GetSessionResponse(session=info("run"))],
                         ReadParameters=[session_pb2.ReadParametersResponse(
                             parameters=[tensors.from_numpy("w", np.full(3, 4, np.float32))])])
    client = Client(transport=fake, retry=FAST)
    p = {"w": np.zeros(3, np.float32)}
    s = client.create_session("sgd", p, session_id="run")
    assert s.id == "run" and [m for m, _ in fake.calls] == ["CreateSession", "CreateSession", "GetSession",
                                                              "ReadParameters"]
    fake = FakeTransport(CreateSession=[AlreadyExists("session 'run' already exists")])
    with pytest.raises(AlreadyExists):  # on the first attempt it is someone else's
        Client(transport=fake, retry=FAST).create_session("sgd", p, session_id="run")
    fake = FakeTransport(CreateSession=[Unavailable("down"), created()])
    with pytest.raises(Unavailable):  # no id: a repeat could create a second session
        Client(transport=fake, retry=FAST).create_session("sgd", p)
    assert len(fake.calls) == 1


def test_delete_whose_reply_was_lost_is_done():
    from optreg.client import NotFound
    fake = FakeTransport(DeleteSession=[Unavailable("reply lost"), NotFound("session 'x' not found")])
    Client(transport=fake, retry=FAST).delete_session("x")
    fake = FakeTransport(DeleteSession=[NotFound("session 'x' not found")])
    with pytest.raises(NotFound):
        Client(transport=fake, retry=FAST).delete_session("x")


def test_shared_memory_is_refused_up_front_for_a_remote_server():
    fake = FakeTransport()
    _, s, _ = make_session(fake)
    with pytest.raises(UsageError, match="loopback"):
        s.enable_shared_memory()
    assert [m for m, _ in fake.calls] == ["CreateSession"]


def test_the_old_reply_keyword_still_works_with_a_deprecation_warning():
    fake = FakeTransport(CreateSession=[created(reply=session_pb2.STEP_REPLY_DELTA)])
    with pytest.warns(DeprecationWarning, match="step_reply"):
        s = Client(transport=fake).create_session("sgd", {"w": np.zeros(3)}, reply="delta")
    request = fake.calls[0][1]
    assert request.config.step_reply == session_pb2.STEP_REPLY_DELTA and "reply" not in request.config.hyperparameters
    assert s.info.step_reply == "delta"
