"""Chaos in the spirit of torchft's (issue 22): a sync session of 4 worker processes trains the demo's
network (the book's two-layer net on scikit-learn's digits) while one worker after another is killed
with SIGKILL and restarted (it rejoins under its name), and now and then the server is killed with
SIGKILL and restarted on the same port and data directory (durability `log`).

    python -m bench --only chaos     # a few minutes (--quick: ~30 s); tests/hostile/test_chaos.py: ~45 s
    python -m bench.chaos worker ADDRESS SESSION NAME FOLDER      # one worker (run() starts them)

Every worker appends each event to FOLDER/NAME.jsonl, fsynced: what it sent (round, a digest of its
gradient) and what the server answered (step, contributors, a digest of the parameters). A worker's
gradient is a function of (worker, round) and the round's parameters only (its batch is drawn from
a generator seeded by both), so check() replays the whole run from p0: each committed round's mean of
its contributors' gradients (summed in worker-name order, as the server combines them) through the
plugins' own Adam update. Rounds combine deterministically and the kernels give the numpy update's
bits, so the replay must match the server bit for bit, after every acknowledged round and at the end.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import threading
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCE_ROOTS = [str(ROOT / d) for d in ("proto", "plugins", "server", "client", "app")]
for _d in SOURCE_ROOTS:
    if _d not in sys.path:
        sys.path.insert(0, _d)

WORKERS = 4
HIDDEN = [50]  # the book's TwoLayerNet: 64 -> 50 -> 10 on the 8x8 digits
BATCH = 32
OPTIMIZER, HP = "adam", {"lr": 0.01}
SEED = 22
ROUND_DEADLINE, LEASE, MIN_WORKERS = 0.5, 1.5, 2
CALL_TIMEOUT = 10.0  # a step's deadline: a round that does not close in time is sent again (applied once)
LATE_SLACK, LATE_POLLS = 5.0, 20  # a round past its deadline by this, while the server answered this many polls


# -- the network, its data and the gradients -------------------------------------------------------
def network():
    from optreg.app.demo.network import MultiLayerNet
    return MultiLayerNet(64, HIDDEN, 10, np.random.default_rng(0))


def gradient(net, x, t, worker: str, rnd: int):
    """(loss, grads) of `worker` in round `rnd` on net's current parameters: a batch seeded by both."""
    i = np.random.default_rng([SEED, int(worker[1:]), rnd]).integers(0, len(x), BATCH)
    return net.gradient(x[i], t[i])


def digest(arrays) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        h.update(name.encode() + np.ascontiguousarray(arrays[name]).tobytes())
    return h.hexdigest()[:32]


def one_blas_thread():
    """Gradients must come out with the same bits in every process: BLAS on one thread, everywhere."""
    from threadpoolctl import threadpool_limits
    return threadpool_limits(1)


# -- one worker process ----------------------------------------------------------------------------
class Journal:
    """Append-only JSON lines, each written by one write() and fsynced: a SIGKILL loses at most the line
    being written, never one before it."""

    def __init__(self, path):
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, **record):
        os.write(self.fd, (json.dumps(record) + "\n").encode())
        os.fsync(self.fd)

    def close(self):
        os.close(self.fd)


def worker_main(address: str, session_id: str, name: str, folder: str) -> None:
    from optreg.client import Client, RetryPolicy, StepMismatch
    from optreg.client.errors import DeadlineExceeded, Unavailable

    folder = pathlib.Path(folder)
    data = np.load(folder / "data.npz")
    x, t = data["x"], data["t"]
    net = network()
    log = Journal(folder / f"{name}.jsonl")
    log.write(event="start", pid=os.getpid(), at=time.time())
    # The server may be down for a few seconds at a time: the client rides that out itself.
    client = Client(address, timeout=CALL_TIMEOUT, retry=RetryPolicy(total_seconds=120))
    while True:
        try:
            w = client.join(session_id, name, net.params)  # net.params now hold the open round's parameters
            break
        except (Unavailable, DeadlineExceeded):
            time.sleep(0.2)
    with one_blas_thread():
        while not (folder / "stop").exists():
            rnd = w.round
            loss, g = gradient(net, x, t, name, rnd)
            log.write(event="send", round=rnd, grad=digest(g), at=time.time())
            try:
                r = w.step(g, metrics={"loss": loss})
            except StepMismatch as e:  # the round closed without it (or with it, reply not kept): start again
                log.write(event="mismatch", round=rnd, open=e.server_step, why=str(e)[:200], at=time.time())
                w.refresh()
                continue
            except (Unavailable, DeadlineExceeded):  # send the same (worker, round) again: applied once
                continue
            log.write(event="ack", round=r.round, step=r.step, replayed=r.replayed, contributors=list(r.contributors),
                      params=digest(w.arrays), grad=digest(g), at=time.time())
    w.leave()
    client.close()


