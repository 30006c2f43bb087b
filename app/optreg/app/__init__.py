"""optreg's application layer: the `optreg` command and the demo.

It sits on top of the client (optreg.client) and the server (optreg.server),
which never import it. Its commands are pluggy plugins of one hook,
`register_commands` (optreg.app.hookspecs), as llm's are: the built-in ones in
optreg.app.commands, others from any installed distribution's "optreg.app"
entry points.
"""


def version() -> str:
    """The installed optreg distribution's version, or the source tree's when run from a checkout."""
    from importlib import metadata
    try:
        return metadata.version("optreg")
    except metadata.PackageNotFoundError:
        return "0.1.0+source"
