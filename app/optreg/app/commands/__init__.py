"""The built-in `optreg` commands, each a plugin of optreg.app.hookspecs.register_commands."""
