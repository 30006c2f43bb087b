"""Load: 64 concurrent clients over 1,000 sessions, bounded in count (and, loosely, in time):
zero errors, zero lost steps. Loopback only."""
from __future__ import annotations

import threading
import time

import numpy as np

from optreg.client import Client

CLIENTS, SESSIONS, STEPS = 64, 1000, 3


def test_64_clients_over_1000_sessions(start_server, tmp_path):
    s = start_server("--data-dir", str(tmp_path), "--threads", "32", "--default-durability", "periodic",
                     "--periodic-steps", "2")
    errors, acked = [], {}
    lock = threading.Lock()
    barrier = threading.Barrier(CLIENTS)

    def client(k):
        try:
            with Client(s.address, timeout=60) as c:
                mine = [f"load-{i}" for i in range(k, SESSIONS, CLIENTS)]
                sessions = [c.create_session("momentum", {"w": np.zeros(8, dtype=np.float32)}, session_id=sid,
                                             lr=0.1, step_reply="none") for sid in mine]
                barrier.wait()
                g = {"w": np.ones(8, dtype=np.float32)}
                for _ in range(STEPS):
                    for sess in sessions:
                        sess.step(g)
                with lock:
                    acked.update({sess.id: sess.step_count for sess in sessions})
        except Exception as e:  # collected, asserted below
            errors.append(repr(e))
            barrier.abort()

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)  # a bound, not a performance assertion
    elapsed = time.monotonic() - t0
    assert not any(t.is_alive() for t in threads), "clients still running after 300 s"
    assert errors == []
    with Client(s.address) as c:
        infos = {i.session_id: i for i in c.list_sessions()}
        assert len(infos) == SESSIONS
        assert all(infos[sid].step == STEPS == n for sid, n in acked.items())
        assert len(acked) == SESSIONS
        # momentum (book form): v <- 0.9 v - 0.1 g; w <- w + v, for STEPS steps of g = 1
        v = w = 0.0
        for _ in range(STEPS):
            v = 0.9 * v - 0.1
            w += v
        for sid in ("load-0", "load-999", "load-500"):
            np.testing.assert_allclose(c.session(sid).read_parameters()["w"], np.full(8, w), rtol=1e-6)
    print(f"\nload: {CLIENTS} clients, {SESSIONS} sessions, {SESSIONS * STEPS} steps + {SESSIONS} creates "
          f"in {elapsed:.1f} s ({SESSIONS * STEPS / elapsed:.0f} steps/s), 0 errors")
