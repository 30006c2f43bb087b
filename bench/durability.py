"""What durability costs: steps on a server with a data directory, in each mode, against the same steps
on a memory-only server measured in the same run (interleaved, so drift hits both alike).

    python -m bench --only durability

Rows: the default mode (`log`: each record written to the OS before the reply) and `every-step` (fsync'd
before the reply) at 1e7 and 1e3 Adam float32 parameters, against `--memory-only`; 16 sessions stepping at
once in every-step mode (group commit) against one session's fsync per step.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

import numpy as np


def _interleaved(sessions: dict, grads, reps: int, per: int = 1) -> dict[str, list[float]]:
    """Median-ready times per session: rounds of `per` steps on each session in turn."""
    out = {k: [] for k in sessions}
    for _ in range(reps):
        for k, s in sessions.items():
            t = time.perf_counter()
            for _ in range(per):
                s.step(grads)
            out[k].append((time.perf_counter() - t) / per)
    return out


def bench_durability(cfg, server, _echo):
    from bench.run import Child, _clients, row
    from optreg.client import Client

    with tempfile.TemporaryDirectory(prefix="optreg-bench-") as d:
        disk = Child(["-m", "optreg.server", "serve", "--host", "127.0.0.1", "--port", "0", "--log-level",
                      "warning", "--data-dir", d], "optreg serving on ")
        try:
            rng = np.random.default_rng(3)
            for n, reps, per in ((10_000_000, cfg.large_reps, 1), (1_000, 15 if cfg.quick else 40, 50)):
                w = rng.standard_normal(n).astype(np.float32)
                g = {"w": (rng.standard_normal(n) * 1e-2).astype(np.float32)}
                with Client(server.address) as mem, Client(disk.line[-1]) as dc:
                    sessions = {"none": mem.create_session("adam", {"w": w.copy()}),
                                "log": dc.create_session("adam", {"w": w.copy()}),
                                "every-step": dc.create_session("adam", {"w": w.copy()}, durability="every-step")}
                    assert sessions["log"].info.durability == "log"  # the default with a data directory
                    _interleaved(sessions, g, 2)
                    t = {k: statistics.median(v) for k, v in _interleaved(sessions, g, reps, per).items()}
                    for s in sessions.values():
                        s.delete()
                size = "1e7" if n >= 1e6 else "1e3"
                row(f"default (log) durability step, adam {size}", t["log"], "s", "memory-only server, same step",
                    t["none"], 1.2)
                row(f"every-step durability step, adam {size}", t["every-step"], "s",
                    "memory-only server, same step", t["none"], 1.5 if n >= 1e6 else None)
            one = _clients(disk.line[-1], 1, cfg.conc_seconds, "every-step")
            grouped = _clients(disk.line[-1], cfg.clients, cfg.conc_seconds, "every-step")
        finally:
            disk.stop()
        # The same sessions on a server whose syncer gives each log its own fdatasync in turn.
        serial = Child(["-m", "optreg.server", "serve", "--host", "127.0.0.1", "--port", "0", "--log-level",
                        "warning", "--data-dir", d, "--fsync-method", "fdatasync"], "optreg serving on ")
        try:
            one_each = _clients(serial.line[-1], cfg.clients, cfg.conc_seconds, "every-step")
        finally:
            serial.stop()
        memory = _clients(server.address, cfg.clients, cfg.conc_seconds)
        sync = _fdatasync_seconds(d)
        row(f"every-step, {cfg.clients} sessions at once: time per step", 1 / grouped, "s",
            "one session, an fsync per step", 1 / one, 0.25,
            note=f"{grouped:.0f} vs {one:.0f} steps/s")
        row(f"every-step, {cfg.clients} sessions at once: time per step", 1 / grouped, "s",
            "same, --fsync-method fdatasync", 1 / one_each,
            note=f"{one_each:.0f} steps/s with one fdatasync per log, in turn")
        row(f"every-step, {cfg.clients} sessions at once: time per step", 1 / grouped, "s",
            f"{cfg.clients} memory-only sessions at once", 1 / memory,
            note=f"{memory:.0f} steps/s: what the 2 cores allow without a disk")
        # What the cores allow: one session alternates CPU (client and server) and an fsync; k sessions keep
        # the cores busy and share fsyncs, so they reach at most cores * (cpu + fsync) / cpu one session's
        # rate. 4x needs an fsync at least as long as a step's CPU time on 2 cores.
        row(f"ceiling: {cfg.clients} memory-only sessions at once", 1 / memory, "s",
            "one session, an fsync per step", 1 / one,
            note=f"the best every-step can do on {os.cpu_count()} cores; fdatasync here p50 {sync * 1e3:.2f} ms, "
                 f"a step's CPU ~{os.cpu_count() / memory * 1e3:.2f} ms")


def _fdatasync_seconds(folder: str, n: int = 200) -> float:
    """Median time of an fdatasync after a small append (a small step's log record) in `folder`."""
    path = os.path.join(folder, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    times = []
    try:
        for _ in range(n):
            os.write(fd, b"x" * 4096)
            t = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - t)
    finally:
        os.close(fd)
        os.unlink(path)
    return statistics.median(times)


def bench_resident_durability(cfg, server, _echo):
    """Fast steps: a resident Adam session (parameters in the client's shared memory) stepped 200 times in a
    row on a server with a data directory, default durability (`log`: records to the memory log, the disk
    behind), against the same on the `--memory-only` server, in the same run: blocks of sustained steps on
    each in turn, so the disk writer is busy throughout. Beside it the window of exposure (steps and seconds
    not yet on disk, SessionInfo.unsaved_*), the largest seen after a block. 1e8 in the full run only.

        python -m bench --only resident-durability
    """
    from bench.run import Child, row
    from optreg.client import Client

    sizes = (10_000_000,) if cfg.quick else (10_000_000, 100_000_000)
    steps, block = (50, 25) if cfg.quick else (200, 25)
    with tempfile.TemporaryDirectory(prefix="optreg-bench-") as d:
        # (a budget of 6 GiB: the memory logs count against it, and these machines are shared)
        disk = Child(["-m", "optreg.server", "serve", "--host", "127.0.0.1", "--port", "0", "--log-level",
                      "warning", "--data-dir", d, "--memory-budget-mb", "6144"], "optreg serving on ")
        # The same mode without a memory log: each record to the disk log before the reply (the log before issue 28).
        plain = Child(["-m", "optreg.server", "serve", "--host", "127.0.0.1", "--port", "0", "--log-level",
                       "warning", "--data-dir", d + "/plain", "--memory-log-dir", ""], "optreg serving on ")
        try:
            for n in sizes:
                rng = np.random.default_rng(3)
                w = rng.standard_normal(n).astype(np.float32)
                with Client(server.address) as mem, Client(disk.line[-1]) as dc, Client(plain.line[-1]) as pc:
                    sessions = {"memory-only": mem.create_session("adam", {"w": w}, keep=False),
                                "log": dc.create_session("adam", {"w": w}, keep=False)}
                    if n <= 10_000_000:  # (at 1e8, 400 MB records to the disk a step: minutes; shown at 1e7)
                        sessions["disk log"] = pc.create_session("adam", {"w": w}, keep=False)
                    del w
                    assert sessions["log"].info.durability == "log"
                    grads = {}
                    for k, s in sessions.items():
                        s.enable_shared_memory(resident=True)
                        s.gradients["w"][...] = rng.standard_normal(n).astype(np.float32) * 1e-2
                        grads[k] = {"w": s.gradients["w"]}
                        s.step(grads[k])  # (warm: kernels, pages)
                    total = {k: 0.0 for k in sessions}
                    worst = (0, 0.0)
                    for _ in range(steps // block):
                        for k, s in sessions.items():
                            t = time.perf_counter()
                            for _ in range(block):
                                s.step(grads[k])
                            total[k] += time.perf_counter() - t
                            if k == "log":  # the window at the end of a block of sustained steps
                                info = dc.get_session(s.id)
                                worst = max(worst, (info.unsaved_steps, info.unsaved_seconds), key=lambda x: x[1])
                    t0 = time.monotonic()
                    while dc.get_session(sessions["log"].id).unsaved_steps and time.monotonic() - t0 < 600:
                        time.sleep(0.05)
                    drained = time.monotonic() - t0
                    for s in sessions.values():
                        s.delete()
                per = {k: v / steps for k, v in total.items()}
                row(f"resident step, default (log) durability, adam {n:.0e}", per["log"], "s",
                    "memory-only server, same steps", per["memory-only"], 1.2,
                    note=f"{steps} sustained steps; exposure up to {worst[0]} steps / {worst[1]:.2f} s not on "
                         f"disk; on disk {drained:.1f} s after the last step")
                row(f"  window of exposure, up to {worst[0]} steps", worst[1], "s",
                    note=f"all on disk {drained:.1f} s after the last step")
                if "disk log" in per:
                    row(f"  the same without a memory log, adam {n:.0e}", per["disk log"], "s",
                        "memory-only server, same steps", per["memory-only"],
                        note="--memory-log-dir '': each record to the disk log before the reply")
        finally:
            disk.stop()
            plain.stop()
