"""The journal of a session host: the single server's journal (snapshot + write-ahead log, replayed
on load), with every file named by the owner epoch and every write checked against it.

DIR/sessions/<id>/e<n>.safetensors and e<n>.wal are the files written under epoch n. An owner writes
only its own epoch's files, so a stale owner (stopped, partitioned, marked dead while alive) can never
touch the new owner's. Taking a session over (`adopt`): claim epoch n+1, read the latest older epoch's
snapshot and log (their length at that moment is the cutoff: later bytes are never read), write them
as epoch n+1's snapshot, delete the older files. Every log record's commit, every snapshot and every
hyperparameter change first checks the epoch (ownership.holds) and is refused with StaleOwner after a
takeover, before the step is acknowledged; a record the stale owner appended before the check but
after the cutoff is in a file nobody reads again.
"""
from __future__ import annotations

import logging
import os
import pathlib
import time

from optreg.server.cluster.ownership import Claim, Ownership, StaleOwner, shard_commit
from optreg.server.model.errors import DataLoss, NotFound
from optreg.server.storage.journal import NULL_RECORD, SNAPSHOT, Journal
from optreg.server.steps.replay import replay

log = logging.getLogger("optreg.server.cluster")


class _FencedRecord:
    """A step's record whose commit is refused once the epoch has moved on (before the swap)."""

    def __init__(self, inner, journal: "FencedJournal", session_id: str):
        self.inner, self.journal, self.session_id = inner, journal, session_id

    def add(self, name, code, shape, start, data) -> None:
        self.inner.add(name, code, shape, start, data)

    def add_array(self, key, array) -> None:  # a sparse step's rows and values
        self.inner.add_array(key, array)

    def renumber(self, step, hyperparameters) -> None:
        self.inner.renumber(step, hyperparameters)

    def commit(self, arrays=None) -> None:
        self.inner.commit(arrays)  # written (and synced as the mode says) first...
        try:
            self.journal.check(self.session_id)  # ...then: are we still the owner? else not acknowledged
        except StaleOwner:
            self.journal.stale(self.session_id)
            raise

    def abort(self) -> None:
        self.inner.abort()


