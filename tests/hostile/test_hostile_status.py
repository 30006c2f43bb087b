"""Hostile client, status family (issue 22, findings 10 and 11): a full disk is RESOURCE_EXHAUSTED on every
path (CreateSession included, which the client used to retry as UNAVAILABLE for 5 s), and UpdateHyperparameters on
a durable session waits for the steps in flight instead of being refused UNAVAILABLE, in order with the steps
before and after it, across a kill -9. (One change waiting for a held stream step, and its deadline:
test_recovery.py::test_lr_change_while_a_logged_stream_step_is_in_flight_waits_for_it.)"""
from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from disk_helpers import fill, small_tmpfs
from durability_helpers import step_request, stub
from optreg.client import Client, ResourceExhausted
from optreg.v1 import session_pb2, telemetry_pb2, telemetry_pb2_grpc, tensors

T = 30  # seconds: every call's deadline, a hang guard only


def create(st, sid, params, optimizer="sgd", lr=0.1):
    return st.CreateSession(session_pb2.CreateSessionRequest(
        config=session_pb2.SessionConfig(optimizer=optimizer, session_id=sid, hyperparameters={"lr": lr}),
        parameters=[tensors.from_numpy(n, a) for n, a in params.items()]), timeout=T).session


def info(st, sid):
    return st.GetSession(session_pb2.GetSessionRequest(session_id=sid), timeout=T).session


def update(st, sid, lr, timeout=T):
    return st.UpdateHyperparameters(session_pb2.UpdateHyperparametersRequest(
        session_id=sid, hyperparameters={"lr": lr}), timeout=timeout).session


def step(st, sid, t, g):
    """Step t (fenced at t-1); the parameters it answered."""
    r = st.Step(step_request(sid, t - 1, {"w": g}), timeout=T)
    assert (r.step, r.replayed) == (t, False)
    return tensors.to_numpy(r.tensors[0])


def params(st, sid):
    r = st.ReadState(session_pb2.ReadStateRequest(session_id=sid), timeout=T)
    return r.session, tensors.to_numpy(r.parameters[0])


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value


# == 10. a full disk is RESOURCE_EXHAUSTED everywhere =============================================
def test_full_disk_is_resource_exhausted_on_every_path_and_create_is_not_retried(start_server):
    # The disk log (no memory log): a step's record goes to the full disk before its reply. With the
    # memory log a step is acknowledged from memory, and refused only once the exposure window is full.
    disk_log = ("--memory-log-dir", "")
    with small_tmpfs("4m") as mnt:
        s = start_server("--data-dir", str(mnt / "data"), *disk_log)
        _, st = stub(s.address)
        w = np.linspace(-1, 1, 1024)
        create(st, "kept", {"w": w})
        step(st, "kept", 1, np.ones(1024))
        create(st, "gone", {"w": w})
        telemetry = telemetry_pb2_grpc.TelemetryServiceStub(grpc.insecure_channel(s.address))
        ring = telemetry.ExportTelemetry(telemetry_pb2.ExportTelemetryRequest(session_id="kept"), timeout=T).data
        filler = fill(mnt)

        def exhausted(call, *words):
            e = refused(call)
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, (e.code(), e.details())
            for word in ("disk is full", *words):
                assert word in e.details(), (word, e.details())

        # CreateSession: its snapshot cannot be written (it was UNAVAILABLE)
        exhausted(lambda: create(st, "new", {"w": w}), "new", "free space")
        with Client(s.address, timeout=T) as c:  # the client does not retry it: a refusal, at once
            with pytest.raises(ResourceExhausted, match="disk is full"):
                c.create_session("sgd", {"w": w}, session_id="new-by-client", lr=0.1)
        # the imported telemetry cannot be written (it was UNAVAILABLE)
        exhausted(lambda: telemetry.ImportTelemetry(telemetry_pb2.ImportTelemetryRequest(
            session_id="kept", data=ring), timeout=T), "imported telemetry")
        # a step's log record, a hyperparameter change's snapshot: as before
        exhausted(lambda: step(st, "kept", 2, np.ones(1024)), "kept")
        exhausted(lambda: update(st, "kept", 0.5), "kept")
        assert info(st, "kept").step == 1 and info(st, "kept").hyperparameters["lr"] == 0.1
        # deleting frees space: it works on a full disk
        st.DeleteSession(session_pb2.DeleteSessionRequest(session_id="gone"), timeout=T)

        filler.unlink()  # nothing was created: the same ids work now
        create(st, "new", {"w": w})
        with Client(s.address, timeout=T) as c:
            c.create_session("sgd", {"w": w}, session_id="new-by-client", lr=0.1)
        assert step(st, "kept", 2, np.ones(1024))[0] == pytest.approx(w[0] - 0.2)
        s.kill()
        s = start_server("--data-dir", str(mnt / "data"), *disk_log)
        _, st = stub(s.address)
        ids = sorted(x.session_id for x in st.ListSessions(session_pb2.ListSessionsRequest(), timeout=T).sessions)
        assert ids == ["kept", "new", "new-by-client"]
        assert info(st, "kept").step == 2
        s.stop()


