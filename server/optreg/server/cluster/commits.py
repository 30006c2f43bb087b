"""The commit record of a sharded session (sharded.py): DIR/sessions/<id>/commits, one fixed-width line
per committed step, appended by the front end after every shard has applied the step. Read by the
front end and by the hosts: a shard (`<id>.shard<i>`) is never snapshotted past it, and is adopted
only up to it (fenced.py)."""
from __future__ import annotations

import os
import pathlib

SUFFIX = ".shard"
NAME = "commits"
LINE = 21  # b"%020d\n"


def shard_id(session_id: str, i: int) -> str:
    return f"{session_id}{SUFFIX}{i}"


def start(sessions_dir: pathlib.Path, session_id: str, step: int) -> None:
    (sessions_dir / session_id / NAME).write_bytes(b"%020d\n" % step)


def exists(sessions_dir: pathlib.Path, session_id: str) -> bool:
    return (sessions_dir / session_id / NAME).exists()


def last(sessions_dir: pathlib.Path, session_id: str) -> int:
    """The last committed step (FileNotFoundError: no such sharded session)."""
    with open(sessions_dir / session_id / NAME, "rb") as f:
        f.seek(os.fstat(f.fileno()).st_size - LINE)
        return int(f.read(LINE))


def append(sessions_dir: pathlib.Path, session_id: str, step: int, sync: bool) -> None:
    fd = os.open(sessions_dir / session_id / NAME, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"%020d\n" % step)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def of_shard(sessions_dir: pathlib.Path, shard: str) -> int | None:
    """The last commit record of the sharded session `shard` belongs to; None when it is no shard."""
    parent, sep, index = shard.rpartition(SUFFIX)
    if not sep or not index.isdigit():
        return None
    try:
        return last(sessions_dir, parent)
    except (FileNotFoundError, ValueError):
        return None
