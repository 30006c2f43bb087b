"""Training telemetry: what each session's steps leave behind, kept in a bounded ring per session.

Steps call the hub through the store's observer (TelemetryObserver, below; the hub imports no grpc;
rpc/telemetry.py and the dashboard read it):

    hub.on_step(StepEvent(...))                  after every committed step (not after a replayed retry)
    hub.on_refused(session_id, owner, step, reason)   after every refused step (non-finite gradients, ...);
                                                 step: the session's step count then (the last committed one)
    hub.on_delete(session_id)                    when a session is deleted (its telemetry and file go too)
    hub.flush() / hub.close()                    write dirty rings to DIR/telemetry/<id>.telemetry

With a data directory, a ring is in memory only while its session is in use: read from its file on
first use (a step, a reader), and written and dropped once unused for `idle_seconds` (the server's
--idle-seconds), so memory follows the active sessions, not every session that ever stepped. The
list of every session's summary (`sessions`, the dashboard's) keeps a few figures per dropped ring.

A StepEvent carries, per tensor, the four sums the update pass measures (kernels.apply(stats=...)):
sum g^2, sum theta_new^2, sum (theta_new - theta_old)^2 and max |g|, so no second pass over memory;
and a small sample of the optimizer state at fixed indices (sample_indices) from which the optimizer's
declared `effective_lr` gives the per-element step size of adaptive optimizers.

The ring: the last `recent_steps` steps at full resolution; older steps are merged into at most
`coarse_buckets` buckets whose width doubles whenever they fill up, so the whole run stays visible at
bounded memory. A bucket keeps the mean of each sum (so its norms are the root mean square of the
steps' norms), the max of max |g|, the mean of each client scalar and effective-lr quantile, and the
last hyperparameters.
"""
from __future__ import annotations

import collections
import functools
import json
import logging
import math
import os
import pathlib
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

log = logging.getLogger("optreg.server.telemetry.hub")

SUFFIX = ".telemetry"
FORMAT = "optreg-telemetry/1"
# A ring's JSON is inflated at most this far (a zlib bomb of 1 MB would otherwise grow the server by
# gigabytes); a ring of the default options with a thousand parameter names stays below it.
INFLATE_LIMIT = 256 << 20
INFLATE_PIECE = 4 << 20  # bytes inflated (and counted) at a time
PARSE_FACTOR = 4  # the parsed JSON's Python objects, counted as this many times its text
SAMPLE_SIZE = 64  # state elements sampled per tensor for effective-lr quantiles
QUANTILES = (0.05, 0.5, 0.95)
FEW_TENSORS = 4  # up to this many tensors, effective-lr quantiles are computed tensor by tensor
FOLD_SECONDS = 0.05  # the worker folds queued events this often (the dashboard's added latency, at most)
# The alert rules (docs/telemetry.md "Alerts"). Each compares a tensor, or the loss, with its own history:
# a fixed band on the update/param ratio misread healthy runs (a bias starting at zero, a converged run).
PATIENCE = 20  # steps a tensor's gradient must stay exactly zero to be called dead
REFERENCE_STEPS = 10  # a tensor's reference gradient norm: the largest of its first steps
EXPLODE_FACTOR = 10.0  # exploding: the gradient norm above this many times the reference
LOSS_SMOOTHING = 0.1  # weight of a new loss in its moving average
DIVERGE_STEPS = 10  # the smoothed loss must stay up this many steps to be called diverging
# ... and have climbed back this fraction of the way from its lowest to the first loss: RMSProp on the
# digits, converged, has spikes that climb back 0.23 of the way for a dozen steps and recover
DIVERGE_FRACTION = 0.5


@dataclass
class StepEvent:
    session_id: str
    step: int  # the session's step count after this step
    wall_time: float  # time.time() at the commit
    owner: str = ""  # the creating token's hash; "" without tokens
    optimizer: str = ""
    hyperparameters: dict[str, float] = field(default_factory=dict)
    # name -> float64[4]: sum g^2, sum theta_new^2, sum (theta_new - theta_old)^2, max |g|
    tensors: dict[str, np.ndarray] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # the client's scalars (StepRequest.metrics)
    # slot -> tensor -> the state after the step at sample_indices(tensor size); {} if not adaptive
    state_sample: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


@functools.lru_cache(maxsize=4096)
def sample_indices(size: int, k: int = SAMPLE_SIZE) -> np.ndarray:
    """Fixed, evenly spaced flat indices of a tensor of `size` elements (the same every step; cached)."""
    if size <= k:
        return np.arange(size, dtype=np.int64)
    return np.linspace(0, size - 1, k).astype(np.int64)


def visible(session_owner: str, caller: str, auth: bool) -> bool:
    """May `caller` (a token hash) see a session's telemetry? Without tokens everyone may; with
    tokens only the creating token (the rule SessionStore.get applies to the session itself)."""
    return not auth or session_owner == caller