# == 11. UpdateHyperparameters queues behind the step in flight ====================================
N = 1 << 15  # a 256 KiB float64 parameter: a step's log record is open for a good part of each step
UPDATES = 60


def lr_of(before: np.ndarray, after: np.ndarray, g: float) -> float:
    """The lr an sgd step ran with (p' = p - lr * g), from its first element."""
    return float((before[0] - after[0]) / g)


def test_update_hyperparameters_waits_for_the_step_in_flight_in_order_and_across_a_kill(start_server, tmp_path):
    data = str(tmp_path / "data")
    s = start_server("--data-dir", data)  # durability: log, the default with a data dir
    _, st = stub(s.address)
    p0 = np.zeros(N)
    create(st, "hp", {"w": p0}, lr=0.5)
    lrs = [0.5] + [round(0.001 * (i + 2), 6) for i in range(UPDATES)]  # lrs[i + 1]: what update i sets
    stop = threading.Event()
    steps = []  # (sent, answered, t, lr it ran with), times from one monotonic clock
    failures = []

    def stepper():
        _, stepper_st = stub(s.address)
        prev, t = p0, 0
        try:
            last = False
            while not last:
                last = stop.is_set()  # one more step, sent after the last update was answered
                t += 1
                g = float(t % 7 + 1)
                sent = time.monotonic()
                now = step(stepper_st, "hp", t, np.full(N, g))
                steps.append((sent, time.monotonic(), t, lr_of(prev, now, g)))
                prev = now
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            failures.append(e)

    thread = threading.Thread(target=stepper)
    thread.start()
    updates, refusals = [], []  # (sent, answered) of each accepted update, in order
    try:
        while len(steps) < 2 and thread.is_alive():
            time.sleep(0.01)
        for lr in lrs[1:]:
            sent = time.monotonic()
            try:
                got = update(st, "hp", lr).hyperparameters["lr"]
            except grpc.RpcError as e:
                refusals.append(f"{e.code().name}: {e.details()}")
                continue
            updates.append((sent, time.monotonic()))
            assert got == lr, "the reply shows the values in force after the change"
    finally:
        stop.set()
        thread.join(120)
    assert not failures, failures
    assert not refusals, f"{len(refusals)} of {UPDATES} updates refused while steps ran, e.g. {refusals[0]}"
    assert len(updates) == UPDATES

    # Each step ran with one value the updates set, in their order, and causally consistent: an update
    # answered before a step was sent is in force for it; one sent after the step was answered is not.
    index = {lr: i for i, lr in enumerate(lrs)}
    last = 0
    for sent, answered, t, ran in steps:
        nearest = min(index, key=lambda lr: abs(lr - ran))
        assert abs(nearest - ran) <= 1e-9 * nearest, f"step {t} ran with lr {ran}, not one set"
        k = index[nearest]
        assert k >= last, f"step {t} ran with lr #{k} after a step that ran with #{last}"
        last = k
        assert all(k >= j + 1 for j, (_, done) in enumerate(updates) if done < sent), (t, k)
        assert all(k <= j for j, (u_sent, _) in enumerate(updates) if u_sent > answered), (t, k)
    assert last == UPDATES, "the steps after the last update ran with its value"

    # kill -9: recovery replays the steps in order with the value each ran with, and the last one is in force
    before, held = params(st, "hp")
    s.kill()
    s = start_server("--data-dir", data)
    _, st = stub(s.address)
    after, recovered = params(st, "hp")
    assert after.step == before.step and after.hyperparameters["lr"] == lrs[-1]
    assert recovered.tobytes() == held.tobytes()
    now = step(st, "hp", before.step + 1, np.ones(N))
    assert lr_of(held, now, 1.0) == pytest.approx(lrs[-1], rel=1e-9)
    print(f"\n{len(steps)} steps while {UPDATES} updates ran: none refused")
