"""Several workers on one session (issue 10; docs/workers.md): sync rounds, async, SSP, durability.

Real servers; workers are separate processes (the randomized rounds) or threads with channels of
their own. No wall-time assertions: a hang shows as a call's timeout, which fails the test.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading

import grpc
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import ROOT, SOURCE_ROOTS
from optreg.client import Client, DeadlineExceeded, FailedPrecondition, StepMismatch, UsageError
from optreg.server.model.workers import ssp_may_apply
from optreg.v1 import session_pb2, session_pb2_grpc, tensors

sys.path.insert(0, str(ROOT / "tests"))
from workers_proc import SIZE, gradient  # noqa: E402


def _mean(gs):
    """The server's combine: summed in worker-name order in float32, then divided by the count."""
    acc = gs[0].copy()
    for g in gs[1:]:
        acc += g
    if len(gs) > 1:
        acc /= np.float32(len(gs))
    return acc


def _threads(fns):
    out, errors = [None] * len(fns), []

    def run(i, fn):
        try:
            out[i] = fn()
        except BaseException as e:  # re-raised in the test's thread
            errors.append(e)

    ts = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not any(t.is_alive() for t in ts), "a worker hung"
    if errors:
        raise errors[0]
    return out


# -- sync rounds --------------------------------------------------------------------------------

def test_sync_round_applies_the_mean_and_every_contributor_gets_the_same_reply(server):
    with Client(server.address, timeout=30) as c:
        s = c.create_session("sgd", {"w": np.zeros(8, np.float32)}, workers=4, mode="sync", lr=1.0,
                             durability="none")
        clients = [Client(server.address, timeout=30) for _ in range(4)]
        ws = [cl.join(s.id, f"w{i}") for i, cl in enumerate(clients)]
        rng = np.random.default_rng(1)
        expect = np.zeros(8, np.float32)
        for rnd in range(5):
            gs = [rng.standard_normal(8).astype(np.float32) for _ in ws]
            replies = _threads([lambda w=w, g=g: w.step({"w": g}) for w, g in zip(ws, gs)])
            expect = expect - _mean(gs)
            for w, r in zip(ws, replies):
                assert (r.step, r.round, r.replayed, r.contributors) == (rnd + 1, rnd, False, ("w0", "w1", "w2", "w3"))
                assert np.array_equal(w.arrays["w"], expect)  # bit for bit, the same for every contributor
        info = c.get_session(s.id)
        assert info.workers.mode == "sync" and info.open_round == 5 and info.step == 5
        assert [m.worker for m in info.members] == ["w0", "w1", "w2", "w3"]
        assert all(m.contributions == 5 and m.last_round == 4 for m in info.members)
        assert info.last_round.contributors == ("w0", "w1", "w2", "w3") and info.last_round.stragglers == ()
        # The gradient noise scale of the last round, from McCandlish et al.'s A.1 estimators written out here.
        small = np.mean([np.dot(g.astype(np.float64), g.astype(np.float64)) for g in gs])
        m = _mean(gs).astype(np.float64)
        big = np.dot(m, m)
        n = len(gs)
        want = ((small - big) / (1 - 1 / n)) / ((n * big - small) / (n - 1))
        assert want > 0 and info.last_round.noise_scale == pytest.approx(want, rel=1e-9)
        for cl in clients:
            cl.close()


def test_sum_combine_and_sync_over_streams(server):
    with Client(server.address, timeout=60) as c:
        n = 700_000  # 2.8 MB: above the client's stream threshold, so contributions and replies stream
        s = c.create_session("sgd", {"w": np.zeros(n, np.float32)}, workers=2, combine="sum", lr=1.0,
                             durability="none")
        ws = [Client(server.address, timeout=60).join(s.id, f"w{i}") for i in range(2)]
        gs = [np.full(n, i + 1, np.float32) for i in range(2)]
        rs = _threads([lambda w=w, g=g: w.step({"w": g}) for w, g in zip(ws, gs)])
        assert [r.contributors for r in rs] == [("w0", "w1")] * 2
        for w in ws:
            assert np.array_equal(w.arrays["w"], np.full(n, -3.0, np.float32))


def test_stale_contribution_names_the_open_round_and_changes_nothing(server):
    with Client(server.address, timeout=30) as c:
        s = c.create_session("sgd", {"w": np.zeros(4, np.float32)}, workers=2, min_workers=1, round_deadline=0.2,
                             lr=1.0, durability="none")
        w0, w1 = (Client(server.address, timeout=30).join(s.id, f"w{i}") for i in range(2))
        r = w0.step({"w": np.ones(4, np.float32)})  # w1 is a live member but silent: closes at the deadline
        assert (r.step, r.contributors) == (1, ("w0",))
        assert c.get_session(s.id).last_round.stragglers == ("w1",)
        with pytest.raises(StepMismatch) as e:
            w1.step({"w": np.full(4, 5, np.float32)})  # w1 computed on round 0, which has closed
        assert e.value.server_step == 1 and "stale" in str(e.value) and "open round is 1" in str(e.value)
        assert np.array_equal(s.read_parameters()["w"], -np.ones(4, np.float32))
        assert w1.refresh() == 1  # fresh parameters and the open round: it can contribute again
        with pytest.raises(StepMismatch, match="not open yet"):
            w1.round = 7
            w1.step({"w": np.ones(4, np.float32)})


