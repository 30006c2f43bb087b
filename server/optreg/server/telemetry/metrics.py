"""Prometheus metrics (prometheus-client), on a registry of the server's own."""
from __future__ import annotations

import bisect
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self._step_counts = _StepCounts()
        r.register(self._step_counts)
        r.register(_Refreshes())
        self._in = Counter("optreg_received_bytes", "Serialized request bytes received", registry=r)
        self._out = Counter("optreg_sent_bytes", "Serialized reply bytes sent", registry=r)
        self._errors = Counter("optreg_errors", "Calls that ended with an error status", ["code", "method"],
                               registry=r)
        self._loaded = Gauge("optreg_sessions_loaded", "Sessions whose tensors are in memory", registry=r)
        self._on_disk = Gauge("optreg_sessions_on_disk", "Sessions with a checkpoint in the data directory",
                              registry=r)
        self._bytes = Gauge("optreg_loaded_bytes", "Bytes of tensors held by loaded sessions (counted against "
                            "--memory-budget-mb)", registry=r)
        self._ckpt = Counter("optreg_checkpoints", "Session snapshots written", registry=r)
        self._log_records = Counter("optreg_log_records", "Steps written to sessions' write-ahead logs", registry=r)
        self._log_bytes = Counter("optreg_log_bytes", "Tensor bytes written to sessions' write-ahead logs",
                                  registry=r)
        self._unsaved_steps = Gauge("optreg_unsaved_steps", "Steps acknowledged but not yet on disk (log durability "
                                    "with a memory log: what a power loss would lose), all sessions", registry=r)
        self._unsaved_seconds = Gauge("optreg_unsaved_seconds", "Age of the oldest step acknowledged but not yet "
                                      "on disk (bounded by --max-exposure-seconds)", registry=r)
        self._ckpt_bytes = Counter("optreg_checkpoint_bytes", "Bytes of session files written", registry=r)
        # Shared sessions (docs/workers.md).
        self._rounds = Counter("optreg_rounds", "Sync rounds closed", registry=r)
        self._round_seconds = Histogram("optreg_round_seconds", "A sync round's time from its first contribution "
                                        "to its close", buckets=LATENCY_BUCKETS, registry=r)
        self._stragglers = Counter("optreg_round_stragglers", "Live members a closing sync round did not wait for",
                                   registry=r)
        self._staleness = Histogram("optreg_contribution_staleness", "Async and SSP contributions' staleness "
                                    "(steps)", buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self._noise = Gauge("optreg_round_noise_scale", "The last sync round's gradient noise scale B_simple, in "
                            "worker batches (McCandlish et al. 2018)", ["session_id"], registry=r)

    def serve(self, port: int, host: str = "127.0.0.1"):
        """Start the /metrics HTTP endpoint in a daemon thread; returns the port bound."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_address[1]

    def step(self, seconds: float, replayed: bool) -> None:
        self._step_counts.add(seconds, replayed)

    def bytes_in(self, n: int) -> None:
        self._in.inc(n)

    def bytes_out(self, n: int) -> None:
        self._out.inc(n)

    def error(self, code: str, method: str) -> None:
        self._errors.labels(code=code, method=method).inc()

    def sessions(self, loaded: int, on_disk: int, nbytes: int) -> None:
        self._loaded.set(loaded)
        self._on_disk.set(on_disk)
        self._bytes.set(nbytes)

    def log_record(self, nbytes: int) -> None:
        self._log_records.inc()
        self._log_bytes.inc(nbytes)

    def round(self, session_id: str, seconds: float, stragglers: int, noise_scale: float) -> None:
        self._rounds.inc()
        self._round_seconds.observe(seconds)
        self._stragglers.inc(stragglers)
        if noise_scale:
            self._noise.labels(session_id=session_id).set(noise_scale)

    def staleness(self, steps: int) -> None:
        self._staleness.observe(steps)

    def exposure(self, steps: int, seconds: float) -> None:
        self._unsaved_steps.set(steps)
        self._unsaved_seconds.set(seconds)

    def checkpoint(self, nbytes: int) -> None:
        self._ckpt.inc()
        self._ckpt_bytes.inc(nbytes)


class _StepCounts:
    """optreg_steps (by replayed) and optreg_step_seconds, in the form Counter and Histogram give them,
    counted under one lock with one bisect a step: every step records here, and the client library's
    Counter and Histogram take a lock and check exemplars for the count, the sum and the bucket each."""

    def __init__(self):
        self._lock = threading.Lock()
        self.applied = self.replayed = 0
        self.total_seconds = 0.0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # non-cumulative; the last is +Inf

    def add(self, seconds: float, replayed: bool) -> None:
        with self._lock:
            if replayed:
                self.replayed += 1
            else:
                self.applied += 1
                self.total_seconds += seconds
                self.buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1  # le: bound >= seconds

    def collect(self):
        with self._lock:
            applied, replayed, total, buckets = self.applied, self.replayed, self.total_seconds, list(self.buckets)
        steps = CounterMetricFamily("optreg_steps", "Steps answered (replayed: a retry answered without applying)",
                                    labels=["replayed"])
        steps.add_metric(["false"], applied)
        steps.add_metric(["true"], replayed)
        latency = HistogramMetricFamily("optreg_step_seconds", "Time to apply a step and make it durable, under the "
                                        "session's lock (excludes decoding and the network)")
        cumulative, running = [], 0
        for bound, n in zip((*map(floatToGoString, LATENCY_BUCKETS), "+Inf"), buckets):
            running += n
            cumulative.append((bound, running))
        latency.add_metric([], cumulative, total)
        return [steps, latency]


class _Refreshes:
    """optreg_refreshes and optreg_refresh_seconds by optimizer: the work of Optimizer.every (a
    preconditioner refreshed every k steps), counted where kernels.apply runs it."""

    def collect(self):
        from optreg.server.kernels.apply import REFRESHES

        count = CounterMetricFamily("optreg_refreshes", "Optimizer.every refreshes run (every k steps, after the "
                                    "update; replayed steps included)", labels=["optimizer"])
        seconds = CounterMetricFamily("optreg_refresh_seconds", "Time spent in Optimizer.every refreshes",
                                      labels=["optimizer"])
        for name, (n, total) in sorted(REFRESHES.snapshot().items()):
            count.add_metric([name], n)
            seconds.add_metric([name], total)
        return [count, seconds]
