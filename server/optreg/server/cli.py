"""`optreg serve`'s arguments and runner, and `python -m optreg.server serve`, the server alone.

The rest of the `optreg` command (sessions, optimizers, demo) is the
application layer's (optreg.app), which uses this module for its `serve`; the
server itself never imports the client or the application layer.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


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


def _serve_ray(args, data_dir) -> int:
    """`optreg serve --ray [ADDRESS]`: a front end on a Ray cluster (optreg.server.cluster)."""
    if not data_dir:
        print("optreg serve --ray: sessions live in storage every node reaches: give --data-dir "
              "(a shared path), not --memory-only", file=sys.stderr)
        return 2
    unsupported = [o for o, v in (("--dashboard-port", args.dashboard_port),) if v]
    if unsupported:
        print(f"optreg serve --ray: {', '.join(unsupported)} not supported on a cluster yet "
              "(docs/scale-out.md)", file=sys.stderr)
        return 2
    try:
        from optreg.server.cluster.serve import ClusterServer
    except ImportError as e:
        print(f"optreg serve --ray needs Ray: pip install 'optreg[ray]' ({e})", file=sys.stderr)
        return 2
    try:
        server = ClusterServer(data_dir, ray_address=args.ray or None, host=args.host, port=args.port,
                               workers=args.threads, max_message_mb=args.max_message_mb,
                               memory_budget_mb=args.memory_budget_mb, allow_insecure=args.allow_insecure,
                               drain_seconds=args.drain_seconds, token_file=args.token_file,
                               tls_cert=args.tls_cert, tls_key=args.tls_key)
    except (ValueError, OSError, ConnectionError) as e:
        print(f"optreg serve --ray: {e}", file=sys.stderr)
        return 2
    return server.serve_forever()


def _serve(args) -> int:
    from optreg.server.assembly import OptregServer, Settings, default_data_dir
    from optreg.server.storage.datadir import DataDirInUse
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if args.log_format == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])
    if args.memory_only and args.data_dir:
        print(f"optreg serve: --memory-only and --data-dir {args.data_dir} contradict each other: give one",
              file=sys.stderr)
        return 2
    data_dir = None if args.memory_only else (default_data_dir() if args.data_dir is None else args.data_dir)
    if getattr(args, "ray", None) is not None:
        return _serve_ray(args, data_dir)
    try:
        server = OptregServer(Settings(
            host=args.host, port=args.port, workers=args.threads, max_message_mb=args.max_message_mb,
            drain_seconds=args.drain_seconds, data_dir=data_dir or None,
            default_durability=args.default_durability or "", periodic_steps=args.periodic_steps,
            periodic_seconds=args.periodic_seconds, idle_seconds=args.idle_seconds,
            max_loaded_sessions=args.max_loaded_sessions,
            memory_budget_mb=args.memory_budget_mb, max_streams=args.max_streams,
            max_watchers=args.max_watchers, max_members=args.max_members,
            stream_idle_seconds=args.stream_idle_seconds, fsync_method=args.fsync_method,
            max_open_logs=args.max_open_logs, memory_log_dir=args.memory_log_dir,
            max_exposure_seconds=args.max_exposure_seconds, max_tensors=args.max_tensors, token_file=args.token_file,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key, allow_insecure=args.allow_insecure, metrics_port=args.metrics_port,
            metrics_host=args.metrics_host, dashboard_port=args.dashboard_port,
            dashboard_host=args.dashboard_host, telemetry_steps=args.telemetry_steps))
    except DataDirInUse as e:
        print(f"optreg serve: {e}: stop it, or give this one another --data-dir (or --memory-only)",
              file=sys.stderr)
        return 2
    except (ValueError, OSError) as e:  # a port in use, a bad TLS file...
        print(f"optreg serve: {e}", file=sys.stderr)
        return 2
    try:
        return server.serve_forever()
    except OSError as e:  # the metrics port in use, found only at start
        print(f"optreg serve: {e}", file=sys.stderr)
        return 2


class _Deprecated(argparse.Action):
    """An old spelling of an option: works as the new one, with a one-line note on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        new = "--" + self.dest.replace("_", "-")
        print(f"optreg serve: {option_string} is deprecated: use {new} (same meaning)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def at_least(low: int):
    """argparse type: a whole number >= low."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value}: give at least {low}")
        return value
    return parse


at_least_one = at_least(1)


def port(text: str) -> int:
    """argparse type: a TCP port, 0-65535 (0: any free one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (0-65535)") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port: ports are 0-65535 (0 picks a free one)")
    return value


def add_arguments(serve: argparse.ArgumentParser) -> None:
    """`optreg serve`'s options on `serve`, in groups so --help reads by topic."""
    serve.usage = "%(prog)s [options]  (grouped below)"
    net = serve.add_argument_group("network")
    storage = serve.add_argument_group("storage and durability")
    limits = serve.add_argument_group("threads and limits")
    security = serve.add_argument_group("security")
    telemetry = serve.add_argument_group("metrics, dashboard and telemetry")
    logs = serve.add_argument_group("logging")
    cluster = serve.add_argument_group("scale-out")
    net.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    net.add_argument("--port", type=port, default=50051,
                       help="port (default: 50051; 0 picks a free one; a port in use is an error)")
    limits.add_argument("--threads", type=int, default=16,
                       help="threads running handlers and steps; calls that wait (watches, rounds, idle streams) "
                            "hold none (default: 16)")
    # --workers was this option's first name; everywhere else it means worker processes.
    limits.add_argument("--workers", type=int, dest="threads", action=_Deprecated, help=argparse.SUPPRESS)
    limits.add_argument("--max-message-mb", type=int, default=64,
                       help="largest unary message in MiB (default: 64; the streaming RPCs have no model limit)")
    net.add_argument("--drain-seconds", type=float, default=30.0,
                       help="on SIGTERM, how long in-flight calls may finish (default: 30)")
    logs.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    logs.add_argument("--log-format", default="text", choices=["text", "json"],
                       help="json: one object a line with session_id and step fields")
    storage.add_argument("--data-dir", default=None,
                       help="where sessions are kept (default: $OPTREG_DATA_DIR, else ~/.local/share/optreg); "
                            "'' keeps them in memory only")
    storage.add_argument("--memory-only", action="store_true", help="no data directory (same as --data-dir '')")
    storage.add_argument("--default-durability", choices=list(DURABILITIES),
                       help="for sessions that do not choose (default: log with a data dir, else none)")
    storage.add_argument("--periodic-steps", type=int, default=100,
                       help="periodic durability's default step window (default: 100)")
    storage.add_argument("--periodic-seconds", type=float, default=30.0,
                       help="periodic durability's default time window (default: 30)")
    storage.add_argument("--idle-seconds", type=float, default=300.0,
                       help="unload a durable session (to its files; read again on its next use) after this long "
                            "unused, and its telemetry from memory (default: 300; 0: never)")
    storage.add_argument("--max-loaded-sessions", type=at_least(0), default=10_000,
                       help="durable sessions held in memory at most; past it the least recently used are "
                            "unloaded (default: 10000; 0: no bound)")
    limits.add_argument("--memory-budget-mb", type=float, default=None,
                       help="MiB of tensor data the server holds at most (sessions, staging copies, uploads); "
                            "beyond it idle durable sessions are unloaded, then requests fail with "
                            "RESOURCE_EXHAUSTED (default: half the physical memory; 0: unlimited)")
    limits.add_argument("--max-streams", type=at_least_one, default=1024,
                       help="streaming calls served at once, the rest refused RESOURCE_EXHAUSTED (default: 1024)")
    limits.add_argument("--max-watchers", type=at_least_one, default=1024,
                       help="WatchSession calls served at once, the rest refused RESOURCE_EXHAUSTED (default: 1024)")
    limits.add_argument("--max-members", type=at_least_one, default=2048,
                       help="members of sync and SSP sessions on this server; beyond, JoinSession is refused "
                            "RESOURCE_EXHAUSTED; each may have two calls in flight (a call and its retry) "
                            "(default: 2048)")
    storage.add_argument("--fsync-method", choices=["threads", "fdatasync", "syncfs"], default="threads",
                       help="how logs waiting for durability are synced together: threads (concurrent "
                            "fdatasyncs, default), fdatasync (one after another: no sharing), syncfs")
    storage.add_argument("--max-open-logs", type=at_least_one, default=256,
                         help="durable sessions' logs kept open at once; the least recently used idle log is "
                              "closed past it and reopened on its next step (default: 256; lowered to fit "
                              "the descriptor limit, ulimit -n)")
    storage.add_argument("--memory-log-dir", default="/dev/shm",
                         help="a memory file system (tmpfs) where log durability's records go first: they survive "
                              "a kill -9 of the server, the disk follows behind (default: /dev/shm; '': no memory "
                              "log, each record written to the disk log before the reply)")
    storage.add_argument("--max-exposure-seconds", type=float, default=60.0,
                         help="log durability with a memory log: steps wait while the oldest step not yet on disk "
                              "is older than this, which bounds what a power loss loses (default: 60)")
    limits.add_argument("--stream-idle-seconds", type=float, default=30.0,
                       help="end a stream that sends no data for this long (default: 30; 0: never)")
    limits.add_argument("--max-tensors", type=int, default=4096, help="parameters a session may have (default: 4096)")
    security.add_argument("--token-file", help="require a bearer token from this file (one a line)")
    security.add_argument("--tls-cert", help="PEM certificate chain: serve TLS")
    security.add_argument("--tls-key", help="PEM private key for --tls-cert")
    security.add_argument("--allow-insecure", action="store_true",
                       help="allow a non-loopback --host without TLS and tokens")
    telemetry.add_argument("--metrics-port", type=port, help="serve Prometheus metrics on this port (0: any free one)")
    telemetry.add_argument("--metrics-host", default="127.0.0.1", help="address of the metrics endpoint")
    telemetry.add_argument("--dashboard-port", type=port,
                       help="serve the live training dashboard on this port (0: any free one; docs/telemetry.md)")
    telemetry.add_argument("--dashboard-host", default="127.0.0.1",
                       help="address of the dashboard (off loopback only with TLS and tokens, as --host)")
    cluster.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                       help="serve sessions on a Ray cluster: join the one at ADDRESS ('auto': this machine's), "
                            "or start a local Ray without one; --data-dir must be storage every node reaches "
                            "(docs/scale-out.md; pip install 'optreg[ray]')")
    telemetry.add_argument("--telemetry-steps", type=at_least_one, default=2048,
                       help="steps of telemetry kept at full resolution per session; older ones are "
                            "downsampled (default: 2048)")


def run(args) -> int:
    """Serve until SIGTERM or SIGINT; 2 with one line on stderr when the server cannot start."""
    return _serve(args)


def main(argv=None) -> int:
    """`python -m optreg.server serve [options]`."""
    parser = argparse.ArgumentParser(prog="python -m optreg.server",
                                     description="the optreg gRPC server (the `optreg` command has more)")
    sub = parser.add_subparsers(dest="command", required=True)
    add_arguments(sub.add_parser("serve", help="run the gRPC server"))
    args = parser.parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
