"""Property-based fuzzing (hypothesis): malformed requests of every kind against a real
server with tokens and a data dir. Each must get its documented status, the server must
stay up, and no session may change (state digests before and after)."""
from __future__ import annotations

import math

import grpc
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from durability_helpers import digest
from optreg.client import Client
from optreg.v1 import session_pb2, session_pb2_grpc, tensor_pb2, tensors
from grpc_health.v1 import health_pb2, health_pb2_grpc

C = grpc.StatusCode
GOOD, OTHER = "fuzz-token-good", "fuzz-token-other"
SID = "fuzz-a"          # adam, float64, W (3, 4) and b (4,), owned by GOOD
OTHER_SID = "fuzz-b"    # sgd, float32, owned by OTHER
SHAPES = {"W": (3, 4), "b": (4,)}
F64 = tensor_pb2.DATA_TYPE_FLOAT64
EXAMPLES = 300
count = {"n": 0}


def md(token=GOOD):
    return () if token is None else (("authorization", f"Bearer {token}"),)


def good_grads():
    return [tensors.from_numpy(n, np.ones(s)) for n, s in SHAPES.items()]


# -- strategies: each draws (rpc, request(s), metadata, expected codes) -----------
@st.composite
def bad_shape(draw):
    g = good_grads()
    i = draw(st.integers(0, 1))
    shape = draw(st.lists(st.one_of(st.integers(-2**62, -1), st.integers(0, 64), st.integers(2**31, 2**62)),
                          max_size=4).filter(lambda s: tuple(s) != tuple(g[i].shape)))
    g[i].shape[:] = shape
    return "Step", session_pb2.StepRequest(session_id=SID, step=0, gradients=g), md(), {C.INVALID_ARGUMENT}


@st.composite
def bad_bytes(draw):
    g = good_grads()
    i = draw(st.integers(0, 1))
    want = len(g[i].data)
    g[i].data = draw(st.binary(max_size=200).filter(lambda b: len(b) != want))
    return "Step", session_pb2.StepRequest(session_id=SID, step=0, gradients=g), md(), {C.INVALID_ARGUMENT}


@st.composite
def bad_dtype(draw):
    g = good_grads()
    g[draw(st.integers(0, 1))].dtype = draw(st.one_of(st.integers(5, 2**31 - 1), st.integers(-2**31, -1),
                                                       st.just(0)))
    return "Step", session_pb2.StepRequest(session_id=SID, step=0, gradients=g), md(), {C.INVALID_ARGUMENT}


@st.composite
def non_finite(draw):
    arrays = {n: np.ones(s) for n, s in SHAPES.items()}
    name = draw(st.sampled_from(list(SHAPES)))
    flat = arrays[name].reshape(-1)
    for i in draw(st.lists(st.integers(0, flat.size - 1), min_size=1, max_size=5)):
        flat[i] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    g = [tensors.from_numpy(n, a) for n, a in arrays.items()]
    return "Step", session_pb2.StepRequest(session_id=SID, step=0, gradients=g), md(), {C.INVALID_ARGUMENT}


@st.composite
def bad_names(draw):
    g = good_grads()
    kind = draw(st.sampled_from(["unknown", "missing", "duplicate", "none"]))
    if kind == "unknown":
        g[draw(st.integers(0, 1))].name = draw(st.text(max_size=20).filter(lambda s: s not in SHAPES))
    elif kind == "missing":
        del g[draw(st.integers(0, 1))]
    elif kind == "duplicate":
        g.append(g[draw(st.integers(0, 1))])
    else:
        g = []
    return "Step", session_pb2.StepRequest(session_id=SID, step=0, gradients=g), md(), {C.INVALID_ARGUMENT}


@st.composite
def bad_fence(draw):
    step = draw(st.one_of(st.integers(-2**63, -1), st.integers(1, 2**63 - 1)))
    return ("Step", session_pb2.StepRequest(session_id=SID, step=step, gradients=good_grads()), md(),
            {C.FAILED_PRECONDITION})


