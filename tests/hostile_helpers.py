"""Shared by the hostile-client family files (tests/hostile/test_hostile_*.py): raw stubs, refusals, state digests,
stream messages, and `Stalled`, a client call left open on purpose.

A client that must stay alive but stalled is a request generator blocked on an Event in a thread
of this process: the server sees an open call that sends nothing more. The fixtures here (`stalls`,
`stub`) are re-exported by importing them into the family file that uses them.
"""
from __future__ import annotations

import hashlib
import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from optreg.v1 import session_pb2, session_pb2_grpc, tensor_pb2, tensors

DT = tensor_pb2.DataType
F32 = DT.DATA_TYPE_FLOAT32
# A call that must not be blocked gets this long (the trial saw them blocked for 90 s and more).
PROMPT = 10


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

