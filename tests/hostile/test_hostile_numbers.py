"""Hostile client, numbers family: int64 step edges, shape [] (issue 9: 6, 7), restored state checked against its
slots' domains (issue 9, 8), and overflowed state the server itself produced restored (issue 22, 12).

A float32 Adam or AdaGrad session stepped with a finite gradient of 1e20 (1e30 for torch.adam) holds v = +inf (g**2
overflows float32); SGD with a large lr overflows a parameter. ReadState gives such a state back
and every restore path takes it: CreateSession with state=, `optreg sessions export`/`import`, and
the torch adapter's state_dict/load_state_dict. NaN stays refused, on the same paths, by the same
check (optreg.server.model.session.check_values; the snapshot load path is in test_hostile_files.py).
"""
from __future__ import annotations

import re

import grpc
import numpy as np
import pytest

from cli_helpers import assert_one_line_error, optreg
from hostile_helpers import PROMPT, create, digest, grads_of, params_of, refused, step_messages, stream_params, stub_for
from hostile_helpers import stub  # noqa: F401 (a fixture)
from optreg.client import Client
from optreg.client.errors import OptregError
from optreg.v1 import session_pb2, tensors

HUGE = np.array([1e30, 1.0, 0.0, -1e30], np.float32)  # finite; its square is not (nor 1e-3 * its square)


@pytest.fixture(scope="module")
def address():
    from conftest import ServerProcess
    s = ServerProcess("--memory-only")
    yield s.address
    s.stop()


def _same(a, b):
    assert a.parameters.keys() == b.parameters.keys() and a.state.keys() == b.state.keys()
    for name, p in a.parameters.items():
        assert p.dtype == b.parameters[name].dtype and p.tobytes() == b.parameters[name].tobytes(), name
        for slot in a.state:
            assert a.state[slot][name].tobytes() == b.state[slot][name].tobytes(), (slot, name)


@pytest.mark.parametrize("optimizer,slot,hp", [("adam", "v", {}), ("adagrad", "h", {}),
                                                ("sgd", None, {"lr": 1e30})])
def test_an_overflowed_state_reads_back_and_is_created_again(address, optimizer, slot, hp):
    with Client(address, timeout=60) as c:
        s = c.create_session(optimizer, {"w": np.zeros(4, np.float32)}, session_id=f"of-{optimizer}", **hp)
        s.step({"w": HUGE})
        saved = s.read_state()
        if slot:
            assert np.isposinf(saved.state[slot]["w"][[0, 3]]).all()
        else:
            assert np.isinf(saved.parameters["w"][[0, 3]]).all()
        again = c.create_session(optimizer, saved.parameters, session_id=f"of-{optimizer}-2", state=saved.state,
                                 initial_step=saved.info.step, **hp)
        _same(saved, again.read_state())
        again.step({"w": np.ones(4, np.float32)})
        s.step({"w": np.ones(4, np.float32)})
        _same(s.read_state(), again.read_state())  # and it goes on exactly as the original (NaN and all: the
        # book's Adam kernel computes v + (g*g - v)*(1 - beta2), which is inf - inf once v is +inf)


def test_nan_stays_refused(address):
    with Client(address, timeout=60) as c:
        v = np.ones(3, np.float32)
        v[1] = np.nan
        with pytest.raises(OptregError, match=r"state v/'w' has 1 NaN") as e:
            c.create_session("adam", {"w": np.ones(3, np.float32)}, state={"m": {"w": np.zeros(3, np.float32)},
                                                                         "v": {"w": v}}, initial_step=3)
        assert e.value.code.name == "INVALID_ARGUMENT"
        with pytest.raises(OptregError, match=r"parameter 'w' has 1 NaN"):
            c.create_session("sgd", {"w": v})
        assert not [i for i in c.list_sessions() if i.optimizer == "adam" and i.step == 3]


def test_export_and_import_of_an_overflowed_session(address, tmp_path):
    with Client(address, timeout=60) as c:
        s = c.create_session("adam", {"w": np.zeros(4, np.float32)}, session_id="of-export")
        s.step({"w": HUGE})
        exported = tmp_path / "of.safetensors"
        done = optreg("sessions", "export", "of-export", str(exported), "--address", address)
        assert done.returncode == 0, done.stderr
        done = optreg("sessions", "import", str(exported), "--session-id", "of-import", "--address", address)
        assert done.returncode == 0, done.stderr
        _same(s.read_state(), c.session("of-import").read_state())
        # a NaN put into the file (its checksums recomputed) is refused by the server, in one line
        from optreg.server.storage import snapshot
        meta, arrays = snapshot.read(exported)
        arrays["state/v/w"][2] = np.nan
        snapshot.write(exported, meta, arrays)
        assert_one_line_error(optreg("sessions", "import", str(exported), "--session-id", "of-nan", "--address",
                                     address), "INVALID_ARGUMENT", "NaN")


def test_torch_state_dict_of_an_overflowed_session_loads(address):
    torch = pytest.importorskip("torch")
    from optreg.client.torch import RemoteOptimizer
    with Client(address, timeout=60) as c:
        w = torch.nn.Parameter(torch.zeros(4))
        with RemoteOptimizer([w], "torch.adam", client=c, lr=0.01) as remote:
            w.grad = torch.from_numpy(HUGE.copy())
            remote.step()
            saved = remote.state_dict()
        assert torch.isinf(saved["state"][0]["exp_avg_sq"]).any()
        w2 = torch.nn.Parameter(w.detach().clone())
        with RemoteOptimizer([w2], "torch.adam", client=c, lr=0.01) as other:
            other.load_state_dict(saved)
            back = other.state_dict()
        for k, v in saved["state"][0].items():
            assert torch.equal(back["state"][0][k], v), k


# -- issue 9, 6: the largest step number
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


# -- issue 9, 7: shape []
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


# -- issue 9, 8: restored state is checked
def _poisoned(slot, value):
    shape = (2, 3)
    state = {"m": {"layer.w": np.zeros(shape, np.float32)}, "v": {"layer.w": np.ones(shape, np.float32)}}
    state[slot]["layer.w"][1, 2] = value
    return state


# +-inf is in the domains (a step can overflow an accumulator: test_an_overflowed_state_reads_back_and_is_created_again
# above); NaN and a negative v are not.
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


@pytest.mark.parametrize("how", ["unary", "stream"])
def test_restored_negative_v_is_refused(stub, how):
    # adam's v is a nonnegative slot (Slot.domain): restored state outside it is refused.
    check_restored_state_refused(stub, "v", -1.0, how)