@dataclass
class Record:
    """One step, or one bucket of `steps` consecutive steps ending at `step`."""
    step: int
    steps: int
    wall_time: float
    stats: np.ndarray  # (tensors, 4) float64, aligned with the ring's names
    metrics: dict[str, float]
    hyperparameters: dict[str, float]
    effective_lr: dict[str, list[float]]  # tensor -> quantiles

    def tensor_figures(self, names: Iterable[str]) -> dict[str, dict]:
        """Per tensor: grad_norm, param_norm, update_norm, update_ratio, grad_max_abs, effective_lr."""
        out = {}
        for i, name in enumerate(names):
            g2, p2, u2, gmax = (float(x) for x in self.stats[i])
            p, u = math.sqrt(max(p2, 0.0)), math.sqrt(max(u2, 0.0))
            out[name] = {"grad_norm": math.sqrt(max(g2, 0.0)) if g2 == g2 else g2, "param_norm": p,
                         "update_norm": u, "update_ratio": u / p if p > 0 else 0.0, "grad_max_abs": gmax,
                         "effective_lr": self.effective_lr.get(name, [])}
        return out


def _merge(records: list[Record]) -> Record:
    """One record for consecutive records: step-weighted means of the sums, scalars and quantiles,
    the max of max |g|. Plain loops over small arrays and floats: the stacked numpy version
    (np.stack, tensordot) cost ~300 us a call, and the ring's halving merges 512 pairs at once."""
    if len(records) == 1:
        return records[0]  # records are never changed once stored
    first = records[0]
    if 0 < len(first.stats) <= FEW_TENSORS:
        stats, n = _merge_few(records)
    else:
        n = 0
        sums = None
        top = first.stats[:, 3].copy()
        for r in records:
            n += r.steps
            weighted = r.stats[:, :3] * r.steps
            if sums is None:
                sums = weighted
            else:
                sums += weighted
                np.maximum(top, r.stats[:, 3], out=top)
        stats = np.empty_like(first.stats)
        stats[:, :3] = sums / n
        stats[:, 3] = top

    def mean_of(dicts):
        acc: dict = {}
        for d, r in zip(dicts, records):
            w = r.steps
            for k, v in d.items():
                s, c = acc.get(k, (None, 0))
                if isinstance(v, (list, tuple)):
                    s = [x * w for x in v] if s is None else [a + x * w for a, x in zip(s, v)]
                else:
                    s = v * w if s is None else s + v * w
                acc[k] = (s, c + w)
        return {k: [x / c for x in s] if isinstance(s, list) else float(s / c) for k, (s, c) in acc.items()}

    return Record(step=records[-1].step, steps=n, wall_time=records[-1].wall_time, stats=stats,
                  metrics=mean_of([r.metrics for r in records]),
                  hyperparameters=dict(records[-1].hyperparameters),
                  effective_lr=mean_of([r.effective_lr for r in records]))


def _merge_few(records: list[Record]) -> tuple[np.ndarray, int]:
    """_merge's statistics for records of a few tensors, in Python floats: the same operations in the
    same order as the numpy loop (so the same bits), without its ~5 us of numpy calls a record; the
    ring merges every step that leaves `recent` (long runs: ~40 us a step on the telemetry thread)."""
    rows = [[x[:3] for x in r.stats.tolist()] for r in records]
    tops = [x[3] for x in records[0].stats.tolist()]
    n = 0
    sums = None
    for r, part in zip(records, rows):
        w = r.steps
        n += w
        if sums is None:
            sums = [[v * w for v in row] for row in part]
            continue
        for acc, row in zip(sums, part):
            for j in range(3):
                acc[j] += row[j] * w
        for i, x in enumerate(r.stats[:, 3].tolist()):
            t = tops[i]
            if t == t and (x > t or x != x):  # np.maximum: NaN wins
                tops[i] = x
    return np.array([[a / n, b / n, c / n, t] for (a, b, c), t in zip(sums, tops)], dtype=np.float64), n


@dataclass
class Alert:
    seq: int  # per session, increasing: a watcher sends each alert once
    kind: str  # "refused" | "non_finite" | "diverging" | "exploding_gradients" | "dead_tensor" | "worker_stopped"
    step: int
    wall_time: float
    tensor: str
    message: str

    def as_dict(self) -> dict:
        return {"seq": self.seq, "kind": self.kind, "step": self.step, "wall_time": self.wall_time,
                "tensor": self.tensor, "message": self.message}