def test_retry_of_a_contribution_is_applied_once(server):
    with Client(server.address, timeout=30) as c:
        s = c.create_session("sgd", {"w": np.zeros(4, np.float32)}, workers=2, lr=1.0, durability="none")
        w0, w0_retry, w1 = (Client(server.address, timeout=30).join(s.id, n) for n in ("w0", "w0", "w1"))
        g0, g1 = np.full(4, 2, np.float32), np.full(4, 4, np.float32)
        a, b, r1 = _threads([lambda: w0.step({"w": g0}), lambda: w0_retry.step({"w": g0}),
                             lambda: w1.step({"w": g1})])
        assert a.contributors == b.contributors == r1.contributors == ("w0", "w1")
        assert np.array_equal(w0.arrays["w"], np.full(4, -3, np.float32))  # mean of 2 and 4, w0 counted once
        w0_retry.round = 0  # the same (worker, round) after the round closed: answered, not applied
        again = w0_retry.step({"w": g0})
        assert again.replayed and again.step == 1
        assert np.array_equal(w0_retry.arrays["w"], np.full(4, -3, np.float32))
        assert c.get_session(s.id).step == 1


def test_a_contribution_outlives_its_calls_deadline(server):
    with Client(server.address, timeout=30) as c:
        s = c.create_session("sgd", {"w": np.zeros(4, np.float32)}, workers=2, round_deadline=3600.0, lr=1.0,
                             durability="none")
        a = Client(server.address, timeout=0.5).join(s.id, "a")
        b = Client(server.address, timeout=30).join(s.id, "b")
        with pytest.raises(DeadlineExceeded):
            a.step({"w": np.full(4, 2, np.float32)})  # b is silent: a's call ends, its contribution stays committed
        r = b.step({"w": np.full(4, 4, np.float32)})
        assert r.contributors == ("a", "b") and np.array_equal(b.arrays["w"], np.full(4, -3, np.float32))
        again = a.step({"w": np.full(4, 2, np.float32)})  # the same (worker, round): the round's reply
        assert again.replayed and again.step == 1 and np.array_equal(a.arrays["w"], b.arrays["w"])


def test_deleting_the_session_ends_its_waiting_rounds(server):
    from optreg.client import NotFound
    with Client(server.address, timeout=30) as c:
        s = c.create_session("sgd", {"w": np.zeros(4, np.float32)}, workers=2, round_deadline=3600.0,
                             durability="none")
        a = Client(server.address, timeout=30).join(s.id, "a")
        Client(server.address).join(s.id, "b")
        got = {}
        t = threading.Thread(target=lambda: got.update(e=pytest.raises(NotFound, a.step, {"w": np.ones(4, np.float32)})))
        t.start()
        while not any(m.last_round == 0 for m in c.get_session(s.id).members):
            t.join(0.02)
        c.delete_session(s.id)
        t.join(30)
        assert not t.is_alive() and "not found" in str(got["e"].value)


def test_dead_worker_is_dropped_when_its_lease_runs_out(server):
    with Client(server.address, timeout=30) as c:
        s = c.create_session("sgd", {"w": np.zeros(4, np.float32)}, workers=2, round_deadline=3600.0, lease=0.5,
                             lr=1.0, durability="none")
        Client(server.address).join(s.id, "ghost")  # joins, then never calls again
        w = Client(server.address, timeout=30).join(s.id, "alive")
        r = w.step({"w": np.ones(4, np.float32)})  # the round waits for the ghost's lease, not the hour
        assert r.contributors == ("alive",)
        assert [m.worker for m in c.get_session(s.id).members] == ["alive"]


def test_workers_leaving_at_different_rounds_never_hang(server):
    with Client(server.address, timeout=30) as c:
        s = c.create_session("sgd", {"w": np.zeros(4, np.float32)}, workers=4, round_deadline=3600.0, lr=0.1,
                             durability="none")
        ws = [Client(server.address, timeout=30).join(s.id, f"w{i}") for i in range(4)]

        def run(i):
            for _ in range(3 + 4 * i):
                ws[i].step({"w": np.ones(4, np.float32)})
            ws[i].leave()
            return ws[i].round

        last = _threads([lambda i=i: run(i) for i in range(4)])
        assert last == [3, 7, 11, 15] and c.get_session(s.id).step == 15
        assert c.get_session(s.id).members == ()


