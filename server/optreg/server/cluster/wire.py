"""Just enough of the protobuf wire format to route a call: field 1 (every optreg.v1 request's
session_id, and CreateSession's config) read from the raw bytes, without parsing tensors that may
be tens of MB."""
from __future__ import annotations


def _varint(buf, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def field_bytes(buf, number: int):
    """The raw value of the first length-delimited field `number` at the top level, else None."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, kind = key >> 3, key & 7
        if kind == 0:
            _, i = _varint(buf, i)
        elif kind == 1:
            i += 8
        elif kind == 5:
            i += 4
        elif kind == 2:
            size, i = _varint(buf, i)
            if field == number:
                return bytes(buf[i:i + size])
            i += size
        else:
            raise ValueError(f"unsupported wire type {kind}")
    return None


def session_id(buf) -> str:
    """A request's session_id (field 1), "" when absent or unreadable (the owner answers properly)."""
    try:
        raw = field_bytes(buf, 1)
        return raw.decode() if raw is not None else ""
    except (ValueError, IndexError, UnicodeDecodeError):
        return ""


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def create_id(buf) -> str:
    """A create request's config.session_id (config is field 1, its session_id field 5); "" if none."""
    try:
        config = field_bytes(buf, 1)
        raw = field_bytes(config, 5) if config is not None else None
        return raw.decode() if raw is not None else ""
    except (ValueError, IndexError, UnicodeDecodeError):
        return ""


def with_create_id(buf, session_id: str) -> bytes:
    """The request with config.session_id set: a second occurrence of an embedded message merges into
    the first (protobuf's rule), so appending one is setting the field, without parsing the tensors."""
    sid = session_id.encode()
    inner = b"\x2a" + varint(len(sid)) + sid
    return bytes(buf) + b"\x0a" + varint(len(inner)) + inner


def field_varint(buf, number: int, default: int = 0) -> int:
    """The first top-level varint field `number` (a step, a flag), else `default`."""
    i, n = 0, len(buf)
    while i < n:
        key, i = _varint(buf, i)
        field, kind = key >> 3, key & 7
        if kind == 0:
            value, i = _varint(buf, i)
            if field == number:
                return value
        elif kind == 1:
            i += 8
        elif kind == 5:
            i += 4
        elif kind == 2:
            size, i = _varint(buf, i)
            i += size
        else:
            raise ValueError(f"unsupported wire type {kind}")
    return default