class SessionRing:
    """One session's telemetry: recent steps in full, older ones in doubling buckets, and alerts."""

    def __init__(self, session_id: str, owner: str, optimizer: str, recent_steps: int, coarse_buckets: int):
        self.session_id, self.owner, self.optimizer = session_id, owner, optimizer
        self.recent: collections.deque[Record] = collections.deque()
        self.recent_steps = max(1, recent_steps)
        self.coarse: list[Record] = []
        self.coarse_buckets = max(2, coarse_buckets)
        self.stride = 1  # steps per closed bucket
        self.pending: list[Record] = []  # steps out of `recent` not yet making a whole bucket
        self.pending_steps = 0  # the steps `pending` holds
        self.names: list[str] = []
        self.alerts: collections.deque[Alert] = collections.deque(maxlen=256)
        self.alert_seq = 0
        self.refused = 0
        # the alert rules' memory: tensor -> [reference grad norm, steps seen, steps with a zero gradient,
        # exploding now]; and the loss's [first, smoothed, lowest smoothed, steps up] (None before one)
        self.watch: dict[str, list] = {}
        self.loss_watch: list | None = None
        self.hp_source: dict | None = None  # the last step's hyperparameters as given, and as floats
        self.hp: dict[str, float] = {}  # (records share it until they change: never mutated)
        self.version = 0  # bumped on every change; watchers wait for it to move
        self.dirty = False
        self.deleted = False
        self.used = time.monotonic()  # the last step or read (TelemetryHub drops rings unused for long)

    @property
    def last_step(self) -> int:
        return self.recent[-1].step if self.recent else (self.coarse[-1].step if self.coarse else 0)

    @property
    def first_step(self) -> int:
        for part in (self.coarse, self.pending, self.recent):
            if part:
                return part[0].step - part[0].steps + 1
        return 0

    @property
    def full_resolution_from(self) -> int:
        return self.recent[0].step if self.recent else 0

    def append(self, record: Record) -> None:
        self.recent.append(record)
        while len(self.recent) > self.recent_steps:
            self.pending.append(self.recent.popleft())
            # counted as they come: summing `pending` at every step made each append cost its length
            self.pending_steps += self.pending[-1].steps
            if self.pending_steps >= self.stride:
                self.coarse.append(_merge(self.pending))
                self.pending = []
                self.pending_steps = 0
                if len(self.coarse) > self.coarse_buckets:
                    self.coarse = [_merge(self.coarse[i:i + 2]) for i in range(0, len(self.coarse), 2)]
                    self.stride *= 2

    def records(self, after_step: int = 0, to_step: int = 0) -> list[Record]:
        """Records ending after `after_step` (and at or before `to_step` when it is > 0), oldest first."""
        out = []
        for part in (self.coarse, [_merge(self.pending)] if self.pending else [], self.recent):
            for r in part:
                if r.step > after_step and (to_step <= 0 or r.step <= to_step):
                    out.append(r)
        return out

    def alert(self, kind: str, step: int, tensor: str, message: str, wall_time: float | None = None) -> Alert:
        self.alert_seq += 1
        a = Alert(self.alert_seq, kind, step, time.time() if wall_time is None else wall_time, tensor, message)
        self.alerts.append(a)
        return a

    def summary(self) -> dict:
        last = self.recent[-1] if self.recent else None
        return {"session_id": self.session_id, "optimizer": self.optimizer, "step": self.last_step,
                "first_step": self.first_step, "wall_time": last.wall_time if last else 0.0,
                "tensors": list(self.names), "metrics": sorted(last.metrics) if last else [],
                "loss": last.metrics.get("loss") if last else None,
                "alerts": len(self.alerts), "refused": self.refused}

    # persistence: zlib-compressed JSON, rewritten whole (a ring is small: bounded by its options)
    def to_json(self) -> dict:
        def rec(r: Record) -> list:
            return [r.step, r.steps, r.wall_time, r.stats.tolist(), r.metrics, r.hyperparameters, r.effective_lr]
        return {"format": FORMAT, "session_id": self.session_id, "owner": self.owner,
                "optimizer": self.optimizer, "names": self.names, "stride": self.stride,
                "coarse": [rec(r) for r in self.coarse], "pending": [rec(r) for r in self.pending],
                "recent": [rec(r) for r in self.recent], "alerts": [a.as_dict() for a in self.alerts],
                "alert_seq": self.alert_seq, "refused": self.refused, "watch": self.watch,
                "loss_watch": self.loss_watch}

    def restore(self, data: dict) -> None:
        def rec(x) -> Record:
            stats = np.asarray(x[3], dtype=np.float64).reshape(len(self.names), 4)
            return Record(int(x[0]), int(x[1]), float(x[2]), stats, dict(x[4]), dict(x[5]), dict(x[6]))
        self.names = list(data["names"])
        self.stride = int(data["stride"])
        self.coarse = [rec(x) for x in data["coarse"]]
        self.pending = [rec(x) for x in data["pending"]]
        self.pending_steps = sum(r.steps for r in self.pending)
        self.recent.extend(rec(x) for x in data["recent"])
        for a in data["alerts"]:
            self.alerts.append(Alert(a["seq"], a["kind"], a["step"], a["wall_time"], a["tensor"], a["message"]))
        self.alert_seq = int(data["alert_seq"])
        self.refused = int(data["refused"])
        self.watch = {k: list(v) for k, v in data.get("watch", {}).items()}  # absent in older files
        self.loss_watch = data.get("loss_watch")


EffectiveLr = Callable[[dict, dict, int], np.ndarray]


def inflate(data: bytes, reserve=lambda nbytes: None, limit: int = INFLATE_LIMIT) -> bytearray:
    """zlib-decompress `data`, never past `limit` bytes (ValueError); `reserve(n)` is called before each
    piece of at most n bytes is inflated, so a memory budget can refuse it first."""
    d, out, rest = zlib.decompressobj(), bytearray(), data
    while True:
        n = min(INFLATE_PIECE, limit + 1 - len(out))
        reserve(n)
        piece = d.decompress(rest, n) if rest else d.flush(n)
        rest = d.unconsumed_tail
        if len(out) + len(piece) > limit:
            raise ValueError(f"data inflates to more than {limit >> 20} MiB, more than any telemetry ring")
        out += piece
        if d.eof or (not rest and not piece):
            break
    if not d.eof:
        raise ValueError("data is a truncated zlib stream")
    return out  # json.loads takes it as it is: no second copy