# -- the server ------------------------------------------------------------------------------------
def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(SOURCE_ROOTS + [str(ROOT), e.get("PYTHONPATH", "")])
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        e[var] = "1"
    return e


class Server:
    """`optreg.server serve` on a fixed port and data directory; its stderr appended to a file, so a
    restart keeps what the last one said (the test's failure messages quote it)."""

    def __init__(self, port: int, data_dir, stderr_path):
        self.port, self.data_dir, self.stderr_path = port, str(data_dir), stderr_path
        self.address = f"127.0.0.1:{port}"
        self.proc = None

    def start(self):
        with open(self.stderr_path, "a") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "optreg.server", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                 "--data-dir", self.data_dir, "--log-level", "warning"],
                stdout=subprocess.PIPE, stderr=err, text=True, env=env())
        line = ""
        for _ in range(50):  # the port of a killed server may take a moment to be free
            line = self.proc.stdout.readline()
            if line.startswith("optreg serving on "):
                return
            if self.proc.poll() is not None:
                break
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError(f"server did not start: {line!r}; see {self.stderr_path}")

    def kill(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc is not None and not self.proc.stdout.closed:
            self.proc.stdout.close()


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the deadline monitor --------------------------------------------------------------------------
class Monitor(threading.Thread):
    """Polls GetSession. A round whose committed contributions (members whose last_round is the open
    round) reach the quorum is due to close at max(first seen + deadline, quorum seen); it is *late* when
    it is still open LATE_SLACK after that while the server answered LATE_POLLS polls meanwhile (so the
    server was running, not starved of CPU by a loaded machine: the rounds' tick closes a due round within
    a tenth of a second of CPU)."""

    def __init__(self, address, session_id):
        super().__init__(daemon=True, name="chaos-monitor")
        import grpc
        from optreg.v1 import session_pb2, session_pb2_grpc
        # Reconnect at once when a restarted server is back (grpc's own backoff grows to 120 s otherwise).
        self.channel = grpc.insecure_channel(address, options=[("grpc.initial_reconnect_backoff_ms", 100),
                                                               ("grpc.min_reconnect_backoff_ms", 100),
                                                               ("grpc.max_reconnect_backoff_ms", 500)])
        self.stub = session_pb2_grpc.SessionServiceStub(self.channel)
        self.request = session_pb2.GetSessionRequest(session_id=session_id)
        self.stopped = threading.Event()
        self.late: list[dict] = []  # rounds left open past their deadline
        self.most_overdue = float("-inf")  # the largest (seen open - due) of any round, seconds
        self.committed = 0  # the open round last seen: rounds committed so far
        self.closing = threading.Event()  # set while the open round has all but one contribution (about to close)

    def run(self):
        cur = seen = quorum_at = None
        polls_overdue = 0
        flagged = set()
        while not self.stopped.wait(0.05):
            try:
                info = self.stub.GetSession(self.request, timeout=2).session
            except Exception:  # the server is down: its open round starts again when it is back
                cur = None
                continue
            now = time.monotonic()
            committed = [m.worker for m in info.members if m.last_round == info.open_round]
            self.committed = max(self.committed, info.open_round)
            (self.closing.set if len(committed) >= WORKERS - 1 else self.closing.clear)()
            if info.open_round != cur:
                cur, seen, quorum_at, polls_overdue = info.open_round, None, None, 0
            if committed and seen is None:
                seen = now
            if len(committed) >= MIN_WORKERS and quorum_at is None:
                quorum_at = now
            if seen is not None and quorum_at is not None:
                overdue = now - max(seen + ROUND_DEADLINE, quorum_at)
                polls_overdue += overdue > 0
                self.most_overdue = max(self.most_overdue, overdue)
                if overdue > LATE_SLACK and polls_overdue >= LATE_POLLS and cur not in flagged:
                    flagged.add(cur)
                    self.late.append({"round": cur, "overdue": round(overdue, 2), "committed": committed,
                                      "members": [m.worker for m in info.members]})

    def stop(self):
        self.stopped.set()
        self.join(10)
        self.channel.close()


# -- the run ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    folder: pathlib.Path
    session_id: str
    p0: dict
    final_step: int
    final_params: dict
    final_state: dict
    worker_kills: int
    server_kills: int
    late: list
    most_overdue: float
    seconds: float
    worker_exits: dict


def run(folder, seconds: float, worker_kill_every=(1.0, 3.0), server_kill_every=(6.0, 12.0), seed=None,
        min_kills=(0, 0), min_rounds=0, most_seconds=600.0, say=lambda *a: None) -> Run:
    """Train under chaos for `seconds` (and on, up to `most_seconds`, until `min_kills` (workers, server)
    and `min_rounds` committed rounds happened: a loaded machine is slow, and a run must still test
    something), then stop the workers, kill -9 the server once more, restart it, and read the final
    state. Kill intervals are uniform in the ranges given (seconds); only running workers are killed."""
    from optreg.client import Client, RetryPolicy

    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    from optreg.app.demo.data import load_digits_dataset
    ds = load_digits_dataset()
    np.savez(folder / "data.npz", x=ds.x_train, t=ds.t_train)
    rng = random.Random(seed)
    server = Server(free_port(), folder / "data", folder / "server.stderr")
    server.start()
    net = network()
    p0 = {k: v.copy() for k, v in net.params.items()}
    client = Client(server.address, timeout=30, retry=RetryPolicy(total_seconds=60))
    s = client.create_session(OPTIMIZER, net.params, session_id="chaos", workers=WORKERS, mode="sync",
                              min_workers=MIN_WORKERS, round_deadline=ROUND_DEADLINE, lease=LEASE,
                              durability="log", **HP)
    procs: dict[str, subprocess.Popen] = {}

    spawned_at: dict[str, int] = {}  # a worker's journal size when it was started

    def journal_size(name) -> int:
        try:
            return (folder / f"{name}.jsonl").stat().st_size
        except FileNotFoundError:
            return 0

    def spawn(name):
        spawned_at[name] = journal_size(name)
        with open(folder / f"{name}.stderr", "a") as err:
            procs[name] = subprocess.Popen([sys.executable, "-m", "bench.chaos", "worker", server.address, s.id,
                                            name, str(folder)], env=env(), cwd=str(ROOT), stderr=err)

    def running(name) -> bool:
        """This incarnation started and sent something (its journal grew by more than its start line): on a
        loaded machine a new worker takes seconds to start, and killing it again then would test nothing."""
        try:
            with open(folder / f"{name}.jsonl", "rb") as f:
                f.seek(spawned_at[name])
                return f.read(4096).count(b"\n") >= 2
        except FileNotFoundError:
            return False

    for k in range(WORKERS):
        spawn(f"w{k}")
    monitor = Monitor(server.address, s.id)
    monitor.start()
    worker_kills = server_kills = 0
    events = Journal(folder / "driver.jsonl")  # what the driver did when, beside the workers' journals
    try:
        start = time.monotonic()
        while not all(running(n) for n in procs) and time.monotonic() < start + most_seconds:
            time.sleep(0.1)  # the chaos starts once every worker contributes (python starts slowly under load)
        events.write(event="workers up", at=time.time())
        start = time.monotonic()
        end, hard_end = start + seconds, start + most_seconds
        next_worker = start + rng.uniform(*worker_kill_every)
        next_server = start + rng.uniform(*server_kill_every)
        while (now := time.monotonic()) < end or (
                now < hard_end and (worker_kills < min_kills[0] or server_kills < min_kills[1]
                                    or monitor.committed < min_rounds)):
            for name, p in procs.items():  # a worker must only ever end by our SIGKILL
                if p.poll() is not None:
                    raise RuntimeError(f"worker {name} exited with {p.returncode}: "
                                       f"{(folder / f'{name}.stderr').read_text()[-3000:]}")
            up = [n for n in sorted(procs) if running(n)]
            if now >= next_worker and len(up) >= WORKERS - 1:  # at most two down at once
                name = rng.choice(up)
                procs[name].send_signal(signal.SIGKILL)
                procs[name].wait()
                worker_kills += 1
                events.write(event="killed worker", worker=name, at=time.time())
                spawn(name)  # rejoins under its name
                next_worker = now + rng.uniform(*worker_kill_every)
            if now >= next_server:
                # Mostly just as a round is about to close: its record may be logged and its replies lost, so
                # the workers' retries must be answered from the log (replayed), not applied again.
                monitor.closing.wait(2.0)
                server.kill()
                server_kills += 1
                events.write(event="killed server", at=time.time())
                say(f"chaos: server killed near round {monitor.committed}")
                server.start()
                events.write(event="server up", at=time.time())
                next_server = time.monotonic() + rng.uniform(*server_kill_every)
            time.sleep(0.02)
        events.write(event="stop", at=time.time())
        (folder / "stop").touch()  # each worker finishes the round it is in, leaves and exits
        exits = {}
        for name, p in procs.items():
            try:
                exits[name] = p.wait(120)
            except subprocess.TimeoutExpired:
                p.kill()
                exits[name] = "hung"
        monitor.stop()
        server.kill()  # the final state must survive a crash too
        server.start()
        state = client.session(s.id).read_state()
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
        monitor.stopped.set()
        events.close()
        client.close()
        server.stop()
    return Run(folder, s.id, p0, state.info.step, state.parameters, state.state, worker_kills, server_kills,
               monitor.late, monitor.most_overdue, time.monotonic() - start, exits)


# -- the checks ------------------------------------------------------------------------------------
def read_journals(folder) -> tuple[list[dict], int]:
    """Every record of every worker (with its name), and the count of torn lines (a SIGKILL mid-write)."""
    records, torn = [], 0
    for path in sorted(pathlib.Path(folder).glob("w*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                torn += 1
                continue
            rec["worker"] = path.stem
            records.append(rec)
    return records, torn


def combine(grads: list[dict]) -> dict:
    """The server's mean (rounds.combine): summed in worker-name order in the master dtype, then divided."""
    out = {}
    for name in grads[0]:
        acc = grads[0][name].copy()
        for g in grads[1:]:
            acc += g[name]
        if len(grads) > 1:
            acc /= np.float64(len(grads))
        out[name] = acc
    return out


def aborted_by_server_kills(folder, acks, sends) -> int:
    """Rounds a server kill aborted: at each kill, the round then open (the one after the last round
    answered before it) counts when some worker had sent it a contribution before the kill. Its
    contributions were not acknowledged; the workers sent them again to the restarted server."""
    kills = [json.loads(line)["at"] for line in (pathlib.Path(folder) / "driver.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "killed server"]
    n = 0
    for at in kills:
        open_round = 1 + max((a["round"] for a in acks if a["at"] < at), default=-1)
        n += any(x["round"] == open_round and x["at"] < at for x in sends)
    return n


@dataclasses.dataclass
class Report:
    acks: int
    lost: list  # acknowledged rounds the final state does not hold
    disagreeing: list  # rounds whose contributors were answered differently (applied twice, or two answers)
    replay_mismatch: list  # rounds where the replayed parameters differ from what was acknowledged
    unknown_rounds: list  # committed rounds nobody was answered for and that could not be reconstructed
    final_equal: bool  # final parameters and Adam state == the replay, bit for bit
    rounds: int
    attempts: int
    fraction: float  # rounds committed / attempts (committed + rounds a server kill aborted)
    contributions_sent: int
    contributions_applied: int
    full_rounds: int  # rounds with all WORKERS contributors
    replayed: int  # answers to a retry of a round already applied (its first answer was lost)
    stale: int  # contributions refused because their round closed without them (or with them, unanswered)
    torn: int
    problems: list  # anything else (worker gradients that differ from the replay's, odd acks)

    def summary(self) -> str:
        return (f"{self.rounds} rounds committed of {self.attempts} attempted ({self.fraction:.1%}); "
                f"{self.contributions_applied} of {self.contributions_sent} contributions applied; "
                f"{self.full_rounds} rounds with all {WORKERS} workers; {self.acks} answers ({self.replayed} "
                f"replayed), {self.stale} contributions refused as stale")


def check(r: Run) -> Report:
    from optreg.plugins.builtins.adam import ADAM
    from optreg.plugins.testing import new_state

    records, torn = read_journals(r.folder)
    acks = [x for x in records if x["event"] == "ack"]
    sends = [x for x in records if x["event"] == "send"]
    problems = []
    by_round: dict[int, list[dict]] = {}
    for a in acks:
        if a["step"] != a["round"] + 1 or a["worker"] not in a["contributors"]:
            problems.append(f"odd acknowledgement: {a}")
        by_round.setdefault(a["round"], []).append(a)
    lost = sorted(rnd for rnd in by_round if rnd >= r.final_step)
    disagreeing = sorted(rnd for rnd, xs in by_round.items()
                         if len({(tuple(x["contributors"]), x["params"]) for x in xs}) > 1)
    sent_by: dict[int, set] = {}
    sent_grad: dict[tuple, set] = {}
    for x in sends:
        sent_by.setdefault(x["round"], set()).add(x["worker"])
        sent_grad.setdefault((x["worker"], x["round"]), set()).add(x["grad"])

    data = np.load(r.folder / "data.npz")
    x, t = data["x"], data["t"]
    params = {k: v.copy() for k, v in r.p0.items()}
    state = {k: new_state(ADAM, v) for k, v in params.items()}
    hp = {"lr": HP["lr"], "beta1": 0.9, "beta2": 0.999}
    replay_mismatch, unknown = [], []
    applied = full = 0

    def apply(params, st, who, rnd):
        """params/st after round rnd with contributors `who` (copies)."""
        work = network()
        work.params = params
        grads = [gradient(work, x, t, w, rnd)[1] for w in sorted(who)]
        g = combine(grads)
        out_p = {k: v.copy() for k, v in params.items()}
        out_s = {k: {s: a.copy() for s, a in v.items()} for k, v in st.items()}
        for k in out_p:
            ADAM.update(out_p[k], g[k], out_s[k], rnd + 1, hp, [np.empty_like(out_p[k]) for _ in range(ADAM.scratch)])
        return out_p, out_s, {w: digest(gr) for w, gr in zip(sorted(who), grads)}

    with one_blas_thread():
        for rnd in range(r.final_step):
            xs = by_round.get(rnd)
            if xs:
                who = xs[0]["contributors"]
                params, state, gd = apply(params, state, who, rnd)
                if digest(params) != xs[0]["params"]:
                    replay_mismatch.append(rnd)
            else:  # nobody was answered: find the contributors among those who sent (checked by the next answer)
                nxt = by_round.get(rnd + 1)
                fits = []
                senders = sorted(sent_by.get(rnd, ()))
                for k in range(1, len(senders) + 1):
                    for who in itertools.combinations(senders, k):
                        p1, s1, gd1 = apply(params, state, who, rnd)
                        if nxt is not None:
                            p2, _, _ = apply(p1, s1, nxt[0]["contributors"], rnd + 1)
                            ok = digest(p2) == nxt[0]["params"]
                        elif rnd + 1 == r.final_step:
                            ok = digest(p1) == digest(r.final_params)
                        else:
                            ok = False
                        if ok:
                            fits.append((who, p1, s1, gd1))
                if len(fits) != 1:
                    unknown.append({"round": rnd, "senders": senders, "fits": [f[0] for f in fits]})
                    break
                who, params, state, gd = fits[0]
            applied += len(who)
            full += len(who) == WORKERS
            for w, d in gd.items():  # what the worker sent is what the replay computes for it
                if d not in sent_grad.get((w, rnd), ()):
                    problems.append(f"round {rnd}: worker {w}'s gradient was not the replay's "
                                    f"(it sent {sorted(sent_grad.get((w, rnd), ()))})")
    final_equal = (not unknown and all(np.array_equal(params[k], r.final_params[k]) for k in params)
                   and all(np.array_equal(state[k][sl], r.final_state[sl][k]) for k in state for sl in state[k]))
    sent = len({(x["worker"], x["round"]) for x in sends if x["round"] < r.final_step})
    attempts = r.final_step + aborted_by_server_kills(r.folder, acks, sends)
    return Report(len(acks), lost, disagreeing, replay_mismatch, unknown, final_equal, r.final_step, attempts,
                  r.final_step / attempts if attempts else 0.0, sent, applied, full, sum(a["replayed"] for a in acks),
                  sum(x["event"] == "mismatch" for x in records), torn, problems)


# -- python -m bench --only chaos ------------------------------------------------------------------
def bench_chaos(cfg, _server, _echo):
    """Rows: the fraction of round attempts that committed, of contributions applied, rounds per second
    under chaos. Raises when a promise broke, so the quick bench in CI fails too."""
    import tempfile
    from bench.run import row

    with tempfile.TemporaryDirectory(prefix="optreg-chaos-") as d:
        if cfg.quick:
            r = run(d, 10.0, worker_kill_every=(1.0, 3.0), server_kill_every=(4.0, 6.0), min_kills=(2, 1),
                    min_rounds=20, most_seconds=180.0)
        else:
            r = run(d, 180.0, worker_kill_every=(2.0, 6.0), server_kill_every=(15.0, 40.0), min_kills=(20, 4),
                    min_rounds=500, most_seconds=900.0)
        rep = check(r)
        kills = f"{r.worker_kills} worker and {r.server_kills} server kills (SIGKILL) in {r.seconds:.0f} s"
        row("chaos: round attempts committed", rep.fraction, "", note=f"{rep.rounds} rounds; {kills}")
        row("chaos: contributions applied", rep.contributions_applied / max(1, rep.contributions_sent), "",
            note=f"{rep.contributions_applied} of {rep.contributions_sent} sent; {rep.full_rounds} rounds with all "
                 f"{WORKERS}; {rep.replayed} answers replayed; {rep.stale} refused as stale")
        row("chaos: rounds per second under chaos", rep.rounds / r.seconds, "rounds/s",
            note=f"most overdue round {r.most_overdue:+.2f} s past its deadline (late: {len(r.late)})")
        broken = {k: v for k, v in (("lost", rep.lost), ("answered differently", rep.disagreeing),
                                    ("replay differs", rep.replay_mismatch), ("not reconstructible",
                                                                              rep.unknown_rounds),
                                    ("late", r.late), ("other", rep.problems)) if v}
        if broken or not rep.final_equal:
            raise AssertionError(f"chaos broke a promise: {broken}, final state equal to the replay: "
                                 f"{rep.final_equal} (journals in {d}, kept: {keep(d)})")


def keep(folder) -> str:
    """A copy of a failed run's journals and server log, for the report (the run's folder is temporary)."""
    import shutil
    dest = pathlib.Path(f"/tmp/optreg-chaos-failed-{int(time.time())}")
    shutil.copytree(folder, dest, ignore=shutil.ignore_patterns("data"))
    return str(dest)


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        worker_main(*sys.argv[2:6])
    else:
        sys.exit("usage: python -m bench.chaos worker ADDRESS SESSION NAME FOLDER (python -m bench --only chaos runs it)")
