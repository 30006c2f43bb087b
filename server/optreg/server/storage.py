"""On-disk format of a session: one safetensors file holding every tensor and, in its
header's `__metadata__`, the session's JSON metadata.

One file (rather than tensors plus a JSON sidecar) makes a checkpoint a single
atomic rename: there is never a moment where the metadata names a step the
tensors do not hold. The same file is what `optreg export` writes and
`optreg import` reads; `safetensors.numpy.load_file` and torch's loader read it.

Tensor keys: `params/<name>`, `state/<slot>/<name>`, `last_delta/<name>`; the
metadata's "tensors" table maps every key to (kind, slot, name), so names may
hold any character.

Writes are atomic: a temporary file in the same directory, fsync, os.replace,
fsync of the directory. A crash at any point leaves the previous file whole.
"""
from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import struct

import numpy as np
from safetensors.numpy import load as st_load, save as st_save

log = logging.getLogger("optreg.server.storage")

FORMAT = "optreg-session/1"
SUFFIX = ".safetensors"
SESSION_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# Test-only: exit the process between writing the temporary file and renaming it,
# on the N-th checkpoint write of this process (see tests/test_durability.py).
CRASH_ENV = "OPTREG_TEST_CRASH_BEFORE_RENAME"


def valid_id(session_id: str) -> bool:
    return bool(SESSION_ID.fullmatch(session_id))


def encode(meta: dict, params: dict[str, np.ndarray], state: dict[str, dict[str, np.ndarray]],
           last_delta: dict[str, np.ndarray] | None = None) -> bytes:
    """One session as safetensors bytes; `meta` is JSON-able."""
    arrays, table = {}, {}
    for name, a in params.items():
        arrays[f"params/{name}"] = a
        table[f"params/{name}"] = ["params", "", name]
    for slot, arrs in state.items():
        for name, a in arrs.items():
            arrays[f"state/{slot}/{name}"] = a
            table[f"state/{slot}/{name}"] = ["state", slot, name]
    for name, a in (last_delta or {}).items():
        arrays[f"last_delta/{name}"] = a
        table[f"last_delta/{name}"] = ["last_delta", "", name]
    meta = dict(meta, format=FORMAT, tensors=table)
    return st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                   metadata={"optreg": json.dumps(meta, sort_keys=True)})


def decode(data: bytes) -> tuple[dict, dict, dict, dict | None]:
    """(meta, params, state, last_delta) from safetensors bytes; ValueError when it is not a session file."""
    meta = read_meta_bytes(data)
    try:
        arrays = st_load(data)
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"not a readable safetensors file: {e}") from None
    params, state, delta = {}, {}, {}
    for key, (kind, slot, name) in meta["tensors"].items():
        if key not in arrays:
            raise ValueError(f"tensor {key!r} named in the metadata is missing")
        a = np.array(arrays[key], copy=True)  # writable, owned
        if kind == "params":
            params[name] = a
        elif kind == "state":
            state.setdefault(slot, {})[name] = a
        else:
            delta[name] = a
    return meta, params, state, (delta or None)


def read_meta_bytes(data: bytes) -> dict:
    if len(data) < 8:
        raise ValueError("file too short to be safetensors")
    (n,) = struct.unpack("<Q", data[:8])
    return _parse_header(data[8:8 + n], n)


def _parse_header(raw: bytes, n: int) -> dict:
    if len(raw) != n:
        raise ValueError("truncated safetensors header")
    try:
        header = json.loads(raw)
        meta = json.loads(header["__metadata__"]["optreg"])
    except (ValueError, KeyError, TypeError):
        raise ValueError("no optreg metadata in the safetensors header (not an optreg session file)") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"unknown format {meta.get('format')!r}; this server reads {FORMAT}")
    return meta


def read_meta(path: pathlib.Path) -> dict:
    """The metadata alone, reading only the header."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError("file too short to be safetensors")
        (n,) = struct.unpack("<Q", head)
        if n > 100 << 20:
            raise ValueError("implausible safetensors header length")
        return _parse_header(f.read(n), n)


def write_atomic(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    _crash_hook()
    os.replace(tmp, path)
    fsync_dir(path.parent)


_writes = 0


def _crash_hook() -> None:
    global _writes
    at = os.environ.get(CRASH_ENV)
    if at:
        _writes += 1
        if _writes >= int(at):
            os.write(2, f"{CRASH_ENV}: exiting before rename (write {_writes})\n".encode())
            os._exit(87)


def fsync_dir(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Storage:
    """A directory of session files: DIR/sessions/<session id>.safetensors."""

    def __init__(self, root: pathlib.Path):
        self.dir = pathlib.Path(root) / "sessions"
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob(f".*{SUFFIX}.tmp"):  # a write interrupted by a crash
            log.warning("removing interrupted checkpoint write %s", stale.name)
            stale.unlink(missing_ok=True)

    def path(self, session_id: str) -> pathlib.Path:
        return self.dir / f"{session_id}{SUFFIX}"

    def ids(self) -> list[str]:
        return sorted(p.name[:-len(SUFFIX)] for p in self.dir.glob(f"*{SUFFIX}") if not p.name.startswith("."))

    def save(self, session_id: str, data: bytes) -> None:
        write_atomic(self.path(session_id), data)

    def load(self, session_id: str):
        return decode(self.path(session_id).read_bytes())

    def meta(self, session_id: str) -> dict:
        return read_meta(self.path(session_id))

    def delete(self, session_id: str) -> None:
        try:
            self.path(session_id).unlink()
        except FileNotFoundError:
            return
        fsync_dir(self.dir)
