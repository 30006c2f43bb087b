"""`optreg sessions list|show|delete|export|import`: a server's sessions, or a data directory's.

Against a running server (--address, $OPTREG_ADDRESS) or, with --data-dir and
no server, against the sessions kept in that directory (optreg.app.connect).
"""
from __future__ import annotations

import datetime
import inspect
import json
import pathlib

from optreg.app.commands.optimizers import print_table
from optreg.app.connect import add_client_arguments, connect
from optreg.app.hookspecs import hookimpl

DURABILITIES = ("every-step", "log", "periodic", "none")


@hookimpl
def register_commands(subparsers):
    p = subparsers.add_parser("sessions", help="list, show, delete, export and import sessions",
                              description="A server's sessions (--address), or with --data-dir and no server "
                                          "running, the sessions kept in that directory.")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    ls = sub.add_parser("list", help="one line per session")
    ls.add_argument("--json", action="store_true", help="machine-readable output, every field")
    ls.set_defaults(run=run_list)

    show = sub.add_parser("show", help="one session's configuration, parameters and state")
    show.add_argument("session_id", metavar="ID")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.set_defaults(run=run_show)

    delete = sub.add_parser("delete", help="delete sessions (from memory and disk)")
    delete.add_argument("session_ids", metavar="ID", nargs="+")
    delete.set_defaults(run=run_delete)

    export = sub.add_parser("export", help="write a session to a safetensors file")
    export.add_argument("session_id", metavar="ID")
    export.add_argument("file", metavar="FILE")
    export.set_defaults(run=run_export)

    imp = sub.add_parser("import", help="create a session from a file written by `optreg sessions export`")
    imp.add_argument("file", metavar="FILE")
    imp.add_argument("--session-id", metavar="ID", help="the new session's id (default: the one in the file; "
                                                        "'' lets the server pick one)")
    imp.add_argument("--durability", choices=DURABILITIES, help="default: the file's")
    imp.set_defaults(run=run_import)

    for action in (ls, show, delete, export, imp):
        add_client_arguments(action, offline=True)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def when(t: datetime.datetime | None) -> str:
    """A UTC time as local time to the second; '-' for never."""
    if t is None:
        return "-"
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def as_json(info) -> dict:
    return {"session_id": info.session_id, "optimizer": info.optimizer,
            "hyperparameters": dict(info.hyperparameters), "step": info.step, "master_dtype": info.master_dtype,
            "step_reply": info.step_reply, "parameters": {n: list(s) for n, s in info.parameters.items()},
            "slots": list(info.slots), "durability": info.durability, "periodic_steps": info.periodic_steps,
            "periodic_seconds": info.periodic_seconds, "persisted_step": info.persisted_step,
            "unsaved_steps": info.unsaved_steps, "unsaved_seconds": info.unsaved_seconds,
            "loaded": info.loaded, "size_bytes": info.size_bytes, "state": info.state,
            "quarantined": info.quarantined, "missing_optimizer": info.missing_optimizer,
            "created_at": info.created_at.isoformat() if info.created_at else None,
            "last_used_at": info.last_used_at.isoformat() if info.last_used_at else None}


def run_list(args) -> int:
    with connect(args) as client:
        infos = sorted(client.list_sessions(), key=lambda i: i.session_id)
    if args.json:
        print(json.dumps([as_json(i) for i in infos], indent=2))
        return 0
    if not infos:
        print("no sessions")
        return 0
    print_table([{"ID": i.session_id, "OPTIMIZER": i.optimizer, "STEP": str(i.step), "DURABILITY": i.durability,
                  "SIZE": human_bytes(i.size_bytes), "LAST USED": when(i.last_used_at), "STATE": i.state}
                 for i in infos],
                ["ID", "OPTIMIZER", "STEP", "DURABILITY", "SIZE", "LAST USED", "STATE"])
    return 0


