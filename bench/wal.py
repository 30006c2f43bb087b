"""The storage library's figures (optreg.server.storage.wal, snapshot, fsync), each beside a baseline
measured in the same run:

- checksums: xxh3-64 (xxhash) vs zlib.crc32 (and crc32c / google-crc32c when installed) on
  40 MB and 4 KB buffers;
- group commit: 16 sessions, a 1e3 float32 step each, every-step mode, for each syncer
  method, against one fdatasync per step done serially (issue 9: >= 4x the steps/s, i.e.
  <= 0.25x the time per step);
- the "os" mode's append cost for 1e3 and 1e7 float32 steps against a plain os.write;
- a 1e7 Adam snapshot (120 MB) written and read against safetensors' own save_file/load_file (no checksums, no fsync).

Run: python bench/wal.py [--quick]   (or `python -m bench --only wal`)
The files go under $OPTREG_BENCH_DIR or the system temp dir: put it on the disk to measure.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import tempfile
import threading
import time
import zlib

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
for d in ("proto", "plugins", "server", "client"):
    if str(ROOT / d) not in sys.path:
        sys.path.insert(0, str(ROOT / d))
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import xxhash  # noqa: E402

from safetensors.numpy import load_file, save_file  # noqa: E402

from optreg.server.storage import snapshot  # noqa: E402
from optreg.server.storage.fsync import METHODS, GroupSyncer  # noqa: E402
from optreg.server.storage.wal import Log  # noqa: E402

SESSIONS = 16


def _best(fn, reps):
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return min(out)


def bench_checksums(row, quick):
    big, small = os.urandom(40 << 20), os.urandom(4096)
    fns = {"xxh3-64 (xxhash)": xxhash.xxh3_64_intdigest, "zlib.crc32": zlib.crc32}
    try:
        import crc32c
        fns["crc32c (crc32c)"] = crc32c.crc32c
    except ImportError:
        pass
    try:
        import google_crc32c
        fns["crc32c (google-crc32c)"] = google_crc32c.value
    except ImportError:
        pass
    n_small = 2000 if quick else 20000
    res = {}
    for name, f in fns.items():
        res[name] = (_best(lambda: f(big), 5),
                     _best(lambda: [f(small) for _ in range(n_small)], 5) / n_small)
    zb, zs = res["zlib.crc32"]
    for name, (b, s) in res.items():
        if name != "zlib.crc32":
            row(f"checksum 40 MB: {name}", b, "s", "zlib.crc32 40 MB", zb)
            row(f"checksum 4 KB: {name}", s, "s", "zlib.crc32 4 KB", zs)


def _payload(n):
    return np.random.default_rng(0).standard_normal(n).astype(np.float32).tobytes()


def _append(lg, step, data, n):
    w = lg.begin(step, step - 1, {"lr": 0.001})
    w.add("w", "float32", (n,), 0, data)
    w.commit()


def _serial_fsync(d, steps, data):
    """Baseline: the 16 sessions' steps one after another, each record fdatasync'd."""
    logs = [Log.open(d / f"serial{i}.wal", f"serial{i}", sync="none") for i in range(SESSIONS)]
    t = time.perf_counter()
    for s in range(1, steps + 1):
        for lg in logs:
            _append(lg, s, data, 1000)
            os.fdatasync(lg._fd)
    el = time.perf_counter() - t
    for lg in logs:
        lg.close()
    return el / (steps * SESSIONS)


def _snapshots_meanwhile(d, stop):
    """A 120 MB snapshot written again and again (it fsyncs itself), as a session's policy would."""
    arrays = {"w": np.ones(30_000_000, np.float32)}
    while not stop.is_set():
        snapshot.write(d / "busy.safetensors", {}, arrays)


def _concurrent(d, steps, data, sync, method, tag, busy=False):
    """16 threads, one session each, stepping as fast as they can in `sync` mode."""
    stop = threading.Event()
    bg = threading.Thread(target=_snapshots_meanwhile, args=(d, stop)) if busy else None
    if bg:
        bg.start()
        time.sleep(0.5)
    syncer = GroupSyncer(method=method)
    logs = [Log.open(d / f"{tag}{i}.wal", f"{tag}{i}", sync=sync, syncer=syncer) for i in range(SESSIONS)]
    go = threading.Barrier(SESSIONS + 1)

    def run(lg):
        go.wait()
        for s in range(1, steps + 1):
            _append(lg, s, data, 1000)

    threads = [threading.Thread(target=run, args=(lg,)) for lg in logs]
    for th in threads:
        th.start()
    go.wait()
    t = time.perf_counter()
    for th in threads:
        th.join()
    el = time.perf_counter() - t
    stop.set()
    if bg:
        bg.join()
    for lg in logs:
        lg.close()
    per_batch = syncer.synced / max(syncer.batches, 1)
    syncer.close()
    return el / (steps * SESSIONS), per_batch