class TelemetryHub:
    """Every session's ring, fed by the step pipeline, read by the gRPC servicer and the dashboard.

    Thread-safe. on_step only queues the event; a worker thread folds it into the ring (a few
    microseconds per tensor; no array larger than the state sample is touched). Readers wait on
    `wait()` (threads) or are called back by listeners (on the worker thread: they must only hand off).
    """

    def __init__(self, data_dir: str | os.PathLike | None = None, *, recent_steps: int = 2048,
                 coarse_buckets: int = 1024, patience: int = PATIENCE, effective_lr: Callable[[str], EffectiveLr | None] | None = None,
                 auth: bool = False, effective_lr_every: int = 10, idle_seconds: float = 0.0):
        self.dir = pathlib.Path(data_dir) / "telemetry" if data_dir else None
        self.recent_steps, self.coarse_buckets = recent_steps, coarse_buckets
        self.patience = max(1, patience)
        self.effective_lr = effective_lr or (lambda optimizer: None)
        self.auth = auth
        self.effective_lr_every = max(1, effective_lr_every)
        self._rings: dict[str, SessionRing] = {}  # in memory; the rest only in their files (_get)
        self.idle_seconds = idle_seconds  # a ring unused this long is written and dropped (0: never)
        # session id -> (owner, summary) of rings not in memory: what `sessions` lists for them
        self._summaries: dict[str, tuple[str, dict]] = {}
        self._listed = False  # every file's summary read (the first `sessions` call does it)
        self._waiters: dict[str, int] = {}  # rings `wait` is blocked on: not dropped meanwhile
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()
        self._kick = threading.Event()
        self._worker: threading.Thread | None = None
        self._closed = False
        self._io = threading.Lock()
        self._listeners: list[Callable[[str], None]] = []

    # -- called by the step pipeline -------------------------------------------------------------
    # These only queue the event (about a microsecond on the committing thread); a worker thread
    # folds it into the ring, and every reader folds in whatever is queued first, so a read after
    # a step always sees it.
    def on_step(self, event: StepEvent) -> None:
        self._enqueue(("step", event))

    def on_refused(self, session_id: str, owner: str, step: int, reason: str, optimizer: str = "") -> None:
        self._enqueue(("refused", (session_id, owner, int(step), reason, optimizer)))

    def on_worker_stopped(self, session_id: str, owner: str, step: int, worker: str, message: str,
                          optimizer: str = "") -> None:
        """A shared session's member stopped contributing (rounds.Hub: its lease ran out, or it was a
        straggler of several rounds in a row): the "worker_stopped" alert."""
        self._enqueue(("worker", (session_id, owner, int(step), worker, message, optimizer)))

    def on_delete(self, session_id: str) -> None:
        self._enqueue(("delete", session_id))
        self.drain()  # the file goes now: a session created again with this id starts clean

    def drain(self) -> None:
        """Fold every queued event into the rings; wake waiters and listeners."""
        changed: list[str] = []
        deleted: list[str] = []
        with self._cond:
            while self._queue:
                kind, item = self._queue.popleft()
                try:
                    if kind == "step":
                        self._apply_step(item)
                        changed.append(item.session_id)
                    elif kind == "refused":
                        self._apply_refused(*item)
                        changed.append(item[0])
                    elif kind == "worker":
                        self._apply_worker_stopped(*item)
                        changed.append(item[0])
                    else:
                        ring = self._rings.pop(item, None)
                        self._summaries.pop(item, None)
                        if ring is not None:
                            ring.deleted = True
                            ring.version += 1
                        deleted.append(item)
                        changed.append(item)
                except Exception:  # noqa: BLE001 - a malformed event must not stop telemetry
                    log.exception("telemetry event %s dropped", kind)
            if changed:
                self._cond.notify_all()
        if deleted and self.dir is not None:
            with self._io:
                for session_id in deleted:
                    try:
                        (self.dir / f"{session_id}{SUFFIX}").unlink()
                    except FileNotFoundError:
                        pass
        for session_id in dict.fromkeys(changed):
            self._notify(session_id)

    def _enqueue(self, item) -> None:
        self._queue.append(item)
        if self._worker is None:
            with self._cond:
                if self._worker is None:
                    self._worker = threading.Thread(target=self._work, name="optreg-telemetry", daemon=True)
                    self._worker.start()

    def _work(self) -> None:
        # Folds in batches every FOLD_SECONDS rather than waking per step: a wake-up per step costs
        # the stepping threads a GIL hand-off each; readers fold what is queued themselves anyway.
        while not self._closed:
            self._kick.wait(FOLD_SECONDS)
            if self._queue:
                self.drain()

    def _apply_step(self, event: StepEvent) -> None:
        names = list(event.tensors)
        if len(names) == 1:  # np.array of a list of arrays goes through the sequence protocol: ~3 us
            stats = np.array(event.tensors[names[0]], dtype=np.float64).reshape(1, 4)
        else:
            stats = np.array(list(event.tensors.values()), dtype=np.float64).reshape(len(names), 4)
        ring = self._ring(event.session_id, event.owner, event.optimizer)
        hp = event.hyperparameters
        if hp is not ring.hp_source:  # a session's hyperparameters are replaced, never changed in place:
            ring.hp_source, ring.hp = hp, {k: float(v) for k, v in hp.items()}  # converted once per change
        record = Record(int(event.step), 1, float(event.wall_time), stats,
                        {k: float(v) for k, v in event.metrics.items()} if event.metrics else {},
                        ring.hp, self._effective_lr(event))
        if ring.names != names:
            if ring.recent or ring.coarse or ring.pending:  # tensors changed (a re-created session): start over
                ring = self._ring(event.session_id, event.owner, event.optimizer, fresh=True)
            ring.names = names
        if ring.last_step and record.step <= ring.last_step:
            # a session restored from an older snapshot steps again over steps we hold: keep the newest
            while ring.recent and ring.recent[-1].step >= record.step:
                ring.recent.pop()
        ring.append(record)
        self._check(ring, record)
        ring.version += 1
        ring.dirty = True

    def _apply_refused(self, session_id: str, owner: str, step: int, reason: str, optimizer: str) -> None:
        ring = self._ring(session_id, owner, optimizer)
        ring.refused += 1
        ring.alert("refused", step, "", f"step {step + 1} refused: {reason}")
        ring.version += 1
        ring.dirty = True

    def _apply_worker_stopped(self, session_id: str, owner: str, step: int, worker: str, message: str,
                              optimizer: str) -> None:
        ring = self._ring(session_id, owner, optimizer)
        ring.alert("worker_stopped", step, "", message)
        ring.version += 1
        ring.dirty = True

    def wants_state_sample(self, step: int) -> bool:
        """Whether the step pipeline should sample the state for this step (effective lr is measured
        every `effective_lr_every` steps: it moves slowly, and the sample and the quantiles cost)."""
        return step % self.effective_lr_every == 0 or step == 1

    # -- readers ---------------------------------------------------------------------------------
    def ring(self, session_id: str) -> SessionRing | None:
        self.drain()
        with self._cond:
            return self._get(session_id)

    def sessions(self, caller: str = "") -> list[dict]:
        """Every session's summary, those whose rings are only in their files included."""
        self.drain()
        if not self._listed and self.dir is not None and self.dir.is_dir():
            for path in self.dir.glob(f"*{SUFFIX}"):  # once: then kept up to date as rings come and go
                sid = path.name[:-len(SUFFIX)]
                if sid not in self._rings and sid not in self._summaries:
                    ring = self._read(sid)
                    with self._cond:
                        if ring is not None and sid not in self._rings:
                            self._summaries.setdefault(sid, (ring.owner, ring.summary()))
            self._listed = True
        with self._cond:
            out = [r.summary() for r in self._rings.values() if visible(r.owner, caller, self.auth)]
            out += [dict(summary) for sid, (owner, summary) in self._summaries.items()
                    if sid not in self._rings and visible(owner, caller, self.auth)]
            return out

    def snapshot(self, session_id: str, after_step: int = 0, after_alert: int = 0, to_step: int = 0):
        """(records after after_step, alerts after seq after_alert, version, ring) under the lock."""
        self.drain()
        with self._cond:
            ring = self._get(session_id)
            if ring is None:
                return [], [], -1, None
            alerts = [a for a in ring.alerts if a.seq > after_alert]
            return ring.records(after_step, to_step), alerts, ring.version, ring

    def wait(self, session_id: str, version: int, timeout: float) -> int:
        """Block until the session's version differs from `version` (or timeout); return the version
        now (-1 when the session has no telemetry or was deleted)."""
        deadline = time.monotonic() + timeout
        self.drain()
        with self._cond:
            self._waiters[session_id] = self._waiters.get(session_id, 0) + 1
            try:
                while True:
                    ring = self._get(session_id)
                    now = -1 if ring is None else ring.version
                    if now != version:
                        return now
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return now
                    self._cond.wait(left)
            finally:
                n = self._waiters.pop(session_id) - 1
                if n:
                    self._waiters[session_id] = n

    def add_listener(self, fn: Callable[[str], None]) -> None:
        """fn(session_id) after every change, on the committing thread: it must only hand off."""
        self._listeners.append(fn)

    def remove_listener(self, fn: Callable[[str], None]) -> None:
        try:
            self._listeners.remove(fn)
        except ValueError:
            pass

    # -- persistence -----------------------------------------------------------------------------
    def _read(self, session_id: str) -> SessionRing | None:
        """The ring in DIR/telemetry/<id>.telemetry; None without one, or when it cannot be read (logged:
        telemetry never stops the server; the session's next step starts a new ring)."""
        if (self.dir is None or not session_id or session_id.startswith(".") or "/" in session_id
                or "\\" in session_id or "\0" in session_id):  # (a name the caller gave: no path)
            return None
        path = self.dir / f"{session_id}{SUFFIX}"
        try:
            data = json.loads(inflate(path.read_bytes()))
            if data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {FORMAT}")
            ring = SessionRing(data["session_id"], data["owner"], data["optimizer"],
                               self.recent_steps, self.coarse_buckets)
            ring.restore(data)
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - telemetry must never stop the server
            log.warning("telemetry file %s not loaded: %s", path, e)
            return None
        return ring

    def _get(self, session_id: str) -> SessionRing | None:
        """Caller holds _cond: the session's ring, read from its file if it is not in memory."""
        ring = self._rings.get(session_id)
        if ring is None:
            ring = self._read(session_id)
            if ring is None:
                return None
            self._rings[session_id] = ring
            self._summaries.pop(session_id, None)
        ring.used = time.monotonic()
        return ring

    def drop_idle(self) -> int:
        """Write and drop the rings unused for `idle_seconds` (kept: their summaries); how many went."""
        if self.dir is None or not self.idle_seconds:
            return 0
        cutoff = time.monotonic() - self.idle_seconds
        with self._cond:
            idle = [sid for sid, r in self._rings.items() if r.used < cutoff and sid not in self._waiters]
        dropped = 0
        for sid in idle:
            try:
                self.save(sid)
            except OSError as e:  # kept in memory: tried again at the next round
                log.warning("telemetry of session %s not written: %s", sid, e)
                continue
            with self._cond:
                ring = self._rings.get(sid)
                if ring is not None and not ring.dirty and ring.used < cutoff and sid not in self._waiters:
                    del self._rings[sid]
                    self._summaries[sid] = (ring.owner, ring.summary())
                    dropped += 1
        return dropped

    def export(self, session_id: str) -> bytes | None:
        self.drain()
        with self._cond:
            ring = self._get(session_id)
            return None if ring is None else zlib.compress(json.dumps(ring.to_json()).encode(), 1)

    def import_(self, session_id: str, data: bytes, owner: str | None = None, budget=None) -> SessionRing:
        """Take a ring from export() bytes (an imported session's telemetry), under `session_id` (and
        `owner`'s token, when given: not the exporting server's). With a memory `budget`, the inflated
        text and its parse are counted against it before they exist, and given back once the ring is built."""
        held = [0]

        def reserve(nbytes: int) -> None:
            if budget is not None:
                budget.reserve(nbytes, "an imported telemetry ring")
                held[0] += nbytes
        try:
            text = inflate(data, reserve)
            reserve(PARSE_FACTOR * len(text))
            raw = json.loads(text)
            del text
            if raw.get("format") != FORMAT:
                raise ValueError(f"telemetry format {raw.get('format')!r}, expected {FORMAT}")
            ring = SessionRing(session_id, raw["owner"] if owner is None else owner, raw["optimizer"],
                               self.recent_steps, self.coarse_buckets)
            ring.restore(raw)
        finally:
            if held[0]:
                budget.release(held[0])
        ring.dirty = True
        self.drain()
        with self._cond:
            self._rings[session_id] = ring
            self._summaries.pop(session_id, None)
            ring.version += 1
            self._cond.notify_all()
        self._notify(session_id)
        return ring

    def save(self, session_id: str) -> None:
        """Write one session's ring atomically (temporary file, rename)."""
        if self.dir is None:
            return
        self.drain()
        with self._io:  # a delete's unlink cannot pass between our snapshot and our rename
            with self._cond:
                ring = self._rings.get(session_id)
                if ring is None or not ring.dirty:
                    return
                data = zlib.compress(json.dumps(ring.to_json()).encode(), 1)
                ring.dirty = False
            self.dir.mkdir(parents=True, exist_ok=True)
            path = self.dir / f"{session_id}{SUFFIX}"
            tmp = path.with_name(path.name + ".tmp")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)
            except OSError:
                ring.dirty = True  # the next save writes it again
                tmp.unlink(missing_ok=True)
                raise

    def start(self, save_seconds: float = 5.0) -> None:
        """Write dirty rings every `save_seconds` on a daemon thread (with a data dir)."""
        if self.dir is None or getattr(self, "_saver", None):
            return
        self._stop = threading.Event()

        def run():
            while not self._stop.wait(save_seconds):
                self.flush()
                self.drop_idle()

        self._saver = threading.Thread(target=run, name="optreg-telemetry-save", daemon=True)
        self._saver.start()

    def close(self) -> None:
        """Stop the saver and the worker and write every dirty ring."""
        self._closed = True
        self._kick.set()
        saver = getattr(self, "_saver", None)
        if saver is not None:
            self._stop.set()
            saver.join()
            self._saver = None
        self.flush()

    def flush(self) -> None:
        self.drain()
        for session_id in list(self._rings):
            try:
                self.save(session_id)
            except OSError as e:
                log.warning("telemetry of session %s not written: %s", session_id, e)

    # -- internals -------------------------------------------------------------------------------
    def _ring(self, session_id: str, owner: str, optimizer: str, fresh: bool = False) -> SessionRing:
        """Caller holds _cond: the session's ring (from its file when not in memory; a new one if it has
        none, or `fresh`)."""
        ring = None if fresh else self._get(session_id)
        if ring is None:
            ring = self._rings[session_id] = SessionRing(session_id, owner, optimizer, self.recent_steps,
                                                         self.coarse_buckets)
        if optimizer:
            ring.optimizer = optimizer
        return ring

    def _effective_lr(self, event: StepEvent) -> dict[str, list[float]]:
        """Quantiles of the declared effective lr over each tensor's state sample: one call of the
        optimizer's function over every tensor's sample at once (padded rows), one sort."""
        if not event.state_sample:
            # SGD, Momentum, Nesterov (no effective_lr declared): the multiplier on the gradient, or on
            # the momentum buffer, is the lr itself; measured on the same steps as the adaptive ones
            lr = event.hyperparameters.get("lr")
            if lr is None or not self.wants_state_sample(event.step) or self.effective_lr(event.optimizer):
                return {}
            lr = float(lr)
            return {n: [lr, lr, lr] for n in event.tensors}
        fn = self.effective_lr(event.optimizer)
        if fn is None:
            return {}
        slots = event.state_sample
        first = next(iter(slots.values()))
        names = [n for n in event.tensors if n in first and all(n in arrs for arrs in slots.values())]
        if not names:
            return {}
        if len(names) <= FEW_TENSORS:
            return self._effective_lr_each(fn, event, names)
        sizes = np.fromiter((len(first[n]) for n in names), dtype=np.int64, count=len(names))
        width = int(sizes.max())
        if width == 0:
            return {}
        if (sizes == width).all():  # the usual case: every tensor has at least SAMPLE_SIZE elements
            padded = {slot: np.stack([arrs[n] for n in names]).astype(np.float64, copy=False)
                      for slot, arrs in slots.items()}
        else:
            padded = {}
            for slot, arrs in slots.items():
                block = np.zeros((len(names), width))  # zeros: a valid state value; masked below
                for i, n in enumerate(names):
                    block[i, :sizes[i]] = arrs[n]
                padded[slot] = block
        try:
            with np.errstate(all="ignore"):
                lr = np.array(np.broadcast_to(fn(padded, event.hyperparameters, event.step),
                                              (len(names), width)), dtype=np.float64)
        except Exception as e:  # noqa: BLE001 - a plugin's telemetry never fails a step
            log.debug("effective_lr of %s failed: %s", event.optimizer, e)
            return {}
        lr[np.arange(width)[None, :] >= sizes[:, None]] = np.inf  # padding sorts last, never picked
        lr.sort(axis=1)
        # linear interpolation between order statistics, as np.quantile's default
        pos = np.multiply.outer(sizes - 1, QUANTILES)  # (tensors, quantiles)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, (sizes - 1)[:, None])
        a = np.take_along_axis(lr, lo, axis=1)
        b = np.take_along_axis(lr, hi, axis=1)
        with np.errstate(all="ignore"):
            q = np.where(hi > lo, a + (pos - lo) * (b - a), a)
        return {n: row for n, row, size in zip(names, q.tolist(), sizes.tolist()) if size > 0}

    def _effective_lr_each(self, fn, event: StepEvent, names: list[str]) -> dict[str, list[float]]:
        """_effective_lr for a few tensors: one call per tensor and the quantiles in plain floats (the
        batched version's two dozen numpy calls on tiny arrays cost ~100 us); the same figures."""
        out = {}
        for n in names:
            size = len(next(iter(event.state_sample.values()))[n])
            if not size:
                continue
            try:
                with np.errstate(all="ignore"):
                    lr = np.array(np.broadcast_to(fn({slot: arrs[n] for slot, arrs in event.state_sample.items()},
                                                     event.hyperparameters, event.step), (size,)), dtype=np.float64)
            except Exception as e:  # noqa: BLE001 - a plugin's telemetry never fails a step
                log.debug("effective_lr of %s failed: %s", event.optimizer, e)
                return {}
            lr.sort()
            v = lr.tolist()
            row = []
            for q in QUANTILES:  # linear interpolation between order statistics, as np.quantile's default
                pos = (size - 1) * q
                lo = math.floor(pos)
                hi = min(lo + 1, size - 1)
                a = v[lo]
                row.append(a + (pos - lo) * (v[hi] - a) if hi > lo else a)
            out[n] = row
        return out

    def _check(self, ring: SessionRing, record: Record) -> None:
        """The alert rules, per tensor and on the client's "loss" (plain floats: a step has few tensors,
        numpy's per-call cost dominates). Each fires once per excursion and re-arms when it ends."""
        for i, (g2, p2, u2, _) in enumerate(record.stats.tolist()):
            name = ring.names[i]
            w = ring.watch.get(name)
            if w is None:
                w = ring.watch[name] = [0.0, 0, 0, False]
            if not (math.isfinite(g2) and math.isfinite(p2) and math.isfinite(u2)):
                ring.alert("non_finite", record.step, name,
                           f"{name}: non-finite figures at step {record.step} (grad norm {math.sqrt(abs(g2)):g}, "
                           f"param norm {math.sqrt(abs(p2)):g})", record.wall_time)
                continue
            g = math.sqrt(g2)
            w[2] = w[2] + 1 if g2 == 0.0 else 0
            if w[2] == self.patience:
                ring.alert("dead_tensor", record.step, name,
                           f"{name}: gradient exactly zero for {self.patience} steps (a dead layer: ReLUs that "
                           f"never fire, or a parameter the loss does not reach)", record.wall_time)
            if w[1] < REFERENCE_STEPS or w[0] == 0.0:  # the reference: the largest norm of the first steps
                w[0], w[1] = max(w[0], g), w[1] + 1
                continue
            high = g > EXPLODE_FACTOR * w[0]
            if high and not w[3]:
                ring.alert("exploding_gradients", record.step, name,
                           f"{name}: gradient norm {g:.3g} at step {record.step}, {g / w[0]:.0f}x the largest of its "
                           f"first {REFERENCE_STEPS} steps (exploding gradients: clip them, or lower the lr)",
                           record.wall_time)
            w[3] = high
        loss = record.metrics.get("loss")
        if loss is not None and math.isfinite(loss):
            self._check_loss(ring, record, loss)

    def _check_loss(self, ring: SessionRing, record: Record, loss: float) -> None:
        """"diverging": the smoothed loss doubled from its lowest and climbed back half of the way to where
        it started, and stayed there DIVERGE_STEPS steps. Both, so that neither the noise of a loss near 0
        (0.001 to 0.003 is no divergence) nor that of a loss that never fell raises it."""
        lw = ring.loss_watch
        if lw is None:
            ring.loss_watch = [loss, loss, loss, 0]
            return
        lw[1] += LOSS_SMOOTHING * (loss - lw[1])
        lw[2] = min(lw[2], lw[1])
        first, smooth, low = lw[0], lw[1], lw[2]
        up = smooth - low > max(abs(low), DIVERGE_FRACTION * (first - low), 1e-12)
        lw[3] = lw[3] + 1 if up else 0
        if lw[3] == DIVERGE_STEPS:
            ring.alert("diverging", record.step, "",
                       f"loss diverging: smoothed loss {smooth:.3g} at step {record.step}, up from its lowest "
                       f"{low:.3g} (it started at {first:.3g}): learning rate too high?", record.wall_time)

    def _notify(self, session_id: str) -> None:
        for fn in list(self._listeners):
            try:
                fn(session_id)
            except Exception:  # noqa: BLE001
                log.exception("telemetry listener failed")


