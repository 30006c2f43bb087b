"""`optreg demo`: the book's chapter 6 through the service (optreg.app.demo)."""
from optreg.app.hookspecs import hookimpl


@hookimpl
def register_commands(subparsers):
    from optreg.app import demo
    p = subparsers.add_parser("demo", help="the book's chapter 6 through the service: optimizer paths and "
                                           "training curves as PNGs, and a summary")
    demo.add_arguments(p)
    p.set_defaults(run=demo.main)
