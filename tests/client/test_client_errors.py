"""The client's exception tree: every gRPC status maps to its class, and each status the server
documents comes out as that class when provoked through a real server."""
from __future__ import annotations

import re
import socket
import threading

import grpc
import numpy as np
import pytest

import optreg.client as oc
from optreg.client import Client, RetryPolicy, errors

TREE = {  # class -> (its base in the tree, the status it stands for)
    oc.Unavailable: (oc.TransportError, grpc.StatusCode.UNAVAILABLE),
    oc.DeadlineExceeded: (oc.TransportError, grpc.StatusCode.DEADLINE_EXCEEDED),
    oc.Cancelled: (oc.TransportError, grpc.StatusCode.CANCELLED),
    oc.InvalidArgument: (oc.Refusal, grpc.StatusCode.INVALID_ARGUMENT),
    oc.NotFound: (oc.Refusal, grpc.StatusCode.NOT_FOUND),
    oc.AlreadyExists: (oc.Refusal, grpc.StatusCode.ALREADY_EXISTS),
    oc.FailedPrecondition: (oc.Refusal, grpc.StatusCode.FAILED_PRECONDITION),
    oc.PermissionDenied: (oc.Refusal, grpc.StatusCode.PERMISSION_DENIED),
    oc.Unauthenticated: (oc.Refusal, grpc.StatusCode.UNAUTHENTICATED),
    oc.ResourceExhausted: (oc.Refusal, grpc.StatusCode.RESOURCE_EXHAUSTED),
    oc.DataLoss: (oc.Refusal, grpc.StatusCode.DATA_LOSS),
    oc.Internal: (oc.Refusal, grpc.StatusCode.INTERNAL),
    oc.Unimplemented: (oc.Refusal, grpc.StatusCode.UNIMPLEMENTED),
    oc.Unknown: (oc.Refusal, grpc.StatusCode.UNKNOWN),
}


@pytest.mark.parametrize("cls", TREE, ids=lambda c: c.__name__)
def test_each_status_maps_to_its_class(cls):
    base, code = TREE[cls]
    e = errors.for_status(code, "details")
    assert type(e) is cls and isinstance(e, base) and isinstance(e, oc.OptregError)
    assert e.code == code and e.details == "details" and str(e) == f"{code.name}: details"


def test_the_rest_of_the_tree():
    step = errors.for_status(grpc.StatusCode.FAILED_PRECONDITION, "at step 3", server_step=3)
    assert type(step) is oc.StepMismatch and isinstance(step, oc.FailedPrecondition) and step.server_step == 3
    held = errors.for_status(grpc.StatusCode.FAILED_PRECONDITION, "held", holder="host=h pid=1 id=x")
    assert type(held) is oc.WriterConflict and isinstance(held, oc.FailedPrecondition) and held.holder.endswith("x")
    other = errors.for_status(grpc.StatusCode.ABORTED, "aborted")  # a status optreg does not send
    assert type(other) is oc.Refusal and other.code == grpc.StatusCode.ABORTED
    assert issubclass(oc.UsageError, ValueError) and issubclass(oc.InvalidArgument, ValueError)
    assert issubclass(oc.NotFound, LookupError)
    assert not issubclass(oc.ReassemblyError, (oc.DataLoss, oc.Refusal, oc.TransportError))
    assert oc.ReassemblyError("chunks out of order").code is None
    # The classes in the tree drawn in optreg.client's docstring are exactly the exported ones.
    drawn = set(re.findall(r"[├└]── (\w+)", oc.__doc__))
    exported = {c.__name__ for c in TREE} | {"TransportError", "Refusal", "StepMismatch", "WriterConflict",
                                              "ReassemblyError", "UsageError"}
    assert drawn == exported