def sample_state(state: dict[str, dict[str, np.ndarray]], names) -> dict[str, dict[str, np.ndarray]]:
    """The state at sample_indices of each tensor, in float64 (64 elements a tensor: no pass over memory)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for slot, arrs in state.items():
        out[slot] = {}
        for n in names:
            a = arrs[n]
            out[slot][n] = a.reshape(-1).take(sample_indices(a.size)).astype(np.float64)
    return out


class TelemetryObserver:
    """The store's observer (SessionStore.observers): turns a committed or refused StepRun into hub events.

    Reads from the run: `t` (the step), `hp`, `metrics`, `result.replayed`, `reader` (the committed set,
    held as a reader until run.close(), so its arrays are not reused while we sample them; when the
    run holds none, the live set under the session's lock if it is still this step's), and
    `stats` ({name: float64[4]}: what kernels.apply(stats=...) measured in the update pass; steps/run.py
    fills it, folding chunks with merge_stats). A refusal's reason is the exception in flight when the
    run is closed; a cancelled call (the client went away) is not a refusal.
    """

    def __init__(self, hub: TelemetryHub):
        self.hub = hub

    def on_step(self, session, run, *_) -> None:
        result = getattr(run, "result", None)
        if result is None or result.replayed:
            return
        defn = session.optimizer.definition
        stats = getattr(run, "stats", None) or {}
        sample = {}
        if getattr(defn, "effective_lr", None) is not None and self.hub.wants_state_sample(int(run.t)):
            names = list(stats) or list(session.shapes)
            if run.reader is not None:  # the committed set, held for this run's answer
                sample = sample_state(run.reader.state, names)
            else:  # a small answer was encoded under the lock: read the live set under it too
                with session.lock:
                    if session.step == run.t and session.live is not None:
                        sample = sample_state(session.live.state, names)
        # run.ran (the hyperparameters the update ran with: a schedule's lr) and run.metrics are the run's own and never changed in place (hyperparameters are replaced
        # as a whole): handed over without copies
        self.hub.on_step(StepEvent(session.id, run.t, time.time(), session.owner, defn.name, run.ran, stats,
                                   run.metrics, sample))

    def on_refused(self, session, run, *_) -> None:
        import sys
        error = sys.exc_info()[1]
        if error is None or isinstance(error, GeneratorExit) or type(error).__name__ in ("Cancelled", "RpcError"):
            return
        self.hub.on_refused(session.id, session.owner, int(session.step), str(error) or type(error).__name__,
                            session.optimizer.definition.name)

    def on_worker_stopped(self, session, worker: str, message: str) -> None:
        self.hub.on_worker_stopped(session.id, session.owner, int(session.step), worker, message,
                                   session.optimizer.definition.name)

    def on_delete(self, session, *_) -> None:
        self.hub.on_delete(session.id)
