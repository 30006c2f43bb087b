"""The data directory's index of sessions (DIR/index): what start-up reads instead of every snapshot's
header, every log, and the listing of DIR/sessions, so a restart costs a read of one file.

A cache, never the truth. Each entry holds what Journal.scan_one would find for a session (its
metadata, the step advanced past its log) and the identity of the files it was read from (inode,
size, modification time of the snapshot and of the log); the index also records the identity of
the DIR/sessions folder itself (inode, modification time), which changes whenever a file in it is
created, removed or renamed (every snapshot write is a rename). Written atomically (temporary file,
fsync, rename, directory fsync) beside that folder, so writing it leaves the folder's time alone,
at a clean stop and after a start that had to read many sessions' files.

At start, while the folder is as recorded, its names are the index's: no listing (otherwise the
folder is listed: a session not in the index, created since, is read from its files, and an entry
whose snapshot is gone is dropped). An entry is used without touching its files; at the session's
first use (store.py `_checked`) a stat of its two files must match the entry, else (a session
stepped after the index was written, then a crash; a file changed while no server ran) it is read
from its files. A missing or damaged index (a checksum covers it) is a full scan.

Sessions shaped and configured alike share one "kind" (optimizer, hyperparameters, dtype, shapes,
durability, owner...): the file holds each kind once, and start-up builds what the kinds share once.
"""
from __future__ import annotations

import json
import os
import pathlib
import zlib

from optreg.server.storage.fsync import fsync_dir

NAME = "index"
FORMAT = b"optreg-index/1"
# The metadata fields sessions of one kind share; the rest are per session (ENTRY).
KIND = ("optimizer", "plugin", "hyperparameters", "master_dtype", "reply", "durability", "periodic_steps",
        "periodic_seconds", "shapes", "slots", "owner", "workers", "schedule")
ENTRY = ("step", "first_step", "created_at", "last_used_at")
RARE = ("round_record", "worker_rounds", "worker_clocks")  # kept per session only when set


def file_key(path: pathlib.Path) -> list:
    """What identifies a file's version ([] when there is no file): a snapshot or log is only ever
    replaced by a rename (a new inode) or appended to or cut (a new size), and either changes its
    modification time."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return []
    return [st.st_ino, st.st_size, st.st_mtime_ns]


def folder_key(folder: pathlib.Path) -> list:
    """What identifies the set of names in `folder`: a create, removal or rename in it changes its
    modification time."""
    st = os.stat(folder)
    return [st.st_ino, st.st_mtime_ns]


def read(directory: pathlib.Path) -> tuple[dict[str, tuple[dict, list]], list | None] | None:
    """({session id: (its metadata, its files' keys)}, the sessions folder's key when the entries are
    every session it held), or None when there is none. ValueError (or another error of a malformed
    file) when it is not one whole index as written."""
    try:
        data = (directory / NAME).read_bytes()
    except FileNotFoundError:
        return None
    head, _, body = data.partition(b"\n")
    parts = head.split(b" ")
    if len(parts) != 3 or parts[0] != FORMAT or parts[2] != str(len(body)).encode() \
            or parts[1] != f"{zlib.crc32(body):08x}".encode():
        raise ValueError(f"{directory / NAME}: not a whole optreg index (torn or damaged)")
    raw = json.loads(body)
    kinds = [dict(zip(KIND, k)) for k in raw["kinds"]]
    out = {}
    for sid, kind, (step, first_step, created_at, last_used_at), rare, keys in raw["entries"]:
        meta = kinds[kind].copy()
        meta["session_id"], meta["kind"] = sid, kind  # (sessions of one kind share what Journal.session_from builds)
        meta["step"], meta["first_step"], meta["created_at"], meta["last_used_at"] = (step, first_step, created_at,
                                                                                      last_used_at)
        if rare:
            meta.update(rare)
        out[sid] = (meta, keys)
    return out, raw.get("folder")


def write(directory: pathlib.Path, metas: list[tuple[dict, list]], folder: list | None) -> None:
    """Write the index of `metas` ((metadata as Journal.meta_of gives it, its files' keys)); `folder`:
    the sessions folder's key (folder_key) when they are every session it holds, else None."""
    kinds: dict[str, int] = {}
    kind_rows, entries = [], []
    for meta, keys in metas:
        kind = [meta.get(k) for k in KIND]
        text = json.dumps(kind, sort_keys=True)
        i = kinds.get(text)
        if i is None:
            i = kinds[text] = len(kind_rows)
            kind_rows.append(kind)
        rare = {k: meta[k] for k in RARE if meta.get(k)}
        entries.append([meta["session_id"], i, [meta[k] for k in ENTRY], rare or 0, keys])
    body = json.dumps({"kinds": kind_rows, "entries": entries, "folder": folder}, separators=(",", ":")).encode()
    path = directory / NAME
    tmp = path.with_name(f".{NAME}.tmp")  # (a crash leaves it: Journal deletes .*.tmp at start)
    with open(tmp, "wb") as f:
        f.write(b"%s %08x %d\n" % (FORMAT, zlib.crc32(body), len(body)))
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(directory)
