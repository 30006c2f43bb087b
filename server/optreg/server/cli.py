"""The `optreg` command: `optreg serve`, `optreg optimizers`."""
from __future__ import annotations

import argparse
import json
import logging
import sys

from google.protobuf import json_format


def _serve(args) -> int:
    from optreg.server.app import OptregServer, Settings
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = OptregServer(Settings(host=args.host, port=args.port, workers=args.workers,
                                   max_message_mb=args.max_message_mb, drain_seconds=args.drain_seconds))
    server.serve_forever()
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
    serve.set_defaults(func=_serve)

    opts = sub.add_parser("optimizers", help="list the installed optimizers")
    opts.add_argument("--json", action="store_true", help="machine-readable output")
    opts.add_argument("--address", help="ask a running server instead of this installation")
    opts.set_defaults(func=_optimizers)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
