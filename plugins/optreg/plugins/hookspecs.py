"""The hooks an optreg plugin implements (one or both)."""
import pluggy

PROJECT = "optreg"
ENTRY_POINT_GROUP = "optreg"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def optreg_optimizers():
    """Return a list of :class:`optreg.plugins.Optimizer` definitions this plugin provides."""


@hookspec
def optreg_schedules():
    """Return a list of :class:`optreg.plugins.Schedule` definitions (learning-rate schedules) this plugin provides."""
