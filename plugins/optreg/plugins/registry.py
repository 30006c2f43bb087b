"""Finds the optimizers and schedules: the built-ins, then the `optreg` entry-point group.

Environment:
  OPTREG_DISABLE_PLUGIN_AUTOLOAD=1   load no entry points (built-ins only)
  OPTREG_BLOCK_PLUGINS=a,b           skip the plugins (entry-point or module names) listed

A plugin that fails to import, or declares something invalid or a name already
taken, is recorded as a failure naming the plugin; the rest still load.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os
from dataclasses import dataclass

import pluggy

from optreg.plugins import api, hookspecs, schedule
from optreg.plugins.builtins import MODULES as BUILTIN_MODULES


@dataclass(frozen=True)
class Registered:
    definition: api.Optimizer  # or a schedule.Schedule (Registry.schedules)
    plugin: str
    distribution: str
    version: str


@dataclass(frozen=True)
class Failure:
    plugin: str
    reason: str


def _optreg_version() -> str:
    try:
        return importlib.metadata.version("optreg")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


class Registry:
    def __init__(self, autoload: bool | None = None, blocked: set[str] | None = None):
        if autoload is None:
            autoload = not os.environ.get("OPTREG_DISABLE_PLUGIN_AUTOLOAD")
        if blocked is None:
            blocked = {b.strip() for b in os.environ.get("OPTREG_BLOCK_PLUGINS", "").split(",") if b.strip()}
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.optimizers: dict[str, Registered] = {}
        self.schedules: dict[str, Registered] = {}
        self.failures: list[Failure] = []
        self._origin: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)

        version = _optreg_version()
        for name in BUILTIN_MODULES:
            if name not in blocked:
                self.pm.register(importlib.import_module(name), name=name)
                self._origin[name] = ("optreg", version)
        if autoload:
            self._load_entry_points(blocked)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as e:
            plugin = self.pm.get_name(e.plugin) or str(e.plugin)
            self.pm.unregister(e.plugin)
            self.failures.append(Failure(plugin, f"unknown hook: {e}"))
        self._collect()

    def _load_entry_points(self, blocked: set[str]) -> None:
        for ep in importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
            if ep.name in blocked or ep.value in blocked or self.pm.get_plugin(ep.name) is not None:
                continue
            try:
                plugin = ep.load()
                self.pm.register(plugin, name=ep.name)
            except Exception as e:  # a broken plugin must not stop the others
                self.failures.append(Failure(ep.name, f"failed to load {ep.value}: {type(e).__name__}: {e}"))
                continue
            dist = ep.dist
            self._origin[ep.name] = (dist.name, dist.version) if dist else ("unknown", "unknown")

    def _collect(self) -> None:
        self._collect_hook(self.pm.hook.optreg_optimizers, "optreg_optimizers", "optimizer", api.validate,
                           self.optimizers)
        self._collect_hook(self.pm.hook.optreg_schedules, "optreg_schedules", "schedule",
                           schedule.validate_schedule, self.schedules)

    def _collect_hook(self, hook, hook_name: str, what: str, validate, into: dict[str, Registered]) -> None:
        # Call each implementation alone so every definition is attributed to its plugin.
        for impl in hook.get_hookimpls():
            plugin = impl.plugin_name
            try:
                defs = list(impl.function() or [])
            except Exception as e:
                self.failures.append(Failure(plugin, f"{hook_name}() raised {type(e).__name__}: {e}"))
                continue
            for defn in defs:
                try:
                    validate(defn)
                except api.DefinitionError as e:
                    self.failures.append(Failure(plugin, f"invalid {what} definition: {e}"))
                    continue
                if defn.name in into:
                    other = into[defn.name].plugin
                    self.failures.append(Failure(plugin, f"{what} name {defn.name!r} is already provided by {other}"))
                    continue
                dist, version = self._origin.get(plugin, ("unknown", "unknown"))
                into[defn.name] = Registered(defn, plugin, dist, version)

    def get(self, name: str) -> Registered:
        """The registered optimizer `name`; KeyError with the available names otherwise."""
        try:
            return self.optimizers[name]
        except KeyError:
            raise KeyError(f"unknown optimizer {name!r}; available: {', '.join(sorted(self.optimizers))}") from None

    def schedule(self, name: str) -> Registered:
        """The registered schedule `name`; KeyError with the available names otherwise."""
        try:
            return self.schedules[name]
        except KeyError:
            raise KeyError(f"unknown schedule {name!r}; available: {', '.join(sorted(self.schedules))}") from None
