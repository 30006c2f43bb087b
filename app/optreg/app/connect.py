"""The options every client command shares, and the connection they make.

`--address` (default $OPTREG_ADDRESS, else 127.0.0.1:50051), `--token-file`
(default: the token in $OPTREG_TOKEN), `--tls-ca`/`--tls`/`--tls-server-name`
for a server started with --tls-cert, and for the commands that can work
without a server, `--data-dir`: an in-process server on a free loopback port
over that directory, driven by the same client code (so the files' format
stays the server's business). The server's lock on the directory makes this
refuse while another server uses it.
"""
from __future__ import annotations

import contextlib
import os
import pathlib

DEFAULT_ADDRESS = "127.0.0.1:50051"


def add_client_arguments(parser, offline: bool = False) -> None:
    g = parser.add_argument_group("connection")
    g.add_argument("--address", metavar="HOST:PORT",
                   help=f"the server (default: $OPTREG_ADDRESS, else {DEFAULT_ADDRESS}; without a port: 50051)")
    g.add_argument("--token-file", metavar="FILE",
                   help="send the bearer token in FILE (its first word; default: the token in $OPTREG_TOKEN)")
    g.add_argument("--tls-ca", metavar="PEM", help="connect over TLS, trusting these root certificates")
    g.add_argument("--tls", action="store_true", help="connect over TLS, trusting the system's roots")
    g.add_argument("--tls-server-name", metavar="NAME",
                   help="the name to check the server's certificate against (default: the address's host)")
    g.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="give up on a call after this long (default: 30)")
    if offline:
        g.add_argument("--data-dir", metavar="DIR",
                       help="no server: open this data directory directly (refused while a server uses it)")


def address(args) -> str:
    return args.address or os.environ.get("OPTREG_ADDRESS") or DEFAULT_ADDRESS


def _token(args) -> str | None:
    if args.token_file:
        words = pathlib.Path(args.token_file).read_text().split()
        if not words:
            raise ValueError(f"--token-file {args.token_file} is empty")
        return words[0]
    return os.environ.get("OPTREG_TOKEN") or None


def client_for(args, where: str | None = None):
    from optreg.client import Client
    roots = pathlib.Path(args.tls_ca).read_bytes() if args.tls_ca else None
    return Client(where or address(args), token=_token(args), root_certificates=roots,
                  tls=bool(args.tls or roots), tls_server_name=args.tls_server_name, timeout=args.timeout)


@contextlib.contextmanager
def connect(args):
    """A Client for the command: to --address, or to an in-process server over --data-dir."""
    data_dir = getattr(args, "data_dir", None)
    if data_dir is None:
        with client_for(args) as client:
            yield client
        return
    if args.address:
        raise ValueError("give --address (a running server) or --data-dir (no server), not both")
    if not pathlib.Path(data_dir).is_dir():
        raise FileNotFoundError(f"no data directory at {data_dir}")
    from optreg.server.assembly import OptregServer, Settings
    from optreg.server.storage.datadir import DataDirInUse
    try:
        server = OptregServer(Settings(host="127.0.0.1", port=0, data_dir=data_dir, workers=4))
    except DataDirInUse as e:
        raise DataDirInUse(f"{e}: while it runs, reach its sessions with --address instead of --data-dir",
                           e.directory, e.holder) from None
    server.start()
    try:
        from optreg.client import Client
        with Client(server.address, timeout=args.timeout) as client:
            yield client
    finally:
        server.stop(grace=0)
