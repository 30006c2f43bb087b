"""The file `optreg sessions export` writes and `optreg sessions import` reads.

One safetensors file: tensors `params/<name>` and `state/<slot>/<name>` (and, when the
session had any, its telemetry ring as the uint8 tensor `telemetry/ring`: the blob
TelemetryService.ExportTelemetry returns, which readers of the format's first files
skip), and in
the header's `__metadata__["optreg"]` a JSON object with the session's
configuration and step, and a "tensors" table mapping each key to
(kind, slot, name) so names may hold any character. This is the layout the
server's session files had when export was added ("optreg-session/1"), so
safetensors' and torch's loaders read it, and it is built here from what the
client reads (`Session.read_state`): it does not change when the server's
storage does.
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import tempfile

import numpy as np
from safetensors.numpy import load as st_load, save as st_save

FORMAT = "optreg-session/1"


def encode(info, parameters: dict[str, np.ndarray], state: dict[str, dict[str, np.ndarray]],
           telemetry: bytes = b"") -> bytes:
    """`info` is the client's SessionInfo; parameters and state as SessionState holds them."""
    arrays, table = {}, {}
    if telemetry:
        arrays["telemetry/ring"] = np.frombuffer(telemetry, np.uint8)
        table["telemetry/ring"] = ["telemetry", "", "ring"]
    for name, a in parameters.items():
        arrays[f"params/{name}"], table[f"params/{name}"] = a, ["params", "", name]
    for slot, named in state.items():
        for name, a in named.items():
            arrays[f"state/{slot}/{name}"], table[f"state/{slot}/{name}"] = a, ["state", slot, name]
    created = info.created_at.timestamp() if isinstance(info.created_at, datetime.datetime) else None
    meta = {"format": FORMAT, "session_id": info.session_id, "optimizer": info.optimizer,
            "hyperparameters": dict(info.hyperparameters), "step": int(info.step),
            "master_dtype": info.master_dtype, "step_reply": info.step_reply, "durability": info.durability,
            "periodic_steps": int(info.periodic_steps), "periodic_seconds": float(info.periodic_seconds),
            "created_at": created, "shapes": {n: list(s) for n, s in info.parameters.items()},
            "slots": list(info.slots), "tensors": table}
    return st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                   metadata={"optreg": json.dumps(meta, sort_keys=True)})


# The server's session files of format 1 spelled the enums as proto names.
_OLD_NAMES = {"STEP_REPLY_PARAMETERS": "parameters", "STEP_REPLY_DELTA": "delta", "STEP_REPLY_NONE": "none",
              "DURABILITY_EVERY_STEP": "every-step", "DURABILITY_PERIODIC": "periodic", "DURABILITY_NONE": "none"}


def decode(data: bytes) -> tuple[dict, dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """(meta, parameters, state) of an exported file; ValueError naming what is wrong otherwise.
    meta["telemetry"]: the telemetry blob (b"" when the file has none)."""
    try:
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        meta = json.loads(header["__metadata__"]["optreg"])
        tensors = st_load(data)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"not a session file written by `optreg sessions export` ({type(e).__name__}: {e})") \
            from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"session file format {meta.get('format')!r}; this optreg reads {FORMAT!r}")
    params, state = {}, {}
    meta["telemetry"] = b""
    for key, (kind, slot, name) in meta["tensors"].items():
        if kind == "params":
            params[name] = tensors[key]
        elif kind == "state":
            state.setdefault(slot, {})[name] = tensors[key]
        elif kind == "telemetry":
            meta["telemetry"] = tensors[key].tobytes()
    for key in ("step_reply", "durability"):
        meta[key] = _OLD_NAMES.get(meta.get(key), meta.get(key))
    return meta, params, state


def write_atomic(path: pathlib.Path, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the new one, whole."""
    path = pathlib.Path(path).absolute()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
