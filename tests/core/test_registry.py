"""One test per registration hook: an inline plugin registers a component and the registry
builds it from a typed config slice."""

from dataclasses import dataclass

import pytest
from omegaconf import OmegaConf

from rlhfkit import hookimpl
from rlhfkit.errors import ConfigError, DuplicatePluginError, UnknownPluginError
from rlhfkit.plugin_manager import load_plugins
from rlhfkit.registry import GROUPS, Registry


@dataclass
class ToyConfig:
    size: int = 3
    """A field with a default."""


class Toy:
    def __init__(self, cfg: ToyConfig):
        self.cfg = cfg


class InlinePlugin:
    """Implements every registration hook, each registering 'toy_<group>'."""

    @hookimpl
    def rlhfkit_register_policies(self, register):
        register("toy_policy", Toy, ToyConfig)

    @hookimpl
    def rlhfkit_register_reward_models(self, register):
        register("toy_reward_model", Toy, ToyConfig)

    @hookimpl
    def rlhfkit_register_reward_heads(self, register):
        register("toy_reward_head", Toy, ToyConfig)

    @hookimpl
    def rlhfkit_register_algorithms(self, register):
        register("toy_algorithm", Toy, ToyConfig)

    @hookimpl
    def rlhfkit_register_datasets(self, register):
        register("toy_data", Toy, ToyConfig)

    @hookimpl
    def rlhfkit_register_backends(self, register):
        register("toy_backend", Toy, ToyConfig)

    @hookimpl
    def rlhfkit_register_loggers(self, register):
        register("toy_logger", Toy, ToyConfig)

    @hookimpl
    def rlhfkit_register_generators(self, register):
        register("toy_generator", Toy, ToyConfig)

    @hookimpl
    def rlhfkit_register_stages(self, register):
        register("toy_stage", Toy, ToyConfig)

    @hookimpl
    def rlhfkit_register_rewards(self, register):
        register("toy_reward", Toy, ToyConfig)


@pytest.fixture
def plugins():
    plugins = load_plugins()
    plugin = InlinePlugin()
    plugins.register(plugin, name="inline-test-plugin", package="inline-test-package")
    yield plugins
    plugins.pm.unregister(plugin)


@pytest.mark.parametrize(
    "group,hook",
    sorted((name, group.hook) for name, group in GROUPS.items()),
)
def test_registration_hook(plugins, group, hook):
    # rlhfkit_register_policies, rlhfkit_register_reward_models, rlhfkit_register_reward_heads,
    # rlhfkit_register_algorithms, rlhfkit_register_datasets, rlhfkit_register_backends,
    # rlhfkit_register_loggers, rlhfkit_register_generators, rlhfkit_register_stages,
    # rlhfkit_register_rewards
    registry = Registry.from_plugins(plugins)
    name = f"toy_{group}"
    assert name in registry.names(group)
    entry = registry.get(group, name)
    assert entry.package == "inline-test-package"
    node = OmegaConf.merge(OmegaConf.structured(entry.stored_schema), {"size": 7})
    obj = registry.build(group, node)
    assert isinstance(obj, Toy) and isinstance(obj.cfg, ToyConfig) and obj.cfg.size == 7


def test_builtins_register_through_entry_points():
    registry = Registry.from_plugins(load_plugins())
    assert {"ppo", "a2c", "rloo", "grpo"} <= set(registry.names("algorithm"))
    assert {"last_token", "mean_pool", "mlp"} <= set(registry.names("reward_head"))
    assert registry.get("algorithm", "ppo").package == "rlhfkit"
    assert registry.names("stage") == ["dpo", "rl", "rm", "sft"]
    assert {"model", "python_exec", "labeller", "combined", "length", "format"} <= set(registry.names("reward"))
    assert registry.get("reward", "python_exec").package == "rlhfkit"


def test_one_table_makes_the_hooks_and_the_run_config_fields():
    """Adding a group is one entry in hookspecs.GROUPS: its hook is a hookspec and its
    config key a field of the run schema."""
    import dataclasses

    from rlhfkit import hookspecs
    from rlhfkit.config import run_schema
    from rlhfkit.plugin_manager import new_plugin_manager

    registry = Registry.from_plugins(load_plugins())
    fields = {f.name for f in dataclasses.fields(run_schema(registry))}
    pm = new_plugin_manager()
    for group in hookspecs.GROUPS:
        assert hasattr(pm.hook, group.hook) and group.returns in getattr(hookspecs, group.hook).__doc__
        assert (group.name in fields) == (group.pick != "stages")
    assert {"sft", "rm", "rl"} <= fields  # each registered stage's config at its own key


def test_unknown_name_lists_choices_and_closest_match():
    registry = Registry.from_plugins(load_plugins())
    with pytest.raises(UnknownPluginError) as e:
        registry.get("algorithm", "ppoo")
    msg = str(e.value)
    assert "Did you mean 'ppo'?" in msg and "a2c, grpo, ppo" in msg


def test_duplicate_name_names_both_packages(plugins):
    class Clash:
        @hookimpl
        def rlhfkit_register_algorithms(self, register):
            register("ppo", Toy, ToyConfig)

    clash = Clash()
    plugins.register(clash, name="clash", package="clash-package")
    try:
        with pytest.raises(DuplicatePluginError) as e:
            Registry.from_plugins(plugins)
        assert "'rlhfkit'" in str(e.value) and "'clash-package'" in str(e.value)
    finally:
        plugins.pm.unregister(clash)


def test_schema_must_be_a_dataclass(plugins):
    class Bad:
        @hookimpl
        def rlhfkit_register_algorithms(self, register):
            register("bad", Toy, dict)

    bad = Bad()
    plugins.register(bad, name="bad", package="bad-package")
    try:
        with pytest.raises(ConfigError, match="not a dataclass"):
            Registry.from_plugins(plugins)
    finally:
        plugins.pm.unregister(bad)


def test_plugin_receives_only_its_typed_slice():
    registry = Registry.from_plugins(load_plugins())
    entry = registry.get("algorithm", "ppo")
    node = OmegaConf.merge(OmegaConf.structured(entry.stored_schema), {"clip_eps": 0.1})
    algo = registry.build("algorithm", node)
    from rlhfkit.plugins.algorithms.ppo import PPOConfig

    assert isinstance(algo.cfg, PPOConfig) and algo.cfg.clip_eps == 0.1