def bench_group_commit(row, quick, d):
    steps = 10 if quick else 100
    data = _payload(1000)
    reps = 2 if quick else 3
    serial, group = [], {m: [] for m in METHODS}
    batch = {}
    for r in range(reps):  # interleaved, so drift hits every variant alike
        (d / f"r{r}").mkdir()
        serial.append(_serial_fsync(d / f"r{r}", steps, data))
        for m in group:
            t, per_batch = _concurrent(d / f"r{r}", steps, data, "fsync", m, f"{m}-")
            group[m].append(t)
            batch[m] = per_batch
    base = statistics.median(serial)
    row("1 step (1e3 f32) serial + fdatasync each", base, "s", note=f"{1 / base:.0f} steps/s")
    single = []
    for r in range(reps):
        syncer = GroupSyncer()
        with Log.open(d / f"r{r}" / "single.wal", "single", sync="fsync", syncer=syncer) as lg:
            t = time.perf_counter()
            for s in range(1, steps * 4 + 1):
                _append(lg, s, data, 1000)
            single.append((time.perf_counter() - t) / (steps * 4))
        syncer.close()
    row("1 session every-step through the syncer", statistics.median(single), "s",
        "serial fdatasync per step", base, note="the hand-off to the syncer thread, alone")
    for m, ts in group.items():  # the target applies to the default method (the first)
        t = statistics.median(ts)
        label = "16 sessions every-step, group commit" + (f" {m}" if m == METHODS[0] else f", {m} (compare)")
        row(label, t, "s", "serial fdatasync per step", base, 0.25 if m == METHODS[0] else None,
            note=f"{1 / t:.0f} steps/s, {1 / base:.0f} serial; {batch[m]:.1f} logs per sync")
    for m in ("threads", "syncfs"):
        t, _ = _concurrent(d / "r0", steps, data, "fsync", m, f"busy-{m}-", busy=True)
        row(f"  same, {m}, 120 MB snapshots written meanwhile", t, "s", "serial fdatasync per step", base,
            note=f"{1 / t:.0f} steps/s")
    t_os, _ = _concurrent(d / "r0", steps, data, "os", "threads", "os-")
    t_none, _ = _concurrent(d / "r0", steps, data, "none", "threads", "none-")
    row("16 sessions os mode (1e3 f32)", t_os, "s", "none mode", t_none, note=f"{1 / t_os:.0f} steps/s")


def bench_append(row, quick, d):
    reps = 3 if quick else 7
    for n, chunk in ((1000, 1000), (10_000_000, 1 << 18)):
        data = _payload(n)
        view = memoryview(data)
        lg = Log.open(d / f"append{n}.wal", f"append{n}", sync="os")
        fd = os.open(d / f"plain{n}", os.O_RDWR | os.O_CREAT, 0o600)

        def log_it():
            s = lg.last_step + 1
            w = lg.begin(s, s - 1, {"lr": 0.001})
            for off in range(0, n, chunk):
                w.add("w", "float32", (n,), off, view[off * 4:(off + chunk) * 4])
            w.commit()

        def plain():
            for off in range(0, n, chunk):
                os.pwrite(fd, view[off * 4:(off + chunk) * 4], off * 4)

        tl, tp = [], []
        for r in range(reps):  # both files start empty each time; alternate which goes first
            lg.reset(lg.last_step)
            os.ftruncate(fd, 0)
            for f, out in ((log_it, tl), (plain, tp))[::1 if r % 2 else -1]:
                t = time.perf_counter()
                f()
                out.append(time.perf_counter() - t)
        plain()
        label = "1e3" if n == 1000 else "1e7"
        row(f"log append {label} f32 step, os mode", min(tl), "s", "os.pwrite of the same bytes", min(tp))
        lg.close()
        buf = bytearray(n * 4)
        tr, tpr = [], []
        for _ in range(reps):
            t = time.perf_counter()
            with Log.open(d / f"append{n}.wal", f"append{n}", sync="none") as again:
                (rec,) = again.records()
            tr.append(time.perf_counter() - t)
            t = time.perf_counter()
            os.preadv(fd, [buf], 0)
            tpr.append(time.perf_counter() - t)
        assert rec.tensors["w"].tobytes() == data
        os.close(fd)
        row(f"log open+check+read {label} f32 record", min(tr), "s", "os.preadv of the same bytes", min(tpr))


def bench_snapshot(row, quick, d):
    n = 10_000_000
    rng = np.random.default_rng(0)
    arrays = {"params/w": rng.standard_normal(n).astype(np.float32),
              "state/m/w": rng.standard_normal(n).astype(np.float32),
              "state/v/w": np.abs(rng.standard_normal(n)).astype(np.float32)}
    meta = {"step": 1, "optimizer": "adam"}
    reps = 2 if quick else 3
    p_new, p_old = d / "new.safetensors", d / "old.safetensors"
    tw = _best(lambda: snapshot.write(p_new, meta, arrays), reps)
    tw_old = _best(lambda: save_file(arrays, str(p_old)), reps)
    row("snapshot write 1e7 adam (120 MB, checked)", tw, "s", "safetensors save_file (unchecked, no fsync)", tw_old)
    tr = _best(lambda: snapshot.read(p_new), reps)
    tr_old = _best(lambda: load_file(str(p_old)), reps)
    row("snapshot read 1e7 adam (120 MB, checked)", tr, "s", "safetensors load_file (unchecked)", tr_old)


def bench_wal(cfg, _server=None, _echo=None, row=None):
    if row is None:
        from bench.run import row
    quick = getattr(cfg, "quick", bool(cfg))
    with tempfile.TemporaryDirectory(prefix="optreg-walbench-", dir=os.environ.get("OPTREG_BENCH_DIR")) as d:
        d = pathlib.Path(d)
        bench_checksums(row, quick)
        bench_group_commit(row, quick, d)
        bench_append(row, quick, d)
        bench_snapshot(row, quick, d)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    from bench.run import row
    print(f"{'figure':<48} {'value':>12}  {'baseline':<34} {'base value':>12}  {'ratio':>7}  target")
    bench_wal(args.quick, row=row)


if __name__ == "__main__":
    main()