@st.composite
def unknown_session(draw):
    sid = draw(st.text(max_size=40).filter(lambda s: s not in (SID, OTHER_SID)))
    expected = {C.INVALID_ARGUMENT} if not sid else {C.PERMISSION_DENIED}
    rpc = draw(st.sampled_from(["Step", "Get", "Read", "Delete"]))
    if rpc == "Step":
        return "Step", session_pb2.StepRequest(session_id=sid, step=0, gradients=good_grads()), md(), expected
    req = {"Get": session_pb2.GetSessionRequest, "Read": session_pb2.ReadStateRequest,
           "Delete": session_pb2.DeleteSessionRequest}[rpc](session_id=sid)
    return {"Get": "GetSession", "Read": "ReadState", "Delete": "DeleteSession"}[rpc], req, md(), expected


@st.composite
def wrong_token(draw):
    token = draw(st.one_of(st.none(), st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126),
                                              max_size=30).filter(lambda t: t not in (GOOD, OTHER))))
    rpc = draw(st.sampled_from(["Step", "ReadState", "DeleteSession", "ListSessions"]))
    req = {"Step": session_pb2.StepRequest(session_id=SID, step=0, gradients=good_grads()),
           "ReadState": session_pb2.ReadStateRequest(session_id=SID),
           "DeleteSession": session_pb2.DeleteSessionRequest(session_id=SID),
           "ListSessions": session_pb2.ListSessionsRequest()}[rpc]
    return rpc, req, md(token), {C.UNAUTHENTICATED}


@st.composite
def foreign_session(draw):
    """A valid token reaching for the other token's session: PERMISSION_DENIED, as if absent."""
    rpc = draw(st.sampled_from(["Step", "ReadState", "DeleteSession", "GetSession"]))
    sid = draw(st.sampled_from([SID, OTHER_SID]))
    token = OTHER if sid == SID else GOOD
    req = {"Step": session_pb2.StepRequest(session_id=sid, step=0, gradients=good_grads()),
           "ReadState": session_pb2.ReadStateRequest(session_id=sid),
           "DeleteSession": session_pb2.DeleteSessionRequest(session_id=sid),
           "GetSession": session_pb2.GetSessionRequest(session_id=sid)}[rpc]
    return rpc, req, md(token), {C.PERMISSION_DENIED}


@st.composite
def oversize(draw):
    n = draw(st.integers(1 << 20, 3 << 20))  # over --max-message-mb 1
    g = good_grads()
    g[0].data = b"\0" * n
    return "Step", session_pb2.StepRequest(session_id=SID, step=0, gradients=g), md(), {C.RESOURCE_EXHAUSTED}


@st.composite
def bad_stream(draw):
    kind = draw(st.sampled_from(["truncated", "offset", "past_end", "empty", "no_id", "partial_element"]))
    chunks = [c for n, s in SHAPES.items() for c in tensors.chunk(n, np.ones(s), chunk_bytes=32)]
    if kind == "truncated":
        del chunks[draw(st.integers(1, len(chunks) - 1)):]
    elif kind == "offset":
        i = draw(st.integers(0, len(chunks) - 1))
        chunks[i].offset += draw(st.integers(1, 1000))
    elif kind == "past_end":
        chunks.append(tensors.from_numpy("b", np.ones(4)))
        chunks[-1].shape[:] = [4]
        chunks[-1].offset = 4
    elif kind == "partial_element":
        chunks[0].data = chunks[0].data[:-draw(st.integers(1, 7))]
    msgs = [session_pb2.StepStreamRequest(session_id=SID, step=0)] + [
        session_pb2.StepStreamRequest(chunks=[c]) for c in chunks]
    if kind == "empty":
        msgs = []
    elif kind == "no_id":
        msgs[0].session_id = ""
        return "StepStream", msgs, md(), {C.INVALID_ARGUMENT}
    return "StepStream", msgs, md(), {C.INVALID_ARGUMENT}


