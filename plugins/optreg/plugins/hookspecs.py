"""The one hook an optreg plugin implements."""
import pluggy

PROJECT = "optreg"
ENTRY_POINT_GROUP = "optreg"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def optreg_optimizers():
    """Return a list of :class:`optreg.plugins.Optimizer` definitions this plugin provides."""
