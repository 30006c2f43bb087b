"""The `optreg` command: a parser whose subcommands come from `register_commands` plugins.

Whatever goes wrong in a way a user can fix (a stopped server, a bad argument,
a refused request) ends as one line on stderr and a non-zero exit, never a
traceback: 2 for bad arguments (argparse's convention), 1 for everything else.
A closed pipe (`| head`) ends the command quietly with 141, as SIGPIPE would.
"""
from __future__ import annotations

import argparse
import os
import sys

# grpc's C core logs at INFO to stderr unless told otherwise (since it moved to absl logging): a command's
# in-process server stopping under its own client's channel printed "Got goaway" after the command's one line.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

import pluggy  # noqa: E402

from optreg.app import hookspecs, version  # noqa: E402

BUILTIN_COMMANDS = ("optreg.app.commands.serve", "optreg.app.commands.optimizers", "optreg.app.commands.sessions",
                    "optreg.app.commands.demo")


SIGPIPE_EXIT = 128 + 13  # what a shell reports for a process ended by SIGPIPE


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line: the error and where to read more."""

    def error(self, message):
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")

    def _print_message(self, message, file=None):
        # argparse swallows OSError here, so `optreg --help | head -0` would exit 0 having
        # written nothing; let a closed pipe reach main() like any other write's.
        if message:
            (file or sys.stderr).write(message)


def plugin_manager() -> pluggy.PluginManager:
    import importlib
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for name in reversed(BUILTIN_COMMANDS):  # pluggy calls the last registered first
        pm.register(importlib.import_module(name), name)
    from importlib.metadata import entry_points
    for ep in entry_points(group=hookspecs.ENTRY_POINT_GROUP):
        if pm.get_plugin(ep.name) is not None or pm.is_blocked(ep.name):
            continue
        try:
            pm.register(ep.load(), name=ep.name)
        except Exception as e:  # one broken plugin must not take every command down
            print(f"optreg: command plugin {ep.name} ({ep.value}) failed to load: {one_line(e)}", file=sys.stderr)
    return pm


def build_parser(pm: pluggy.PluginManager | None = None) -> ArgumentParser:
    parser = ArgumentParser(prog="optreg", description="optreg: an optimizer service over gRPC")
    parser.add_argument("--version", action="version", version=f"optreg {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=ArgumentParser)
    (pm or plugin_manager()).hook.register_commands(subparsers=sub)
    return parser


def one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    first = text.splitlines()[0]
    return first if first == text else first + " ..."


def main(argv=None) -> int:
    name, args = "optreg", None
    try:
        parser = build_parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit:  # --help, --version, a usage error: flush here so a closed pipe is caught below
            sys.stdout.flush()
            raise
        name = " ".join(["optreg", args.command] + ([args.action] if getattr(args, "action", None) else []))
        code = args.run(args)
        sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
        return code or 0
    except BrokenPipeError:
        # The reader left (`optreg sessions list | head -3`): stop quietly, as a program killed
        # by SIGPIPE would (exit 141, no message: `head` got what it asked for). Python would
        # report the pipe when it flushes stdout at exit, so point stdout at /dev/null first.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return SIGPIPE_EXIT
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not _expected(e):
            raise
        print(f"{name}: {one_line(e)}", file=sys.stderr)  # a transport error names its address
        return 1


def _expected(e: Exception) -> bool:
    """Errors a user can act on from their one-line message; anything else is a bug and keeps its traceback."""
    if isinstance(e, (OSError, ValueError)):
        return True
    try:
        from optreg.client.errors import OptregError
    except ImportError:
        return False
    return isinstance(e, OptregError)


if __name__ == "__main__":
    sys.exit(main())
