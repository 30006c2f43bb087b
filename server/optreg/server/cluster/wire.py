"""Just enough of the protobuf wire format to route a call: field 1 (every optreg.v1 request's
session_id, and CreateSession's config) read from the raw bytes, without parsing tensors that may
be tens of MB."""
from __future__ import annotations

from optreg.v1.tensors import read_varint, skip_field, varint


def _fields(buf):
    """(field number, wire type, offset of its value) of each top-level field, in order."""
    buf = memoryview(buf)
    i, n = 0, len(buf)
    while i < n:
        key, i = read_varint(buf, i, n)
        yield key >> 3, key & 7, i
        i = skip_field(buf, i, n, key & 7)


def field_bytes(buf, number: int):
    """The raw value of the first length-delimited field `number` at the top level, else None."""
    for field, kind, i in _fields(buf):
        if field == number and kind == 2:
            size, i = read_varint(memoryview(buf), i, len(buf))
            return bytes(buf[i:i + size])
    return None


def session_id(buf) -> str:
    """A request's session_id (field 1), "" when absent or unreadable (the owner answers properly)."""
    try:
        raw = field_bytes(buf, 1)
        return raw.decode() if raw is not None else ""
    except (ValueError, IndexError, UnicodeDecodeError):
        return ""


def create_id(buf) -> str:
    """A create request's config.session_id (config is field 1, its session_id field 5); "" if none."""
    try:
        config = field_bytes(buf, 1)
        raw = field_bytes(config, 5) if config is not None else None
        return raw.decode() if raw is not None else ""
    except (ValueError, IndexError, UnicodeDecodeError):
        return ""


def create_shards(buf) -> int:
    """A create request's config.shards (config is field 1, shards its field 12); 0 if none."""
    try:
        config = field_bytes(buf, 1)
        return field_varint(config, 12) if config is not None else 0
    except (ValueError, IndexError):
        return 0


def with_create_id(buf, session_id: str) -> bytes:
    """The request with config.session_id set: a second occurrence of an embedded message merges into
    the first (protobuf's rule), so appending one is setting the field, without parsing the tensors."""
    sid = session_id.encode()
    inner = b"\x2a" + varint(len(sid)) + sid
    return bytes(buf) + b"\x0a" + varint(len(inner)) + inner


def field_varint(buf, number: int, default: int = 0) -> int:
    """The first top-level varint field `number` (a step, a flag), else `default`."""
    for field, kind, i in _fields(buf):
        if field == number and kind == 0:
            return read_varint(memoryview(buf), i, len(buf))[0]
    return default