def test_refusals_through_a_real_server(client):
    p = {"w": np.zeros(3)}
    s = client.create_session("sgd", p, lr=0.1, session_id="errors-run")
    cases = [
        (oc.InvalidArgument, lambda: s.set_hyperparameters(lr=-1.0), "lr"),
        (oc.InvalidArgument, lambda: s.step({"w": np.full(3, np.nan)}), "NaN"),
        (oc.NotFound, lambda: client.get_session("no-such-session"), "no-such-session"),
        (oc.NotFound, lambda: client.create_session("adamm", p), "available"),
        (oc.AlreadyExists, lambda: client.create_session("sgd", p, session_id="errors-run"), "errors-run"),
    ]
    for cls, call, words in cases:
        with pytest.raises(cls, match=words):
            call()
    s.step_count = 5
    with pytest.raises(oc.StepMismatch) as e:
        s.step({"w": np.ones(3)})
    assert e.value.server_step == 0
    s.delete()


def test_tokens_resources_and_data_loss_through_real_servers(start_server, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("alice\nbob\n")
    srv = start_server("--token-file", str(tokens), "--memory-budget-mb", "1", "--memory-only")
    with Client(srv.address, token="alice") as alice, Client(srv.address, token="bob") as bob, \
            Client(srv.address) as anonymous:
        alice.create_session("sgd", {"w": np.zeros(3)}, session_id="alices")
        with pytest.raises(oc.PermissionDenied):
            bob.get_session("alices")
        with pytest.raises(oc.Unauthenticated):
            anonymous.list_sessions()
        with pytest.raises(oc.FailedPrecondition, match="--data-dir"):
            alice.create_session("sgd", {"w": np.zeros(3)}, durability="every-step")
        with pytest.raises(oc.ResourceExhausted, match="memory budget"):
            alice.create_session("adam", {"w": np.zeros(200_000)})  # 3 copies of 1.6 MB
    # DATA_LOSS: a session file whose tensors cannot be read back when the session is loaded.
    data = tmp_path / "data"
    srv = start_server("--data-dir", str(data))
    with Client(srv.address) as c:
        c.create_session("sgd", {"w": np.zeros(1000)}, session_id="damaged", durability="every-step")
    assert srv.stop() == 0
    path = data / "sessions" / "damaged.safetensors"
    path.write_bytes(path.read_bytes()[:-2000])  # the header survives; the tensors do not
    srv = start_server("--data-dir", str(data))
    with Client(srv.address) as c:
        # Found damaged at start (its header names bytes the file does not have): kept, refused with DATA_LOSS.
        with pytest.raises(oc.DataLoss, match="damaged"):
            c.get_session("damaged")
        with pytest.raises(oc.DataLoss, match="damaged"):
            c.session("damaged")


def test_unavailable_and_deadline_exceeded(start_server):
    listener = socket.socket()  # a port nothing listens on
    listener.bind(("127.0.0.1", 0))
    address = "127.0.0.1:%d" % listener.getsockname()[1]
    listener.close()
    with Client(address, retry=RetryPolicy(total_seconds=0.3)) as c:
        with pytest.raises(oc.Unavailable, match="attempts"):
            c.list_sessions()
    # A peer that accepts connections and never answers: the call's timeout ends it.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    held = []
    threading.Thread(target=lambda: held.append(silent.accept()), daemon=True).start()
    try:
        with Client("127.0.0.1:%d" % silent.getsockname()[1], timeout=0.5, retry=RetryPolicy(total_seconds=0)) as c:
            with pytest.raises((oc.DeadlineExceeded, oc.Unavailable)) as e:
                c.list_sessions()
            assert isinstance(e.value, oc.TransportError)
    finally:
        silent.close()
        for conn, _ in held:
            conn.close()
    srv = start_server("--memory-only")
    with Client(srv.address, timeout=0.005, retry=RetryPolicy(total_seconds=0)) as c:
        with pytest.raises(oc.DeadlineExceeded):  # 32 MB cannot reach the server in 5 ms
            c.create_session("sgd", {"w": np.zeros(4_000_000)}, session_id="too-slow")
