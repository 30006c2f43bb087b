"""A billion-parameter Adam session on one machine, through a resident shared-memory segment.

    python -m bench.billion                 # 1e9 float32 parameters (needs ~16 GB of free memory)
    python -m bench.billion --size 5e8      # half of it
    python -m bench.billion --size 1e7 --steps 3   # a minute's check that the script works

Not part of `python -m bench` (nor --quick, nor CI): it takes most of the machine's memory.

What it does, and what it measures (each phase's time, and the peak memory of both processes
sampled every 0.1 s from /proc/PID/status: RssAnon (private) and RssShmem (the segment, counted
once however many processes map it), and the machine's lowest MemAvailable):
  1. starts `optreg serve` on a data directory with --memory-budget-mb raised to fit (the default
     budget is half the physical memory: 12 GiB here, less than a 1e9 Adam session's 16 GB at
     creation -- its 12 GB of parameters, m and v, plus the 4 GB upload while it is assembled);
  2. create: the initial parameters (4 GB) streamed with CreateSessionStream, durability
     "periodic" with a window that never closes by itself (so steps write nothing to disk); the
     server takes the assembled upload as the master copy (no second copy), m and v are calloc'd
     zeros whose pages are touched at the first step; the creation writes the first snapshot;
  3. resident: enable_shared_memory(resident=True) moves the parameters into the segment (the
     server copies them in and frees its own); the client drops its private copy;
  4. steps: the gradient written once into the segment, then `--steps` Adam steps; steps/s,
     against the in-process kernel at 1e7 measured in this run, scaled per parameter;
  5. snapshot: a hyperparameter change writes one (parameters, m, v: 12 GB, fsync'd);
  6. recovery: the server killed (SIGKILL), the gradient pages of the segment given back (the next
     step's gradient is written again anyway), the server started again on the same directory and
     port; the client registers the same segment again and the server loads the snapshot and
     refills the segment. The parameters are checked against a sample taken before the kill, and
     one more step is taken.
"""
from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import pathlib
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from bench.run import ROOT, _env, row

BYTES_PER_PARAM = 16  # float32 parameters, m, v, and the gradient (or the upload while creating)


def meminfo(field: str = "MemAvailable") -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("RssAnon", "RssShmem", "RssFile", "VmHWM", "VmRSS"):
                    out[k] = int(v.split()[0]) * 1024
    except FileNotFoundError:
        pass
    return out


class Monitor:
    """Peak RssAnon / RssShmem of each process and the lowest MemAvailable, per phase."""

    def __init__(self):
        self.pids: dict[str, int] = {"client": os.getpid()}
        self.segment = ""  # the memfd (/proc/self/fd/N): its allocated blocks are the segment's memory, counted once
        self.phase = "start"
        self.peaks: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.1):
            self.sample()

    def sample(self):
        p = self.peaks.setdefault(self.phase, {})
        anon = 0
        for who, pid in list(self.pids.items()):
            st = status(pid)
            anon += st.get("RssAnon", 0)
            for k in ("RssAnon", "RssShmem"):
                key = f"{who} {k}"
                p[key] = max(p.get(key, 0), st.get(k, 0))
        try:
            shmem = os.stat(self.segment).st_blocks * 512 if self.segment else 0
        except FileNotFoundError:
            shmem = 0
        p["segment"] = max(p.get("segment", 0), shmem)
        # the machine's view: both processes' private pages plus the segment once
        p["both, segment once"] = max(p.get("both, segment once", 0), anon + shmem)
        avail = meminfo()
        p["min MemAvailable"] = min(p.get("min MemAvailable", avail), avail)

    def enter(self, phase: str):
        self.sample()
        self.phase = phase
        self.sample()

    def stop(self):
        self._stop.set()
        self._thread.join()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(data: pathlib.Path, port: int, budget_mb: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "optreg.server", "serve", "--host", "127.0.0.1", "--port",
                             str(port), "--data-dir", str(data), "--memory-budget-mb", str(budget_mb),
                             "--log-level", "warning"], stdout=subprocess.PIPE, text=True, env=_env(),
                            cwd=str(ROOT))
    line = proc.stdout.readline()
    if not line.startswith("optreg serving on "):
        proc.kill()
        raise RuntimeError(f"the server did not start: {line!r}")
    return proc


def kernel_ns_per_param(rounds: int = 7) -> float:
    """The in-process Adam kernel at 1e7 float32 (the bench's shm baseline), ns a parameter."""
    from optreg.plugins.registry import Registry
    from optreg.server.kernels import jit
    from optreg.server.kernels import warmup
    from optreg.server.kernels import apply as kernels
    warmup.warm(block=True)
    n = 10_000_000
    defn, hp = Registry().get("adam").definition, {"lr": 0.001, "beta1": 0.9, "beta2": 0.999}
    p = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
    g = np.full(n, 1e-3, np.float32)
    st = {"m": np.zeros(n, np.float32), "v": np.zeros(n, np.float32)}
    times = []
    for t in range(1, rounds + 2):
        a = time.perf_counter()
        kernels.apply(defn, p, g, st, t, hp)
        times.append(time.perf_counter() - a)
    return statistics.median(times[1:]) / n * 1e9


