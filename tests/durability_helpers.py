"""Shared by the durability, fuzz and load tests: an independent replay of the book's Adam,
raw stubs, and state digests."""
from __future__ import annotations

import hashlib
import math

import grpc
import numpy as np

from optreg.v1 import session_pb2, session_pb2_grpc, tensors


def adam_replay(p0: dict, grads: list[dict], lr=0.01, b1=0.9, b2=0.999):
    """The book's Adam in float64, written out independently of the plugin."""
    p = {n: np.array(a, dtype=np.float64) for n, a in p0.items()}
    m = {n: np.zeros_like(a) for n, a in p.items()}
    v = {n: np.zeros_like(a) for n, a in p.items()}
    for t, g in enumerate(grads, start=1):
        lr_t = lr * math.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        for n in p:
            m[n] = m[n] + (1 - b1) * (g[n] - m[n])
            v[n] = v[n] + (1 - b2) * (g[n] ** 2 - v[n])
            p[n] = p[n] - lr_t * m[n] / (np.sqrt(v[n]) + 1e-7)
    return p, {"m": m, "v": v}


def assert_state(stub, session_id, p0, grads, metadata=(), **hp):
    reply = stub.ReadState(session_pb2.ReadStateRequest(session_id=session_id), timeout=30, metadata=metadata)
    assert reply.session.step == len(grads)
    want_p, want_s = adam_replay(p0, grads, **hp)
    got_p = {t.name: tensors.to_numpy(t) for t in reply.parameters}
    for n in want_p:
        np.testing.assert_allclose(got_p[n], want_p[n], rtol=1e-12, atol=1e-15)
    for st in reply.state:
        for t in st.tensors:
            np.testing.assert_allclose(tensors.to_numpy(t), want_s[st.slot][t.name], rtol=1e-12, atol=1e-15)


def stub(address, **kw):
    channel = grpc.insecure_channel(address)
    return channel, session_pb2_grpc.SessionServiceStub(channel)


def digest(stub, session_id, metadata=()) -> str:
    reply = stub.ReadState(session_pb2.ReadStateRequest(session_id=session_id), timeout=30, metadata=metadata)
    info = session_pb2.SessionInfo()
    info.CopyFrom(reply.session)
    info.ClearField("last_used_at")
    info.ClearField("loaded")
    for field in ("persisted_step", "unsaved_steps", "unsaved_seconds"):  # how far the disk is behind: not state
        info.ClearField(field)
    h = hashlib.sha256(info.SerializeToString(deterministic=True))
    for t in reply.parameters:
        h.update(t.SerializeToString(deterministic=True))
    for st in reply.state:
        h.update(st.SerializeToString(deterministic=True))
    return h.hexdigest()


def step_request(session_id, step, grads):
    return session_pb2.StepRequest(session_id=session_id, step=step,
                                   gradients=[tensors.from_numpy(n, g) for n, g in grads.items()])
