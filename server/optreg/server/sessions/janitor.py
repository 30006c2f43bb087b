"""The janitor: a background thread that runs the store's periodic work (snapshots past their
window, idle sessions unloaded)."""
from __future__ import annotations

import logging
import threading

log = logging.getLogger("optreg.server")


class Janitor:
    def __init__(self, store, period: float = 0.5):
        self.store = store
        self.period = period if not store.idle_seconds else min(period, store.idle_seconds / 4)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="optreg-janitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.store.tick()
            except Exception:
                log.exception("background flush/unload failed")
