"""`optreg serve`: the server's own command line (optreg.server.cli), registered here."""
from optreg.app.hookspecs import hookimpl


@hookimpl
def register_commands(subparsers):
    from optreg.server import cli
    p = subparsers.add_parser("serve", help="run the gRPC server")
    cli.add_arguments(p)
    p.set_defaults(run=cli.run)