def run_show(args) -> int:
    with connect(args) as client:
        info = client.get_session(args.session_id)
    if args.json:
        print(json.dumps(as_json(info), indent=2))
        return 0
    durability = info.durability
    if durability == "periodic":
        durability += f" (every {info.periodic_steps} steps or {info.periodic_seconds:g} s)"
    on_disk = "-" if info.persisted_step < 0 else f"step {info.persisted_step}"
    if info.durability == "log" and info.loaded:  # (a memory log: what a power loss would lose now)
        on_disk += f" ({info.unsaved_steps} steps, {info.unsaved_seconds:.1f} s not yet on disk)"
    state = info.state + (f": {info.quarantined}" if info.quarantined and not info.missing_optimizer else "")
    for key, value in (("id", info.session_id), ("optimizer", info.optimizer), ("state", state),
                       ("hyperparameters", ", ".join(f"{k}={v:g}" for k, v in info.hyperparameters.items())),
                       ("step", info.step), ("master dtype", info.master_dtype), ("step reply", info.step_reply),
                       ("durability", durability), ("on disk", on_disk),
                       ("in memory", "yes" if info.loaded else "no (loaded on its next use)"),
                       ("size", human_bytes(info.size_bytes)), ("created", when(info.created_at)),
                       ("last used", when(info.last_used_at)), ("slots", ", ".join(info.slots) or "-")):
        print(f"{key + ':':<17}{value}")
    print("parameters:")
    for name, shape in info.parameters.items():
        print(f"  {name}  {list(shape)}")
    return 0


def run_delete(args) -> int:
    with connect(args) as client:
        for session_id in args.session_ids:
            client.delete_session(session_id)
            print(f"deleted session {session_id}")
    return 0


def run_export(args) -> int:
    path = pathlib.Path(args.file)
    if not path.absolute().parent.is_dir():
        raise FileNotFoundError(f"cannot write {path}: no directory {path.absolute().parent}")
    from optreg.app import sessionfile  # the server's snapshot code: only for export and import
    with connect(args) as client:
        info, params, state = client.session(args.session_id).read_state()
        telemetry = _export_telemetry(client, args.session_id)
    sessionfile.write(path, info, params, state, telemetry)
    print(f"exported session {info.session_id} at step {info.step} to {path}"
          + (f" (with its telemetry, {len(telemetry)} bytes)" if telemetry else ""))
    return 0


def run_import(args) -> int:
    from optreg.app import sessionfile
    meta, params, state = sessionfile.read(args.file)
    durability = args.durability or meta.get("durability")
    periodic = durability == "periodic"
    session_id = meta["session_id"] if args.session_id is None else (args.session_id or None)
    from optreg.client.errors import AlreadyExists
    with connect(args) as client:
        try:
            s = _create(client, meta, params, state, session_id, durability, periodic)
        except AlreadyExists as e:
            raise AlreadyExists(f"{e.details}; or import it under another id with --session-id NEW_ID",
                                e.code) from None
        info = s.info
        if meta["telemetry"]:
            client.import_telemetry(info.session_id, meta["telemetry"])
    print(f"imported {args.file} as session {info.session_id} at step {info.step}"
          + (" with its telemetry" if meta["telemetry"] else ""))
    return 0


def _export_telemetry(client, session_id: str) -> bytes:
    """The session's telemetry ring (b"" from a server that keeps none or predates ExportTelemetry)."""
    from optreg.client.errors import Unimplemented
    try:
        return client.export_telemetry(session_id)
    except Unimplemented:
        return b""


def _create(client, meta, params, state, session_id, durability, periodic):
    hp = meta["hyperparameters"]
    clash = sorted(set(hp) & set(inspect.signature(client.create_session).parameters))
    if clash:  # it would land on create_session's own argument of that name
        raise ValueError(f"{clash[0]!r} in the file's hyperparameters is not a hyperparameter name")
    return client.create_session(
        meta["optimizer"], params, session_id=session_id, state=state, initial_step=meta["step"],
        master_dtype=meta["master_dtype"], step_reply=meta["reply"], durability=durability,
        periodic_steps=meta["periodic_steps"] or None if periodic else None,
        periodic_seconds=meta["periodic_seconds"] or None if periodic else None,
        schedule=(meta["schedule"] or {}).get("name"), schedule_parameters=(meta["schedule"] or {}).get("parameters"),
        **meta["workers"], **hp)
