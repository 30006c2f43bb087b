"""The `optreg` command: `optreg serve`, `optreg optimizers`, `optreg export`, `optreg import`, `optreg demo`."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from google.protobuf import json_format


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, and session_id/step when the record has them."""

    def format(self, record):
        out = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
               "message": record.getMessage()}
        for key in ("session_id", "step"):
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


DURABILITIES = ("every-step", "log", "periodic", "none")


def _serve(args) -> int:
    from optreg.server.app import OptregServer, Settings, default_data_dir
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if args.log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    data_dir = None if args.memory_only else (default_data_dir() if args.data_dir is None else args.data_dir)
    try:
        server = OptregServer(Settings(
            host=args.host, port=args.port, workers=args.workers, max_message_mb=args.max_message_mb,
            drain_seconds=args.drain_seconds, data_dir=data_dir or None,
            default_durability=args.default_durability or "", periodic_steps=args.periodic_steps,
            periodic_seconds=args.periodic_seconds, idle_seconds=args.idle_seconds,
            memory_budget_mb=args.memory_budget_mb, max_streams=args.max_streams,
            stream_idle_seconds=args.stream_idle_seconds, max_tensors=args.max_tensors, token_file=args.token_file, tls_cert=args.tls_cert,
            tls_key=args.tls_key, allow_insecure=args.allow_insecure, metrics_port=args.metrics_port,
            metrics_host=args.metrics_host))
    except (ValueError, OSError) as e:
        print(f"optreg serve: {e}", file=sys.stderr)
        return 2
    return server.serve_forever()


def _client(args):
    from optreg.client import Client
    token = args.token
    if token is None and args.token_file:
        token = open(args.token_file).read().split()[0]
    roots = open(args.tls_ca, "rb").read() if args.tls_ca else None
    return Client(args.address, token=token, root_certificates=roots)


def _export(args) -> int:
    from optreg.server import storage
    with _client(args) as c:
        info, params, slots = c.session(args.session_id, params={}).read_state()
    meta = {"session_id": info.session_id, "optimizer": info.optimizer,
            "hyperparameters": dict(info.hyperparameters), "step": info.step,
            "master_dtype": "float64" if info.master_dtype == 2 else "float32",
            "step_reply": _enum_name("StepReply", info.step_reply), "durability": _enum_name("Durability",
                                                                                              info.durability),
            "periodic_steps": info.periodic_steps, "periodic_seconds": info.periodic_seconds,
            "created_at": info.created_at.ToNanoseconds() / 1e9,
            "shapes": {t.name: list(t.shape) for t in info.parameters}, "slots": list(info.slots)}
    import pathlib
    storage.write_atomic(pathlib.Path(args.file).resolve(), storage.encode(meta, params, slots))
    print(f"exported session {info.session_id} at step {info.step} to {args.file}")
    return 0


def _enum_name(enum: str, value: int) -> str:
    from optreg.v1 import session_pb2
    return session_pb2.DESCRIPTOR.enum_types_by_name[enum].values_by_number[value].name


def _import(args) -> int:
    import pathlib
    from optreg.server import storage
    meta, params, state, _delta = storage.decode(pathlib.Path(args.file).read_bytes())
    reply = {"STEP_REPLY_DELTA": "delta", "STEP_REPLY_NONE": "none"}.get(meta["step_reply"], "parameters")
    durability = args.durability or {"DURABILITY_EVERY_STEP": "every-step", "DURABILITY_PERIODIC": "periodic",
                                     "DURABILITY_NONE": "none"}.get(meta.get("durability"))
    with _client(args) as c:
        s = c.create_session(meta["optimizer"], params, master_dtype=meta["master_dtype"], reply=reply,
                             session_id=meta["session_id"] if args.session_id is None else args.session_id,
                             state=state, initial_step=int(meta["step"]), durability=durability,
                             periodic_steps=int(meta.get("periodic_steps", 0)) if durability == "periodic" else 0,
                             periodic_seconds=float(meta.get("periodic_seconds", 0)) if durability == "periodic" else 0,
                             **meta["hyperparameters"])
    print(f"imported {args.file} as session {s.id} at step {s.step_count}")
    return 0


