"""Owner epochs: which host owns a session, kept in storage every node reaches.

DIR/sessions/<id>/epoch.<n> is a small JSON file naming the holder of epoch n. The current epoch is
the highest n present. Taking ownership is a compare-and-swap from the epoch one saw, n, to n+1: the
holder's record is written to a temporary file and hard-linked to `epoch.<n+1>`; link(2) fails with
EEXIST when the name exists, atomically on a local file system and on NFS (the classic lock-file
recipe), and the name never points at a half-written file. Nothing is locked: a stopped or
partitioned owner holds no lock anyone waits for; it is simply superseded, and every write it tries
afterwards checks `holds()` and is refused (fenced.py).

Also here, the commit record of a sharded session (sharded.py): DIR/sessions/<id>/commits, one
fixed-width line per committed step, appended by the front end after every shard applied the step;
read by front ends and hosts (a shard, `<id>.shard<i>`, is never snapshotted past it and is adopted
only up to it: fenced.py).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid
from dataclasses import dataclass

from optreg.server.model.errors import NotFound, Unavailable

PREFIX = "epoch."


class EpochTaken(Unavailable):
    """Someone else took the epoch first: `epoch` and `holder` are the winner's."""

    def __init__(self, session_id: str, epoch: int, holder: dict | None):
        name = (holder or {}).get("host", "?")
        super().__init__(f"session {session_id} is owned by {name} (epoch {epoch}); retry there")
        self.session_id, self.epoch, self.holder = session_id, epoch, holder or {}


class StaleOwner(Unavailable):
    """This process's epoch was superseded: the write was refused, nothing changed."""

    def __init__(self, session_id: str, epoch: int):
        super().__init__(f"session {session_id}: this host's ownership (epoch {epoch}) was taken over; "
                         "nothing was written: retry, the call goes to the new owner")
        self.session_id, self.epoch = session_id, epoch


@dataclass(frozen=True)
class Claim:
    session_id: str
    epoch: int
    inode: int  # of our epoch file: a session deleted and re-created reuses epoch numbers, not files


class Ownership:
    def __init__(self, root):
        self.dir = pathlib.Path(root) / "sessions"
        self.dir.mkdir(parents=True, exist_ok=True)

    def session_dir(self, session_id: str) -> pathlib.Path:
        return self.dir / session_id

    def _epoch_path(self, session_id: str, n: int) -> pathlib.Path:
        return self.dir / session_id / f"{PREFIX}{n}"

    def epochs(self, session_id: str) -> list[int]:
        try:
            names = os.listdir(self.dir / session_id)
        except FileNotFoundError:
            return []
        return sorted(int(x[len(PREFIX):]) for x in names if x.startswith(PREFIX) and x[len(PREFIX):].isdigit())

    def current(self, session_id: str) -> tuple[int, dict | None]:
        """(epoch, its holder's record); (0, None) for a session nobody has claimed."""
        for _ in range(5):  # a deletion may remove the file between listdir and read
            found = self.epochs(session_id)
            if not found:
                return 0, None
            try:
                return found[-1], json.loads(self._epoch_path(session_id, found[-1]).read_text())
            except FileNotFoundError:
                continue
            except ValueError:  # not ours or damaged: still the epoch, holder unknown
                return found[-1], None
        return 0, None

    def claim(self, session_id: str, expected: int, holder: dict) -> Claim:
        """Compare-and-swap: epoch `expected` -> expected + 1, held by `holder`. EpochTaken when another
        holder got there first (or the epoch moved on); NotFound when `expected` > 0 names an epoch that
        no longer exists (the session was deleted)."""
        d = self.dir / session_id
        if expected and not self._epoch_path(session_id, expected).exists():
            epoch, who = self.current(session_id)
            if epoch > expected:
                raise EpochTaken(session_id, epoch, who)
            raise NotFound(f"session {session_id} not found")
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".claim.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(dict(holder, epoch=expected + 1)))
        target = self._epoch_path(session_id, expected + 1)
        try:
            os.link(tmp, target)
        except FileExistsError:
            epoch, who = self.current(session_id)
            raise EpochTaken(session_id, epoch, who) from None
        finally:
            tmp.unlink(missing_ok=True)
        return Claim(session_id, expected + 1, os.stat(target).st_ino)

    def holds(self, claim: Claim) -> bool:
        """Whether `claim` is still the current epoch: two stat calls (on NFS, mount the directory with
        lookupcache=none / actimeo=0 so a new epoch file is seen at once; docs/scale-out.md)."""
        try:
            if os.stat(self._epoch_path(claim.session_id, claim.epoch)).st_ino != claim.inode:
                return False
        except FileNotFoundError:
            return False
        return not self._epoch_path(claim.session_id, claim.epoch + 1).exists()

    def prune(self, claim: Claim, keep: int = 2) -> None:
        """Drop epoch records older than the last `keep` (the history is only for reading)."""
        for n in self.epochs(claim.session_id):
            if n <= claim.epoch - keep:
                self._epoch_path(claim.session_id, n).unlink(missing_ok=True)

    def remove(self, claim: Claim) -> None:
        """Delete the session: fence every holder first (a tombstone epoch), then the directory."""
        self.claim(claim.session_id, claim.epoch, {"deleted": True})
        shutil.rmtree(self.dir / claim.session_id, ignore_errors=True)

    def session_ids(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.dir) if not n.startswith("."))
        except FileNotFoundError:
            return []


# -- the commit record of a sharded session ------------------------------------------------------
SUFFIX = ".shard"
COMMITS = "commits"
COMMIT_LINE = 21  # b"%020d\n"


def shard_id(session_id: str, i: int) -> str:
    return f"{session_id}{SUFFIX}{i}"


def start_commits(sessions_dir: pathlib.Path, session_id: str, step: int) -> None:
    (sessions_dir / session_id / COMMITS).write_bytes(b"%020d\n" % step)


def has_commits(sessions_dir: pathlib.Path, session_id: str) -> bool:
    return (sessions_dir / session_id / COMMITS).exists()


def last_commit(sessions_dir: pathlib.Path, session_id: str) -> int:
    """The last committed step (FileNotFoundError: no such sharded session)."""
    with open(sessions_dir / session_id / COMMITS, "rb") as f:
        f.seek(os.fstat(f.fileno()).st_size - COMMIT_LINE)
        return int(f.read(COMMIT_LINE))


def append_commit(sessions_dir: pathlib.Path, session_id: str, step: int, sync: bool) -> None:
    fd = os.open(sessions_dir / session_id / COMMITS, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"%020d\n" % step)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def shard_commit(sessions_dir: pathlib.Path, shard: str) -> int | None:
    """The last commit record of the sharded session `shard` belongs to; None when it is no shard."""
    parent, sep, index = shard.rpartition(SUFFIX)
    if not sep or not index.isdigit():
        return None
    try:
        return last_commit(sessions_dir, parent)
    except (FileNotFoundError, ValueError):
        return None