def test_shared_session_refusals(server):
    with Client(server.address, timeout=30) as c:
        s = c.create_session("sgd", {"w": np.zeros(4, np.float32)}, workers=1, durability="none")
        with pytest.raises(FailedPrecondition, match="send worker"):
            s.step({"w": np.ones(4, np.float32)})  # a plain step on a shared session
        w = c.join(s.id, "a")
        with pytest.raises(FailedPrecondition, match="its limit"):
            c.join(s.id, "b")
        w.leave()
        with pytest.raises(FailedPrecondition, match="not a member"):
            w.heartbeat()
        single = c.create_session("sgd", {"w": np.zeros(4, np.float32)}, durability="none")
        with pytest.raises(FailedPrecondition, match="single-writer"):
            c.join(single.id, "a")
        with pytest.raises(UsageError, match="min_workers"):
            c.create_session("sgd", {"w": np.zeros(4, np.float32)}, workers=2, min_workers=3)


def test_randomized_sync_rounds_with_workers_killed_mid_stream(server, tmp_path):
    """The issue's 1,000 randomized rounds: OPTREG_WORKER_ROUNDS sets the count (default 1,000; ~20 s here).
    4 worker processes, random delays; in some rounds a worker sends half its contribution and kills
    itself with SIGKILL mid-stream (a replacement joins under its name). Every applied update is, bit for
    bit, the mean of exactly the committed contributions; no partial one is applied; twin sends count once."""
    rounds = int(os.environ.get("OPTREG_WORKER_ROUNDS", "1000"))
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kills = {f"w{i}": sorted(rng.sample(range(1, rounds - 1), max(1, rounds // 150))) for i in range(4)}
    with Client(server.address, timeout=60) as c:
        s = c.create_session("sgd", {"w": np.zeros(SIZE, np.float32)}, workers=4, min_workers=3,
                             round_deadline=0.3, lease=0.6, lr=1.0, durability="none")
        out = tmp_path / "replies.jsonl"
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(SOURCE_ROOTS + [str(ROOT / "tests")]))

        def spawn(worker, die_at):
            return subprocess.Popen([sys.executable, str(ROOT / "tests" / "workers_proc.py"), server.address, s.id,
                                     worker, str(rounds), str(seed), str(out), *map(str, die_at)], env=env,
                                    stderr=subprocess.PIPE, text=True)

        procs = {w: spawn(w, kills[w]) for w in kills}
        killed = []
        while procs:
            for w, p in list(procs.items()):
                try:
                    code = p.wait(timeout=0.2)
                except subprocess.TimeoutExpired:
                    continue
                err = p.stderr.read()
                if code == -signal.SIGKILL:  # died mid-stream on purpose: a replacement joins under its name
                    killed.append(w)
                    procs[w] = spawn(w, [k for k in kills[w] if k > c.get_session(s.id).step + 2])
                    kills[w] = []
                else:
                    assert code == 0, f"worker {w} failed (seed {seed}): {err[-3000:]}"
                    del procs[w]
        assert killed, "no worker was killed"
        records = [json.loads(line) for line in out.read_text().splitlines()]
        final = c.get_session(s.id)
        assert final.step == rounds and final.members == ()
        by_round = {}
        for rec in records:
            by_round.setdefault(rec["round"], []).append(rec)
        p = np.zeros(SIZE, np.float32)
        for rnd in range(rounds):
            recs = by_round.get(rnd)
            assert recs, f"round {rnd}: no contributor got a reply (seed {seed})"
            first = recs[0]
            who = first["contributors"]
            assert len(who) >= 1 and who == sorted(who)
            for rec in recs:  # every contributor of the round got the same reply
                assert rec["contributors"] == who and rec["w"] == first["w"] and rec["step"] == rnd + 1
                assert rec["worker"] in who
            p = p - _mean([gradient(seed, w, rnd) for w in who])
            assert np.array_equal(np.asarray(first["w"], np.float32), p), f"round {rnd} (seed {seed})"
        assert np.array_equal(s.read_parameters()["w"], p)


# -- async ------------------------------------------------------------------------------------

def test_async_no_lost_update_8_writers(server):
    writers, steps, lr = 8, 200, 0.01
    with Client(server.address, timeout=60) as c:
        p0 = np.random.default_rng(5).standard_normal(32)
        s = c.create_session("sgd", {"w": p0.copy()}, workers=writers, mode="async", lr=lr, durability="none")

        def run(i):
            rng = np.random.default_rng(100 + i)
            w = Client(server.address, timeout=60).join(s.id, f"a{i}")
            sent, seen = np.zeros(32), []
            for _ in range(steps):
                g = rng.standard_normal(32)
                r = w.step({"w": g})
                assert r.staleness >= 0 and not r.replayed and r.step == w.round
                sent += g
                seen.append(r.step)
            w.leave()
            return sent, seen

        results = _threads([lambda i=i: run(i) for i in range(writers)])
        total = sum(r[0] for r in results)
        steps_seen = sorted(x for r in results for x in r[1])
        assert steps_seen == list(range(1, writers * steps + 1))  # one at a time: every step number once
        np.testing.assert_allclose(s.read_parameters()["w"], p0 - lr * total, rtol=1e-12, atol=1e-12)


def test_async_retry_is_applied_once_and_max_staleness_refuses(server):
    with Client(server.address, timeout=30) as c:
        s = c.create_session("sgd", {"w": np.zeros(4)}, workers=3, mode="async", staleness=1, lr=1.0,
                             durability="none")
        a, b = (Client(server.address, timeout=30).join(s.id, n) for n in ("a", "b"))
        r = a.step({"w": np.ones(4)})
        assert (r.step, r.staleness) == (1, 0)
        a.round = 0
        again = a.step({"w": np.ones(4)})  # the same (worker, round): a retry, answered
        assert again.replayed and again.step == 1 and np.array_equal(a.arrays["w"], -np.ones(4))
        r = b.step({"w": np.ones(4)})  # read at step 0, applied as step 2: staleness 1, within the bound
        assert (r.step, r.staleness) == (2, 1)
        c2 = Client(server.address, timeout=30).join(s.id, "c")
        c2.round = 0
        with pytest.raises(StepMismatch, match="too stale"):
            c2.step({"w": np.ones(4)})
        assert c.get_session(s.id).step == 2


# -- SSP ----------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(st.integers(0, 3), st.integers(2, 5), st.lists(st.integers(0, 4), min_size=1, max_size=200))
def test_ssp_rule_over_random_schedules(bound, n, picks):
    """Workers try to apply in a random order; a blocked one waits. The slowest is never blocked (no
    deadlock), nobody gets more than bound + 1 contributions ahead, and a worker applying its c-th
    contribution sees every other worker's first c - 1 - bound (Ho et al.'s visibility rule)."""
    clocks = [0] * n
    for pick in picks:
        i = pick % n
        slowest = min(range(n), key=clocks.__getitem__)
        assert ssp_may_apply(clocks[slowest], clocks, bound)
        if ssp_may_apply(clocks[i], clocks, bound):
            c = clocks[i] + 1
            assert all(clocks[j] >= c - 1 - bound for j in range(n) if j != i)
            clocks[i] = c
        assert max(clocks) - min(clocks) <= bound + 1


def test_ssp_blocks_the_fastest_within_its_deadline(server):
    with Client(server.address, timeout=30) as c:
        s = c.create_session("sgd", {"w": np.zeros(4)}, workers=2, mode="ssp", staleness=1, lr=1.0,
                             durability="none")
        fast = Client(server.address, timeout=1.0).join(s.id, "fast")
        slow = Client(server.address, timeout=30).join(s.id, "slow")
        fast.step({"w": np.ones(4)})
        fast.step({"w": np.ones(4)})  # 2 ahead of slow after this one: the next must wait
        with pytest.raises(DeadlineExceeded):
            fast.step({"w": np.ones(4)})
        assert c.get_session(s.id).step == 2  # nothing applied by the blocked call
        result = {}
        t = threading.Thread(target=lambda: result.update(r=Client(server.address, timeout=30).join(
            s.id, "fast").step({"w": np.ones(4)})))
        t.start()
        slow.step({"w": np.ones(4)})  # the slowest moves: the fast one's contribution goes through
        t.join(60)
        assert result["r"].step in (3, 4) and c.get_session(s.id).step == 4
        slow.leave()  # a departed member no longer holds anyone back
        fast.refresh()  # another handle of "fast" contributed meanwhile
        for _ in range(3):
            fast.step({"w": np.ones(4)})


# -- durability ---------------------------------------------------------------------------------

def _stub(address):
    return session_pb2_grpc.SessionServiceStub(grpc.insecure_channel(address))


def _contribute(stub, sid, worker, rnd, g, timeout=30):
    return stub.Step(session_pb2.StepRequest(session_id=sid, worker=worker, round=rnd,
                                             gradients=[tensors.from_numpy("w", g)]), timeout=timeout)


def test_sync_rounds_survive_kill_9_of_the_server(start_server, tmp_path):
    srv = start_server("--data-dir", str(tmp_path))
    g = {(w, r): np.random.default_rng([r, i]).standard_normal(4) for i, w in enumerate("abc") for r in range(3)}
    with Client(srv.address, timeout=30) as c:
        c.create_session("sgd", {"w": np.zeros(4)}, session_id="shared", workers=3, round_deadline=3600.0,
                         lr=1.0, durability="log")
    st = _stub(srv.address)
    for w in "abc":  # every worker a member before the first round (a round waits for the live members only)
        st.JoinSession(session_pb2.JoinSessionRequest(session_id="shared", worker=w), timeout=10)
    r0 = _threads([lambda w=w: _contribute(st, "shared", w, 0, g[w, 0]) for w in "abc"])
    after0 = tensors.to_numpy(r0[0].tensors[0])
    assert np.array_equal(after0, -_mean([g[w, 0] for w in "abc"]))
    # Round 1: a and b are committed and waiting for c when the server dies.
    pending = [threading.Thread(target=lambda w=w: pytest.raises(grpc.RpcError, _contribute, st, "shared", w, 1,
                                                                  g[w, 1]), daemon=True) for w in "ab"]
    for t in pending:
        t.start()
    import time
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # both committed to round 1 (the members show their last round)
        info = st.GetSession(session_pb2.GetSessionRequest(session_id="shared"), timeout=10).session
        if sorted(m.worker for m in info.members if m.last_round == 1) == ["a", "b"]:
            break
        time.sleep(0.02)
    srv.kill()
    srv2 = start_server("--data-dir", str(tmp_path))
    st = _stub(srv2.address)
    again = _contribute(st, "shared", "c", 0, g["c", 0])  # c's reply to round 0 was lost: answered, not applied
    assert again.replayed and again.step == 1 and np.array_equal(tensors.to_numpy(again.tensors[0]), after0)
    # The workers retry round 1 (unacknowledged before the crash): applied once, with c's contribution.
    r1 = _threads([lambda w=w: _contribute(st, "shared", w, 1, g[w, 1]) for w in "abc"])
    after1 = after0 - _mean([g[w, 1] for w in "abc"])
    assert all(r.step == 2 and list(r.contributors) == ["a", "b", "c"] for r in r1)
    assert np.array_equal(tensors.to_numpy(r1[0].tensors[0]), after1)
    srv2.stop()  # a clean stop writes a snapshot: the round's record must survive in it too
    srv3 = start_server("--data-dir", str(tmp_path))
    st = _stub(srv3.address)
    again = _contribute(st, "shared", "a", 1, g["a", 1])
    assert again.replayed and again.step == 2 and np.array_equal(tensors.to_numpy(again.tensors[0]), after1)
    info = st.GetSession(session_pb2.GetSessionRequest(session_id="shared"), timeout=10).session
    assert [m.worker for m in info.members] == ["a", "b", "c"]  # the last round's members are back
    with pytest.raises(grpc.RpcError) as e:
        _contribute(st, "shared", "a", 0, g["a", 0])  # too old to answer: it names the open round
    assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "open round is 2" in e.value.details()


def test_async_contributions_survive_kill_9_of_the_server(start_server, tmp_path):
    srv = start_server("--data-dir", str(tmp_path))
    with Client(srv.address, timeout=30) as c:
        c.create_session("sgd", {"w": np.zeros(4)}, session_id="as", workers=2, mode="async", lr=1.0,
                         durability="log")
    st = _stub(srv.address)
    first = _contribute(st, "as", "a", 0, np.ones(4))
    assert first.step == 1
    srv.kill()
    srv2 = start_server("--data-dir", str(tmp_path))
    st = _stub(srv2.address)
    again = _contribute(st, "as", "a", 0, np.ones(4))  # the reply was lost: the retry is not applied again
    assert again.replayed and again.step == 1
    r = _contribute(st, "as", "b", 0, np.full(4, 2.0))
    assert (r.step, r.staleness) == (2, 1)
    assert np.array_equal(tensors.to_numpy(r.tensors[0]), np.full(4, -3.0))


# -- the book's drop-ins ------------------------------------------------------------------------

def test_book_drop_ins_as_workers_of_one_session(server):
    from optreg.client import SGD
    results = {}

    # Created by whichever starts first; every worker joins before any contributes (resume() joins).
    barrier = threading.Barrier(3)

    def run_synced(i):
        params = {"W": np.full((3, 2), float(i)), "b": np.zeros(2)}
        with SGD(lr=0.5, address=server.address, session_id="book-shared", worker=f"w{i}", workers=3) as opt:
            start = opt.resume(params)
            barrier.wait()
            for _ in range(start, 4):
                opt.update(params, {"W": np.full((3, 2), float(i + 1)), "b": np.ones(2)})
            results[i] = (opt.step, params)

    _threads([lambda i=i: run_synced(i) for i in range(3)])
    first = results[0][1]
    w0 = first["W"]
    for i in range(3):
        step, params = results[i]
        assert step == 4 and np.array_equal(params["W"], w0) and np.array_equal(params["b"], np.full(2, -2.0))
    with Client(server.address) as c:
        info = c.get_session("book-shared")
        assert info.step == 4 and info.members == ()  # every worker left; the session is kept
        start = w0 + 4 * 0.5 * 2.0  # the mean gradient of W is 2 each round
        assert np.allclose(start, start[0, 0]) and start[0, 0] in (0.0, 1.0, 2.0)  # one worker's initial W
        c.delete_session("book-shared")


# -- round statistics -----------------------------------------------------------------------------

def test_round_metrics_and_scalars(start_server, tmp_path):
    from test_auth_tls_metrics import _free_port, _scrape
    from optreg.server.storage import wal
    port = _free_port()
    srv = start_server("--data-dir", str(tmp_path), "--metrics-port", str(port))
    with Client(srv.address, timeout=30) as c:
        c.create_session("sgd", {"w": np.zeros(4)}, session_id="stats", workers=2, lr=1.0)
        ws = [Client(srv.address, timeout=30).join("stats", f"w{i}") for i in range(2)]
        _threads([lambda w=w, i=i: w.step({"w": np.full(4, i + 1.0) * (np.arange(4) - 1.5)},
                                          metrics={"loss": 1.0 + 2 * i}) for i, w in enumerate(ws)])
        a = c.create_session("sgd", {"w": np.zeros(4)}, workers=2, mode="async", durability="none")
        aw = [Client(srv.address, timeout=30).join(a.id, f"a{i}") for i in range(2)]
        aw[0].step({"w": np.ones(4)})
        aw[1].step({"w": np.ones(4)})  # read at step 0, applied as step 2: staleness 1
    m = _scrape(port)
    assert m["optreg_rounds_total"] == 1 and m["optreg_round_seconds_count"] == 1
    assert m["optreg_round_stragglers_total"] == 0
    assert m['optreg_round_noise_scale{session_id="stats"}'] > 0
    assert m["optreg_contribution_staleness_count"] == 2 and m["optreg_contribution_staleness_sum"] == 1
    srv.kill()  # the round's record is still in the log: it holds the mean of the contributors' scalars
    lg = wal.Log.open(wal.path_for(tmp_path / "sessions", "stats"), "stats", base_step=0, sync="os")
    (record,) = list(lg.records(after=0))
    assert record.extras["metrics"] == {"loss": 2.0} and record.extras["contributors"] == ["w0", "w1"]
    lg.close()


def test_heartbeat_keeps_a_computing_worker_in_its_round(server):
    import time
    with Client(server.address, timeout=30) as c:
        s = c.create_session("sgd", {"w": np.zeros(4, np.float32)}, workers=2, round_deadline=3600.0, lease=2.0,
                             lr=1.0, durability="none")
        slow = Client(server.address, timeout=30).join(s.id, "slow", heartbeat_every=0.2)
        fast = Client(server.address, timeout=30).join(s.id, "fast")
        got = {}
        t = threading.Thread(target=lambda: got.update(r=fast.step({"w": np.full(4, 4, np.float32)})))
        t.start()
        time.sleep(4.0)  # "slow" computes for two leases; its heartbeats keep it a member, so the round waits
        r = slow.step({"w": np.full(4, 2, np.float32)})
        t.join(30)
        assert r.contributors == got["r"].contributors == ("fast", "slow")
        assert np.array_equal(slow.arrays["w"], np.full(4, -3, np.float32))
        slow.leave()


def test_the_last_rounds_members_come_back_after_kill_9(start_server, tmp_path):
    srv = start_server("--data-dir", str(tmp_path))
    with Client(srv.address, timeout=30) as c:
        c.create_session("sgd", {"w": np.zeros(4)}, session_id="m", workers=3, min_workers=2, round_deadline=0.2,
                         lr=1.0, durability="log")
    st = _stub(srv.address)
    for w in "abc":
        st.JoinSession(session_pb2.JoinSessionRequest(session_id="m", worker=w), timeout=10)
    r = _threads([lambda w=w: _contribute(st, "m", w, 0, np.ones(4)) for w in "ab"])
    assert list(r[0].contributors) == ["a", "b"]  # c, silent, was a straggler of round 0
    srv.kill()
    srv2 = start_server("--data-dir", str(tmp_path))
    st = _stub(srv2.address)
    st.JoinSession(session_pb2.JoinSessionRequest(session_id="m", worker="a"), timeout=10)
    info = st.GetSession(session_pb2.GetSessionRequest(session_id="m"), timeout=10).session
    assert [m.worker for m in info.members] == ["a", "b", "c"] and info.open_round == 1
    assert [m.contributions for m in info.members] == [1, 1, 0]  # their clocks, from the round's record
    assert info.last_round.round == 0 and list(info.last_round.contributors) == ["a", "b"]


def test_ssp_clocks_and_members_survive_kill_9_and_retries_apply_once(start_server, tmp_path):
    """The SSP bound holds across a crash: the fast worker, 2 contributions ahead of the slow one with bound 1,
    is still blocked after the restart (the members and their clocks come back from the log), and retries of
    contributions acknowledged before the crash are answered, not applied again."""
    srv = start_server("--data-dir", str(tmp_path))
    with Client(srv.address, timeout=30) as c:
        c.create_session("sgd", {"w": np.zeros(4)}, session_id="ssp", workers=2, mode="ssp", staleness=1, lr=1.0,
                         durability="log")
    st = _stub(srv.address)
    for w in ("fast", "slow"):
        st.JoinSession(session_pb2.JoinSessionRequest(session_id="ssp", worker=w), timeout=10)
    g = {k: np.random.default_rng(k).standard_normal(4) for k in range(5)}
    assert _contribute(st, "ssp", "fast", 0, g[0]).step == 1
    assert _contribute(st, "ssp", "fast", 1, g[1]).step == 2  # clock 2, slow at 0: its next must wait
    srv.kill()
    srv2 = start_server("--data-dir", str(tmp_path))
    st = _stub(srv2.address)
    info = st.GetSession(session_pb2.GetSessionRequest(session_id="ssp"), timeout=10).session
    assert [(m.worker, m.contributions) for m in info.members] == [("fast", 2), ("slow", 0)]  # before any call
    with pytest.raises(grpc.RpcError) as e:  # fast is still 2 ahead of slow
        _contribute(st, "ssp", "fast", 2, g[2], timeout=1.0)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    again = _contribute(st, "ssp", "fast", 1, g[1])  # its reply was lost in the crash: answered, not applied
    assert again.replayed and again.step == 2
    assert st.GetSession(session_pb2.GetSessionRequest(session_id="ssp"), timeout=10).session.step == 2
    r = _contribute(st, "ssp", "slow", 0, g[3])
    assert (r.step, r.staleness) == (3, 2)
    r = _contribute(st, "ssp", "fast", 2, g[2])  # slow moved: fast is within the bound again
    assert r.step == 4
    np.testing.assert_array_equal(tensors.to_numpy(r.tensors[0]), -(((g[0] + g[1]) + g[3]) + g[2]))


# -- staleness-scaled learning rate -------------------------------------------------------------------

def test_staleness_scaled_lr_applies_lr_over_one_plus_staleness_and_survives_kill_9(start_server, tmp_path):
    srv = start_server("--data-dir", str(tmp_path))
    lr = 0.3
    with Client(srv.address, timeout=30) as c:
        c.create_session("sgd", {"w": np.zeros(4)}, session_id="sc", workers=3, mode="async", lr=lr,
                         scale_lr_by_staleness=True, durability="log")
        assert c.get_session("sc").workers.scale_lr_by_staleness
    st = _stub(srv.address)
    g = [np.random.default_rng(10 + i).standard_normal(4) for i in range(3)]
    results = [_contribute(st, "sc", w, 0, g[i]) for i, w in enumerate("abc")]  # all read at step 0
    assert [(r.step, r.staleness) for r in results] == [(1, 0), (2, 1), (3, 2)]
    expected = np.zeros(4)
    for k in range(3):  # the sgd update, p -= lr_k * g, with lr_k = lr / (1 + staleness)
        expected -= (lr / (1 + k)) * g[k]
    unscaled = -lr * (g[0] + g[1] + g[2])
    got = tensors.to_numpy(results[-1].tensors[0])
    np.testing.assert_allclose(got, expected, rtol=1e-15, atol=0)
    assert not np.allclose(got, unscaled)
    info = st.GetSession(session_pb2.GetSessionRequest(session_id="sc"), timeout=10).session
    assert info.hyperparameters["lr"] == lr  # the session's own lr is unchanged
    srv.kill()
    srv2 = start_server("--data-dir", str(tmp_path))
    st = _stub(srv2.address)
    info = st.GetSession(session_pb2.GetSessionRequest(session_id="sc"), timeout=10).session
    assert info.hyperparameters["lr"] == lr and info.step == 3  # before the session is loaded (from the log)
    read = st.ReadParameters(session_pb2.ReadParametersRequest(session_id="sc"), timeout=10)
    np.testing.assert_array_equal(tensors.to_numpy(read.parameters[0]), got)  # the log replays the scaled lrs
    assert st.GetSession(session_pb2.GetSessionRequest(session_id="sc"), timeout=10).session.hyperparameters["lr"] == lr
    again = _contribute(st, "sc", "c", 0, g[2])
    assert again.replayed and again.step == 3
    r = _contribute(st, "sc", "a", 1, g[0])  # read at step 1, applied as step 4: staleness 2
    assert r.staleness == 2
    np.testing.assert_allclose(tensors.to_numpy(r.tensors[0]), got - (lr / 3) * g[0], rtol=1e-15, atol=0)


def test_staleness_scaled_lr_is_refused_in_sync_mode(server):
    with Client(server.address, timeout=30) as c:
        with pytest.raises(UsageError, match="scale_lr_by_staleness"):
            c.create_session("sgd", {"w": np.zeros(4)}, workers=2, scale_lr_by_staleness=True)
    config = session_pb2.SessionConfig(optimizer="sgd", durability=session_pb2.DURABILITY_NONE,
                                       workers=session_pb2.WorkerConfig(workers=2, scale_lr_by_staleness=True))
    with pytest.raises(grpc.RpcError) as e:
        _stub(server.address).CreateSession(session_pb2.CreateSessionRequest(
            config=config, parameters=[tensors.from_numpy("w", np.zeros(4))]), timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "config.workers.scale_lr_by_staleness" in e.value.details() and "async or ssp" in e.value.details()


def test_a_worker_that_stopped_contributing_raises_the_telemetry_alert(server):
    """The dashboard's "worker_stopped" alert (issue 12): a member that is alive (its lease holds) but missed
    3 sync rounds in a row raises it once, and again when its lease runs out and it is dropped; a worker that
    leaves does not."""
    import time
    from optreg.v1 import telemetry_pb2, telemetry_pb2_grpc
    with Client(server.address, timeout=30) as c:
        s = c.create_session("sgd", {"w": np.zeros(4)}, workers=4, min_workers=2, round_deadline=0.2, lease=5.0,
                             lr=1.0, durability="none")
        a, b, gone = (Client(server.address, timeout=30).join(s.id, n) for n in ("a", "b", "gone"))
        silent = Client(server.address, timeout=30).join(s.id, "silent")  # joins, then never calls again
        gone.leave()
        for _ in range(3):  # each round closes at its deadline with a and b; "silent" is a straggler of all three
            _threads([lambda w=w: w.step({"w": np.ones(4)}) for w in (a, b)])
        stub = telemetry_pb2_grpc.TelemetryServiceStub(grpc.insecure_channel(server.address))

        def alerts():
            got = stub.GetTelemetry(telemetry_pb2.GetTelemetryRequest(session_id=s.id), timeout=10)
            return [x for x in got.alerts if x.kind == "worker_stopped"]

        deadline = time.monotonic() + 30
        while len(alerts()) < 2 and time.monotonic() < deadline:  # a and b keep calling: only silent's lease ends
            a.heartbeat()
            b.heartbeat()
            time.sleep(0.2)
        found = alerts()
        assert [x.message.split(":")[0] for x in found] == ["worker silent stopped contributing"] * 2, found
        assert "none of the last 3 rounds" in found[0].message and found[0].step == 3
        assert "lease ran out" in found[1].message and "it never contributed" in found[1].message
        assert [m.worker for m in c.get_session(s.id).members] == ["a", "b"]
        del silent


def test_join_and_refresh_a_session_larger_than_one_message(start_server):
    """join() reads the parameters (refresh): a session larger than the message limit streams them, as
    Session.read_parameters does, instead of failing with RESOURCE_EXHAUSTED; a big worker step streams."""
    srv = start_server("--memory-only", "--max-message-mb", "2")
    b = np.arange(400_000, dtype=np.float64)  # 3.2 MB: over the limit and over the client's streaming size
    with Client(srv.address, timeout=60) as c:
        c.create_session("sgd", {"b": b, "c": np.ones(3)}, session_id="big", workers=1, mode="async", lr=0.5)
        with c.join("big", "w0") as w:
            np.testing.assert_array_equal(w.arrays["b"], b)
            assert w.round == 0
            w.step({"b": np.ones_like(b), "c": np.ones(3)})
            assert w.refresh() == 1
            np.testing.assert_array_equal(w.arrays["b"], b - 0.5)


def test_delta_replies_only_in_sync_mode(server):
    """An async/SSP contribution applies to parameters other workers moved since it read them, so its
    new - old would leave the worker's arrays without their updates: refused at creation, naming the
    fields. In sync mode every worker's arrays follow the server."""
    from optreg.client import InvalidArgument
    with Client(server.address, timeout=30) as c:
        for mode in ("async", "ssp"):
            with pytest.raises(InvalidArgument, match="step_reply delta with config.workers.mode " + mode):
                c.create_session("sgd", {"x": np.zeros(2)}, workers=2, mode=mode, step_reply="delta")
        s = c.create_session("sgd", {"x": np.zeros(2)}, workers=2, mode="sync", step_reply="delta", lr=1.0)
        a, b = c.join(s.id, "a"), c.join(s.id, "b")
        for _ in range(3):
            threads = [threading.Thread(target=w.step, args=({"x": np.ones(2)},)) for w in (a, b)]
            [t.start() for t in threads]
            [t.join() for t in threads]
        np.testing.assert_array_equal(s.read_parameters()["x"], [-3, -3])
        np.testing.assert_array_equal(a.arrays["x"], [-3, -3])
        np.testing.assert_array_equal(b.arrays["x"], [-3, -3])


def test_leases_run_out_exactly_when_due_though_expiry_is_not_rescanned_each_call(monkeypatch):
    """Members.expire skips its scan while no lease can have run out (a round of 1,000 members called it
    per contribution: O(members^2) on the event loop). Renewals, newcomers and a member readmitted with an
    old lease must still run out on time."""
    from optreg.server.model import workers
    clock = [1000.0]
    monkeypatch.setattr(workers.time, "monotonic", lambda: clock[0])
    members = workers.Members(workers.WorkerConfig(workers=8, lease_seconds=10.0), "s")
    a, b = members.join("a"), members.join("b")
    clock[0] = 1005.0
    assert members.expire() == []
    members.get("a")  # a renewed at 1005: due at 1015; b still due at 1010
    c = members.join("c")  # due at 1015
    clock[0] = 1010.0
    assert members.expire() == ["b"]
    clock[0] = 1014.9
    assert members.expire() == []
    clock[0] = 1015.0
    assert sorted(members.expire()) == ["a", "c"]
    members.readmit(b)  # back with its old lease (due at 1010): the next check drops it
    assert members.expire() == ["b"] and not members.by_name
    assert a.expires == c.expires == 1015.0
