"""Where a small step's microseconds go (Adam, 1e3 float32, durability none), same run, interleaved.

Each layer is timed alone and against the one below it, round by round:
  echo      gRPC unary echo of raw bytes (no protobuf, trivial handler), another process
  health    the optreg server's cheapest call (grpc.health.v1 Check, an empty request): the
            per-call floor of that server process, before any optreg code runs
  raw Step  the optreg server's Step called with pre-encoded request bytes, the reply kept as
            bytes (no client library): the server's work plus gRPC, minus the client's Python
  client    Session.step(): request building, transport, retry wrapper, reply decoding and
            the copy into the caller's array
  servicer  the servicer's Step in this process, no gRPC at all (parse, Step, serialize); this
            process's CPU, not contended by gRPC's threads as in the live server
"""
from __future__ import annotations

import statistics
import time

import numpy as np

from bench.run import timed


def _median_us(fn, n):
    return statistics.median(timed(fn, n))


def bench_small_parts(cfg, server, echo, row, channel):
    from optreg.client import Client
    from optreg.v1 import session_pb2, tensors

    n, per_round, rounds = 1000, max(100, cfg.small_reps // 3), 5 if cfg.quick else 9
    rng = np.random.default_rng(0)
    g = rng.standard_normal(n).astype(np.float32)
    res = {"echo": [], "health": [], "raw": [], "client": [], "servicer": []}
    with Client(server.address) as c:
        s = c.create_session("adam", {"w": rng.standard_normal(n).astype(np.float32)}, durability="none")
        ch = channel(server.address)
        raw = ch.unary_unary("/optreg.v1.SessionService/Step")  # no serializers: bytes in, bytes out
        health = ch.unary_unary("/grpc.health.v1.Health/Check")  # b"": HealthCheckRequest(service="")
        fence = [0]

        def raw_step():
            fence[0] = s.step_count
            req = session_pb2.StepRequest(session_id=s.id, step=fence[0], gradients=[tensors.from_numpy("w", g)])
            data = req.SerializeToString()
            raw(data)
            s.step_count += 1
        # pre-encoded for the timed call: only the call itself is timed
        def raw_timed():
            req = session_pb2.StepRequest(session_id=s.id, step=s.step_count,
                                          gradients=[tensors.from_numpy("w", g)]).SerializeToString()
            t = time.perf_counter()
            raw(req)
            s.step_count += 1
            return time.perf_counter() - t
        ech = channel(f"127.0.0.1:{echo.grpc_port}")
        eu = ech.unary_unary("/bench.Echo/Unary")
        payload = session_pb2.StepRequest(session_id=s.id, step=0, gradients=[tensors.from_numpy("w", g)]) \
            .SerializeToString()
        for _ in range(100):
            eu(payload)
            health(b"")
            raw_step()
            s.step({"w": g})
        servicer = _InProcess(g)
        for _ in range(rounds):
            res["echo"].append(_median_us(lambda: eu(payload), per_round))
            res["health"].append(_median_us(lambda: health(b""), per_round))
            res["raw"].append(statistics.median(raw_timed() for _ in range(per_round)))
            res["client"].append(_median_us(lambda: s.step({"w": g}), per_round))
            res["servicer"].append(_median_us(servicer.step, per_round))
        servicer.close()
        s.delete()
        ch.close()
        ech.close()
    m = {k: statistics.median(v) for k, v in res.items()}
    row("small step parts: client Session.step", m["client"], "s", "raw Step call (bytes, no client)", m["raw"],
        note="the difference is the client library's Python")
    row("small step parts: raw Step call", m["raw"], "s", "the same server's health check", m["health"],
        note="the difference is Step's own work on the server, protobuf included")
    row("small step parts: the server's health check", m["health"], "s", "gRPC unary echo, raw bytes", m["echo"],
        note="the difference is the server process's per-call floor (gRPC's Python server among its threads)")
    row("small step parts: servicer alone, no gRPC", m["servicer"], "s", "gRPC unary echo, raw bytes", m["echo"],
        note="parse + Step + serialize in the bench's process")


class _InProcess:
    """An optreg server in this process, its servicer's Step called directly (no gRPC in the path)."""

    def __init__(self, g):
        from optreg.server.kernels import jit
        from optreg.server.kernels import warmup
        from optreg.server.assembly import OptregServer, Settings
        from optreg.v1 import session_pb2, tensors
        warmup.warm(block=True)
        self.app = OptregServer(Settings(port=0, data_dir=None))
        self.app.start()
        from optreg.client import Client
        self.client = Client(self.app.address)
        self.s = self.client.create_session("adam", {"w": np.zeros(g.size, np.float32)}, durability="none")
        self.pb, self.g, self.tensors = session_pb2, g, tensors
        self.ctx = _Context()

    def step(self):
        req = self.pb.StepRequest(session_id=self.s.id, step=self.s.step_count,
                                  gradients=[self.tensors.from_numpy("w", self.g)]).SerializeToString()
        reply = self.app.sessions.Step(self.pb.StepRequest.FromString(req), self.ctx)
        if type(reply) is not bytes:  # dense answers come encoded (service._step_reply); gRPC serializes others
            reply = reply.SerializeToString()
        self.s.step_count += 1

    def close(self):
        self.client.close()
        self.app.stop(0)


class _Context:
    """What the servicer's Step asks of a grpc.ServicerContext (no token configured: no metadata)."""

    def is_active(self):
        return True

    def invocation_metadata(self):
        return ()

    def peer(self):
        return "ipv4:127.0.0.1:1"

    def auth_context(self):
        return {}
