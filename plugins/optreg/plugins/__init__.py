"""optreg's plugin API: what an optimizer plugin imports.

A plugin is a module with a hook implementation returning definitions::

    from optreg.plugins import Hyperparameter, Optimizer, Slot, hookimpl

    @hookimpl
    def optreg_optimizers():
        return [Optimizer(name="lion", summary="...", update=..., ...)]

and an entry point in the ``optreg`` group naming that module. A plugin may also (or
instead) provide learning-rate schedules from ``optreg_schedules`` (optreg.plugins.schedule).
"""
from optreg.plugins.api import (DefinitionError, Hyperparameter, HyperparameterError, Optimizer, Slot, blocks, columns,
                                layouts, matrices, per_dimension, rows, same, scalar, unfactored,
                                validate)
from optreg.plugins.hookspecs import hookimpl
from optreg.plugins.schedule import Schedule

__all__ = ["DefinitionError", "Hyperparameter", "HyperparameterError", "Optimizer", "Schedule", "Slot", "blocks", "columns",
           "hookimpl", "layouts", "matrices", "per_dimension", "rows", "same", "scalar", "unfactored",
           "validate"]