class FencedJournal(Journal):
    def __init__(self, root, metrics=None, syncer=None):
        # No memory logs: a session's files must all be in the shared storage, for the host that adopts it.
        super().__init__(pathlib.Path(root), metrics, syncer, memory_dir=None)
        self.ownership = Ownership(root)
        self.claims: dict[str, Claim] = {}
        self._reading: dict[str, int] = {}  # session id -> an older epoch whose files are being read
        self.on_stale = lambda session_id: None  # the host drops the session from its store

    # -- paths: the epoch is part of every file name ----------------------------------------------
    def _epoch(self, session_id: str) -> int:
        if session_id in self._reading:
            return self._reading[session_id]
        claim = self.claims.get(session_id)
        if claim is None:
            raise StaleOwner(session_id, 0)
        return claim.epoch

    def snapshot_path(self, session_id: str) -> pathlib.Path:
        return self.dir / session_id / f"e{self._epoch(session_id)}{SNAPSHOT}"

    def log_path(self, session_id: str) -> pathlib.Path:
        return self.dir / session_id / f"e{self._epoch(session_id)}.wal"

    # -- the fence ------------------------------------------------------------------------
    def check(self, session_id: str) -> None:
        claim = self.claims.get(session_id)
        if claim is None or not self.ownership.holds(claim):
            raise StaleOwner(session_id, claim.epoch if claim else 0)

    def stale(self, session_id: str) -> None:
        """Superseded: forget the session here (its files are the new owner's business now)."""
        log.warning("session %s: epoch %s superseded; dropped from this host", session_id,
                    getattr(self.claims.get(session_id), "epoch", "?"), extra={"session_id": session_id})
        self._close_log(session_id)
        self.claims.pop(session_id, None)
        self.on_stale(session_id)

    def epoch_of(self, session_id: str) -> int:
        claim = self.claims.get(session_id)
        return claim.epoch if claim else 0

    # -- writes, fenced ------------------------------------------------------------------------
    def _snapshot(self, s, hyperparameters=None) -> None:
        self.check(s.id)
        if (c := shard_commit(self.dir, s.id)) is not None and s.step > c:
            # A shard past its session's commit record keeps its older snapshot and its log (a compaction,
            # an idle or unloading flush come later): it may yet have to be rolled back to the record.
            return
        super()._snapshot(s, hyperparameters)

    def _try_snapshot(self, s) -> None:
        try:
            super()._try_snapshot(s)
        except StaleOwner:
            self.stale(s.id)

    def tick(self, s) -> None:
        try:
            super().tick(s)
        except StaleOwner:
            self.stale(s.id)

    def begin(self, s, step, fence, hp, metrics, extras=None):
        return _FencedRecord(super().begin(s, step, fence, hp, metrics, extras) if s.id in self.claims
                             else NULL_RECORD, self, s.id)

    def create(self, s) -> None:
        """A new session: the caller holds the claim on epoch 1 (SessionHost.create)."""
        self.check(s.id)
        super().create(s)

    def delete(self, s) -> None:
        claim = self.claims.get(s.id)
        if claim is None:
            raise StaleOwner(s.id, 0)
        self._close_log(s.id)
        self.ownership.remove(claim)  # EpochTaken if someone took it over meanwhile: not ours to delete
        self.claims.pop(s.id, None)

    def release(self, session_id: str) -> None:
        """Let go without writing (the session was flushed, or was never loaded here)."""
        self._close_log(session_id)
        self.claims.pop(session_id, None)

    # -- taking a session over ----------------------------------------------------------------
    def latest_files(self, session_id: str, below: int) -> int:
        """The highest epoch below `below` that has a snapshot; 0 for none."""
        best = 0
        try:
            names = os.listdir(self.dir / session_id)
        except FileNotFoundError:
            return 0
        for name in names:
            if name.startswith("e") and name.endswith(SNAPSHOT) and name[1:-len(SNAPSHOT)].isdigit():
                n = int(name[1:-len(SNAPSHOT)])
                if best < n < below:
                    best = n
        return best

    def adopt(self, claim: Claim, registry, budget, attempts: int = 5, until: int | None = None):
        """Load the session as of the older epoch's files and write them as `claim`'s epoch. `until`: replay
        the log only up to that step (a shard of a sharded session rolled back to the last committed
        step: its records after it are left in the older epoch's log, which is deleted). A shard is
        adopted only up to its session's commit record, always (sharded.py's invariant: a shard past
        the record is rolled back before anything else is done with it)."""
        if until is None:
            until = shard_commit(self.dir, claim.session_id)
        def upto(s, record):
            if until is None or record.step <= until:
                replay(s, record)

        sid = claim.session_id
        source = self.latest_files(sid, claim.epoch)
        if not source:
            raise NotFound(f"session {sid} not found (no snapshot in storage)")
        self._reading[sid] = source
        try:
            for attempt in range(attempts):
                before = self._fingerprint(sid)
                meta = self.scan_one(sid)
                if until is not None:
                    if until < _snapshot_step(meta):
                        raise DataLoss(f"session {sid}: its snapshot is at step {_snapshot_step(meta)}, past "
                                       f"step {until} it must be rolled back to")
                    meta["step"] = min(int(meta["step"]), until)
                s = self.session_from(meta, registry)
                if s.quarantined:
                    raise DataLoss(f"session {sid} is quarantined: {s.quarantined}")
                self.load(s, budget, upto)
                self._close_log(sid)
                if self._fingerprint(sid) == before:
                    break
                # A stale owner that has not yet seen the new epoch wrote meanwhile: read again.
                log.warning("session %s: epoch %d's files changed while read; again", sid, source)
                s.live = None
                time.sleep(0.05 * (attempt + 1))
            else:
                raise DataLoss(f"session {sid}: epoch {source}'s files kept changing while being taken over")
        finally:
            self._reading.pop(sid, None)
        self.claims[sid] = claim
        s.dirty = True
        self._snapshot(s)  # epoch claim.epoch's files: the state at the cutoff (a shard's: at most its record)
        self._drop_older(sid, claim.epoch)
        self.ownership.prune(claim)
        return s

    def _fingerprint(self, sid: str):
        out = []
        for p in (self.snapshot_path(sid), self.log_path(sid)):
            try:
                st = os.stat(p)
                out.append((st.st_ino, st.st_size, st.st_mtime_ns))
            except FileNotFoundError:
                out.append(None)
        return out

    def _drop_older(self, sid: str, epoch: int) -> None:
        for name in os.listdir(self.dir / sid):
            stem = name.split(".")[0]
            if stem.startswith("e") and stem[1:].isdigit() and int(stem[1:]) < epoch:
                (self.dir / sid / name).unlink(missing_ok=True)


def _snapshot_step(meta: dict) -> int:
    """The step of the snapshot itself (scan_one advances "step" past the log)."""
    return int(meta.get("snapshot_step", meta["step"]))
