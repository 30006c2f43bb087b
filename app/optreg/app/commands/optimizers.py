"""`optreg optimizers`: the optimizers and learning-rate schedules of this installation, or of a server
(--address)."""
from __future__ import annotations

import dataclasses
import json
import sys
import textwrap

from optreg.app.connect import add_client_arguments, client_for
from optreg.app.hookspecs import hookimpl

WIDTH = 100  # the table fits this many columns; --wide does not wrap


@hookimpl
def register_commands(subparsers):
    p = subparsers.add_parser("optimizers", help="list the installed optimizers and schedules (or a server's, with --address)")
    p.add_argument("--json", action="store_true", help="machine-readable output, every field")
    p.add_argument("--wide", action="store_true", help="every column (summary, slots, plugin), unwrapped")
    add_client_arguments(p)
    p.set_defaults(run=run)


def _local() -> tuple[list[dict], list[dict], list[dict]]:
    from google.protobuf import json_format

    from optreg.plugins.registry import Registry
    from optreg.server.rpc.service import list_optimizers
    listing = json_format.MessageToDict(list_optimizers(Registry()), preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True)
    return listing["optimizers"], listing.get("failures", []), listing.get("schedules", [])


def _remote(args) -> tuple[list[dict], list[dict]]:
    with client_for(args) as client:
        return [_plain(o) for o in client.optimizers()], [_plain(s) for s in client.schedules()]


def _plain(value):
    """A client result object as JSON-able dicts and lists."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if hasattr(value, "name") and hasattr(value, "value") and not isinstance(value, (str, bytes)):
        return value.name  # an enum
    return value


def _default(h: dict) -> str:
    """A hyperparameter's default as its type reads: booleans as true/false, not 0/1."""
    kind = str(h.get("type", "")).lower()
    if "bool" in kind:
        return "true" if h["default"] else "false"
    if "int" in kind:
        return str(int(h["default"]))
    return f"{h['default']:g}"


def _slot_names(slots) -> list[str]:
    return [s["name"] if isinstance(s, dict) else str(s) for s in slots]


def run(args) -> int:
    if args.address or args.token_file or args.tls_ca or args.tls:
        (optimizers, schedules), failures = _remote(args), []
    else:
        optimizers, failures, schedules = _local()
    if args.json:
        print(json.dumps({"optimizers": optimizers, "failures": failures, "schedules": schedules}, indent=2))
        return 0
    rows = []
    for o in optimizers:
        hps = ", ".join(f"{h['name']}={_default(h)}" for h in o["hyperparameters"])
        rows.append({"NAME": o["name"], "HYPERPARAMETERS (default)": hps,
                     "FROM": f"{o['distribution']} {o['version']}",
                     "SLOTS": ", ".join(_slot_names(o.get("slots", []))), "PLUGIN": o["plugin"],
                     "SUMMARY": o.get("summary", "")})
    columns = (["NAME", "HYPERPARAMETERS (default)", "SLOTS", "PLUGIN", "FROM", "SUMMARY"] if args.wide
               else ["NAME", "HYPERPARAMETERS (default)", "FROM"])
    print_table(rows, columns, wrap=None if args.wide else "HYPERPARAMETERS (default)")
    rows = []
    for s in schedules:
        required = set(s.get("required", []))
        params = ", ".join(f"{h['name']}*" if h["name"] in required else f"{h['name']}={_default(h)}"
                           for h in s.get("parameters", []))
        rows.append({"SCHEDULE": s["name"], "PARAMETERS (default; * required)": params,
                     "FROM": f"{s['distribution']} {s['version']}", "PLUGIN": s["plugin"],
                     "SUMMARY": s.get("summary", "")})
    if rows:
        print()
        columns = (["SCHEDULE", "PARAMETERS (default; * required)", "PLUGIN", "FROM", "SUMMARY"] if args.wide
                   else ["SCHEDULE", "PARAMETERS (default; * required)", "FROM"])
        print_table(rows, columns, wrap=None if args.wide else "PARAMETERS (default; * required)")
    for f in failures:
        print(f"FAILED  {f['plugin']}: {f['reason']}", file=sys.stderr)
    return 0


def print_table(rows: list[dict], columns: list[str], wrap: str | None = None, width: int = WIDTH) -> None:
    """Columns two spaces apart; the `wrap` column wraps onto continuation lines so a line fits `width`."""
    widths = {c: max([len(c)] + [len(r[c]) for r in rows]) for c in columns}
    if wrap is not None:
        others = sum(widths[c] + 2 for c in columns if c != wrap)
        widths[wrap] = max(len(wrap), min(widths[wrap], width - others))
    lines = [dict(zip(columns, columns))] + rows
    for row in lines:
        cells = {c: [row[c]] for c in columns}
        if wrap is not None:
            cells[wrap] = textwrap.wrap(row[wrap], widths[wrap], break_on_hyphens=False) or [""]
        for i in range(max(len(v) for v in cells.values())):
            parts = [(cells[c][i] if i < len(cells[c]) else "").ljust(widths[c]) for c in columns]
            print("  ".join(parts).rstrip())
