"""The file `optreg sessions export` writes and `optreg sessions import` reads.

A checked snapshot file (optreg.server.storage.snapshot: the data directory's own format, read and
written by the same code): a safetensors file whose header also holds an xxh3-64 checksum of
every tensor and of the metadata, so a flipped bit anywhere is refused on import. Tensors
`params/<name>` and `state/<slot>/<name>` in the session's master dtype and their own shapes
(`[]` stays `[]`), and, when the session had any, its telemetry ring as the uint8 tensor
`telemetry/ring` (the blob TelemetryService.ExportTelemetry returns). The metadata holds the
session's configuration and step under the data directory's key names, a shared session's
worker setup under "workers" (membership.WorkerConfig's fields), its learning-rate schedule under
"schedule" ({name, parameters}, or null), and a "tensors" table mapping
each key to (kind, slot, name) so names may hold any character.

Reading is bounded by the file's size (a header or tensor that claims more than the file holds
is refused before it is read) and checks, before anything is sent to a server: the checksums,
every metadata value's type and range (journal.check_meta, as for the data directory), and
every tensor's dtype and shape against the metadata (journal.check_against_meta). Anything
wrong is a ValueError naming the file and what is wrong. It is built from what the client
reads (`Session.read_state`), so any client can write one.
"""
from __future__ import annotations

import dataclasses
import datetime
import pathlib

import numpy as np

from optreg.server.storage import journal

from optreg.server.storage import snapshot

FORMAT = "optreg-session/2"
# client WorkerSetup / create_session argument -> membership.WorkerConfig field, as the metadata spells it
WORKER_FIELDS = {"workers": "workers", "mode": "mode", "min_workers": "min_workers",
                 "round_deadline": "round_deadline", "lease": "lease_seconds", "combine": "combine",
                 "staleness": "staleness", "scale_lr_by_staleness": "scale_lr"}
TELEMETRY = "telemetry/ring"


def write(path, info, parameters: dict[str, np.ndarray], state: dict[str, dict[str, np.ndarray]],
          telemetry: bytes = b"") -> int:
    """Write the file atomically (a crash leaves the old file or the new one, whole); its size.
    `info` is the client's SessionInfo; parameters and state as SessionState holds them."""
    arrays, table = {}, {}
    for name, a in parameters.items():
        arrays[f"params/{name}"], table[f"params/{name}"] = a, ["params", "", name]
    for slot, named in state.items():
        for name, a in named.items():
            arrays[f"state/{slot}/{name}"], table[f"state/{slot}/{name}"] = a, ["state", slot, name]
    if telemetry:
        arrays[TELEMETRY], table[TELEMETRY] = np.frombuffer(telemetry, np.uint8), ["telemetry", "", "ring"]
    created = info.created_at.timestamp() if isinstance(info.created_at, datetime.datetime) else None
    meta = {"format": FORMAT, "session_id": info.session_id, "optimizer": info.optimizer,
            "hyperparameters": dict(info.hyperparameters), "step": int(info.step),
            "master_dtype": info.master_dtype, "reply": info.step_reply, "durability": info.durability,
            "periodic_steps": int(info.periodic_steps), "periodic_seconds": float(info.periodic_seconds),
            "created_at": created, "shapes": {n: list(s) for n, s in info.parameters.items()},
            "slots": list(info.slots), "tensors": table, "workers": None,
            "schedule": {"name": info.schedule, "parameters": dict(info.schedule_parameters)} if info.schedule else None}
    workers = getattr(info, "workers", None)
    if workers is not None:  # a shared session stays shared (its members rejoin; docs/workers.md)
        meta["workers"] = {WORKER_FIELDS[k]: v for k, v in dataclasses.asdict(workers).items()}
    return snapshot.write(pathlib.Path(path), meta, arrays)


def read(path) -> tuple[dict, dict[str, np.ndarray], dict[str, dict[str, np.ndarray]]]:
    """(meta, parameters, state) of an exported file, every check done; ValueError naming the file and
    what is wrong otherwise. meta["telemetry"]: the telemetry blob (b"" when the file has none);
    meta["workers"]: create_session's worker arguments ({} for a single-writer session)."""
    try:
        meta, arrays = snapshot.read(path)
        if meta.get("format") != FORMAT:
            raise snapshot.CorruptFile(path, f"format {str(meta.get('format'))[:40]!r}; this optreg reads "
                                             f"{FORMAT!r} (files of `optreg sessions export`)")
        journal.check_meta(meta, path)
        meta["schedule"] = journal.schedule_meta(meta, path)
        telemetry, kind = arrays.pop(TELEMETRY, None), meta["tensors"].pop(TELEMETRY, ["telemetry"])[0]
        if kind != "telemetry" or (telemetry is not None and (telemetry.dtype != np.uint8 or telemetry.ndim != 1)):
            raise snapshot.CorruptFile(path, f"tensor {TELEMETRY!r} is not a telemetry blob (uint8, 1-D)")
        if set(arrays) != set(meta["tensors"]):
            raise snapshot.CorruptFile(path, "the tensors and the metadata's table differ")
        params, state, delta = journal.check_against_meta(meta, arrays, path)
        if delta:
            raise snapshot.CorruptFile(path, "it holds tensors of kind last_delta, which an export never has")
    except snapshot.CorruptData as e:  # a ValueError for the command: one line, exit 1
        raise ValueError(f"not a usable `optreg sessions export` file: {e}") from None
    meta["telemetry"] = b"" if telemetry is None else telemetry.tobytes()
    inverse = {v: k for k, v in WORKER_FIELDS.items()}
    meta["workers"] = {inverse[k]: v for k, v in (meta["workers"] or {}).items()}
    return meta, params, state