def fill_random(a: np.ndarray, seed: int, scale: float) -> None:
    """Standard normal values times `scale`, chunk by chunk (no temporary of the array's size)."""
    rng = np.random.default_rng(seed)
    flat = a.reshape(-1)
    step = 1 << 24
    for i in range(0, flat.size, step):
        part = flat[i:i + step]
        rng.standard_normal(out=part, dtype=np.float32)
        part *= scale


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=float, default=1e9, help="parameters (default 1e9)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--data", default=None, help="data directory (default: a temporary one, removed after)")
    ap.add_argument("--force", action="store_true", help="run even if MemAvailable looks too small")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    n = int(args.size)
    need = n * BYTES_PER_PARAM
    avail = meminfo()
    print(f"optreg billion bench: Adam, {n:.3g} float32 parameters; needs ~{need / 2**30:.1f} GiB, "
          f"MemAvailable {avail / 2**30:.1f} GiB", flush=True)
    if avail < need * 1.15 and not args.force:
        print(f"not enough free memory now: try --size {max(1e7, avail / 1.15 / BYTES_PER_PARAM):.2g}", flush=True)
        return 2
    budget_mb = math.ceil(need / 2**20) + 512  # the set (12 B/param) and the upload (4 B/param) while creating
    tmp = None
    if args.data:
        data = pathlib.Path(args.data)
    else:
        tmp = tempfile.mkdtemp(prefix="optreg-billion-", dir=os.environ.get("OPTREG_BENCH_DIR"))
        data = pathlib.Path(tmp)
    per_param = kernel_ns_per_param()
    port = free_port()
    mon = Monitor()
    server = start_server(data, port, budget_mb)
    mon.pids["server"] = server.pid
    figures: dict[str, float] = {}
    from optreg.client import Client
    client = Client(f"127.0.0.1:{port}", timeout=3600)
    try:
        mon.enter("create")
        params = np.empty(n, np.float32)
        fill_random(params, 1, 0.02)
        t = time.perf_counter()
        s = client.create_session("adam", {"w": params}, durability="periodic", periodic_steps=1 << 40,
                                  periodic_seconds=1e9)
        figures["create_s"] = time.perf_counter() - t
        print(f"create (4 B/param streamed, first snapshot written): {figures['create_s']:.1f} s", flush=True)

        mon.enter("resident")
        t = time.perf_counter()
        arrays = s.enable_shared_memory(resident=True)
        figures["resident_s"] = time.perf_counter() - t
        mon.segment = f"/proc/{os.getpid()}/fd/{s._shm.fd}"
        del params  # the client's private copy: the segment holds the parameters now
        print(f"resident registration (parameters into the segment): {figures['resident_s']:.1f} s", flush=True)

        mon.enter("steps")
        grad = s.gradients["w"]
        fill_random(grad, 2, 1e-3)
        grads = {"w": grad}
        times = []
        for _ in range(args.steps):
            t = time.perf_counter()
            s.step(grads)
            times.append(time.perf_counter() - t)
        first, rest = times[0], times[1:] or times
        figures["first_step_s"] = first
        figures["step_s"] = statistics.median(rest)
        print(f"steps: first {first:.2f} s (m and v pages touched), then median {figures['step_s']:.2f} s "
              f"= {1 / figures['step_s']:.2f} steps/s", flush=True)

        mon.enter("snapshot")
        t = time.perf_counter()
        s.set_hyperparameters(lr=0.0005)  # a change outside a step is on disk (a snapshot) before it applies
        figures["snapshot_s"] = time.perf_counter() - t
        snap_bytes = sum(f.stat().st_size for f in (data / "sessions").glob("*.safetensors"))
        print(f"snapshot: {figures['snapshot_s']:.1f} s for {snap_bytes / 1e9:.1f} GB", flush=True)
        probe = np.arange(0, n, 999_983)
        sample = arrays["w"][probe].copy()
        step_before = s.step_count

        mon.enter("recovery")
        server.send_signal(signal.SIGKILL)
        server.wait()
        g_off = s._shm.offsets["w"][1]
        s._shm.mm.madvise(mmap.MADV_REMOVE, g_off - g_off % mmap.PAGESIZE,
                          min(s._shm.size - (g_off - g_off % mmap.PAGESIZE), grad.nbytes + mmap.PAGESIZE))
        arrays["w"][:] = 0  # what a crash could leave: recovery must refill it
        t = time.perf_counter()
        server = start_server(data, port, budget_mb)
        mon.pids["server"] = server.pid
        figures["restart_s"] = time.perf_counter() - t
        again = s.enable_shared_memory(resident=True)  # the same segment: the server loads and refills it
        figures["recovery_s"] = time.perf_counter() - t
        ok = again["w"] is arrays["w"] and np.array_equal(arrays["w"][probe], sample) \
            and s.step_count == step_before
        print(f"recovery: {figures['recovery_s']:.1f} s (server start {figures['restart_s']:.1f} s, then the "
              f"snapshot loaded and the segment refilled); parameters {'as before' if ok else 'DIFFER'}",
              flush=True)
        fill_random(grad, 2, 1e-3)
        t = time.perf_counter()
        s.step(grads)
        figures["step_after_recovery_s"] = time.perf_counter() - t
        mon.enter("end")
        s.delete()
    finally:
        mon.stop()
        client.close()
        if server.poll() is None:
            server.terminate()
            server.wait(120)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    gib = 2**30
    print("\npeak memory per phase (GiB; RssShmem is the segment, mapped by both):")
    for phase, p in mon.peaks.items():
        print(f"  {phase:9s} " + ", ".join(f"{k} {v / gib:.2f}" for k, v in sorted(p.items())))
    row(f"resident step, Adam {n:.0e} f32", figures["step_s"], "s", "in-process kernel at 1e7, per parameter x n",
        per_param * n / 1e9, note=f"{1 / figures['step_s']:.2f} steps/s")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps({"size": n, "figures": figures, "peaks": mon.peaks,
                                                      "kernel_ns_per_param_1e7": per_param,
                                                      "recovered": ok}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
