"""Chaos (issue 22), the short form of `python -m bench --only chaos` (bench/chaos.py holds the run and the
checks): a sync session of 4 worker processes trains the demo's two-layer net on the digits while workers
are killed with SIGKILL and restarted every few seconds and the server is killed with SIGKILL and restarted
on its port and data directory (durability `log`) now and then.

One run (~30 s of chaos; longer on a loaded machine, until at least 4 worker kills, 2 server kills and 60
rounds happened), then one test per promise. No wall-time assertion: "open past its deadline" counts only a
round left open 5 s past its due time while the server kept answering (bench/chaos.py, Monitor).
"""
from __future__ import annotations

import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from bench import chaos  # noqa: E402

SECONDS, MIN_KILLS, MIN_ROUNDS = 30.0, (4, 2), 60


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    r = chaos.run(tmp_path_factory.mktemp("chaos"), SECONDS, worker_kill_every=(1.0, 3.0),
                  server_kill_every=(6.0, 10.0), min_kills=MIN_KILLS, min_rounds=MIN_ROUNDS, most_seconds=300.0)
    return r, chaos.check(r)


def _where(r) -> str:
    return f"(journals in {r.folder}; server log {r.folder / 'server.stderr'})"


def test_the_chaos_happened_and_the_fraction_of_rounds_committed_is_reported(run):
    r, rep = run
    print(f"\nchaos: {r.worker_kills} worker kills, {r.server_kills} server kills in {r.seconds:.0f} s; "
          f"{rep.summary()}")
    assert r.worker_kills >= MIN_KILLS[0] and r.server_kills >= MIN_KILLS[1], _where(r)
    assert r.final_step >= MIN_ROUNDS and rep.acks > 0, _where(r)
    assert 0 < rep.fraction <= 1 and rep.contributions_applied <= rep.contributions_sent
    assert all(code == 0 for code in r.worker_exits.values()), (r.worker_exits, _where(r))
    assert rep.torn == 0, "a worker's journal has a torn line"


def test_no_acknowledged_round_is_lost(run):
    """Every round a worker was answered for is in the final state (read after one more kill -9)."""
    r, rep = run
    assert rep.lost == [], f"acknowledged rounds missing from the final step {r.final_step}: {rep.lost} {_where(r)}"


def test_no_round_is_applied_twice_and_its_contributors_get_one_answer(run):
    r, rep = run
    assert rep.disagreeing == [], f"rounds answered differently: {rep.disagreeing} {_where(r)}"
    assert not [p for p in rep.problems if p.startswith("odd")], rep.problems[:5]


def test_final_parameters_equal_a_replay_of_the_committed_rounds(run):
    """From p0, each round's contributors' gradients (recomputed from (worker, round) and the replayed
    parameters) combined as the server combines them, through the plugins' Adam: bit for bit after every
    answered round and at the end, parameters and Adam's m and v."""
    r, rep = run
    assert rep.unknown_rounds == [], f"rounds nobody was answered for, not reconstructible: {rep.unknown_rounds}"
    assert rep.replay_mismatch == [], f"replay differs after rounds {rep.replay_mismatch[:10]} {_where(r)}"
    assert rep.problems == [], rep.problems[:5]
    assert rep.final_equal, f"final parameters or state differ from the replay {_where(r)}"


def test_no_round_is_left_open_past_its_deadline(run):
    r, rep = run
    assert r.late == [], f"rounds left open past their deadline: {r.late[:5]} {_where(r)}"


def test_a_retry_of_the_round_restored_after_kill_9_never_gets_the_next_rounds_answer(start_server, tmp_path):
    """Found reading the code behind the chaos run (rounds.Hub._closed_answer): after a restart, the last round's
    reply is rebuilt from the session's current parameters. A retry of it arriving while the next round closes
    (committed, the hub not yet told) was answered with the NEXT round's step and parameters, labelled as the
    restored round's replay: 472 of ~1,700 retries in one run. Now: the restored round's own answer, or
    FAILED_PRECONDITION "its reply is no longer kept" once the next round committed."""
    import threading

    import grpc
    import numpy as np

    from optreg.client import Client
    from optreg.v1 import session_pb2, session_pb2_grpc

    n = 2_000_000  # the next round's close takes milliseconds (the noise scale reads every contribution)
    g = {"w": np.full(n, 1e-3, np.float32)}
    srv = start_server("--data-dir", str(tmp_path))
    with Client(srv.address, timeout=120) as c:
        c.create_session("sgd", {"w": np.zeros(n, np.float32)}, session_id="r", workers=2, round_deadline=3600.0,
                         lr=1.0, step_reply="none", durability="log")

    def round_of_both(address, rnd):
        def one(w):
            with Client(address, timeout=120) as c:
                worker = c.join("r", w)
                worker.round = rnd
                assert worker.step(g).step == rnd + 1

        ts = [threading.Thread(target=one, args=(w,)) for w in "ab"]
        for t in ts:
            t.start()
        for t in ts:
            t.join(120)

    round_of_both(srv.address, 0)
    srv.kill()
    srv = start_server("--data-dir", str(tmp_path))
    stub = session_pb2_grpc.SessionServiceStub(grpc.insecure_channel(srv.address))
    stop, answers = threading.Event(), []

    def retry_round_0():  # the retry carries no gradient: a retry of an applied contribution is not read
        while not stop.is_set():
            try:
                r = stub.Step(session_pb2.StepRequest(session_id="r", worker="a", round=0), timeout=30)
                answers.append(r.step)
            except grpc.RpcError as e:
                assert e.code() == grpc.StatusCode.FAILED_PRECONDITION and "no longer kept" in e.details(), e
                answers.append("gone")

    t = threading.Thread(target=retry_round_0)
    t.start()
    try:
        while not answers:
            stop.wait(0.01)
        round_of_both(srv.address, 1)
        n_before = len(answers)
        while len(answers) < n_before + 3:  # a few after the close too
            stop.wait(0.01)
    finally:
        stop.set()
        t.join(60)
    assert set(answers) <= {1, "gone"}, f"round 0's retry answered as step 2 {answers.count(2)} times"
    assert answers[-1] == "gone"
