"""Bad input gets its status and a message naming the problem, and changes nothing."""
import hashlib
import threading

import grpc
import numpy as np
import pytest

from optreg.v1 import session_pb2, session_pb2_grpc, tensor_pb2, tensors

DT = tensor_pb2.DataType


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as ch:
        yield session_pb2_grpc.SessionServiceStub(ch)


def digest(stub, session_id):
    """Everything observable about a session, hashed: step, hyperparameters, parameters, slots."""
    r = stub.ReadState(session_pb2.ReadStateRequest(session_id=session_id))
    h = hashlib.sha256()
    h.update(str((r.session.step, sorted(r.session.hyperparameters.items()))).encode())
    for t in list(r.parameters) + [t for s in r.state for t in s.tensors]:
        h.update(t.name.encode() + t.data)
    return h.hexdigest()


def make_session(stub, optimizer="adam", dtype=np.float32):
    rng = np.random.default_rng(0)
    params = [tensors.from_numpy("w", rng.standard_normal((3, 4)).astype(dtype)),
              tensors.from_numpy("b", rng.standard_normal(4).astype(dtype))]
    sid = stub.CreateSession(session_pb2.CreateSessionRequest(
        config=session_pb2.SessionConfig(optimizer=optimizer), parameters=params)).session.session_id
    good = [tensors.from_numpy("w", np.ones((3, 4), dtype)), tensors.from_numpy("b", np.ones(4, dtype))]
    stub.Step(session_pb2.StepRequest(session_id=sid, step=0, gradients=good))
    return sid, good


def expect(code, fn, *words):
    with pytest.raises(grpc.RpcError) as e:
        fn()
    assert e.value.code() == code, e.value.details()
    for w in words:
        assert w in e.value.details(), (w, e.value.details())
    return e.value.details()


def nan_grad():
    g = np.ones((3, 4), np.float32)
    g[1, 2] = np.nan
    return g


BAD_STEPS = {
    "unknown name": (lambda good: good + [tensors.from_numpy("zzz", np.ones(2, np.float32))], ["zzz"]),
    "missing name": (lambda good: good[:1], ["missing", "b"]),
    "repeated name": (lambda good: good + good[:1], ["twice"]),
    "shape mismatch": (lambda good: [tensors.from_numpy("w", np.ones((4, 3), np.float32)), good[1]], ["shape", "[4, 3]"]),
    "wider dtype": (lambda good: [tensors.from_numpy("w", np.ones((3, 4))), good[1]], ["DATA_TYPE_FLOAT64"]),
    "unknown dtype": (lambda good: [tensor_pb2.Tensor(name="w", dtype=99, shape=[3, 4], data=b"\0" * 48), good[1]],
                      ["99"]),
    "short bytes": (lambda good: [tensor_pb2.Tensor(name="w", dtype=DT.DATA_TYPE_FLOAT32, shape=[3, 4],
                                                    data=b"\0" * 47), good[1]], ["47 bytes", "needs 48"]),
    "NaN": (lambda good: [tensors.from_numpy("w", nan_grad()), good[1]], ["NaN"]),
    "Inf": (lambda good: [good[0], tensors.from_numpy("b", np.array([1, np.inf, 1, 1], np.float32))], ["Inf"]),
    "negative shape": (lambda good: [tensor_pb2.Tensor(name="w", dtype=DT.DATA_TYPE_FLOAT32, shape=[-3, -4]),
                                     good[1]], ["shape"]),
}


@pytest.mark.parametrize("case", sorted(BAD_STEPS))
def test_bad_step_is_refused_and_changes_nothing(stub, case):
    sid, good = make_session(stub)
    before = digest(stub, sid)
    build, words = BAD_STEPS[case]
    req = session_pb2.StepRequest(session_id=sid, step=1, gradients=build(good))
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.Step(req), *words)
    # the streaming form refuses the same input the same way
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           lambda: list(stub.StepStream(iter([session_pb2.StepStreamRequest(session_id=sid, step=1,
                                                                            chunks=req.gradients)]))))
    assert digest(stub, sid) == before
    # and the session still steps
    assert stub.Step(session_pb2.StepRequest(session_id=sid, step=1, gradients=good)).step == 2


