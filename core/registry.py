"""name -> factory + config schema, built from the ``rlhfkit_register_*`` hooks.

There is no hand-kept dict beside pluggy: :meth:`Registry.build` asks every plugin again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from omegaconf import DictConfig, OmegaConf

from rlhfkit.errors import ConfigError, DuplicatePluginError, UnknownPluginError
from rlhfkit.hookspecs import GROUPS as GROUP_TABLE, Group
from rlhfkit.plugin_manager import Plugins

GROUPS: dict[str, Group] = {g.name: g for g in GROUP_TABLE}
"""group name -> its entry in :data:`rlhfkit.hookspecs.GROUPS`."""
# Groups where several choices may be on at once (``logger=[console,jsonl]``); each
# choice's config lives at ``<group>.<name>``.
MULTI_GROUPS = frozenset(g.name for g in GROUP_TABLE if g.pick == "many")
STAGE_GROUP = next(g.name for g in GROUP_TABLE if g.pick == "stages")
"""The group whose choices are ``stages=[...]``, each configured at its own top-level key."""

NAME_KEY = "_name_"  # every stored schema carries the plugin name it builds


class Register(Protocol):
    def __call__(self, name: str, factory: Callable[[Any], Any], schema: type) -> None: ...


@dataclass(frozen=True)
class Entry:
    group: str
    name: str
    factory: Callable[[Any], Any]
    schema: type  # the plugin's dataclass
    package: str

    @property
    def stored_schema(self) -> type:
        """The schema plus a ``_name_`` field, as stored in Hydra's ConfigStore, so a
        composed config node says which plugin builds it (YAML presets inherit it)."""
        return _named(self.schema, self.name)

    def fields(self) -> list[tuple[str, str, Any]]:
        """(field, type, default) for ``rlhfkit plugins``."""
        out = []
        for f in dataclasses.fields(self.schema):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:
                default = "???"
            out.append((f.name, getattr(f.type, "__name__", str(f.type)), default))
        return out


_NAMED_CACHE: dict[tuple[type, str], type] = {}


def _named(schema: type, name: str) -> type:
    key = (schema, name)
    if key not in _NAMED_CACHE:
        _NAMED_CACHE[key] = dataclasses.make_dataclass(
            schema.__name__,
            [(NAME_KEY, str, dataclasses.field(default=name))],
            bases=(schema,),
            namespace={"__module__": schema.__module__, "__doc__": schema.__doc__},
        )
    return _NAMED_CACHE[key]


def installed() -> Registry:
    """The registry of the installed plugins, built once per process as the CLI builds it:
    for a setting that names plugins of another group, to check and build them."""
    from rlhfkit.cli import setup

    return setup()[1]


class Registry:
    def __init__(self, entries: dict[str, dict[str, Entry]]):
        self._entries = entries

    @classmethod
    def from_plugins(cls, plugins: Plugins) -> Registry:
        entries: dict[str, dict[str, Entry]] = {g: {} for g in GROUPS}
        for group, spec in GROUPS.items():
            hook = getattr(plugins.pm.hook, spec.hook)
            # Call each implementation ourselves so every registration knows its package.
            for impl in reversed(hook.get_hookimpls()):
                package = plugins.packages.get(impl.plugin_name, f"<plugin {impl.plugin_name!r}>")
                impl.function(register=_Registrar(entries[group], group, package))
        return cls(entries)

    def groups(self) -> list[str]:
        return list(self._entries)

    def names(self, group: str) -> list[str]:
        return sorted(self._entries[group])

    def get(self, group: str, name: str) -> Entry:
        try:
            return self._entries[group][name]
        except KeyError:
            raise UnknownPluginError(group, name, self.names(group)) from None

    def entries(self, group: str) -> list[Entry]:
        return [self._entries[group][n] for n in self.names(group)]

    def store_schemas(self, has_yaml: Callable[[str, str], bool] = lambda group, name: False) -> None:
        """Put every schema in Hydra's ConfigStore as ``schema/<group>/<name>`` (for YAML
        presets to extend) and, unless a YAML preset of that name exists, as
        ``<group>/<name>``, so a plugin with no YAML file is selectable all the same."""
        from hydra.core.config_store import ConfigStore

        cs = ConfigStore.instance()
        for group, entries in self._entries.items():
            if group == STAGE_GROUP:  # a stage's config is a field of the run schema (rlhfkit.config.run_schema)
                continue
            for name, entry in entries.items():
                cs.store(group=f"schema/{group}", name=name, node=entry.stored_schema, provider=entry.package)
                if not has_yaml(group, name):
                    package = f"{group}.{name}" if group in MULTI_GROUPS else None
                    cs.store(group=group, name=name, node=entry.stored_schema, package=package, provider=entry.package)

    def config_of(self, group: str, node: Any) -> Any:
        """The typed config (the plugin's dataclass instance) for a composed node."""
        if isinstance(node, DictConfig):
            name = node.get(NAME_KEY)
            if name is None:
                raise ConfigError(
                    f"The '{group}' config has no '{NAME_KEY}' key, so rlhfkit cannot tell "
                    f"which plugin builds it. Presets must extend the plugin's schema: "
                    f"`defaults: [/schema/{group}/<name>@_here_, _self_]`."
                )
            entry = self.get(group, str(name))
            # resolve interpolations against the whole run config (on_error: ${bad_data}) first
            node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
            merged = OmegaConf.merge(OmegaConf.structured(entry.stored_schema), node)
            return entry, OmegaConf.to_object(merged)
        name = getattr(node, NAME_KEY, None)
        return self.get(group, str(name)), node

    def build(self, group: str, node: Any) -> Any:
        """Build the component a composed config node selects, passing it only its own
        typed config slice."""
        entry, config = self.config_of(group, node)
        return entry.factory(config)


class _Registrar:
    """The ``register`` callback handed to one registration hook of one plugin."""

    def __init__(self, into: dict[str, Entry], group: str, package: str):
        self._into, self._group, self._package = into, group, package

    def __call__(self, name: str, factory: Callable[[Any], Any], schema: type) -> None:
        if not isinstance(name, str) or not name.isidentifier():
            raise ConfigError(f"Package '{self._package}' registered {self._group} name {name!r}: names must be identifiers.")
        if not dataclasses.is_dataclass(schema):
            raise ConfigError(
                f"Package '{self._package}' registered {self._group} '{name}' with schema "
                f"{schema!r}, which is not a dataclass. Pass a @dataclass config class."
            )
        if name in self._into:
            raise DuplicatePluginError(
                f"Two packages register the {self._group} '{name}': "
                f"'{self._into[name].package}' and '{self._package}'. Uninstall one, or "
                f"rename the plugin in one of them."
            )
        self._into[name] = Entry(self._group, name, factory, schema, self._package)
