"""The hook a command plugin implements: `register_commands(subparsers)`.

A plugin adds its subcommand with `subparsers.add_parser(NAME, help=...)`, its
options on that parser, and `set_defaults(run=FUNCTION)`; `optreg NAME ...`
then calls FUNCTION(args) and exits with its return value. Errors it raises
that are expected (OptregError, OSError, ValueError) become one line on stderr.

    from optreg.app.hookspecs import hookimpl

    @hookimpl
    def register_commands(subparsers):
        p = subparsers.add_parser("hello", help="say hello")
        p.set_defaults(run=lambda args: print("hello") or 0)

and in the plugin's pyproject.toml:

    [project.entry-points."optreg.app"]
    hello = "optreg_hello"
"""
import pluggy

PROJECT = "optreg.app"
ENTRY_POINT_GROUP = "optreg.app"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_commands(subparsers):
    """Add subcommands to `subparsers` (argparse's add_subparsers() of the `optreg` parser)."""