def test_unknown_optimizer_lists_available(stub):
    req = session_pb2.CreateSessionRequest(config=session_pb2.SessionConfig(optimizer="adamm"),
                                           parameters=[tensors.from_numpy("w", np.ones(2))])
    expect(grpc.StatusCode.NOT_FOUND, lambda: stub.CreateSession(req), "adamm", "adam", "sgd", "rmsprop")


@pytest.mark.parametrize("hp,words", [({"lr": -0.1}, ["lr", "-0.1", ">= 0"]),
                                      ({"beta1": 1.0}, ["beta1", "1.0", "< 1"]),
                                      ({"momentum": 0.9}, ["unknown hyperparameter momentum", "lr, beta1, beta2"])])
def test_bad_hyperparameter_named(stub, hp, words):
    req = session_pb2.CreateSessionRequest(config=session_pb2.SessionConfig(optimizer="adam", hyperparameters=hp),
                                           parameters=[tensors.from_numpy("w", np.ones(2))])
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.CreateSession(req), *words)
    sid, _ = make_session(stub)
    before = digest(stub, sid)
    upd = session_pb2.UpdateHyperparametersRequest(session_id=sid, hyperparameters={"lr": 0.5, **hp})
    expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.UpdateHyperparameters(upd), *words)
    assert digest(stub, sid) == before  # lr=0.5 was not applied either


def test_bad_create_inputs(stub):
    def create(config, params):
        return lambda: stub.CreateSession(session_pb2.CreateSessionRequest(config=config, parameters=params))
    cfg = session_pb2.SessionConfig(optimizer="sgd")
    expect(grpc.StatusCode.INVALID_ARGUMENT, create(cfg, []), "parameters is empty")
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           create(session_pb2.SessionConfig(optimizer="sgd", master_dtype=DT.DATA_TYPE_FLOAT16),
                  [tensors.from_numpy("w", np.ones(2))]), "master_dtype")
    expect(grpc.StatusCode.INVALID_ARGUMENT,
           create(cfg, [tensors.from_numpy("w", np.array([1.0, np.nan]))]), "NaN")
    two = [tensors.from_numpy("w", np.ones(2))] * 2
    expect(grpc.StatusCode.INVALID_ARGUMENT, create(cfg, two), "twice")
    cfg_id = session_pb2.SessionConfig(optimizer="sgd", session_id="fixed-id-for-retry")
    stub.CreateSession(session_pb2.CreateSessionRequest(config=cfg_id, parameters=two[:1]))
    expect(grpc.StatusCode.ALREADY_EXISTS, create(cfg_id, two[:1]), "fixed-id-for-retry")
    # sharded sessions are a Ray cluster's (docs/scale-out.md): one server says so, naming the field
    expect(grpc.StatusCode.FAILED_PRECONDITION, create(session_pb2.SessionConfig(optimizer="sgd", shards=2),
                                                       [tensors.from_numpy("w", np.ones(2))]), "config.shards 2")


def test_unknown_session_not_found(stub):
    for call in (lambda: stub.Step(session_pb2.StepRequest(session_id="nope", step=0)),
                 lambda: stub.GetSession(session_pb2.GetSessionRequest(session_id="nope")),
                 lambda: stub.ReadState(session_pb2.ReadStateRequest(session_id="nope")),
                 lambda: stub.DeleteSession(session_pb2.DeleteSessionRequest(session_id="nope")),
                 lambda: list(stub.ReadParametersStream(session_pb2.ReadParametersStreamRequest(session_id="nope")))):
        expect(grpc.StatusCode.NOT_FOUND, call, "nope")


