"""The pluggy PluginManager. Built-in plugins and third-party packages load the same way:
through the ``rlhfkit`` entry-point group."""

from __future__ import annotations

import importlib.metadata as md
from dataclasses import dataclass, field

import pluggy

from rlhfkit import PROJECT, hookspecs
from rlhfkit.errors import DuplicatePluginError, PluginLoadError

ENTRY_POINT_GROUP = PROJECT


@dataclass
class Plugins:
    """The plugin manager plus where each plugin came from (for error messages)."""

    pm: pluggy.PluginManager
    packages: dict[str, str] = field(default_factory=dict)  # plugin name -> distribution

    def package_of(self, plugin: object) -> str:
        name = self.pm.get_name(plugin)
        return self.packages.get(name or "", f"<plugin {name!r} registered in code>")

    def register(self, plugin: object, name: str, package: str | None = None) -> None:
        """Register an in-process plugin (tests, notebooks, the pipeline's loggers)."""
        self.pm.register(plugin, name=name)
        if package:
            self.packages[name] = package


def new_plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _dist_name(ep: md.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return dist.name if dist is not None else "<unknown package>"


def load_plugins(entry_points: bool = True) -> Plugins:
    """A plugin manager with every installed ``rlhfkit`` entry point registered.

    An entry point that fails to import, or whose hooks do not match the specs, raises
    :class:`PluginLoadError` naming the package and the exception, before any work starts.
    """
    plugins = Plugins(new_plugin_manager())
    if not entry_points:
        return plugins
    eps = sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: (_dist_name(e) != "rlhfkit", e.name))
    for ep in eps:
        package = _dist_name(ep)
        if ep.name in plugins.packages:
            raise DuplicatePluginError(
                f"Two packages declare the rlhfkit entry point '{ep.name}': "
                f"'{plugins.packages[ep.name]}' and '{package}'. Uninstall one of them."
            )
        try:
            obj = ep.load()
        except Exception as exc:  # any import-time failure of third-party code
            raise PluginLoadError(
                f"The rlhfkit plugin '{ep.name}' from package '{package}' failed to import "
                f"({ep.value}): {type(exc).__name__}: {exc}. Fix the package, or uninstall "
                f"it with `pip uninstall {package}`."
            ) from exc
        try:
            plugins.register(obj, name=ep.name, package=package)
        except ValueError as exc:  # the same module under two entry-point names
            raise DuplicatePluginError(f"Package '{package}': {exc}") from exc
    try:
        plugins.pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginLoadError(
            f"The rlhfkit plugin '{exc.plugin}' from package "
            f"'{plugins.package_of(exc.plugin)}' implements a hook rlhfkit does not define: "
            f"{exc}. See docs/writing_plugins.md for the hook names."
        ) from exc
    return plugins