@st.composite
def bad_create(draw):
    kind = draw(st.sampled_from(["optimizer", "hyper", "nan", "bytes", "dup", "dtype", "master", "id", "empty",
                                 "slot", "step"]))
    config = session_pb2.SessionConfig(optimizer="adam", session_id="fuzz-new")
    params = [tensors.from_numpy("W", np.ones(3))]
    req = session_pb2.CreateSessionRequest(config=config, parameters=params)
    expected = {C.INVALID_ARGUMENT}
    if kind == "optimizer":
        req.config.optimizer = draw(st.text(max_size=20).filter(lambda s: s not in ("adam", "sgd", "momentum",
                                                                                     "nesterov", "adagrad",
                                                                                     "rmsprop")))
        expected = {C.NOT_FOUND}
    elif kind == "hyper":
        if draw(st.booleans()):
            req.config.hyperparameters["lr"] = draw(st.one_of(st.floats(max_value=-1e-300), st.just(math.nan)))
        else:
            req.config.hyperparameters[draw(st.text(min_size=1, max_size=10).filter(
                lambda s: s not in ("lr", "beta1", "beta2")))] = 1.0
    elif kind == "nan":
        req.parameters[0].data = np.array([1.0, math.nan, 1.0]).tobytes()
    elif kind == "bytes":
        req.parameters[0].data = draw(st.binary(max_size=64).filter(lambda b: len(b) != 24))
    elif kind == "dup":
        req.parameters.append(req.parameters[0])
    elif kind == "dtype":
        req.parameters[0].dtype = draw(st.integers(5, 1000))
    elif kind == "master":
        req.config.master_dtype = draw(st.sampled_from([tensor_pb2.DATA_TYPE_FLOAT16, tensor_pb2.DATA_TYPE_BFLOAT16,
                                                        77]))
    elif kind == "id":
        req.config.session_id = draw(st.sampled_from(["../x", ".hidden", "a/b", "x" * 129, "a b", "-x"]))
    elif kind == "empty":
        del req.parameters[:]
    elif kind == "slot":
        req.state.add(slot=draw(st.text(max_size=8)), tensors=[tensors.from_numpy("W", np.ones(3))])
    else:
        req.initial_step = draw(st.integers(-2**63, -1))
    return "CreateSession", req, md(), expected


@st.composite
def bad_hyper_update(draw):
    req = session_pb2.UpdateHyperparametersRequest(session_id=SID)
    if draw(st.booleans()):
        req.hyperparameters["beta1"] = draw(st.one_of(st.floats(min_value=1.0), st.floats(max_value=-1e-300),
                                                      st.just(math.nan)))
    else:
        req.hyperparameters[draw(st.text(min_size=1, max_size=10).filter(
            lambda s: s not in ("lr", "beta1", "beta2")))] = 0.5
    return "UpdateHyperparameters", req, md(), {C.INVALID_ARGUMENT}


CASES = st.one_of(bad_shape(), bad_bytes(), bad_dtype(), non_finite(), bad_names(), bad_fence(), unknown_session(),
                  wrong_token(), foreign_session(), oversize(), bad_stream(), bad_create(), bad_hyper_update())


def test_fuzz_malformed_requests(start_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# fuzz\n{GOOD}\n{OTHER}\n")
    s = start_server("--data-dir", str(tmp_path / "data"), "--token-file", str(tokens), "--max-message-mb", "1")
    with Client(s.address, token=GOOD) as c:
        c.create_session("adam", {n: np.full(sh, 0.5) for n, sh in SHAPES.items()}, session_id=SID)
    with Client(s.address, token=OTHER) as c:
        c.create_session("sgd", {"W": np.ones(5, dtype=np.float32)}, session_id=OTHER_SID)
    channel = grpc.insecure_channel(s.address, options=[("grpc.max_send_message_length", 8 << 20)])
    stub = session_pb2_grpc.SessionServiceStub(channel)
    before = {SID: digest(stub, SID, md(GOOD)), OTHER_SID: digest(stub, OTHER_SID, md(OTHER))}
    codes: dict[str, int] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(case=CASES)
    def run(case):
        rpc, request, metadata, expected = case
        method = getattr(stub, rpc)
        try:
            if rpc == "StepStream":
                list(method(iter(request), metadata=metadata, timeout=30))
            else:
                method(request, metadata=metadata, timeout=30)
        except grpc.RpcError as e:
            assert e.code() in expected, (rpc, e.code(), e.details(), str(request)[:300])
            assert e.details()
            codes[e.code().name] = codes.get(e.code().name, 0) + 1
        else:
            raise AssertionError(f"{rpc} succeeded: {str(request)[:300]}")
        count["n"] += 1

    run()
    print(f"\nfuzz: {count['n']} malformed requests, status codes: {dict(sorted(codes.items()))}")
    assert count["n"] >= 200
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert s.proc.poll() is None
    after = {SID: digest(stub, SID, md(GOOD)), OTHER_SID: digest(stub, OTHER_SID, md(OTHER))}
    assert after == before
    listed = stub.ListSessions(session_pb2.ListSessionsRequest(), metadata=md(GOOD), timeout=10).sessions
    assert [x.session_id for x in listed] == [SID]  # no malformed create made a session
    channel.close()