def test_streamed_chunks_out_of_order_or_missing_refused(stub):
    sid, _ = make_session(stub, dtype=np.float64)
    before = digest(stub, sid)
    w = list(tensors.chunk("w", np.ones((3, 4)), chunk_bytes=32))  # 3 chunks of 4 elements
    b = tensors.from_numpy("b", np.ones(4))

    def send(chunks):
        msgs = [session_pb2.StepStreamRequest(session_id=sid, step=1, chunks=chunks[:1])]
        msgs += [session_pb2.StepStreamRequest(chunks=[c]) for c in chunks[1:]]
        return lambda: list(stub.StepStream(iter(msgs)))
    expect(grpc.StatusCode.INVALID_ARGUMENT, send([w[0], w[2], w[1], b]), "out of order")
    expect(grpc.StatusCode.INVALID_ARGUMENT, send([w[0], w[1], b]), "8 of 12")
    expect(grpc.StatusCode.INVALID_ARGUMENT, send([w[1], w[0], w[2], b]), "offset")
    assert digest(stub, sid) == before
    assert list(stub.StepStream(iter([session_pb2.StepStreamRequest(session_id=sid, step=1,
                                                                    chunks=[w[0], w[1], w[2], b])])))[0].step == 2


def test_other_session_keeps_stepping_through_errors(stub, server):
    sid, good = make_session(stub, optimizer="sgd")
    stop, done, errors = threading.Event(), [], []

    def run():
        with grpc.insecure_channel(server.address) as ch:
            s = session_pb2_grpc.SessionServiceStub(ch)
            step = 1
            while not stop.is_set() and step < 2000:
                try:
                    step = s.Step(session_pb2.StepRequest(session_id=sid, step=step, gradients=good)).step
                    done.append(step)
                except grpc.RpcError as e:
                    errors.append(e)
                    return
    t = threading.Thread(target=run)
    t.start()
    for case in sorted(BAD_STEPS):
        other, g2 = make_session(stub)
        req = session_pb2.StepRequest(session_id=other, step=1, gradients=BAD_STEPS[case][0](g2))
        expect(grpc.StatusCode.INVALID_ARGUMENT, lambda: stub.Step(req))
    stop.set()
    t.join()
    assert not errors and done
    assert stub.GetSession(session_pb2.GetSessionRequest(session_id=sid)).session.step == done[-1]


def test_unary_step_whose_reply_cannot_be_sent_is_refused_before_applying(start_server):
    import ml_dtypes
    srv = start_server("--max-message-mb", "1")
    with grpc.insecure_channel(srv.address) as ch:
        stub = session_pb2_grpc.SessionServiceStub(ch)
        n = 300_000  # 1.2 MB of float32 parameters; bfloat16 gradients are half that
        chunks = list(tensors.chunk("w", np.zeros(n, np.float32), chunk_bytes=256 << 10))
        msgs = [session_pb2.CreateSessionStreamRequest(config=session_pb2.SessionConfig(optimizer="sgd"))]
        msgs += [session_pb2.CreateSessionStreamRequest(chunks=[c]) for c in chunks]
        sid = stub.CreateSessionStream(iter(msgs)).session.session_id
        g = tensors.from_numpy("w", np.ones(n, ml_dtypes.bfloat16))
        expect(grpc.StatusCode.FAILED_PRECONDITION,
               lambda: stub.Step(session_pb2.StepRequest(session_id=sid, step=0, gradients=[g])),
               "StepStream", "not applied")
        assert stub.GetSession(session_pb2.GetSessionRequest(session_id=sid)).session.step == 0
        asm = tensors.Assembler()
        for r in stub.ReadParametersStream(session_pb2.ReadParametersStreamRequest(session_id=sid)):
            for c in r.chunks:
                asm.add(c)
        assert not asm.finish()["w"].any()
        replies = list(stub.StepStream(iter([session_pb2.StepStreamRequest(session_id=sid, step=0, chunks=[g])])))
        assert replies[-1].step == 1