def _optimizers(args) -> int:
    if args.address:
        import grpc
        from optreg.v1 import registry_pb2, registry_pb2_grpc
        with grpc.insecure_channel(args.address) as channel:
            listing = registry_pb2_grpc.OptimizerRegistryServiceStub(channel).ListOptimizers(
                registry_pb2.ListOptimizersRequest(), timeout=10)
    else:
        from optreg.plugins.registry import Registry
        from optreg.server.service import list_optimizers
        listing = list_optimizers(Registry())
    if args.json:
        print(json.dumps(json_format.MessageToDict(listing, preserving_proto_field_name=True,
                                                   always_print_fields_with_no_presence=True), indent=2))
        return 0
    rows = [("NAME", "HYPERPARAMETERS (default)", "PLUGIN", "VERSION")]
    for o in listing.optimizers:
        hps = ", ".join(f"{h.name}={h.default:g}" for h in o.hyperparameters)
        rows.append((o.name, hps, o.plugin, f"{o.distribution} {o.version}"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[3])
    for f in listing.failures:
        print(f"FAILED  {f.plugin}: {f.reason}", file=sys.stderr)
    return 0


def _demo(args) -> int:
    from optreg.server.demo import main as demo_main
    return demo_main(args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="optreg", description="optreg: an optimizer service over gRPC")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gRPC server")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=50051, help="port (default: 50051; 0 picks a free one)")
    serve.add_argument("--workers", type=int, default=16, help="threads serving calls (default: 16)")
    serve.add_argument("--max-message-mb", type=int, default=64,
                       help="largest unary message in MiB (default: 64; the streaming RPCs have no model limit)")
    serve.add_argument("--drain-seconds", type=float, default=30.0,
                       help="on SIGTERM, how long in-flight calls may finish (default: 30)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-format", default="text", choices=["text", "json"],
                       help="json: one object a line with session_id and step fields")
    serve.add_argument("--data-dir", default=None,
                       help="where sessions are kept (default: $OPTREG_DATA_DIR, else ~/.local/share/optreg); "
                            "'' keeps them in memory only")
    serve.add_argument("--memory-only", action="store_true", help="no data directory (same as --data-dir '')")
    serve.add_argument("--default-durability", choices=list(DURABILITIES),
                       help="for sessions that do not choose (default: log with a data dir, else none)")
    serve.add_argument("--periodic-steps", type=int, default=100,
                       help="periodic durability's default step window (default: 100)")
    serve.add_argument("--periodic-seconds", type=float, default=30.0,
                       help="periodic durability's default time window (default: 30)")
    serve.add_argument("--idle-seconds", type=float, default=0.0,
                       help="unload a durable session's tensors after this long unused (default: 0, never)")
    serve.add_argument("--memory-budget-mb", type=float, default=None,
                       help="MiB of tensor data the server holds at most (sessions, staging copies, uploads); "
                            "beyond it idle durable sessions are unloaded, then requests fail with "
                            "RESOURCE_EXHAUSTED (default: half the physical memory; 0: unlimited)")
    serve.add_argument("--max-streams", type=int, default=0,
                       help="streaming calls served at once, the rest refused (default: half of --workers)")
    serve.add_argument("--stream-idle-seconds", type=float, default=30.0,
                       help="end a stream that sends no data for this long (default: 30; 0: never)")
    serve.add_argument("--max-tensors", type=int, default=4096, help="parameters a session may have (default: 4096)")
    serve.add_argument("--token-file", help="require a bearer token from this file (one a line)")
    serve.add_argument("--tls-cert", help="PEM certificate chain: serve TLS")
    serve.add_argument("--tls-key", help="PEM private key for --tls-cert")
    serve.add_argument("--allow-insecure", action="store_true",
                       help="allow a non-loopback --host without TLS and tokens")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: any free one)")
    serve.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint")
    serve.set_defaults(func=_serve)

    def remote(p):
        p.add_argument("--address", default="127.0.0.1:50051", help="the server (default: 127.0.0.1:50051)")
        p.add_argument("--token", help="bearer token")
        p.add_argument("--token-file", help="read the bearer token from this file (its first token)")
        p.add_argument("--tls-ca", help="PEM root certificate(s): connect over TLS")

    exp = sub.add_parser("export", help="write one session to a safetensors file")
    exp.add_argument("session_id")
    exp.add_argument("file")
    remote(exp)
    exp.set_defaults(func=_export)

    imp = sub.add_parser("import", help="create a session from a file written by `optreg export`")
    imp.add_argument("file")
    imp.add_argument("--session-id", help="the new session's id (default: the one in the file; '' a fresh one)")
    imp.add_argument("--durability", choices=list(DURABILITIES), help="default: the file's")
    remote(imp)
    imp.set_defaults(func=_import)

    opts = sub.add_parser("optimizers", help="list the installed optimizers")
    opts.add_argument("--json", action="store_true", help="machine-readable output")
    opts.add_argument("--address", help="ask a running server instead of this installation")
    opts.set_defaults(func=_optimizers)

    demo = sub.add_parser("demo", help="the book's chapter 6 through the service: optimizer paths and training "
                                       "curves as PNGs, and a summary")
    from optreg.server.demo import add_arguments as add_demo_arguments
    add_demo_arguments(demo)
    demo.set_defaults(func=_demo)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except Exception as e:
        from optreg.client.errors import OptregError
        if isinstance(e, (OptregError, ValueError, OSError)):
            print(f"optreg {args.command}: {e}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
