"""Every option of every config group composes and builds on CPU."""

import pytest

from rlhfkit.cli import setup, yaml_options
from rlhfkit.pipeline import Components
from rlhfkit.registry import MULTI_GROUPS

from ..helpers import SMOKE, compose


def _options():
    registry = setup()[1]
    out = []
    for group in registry.groups():
        for name in sorted(set(registry.names(group)) | yaml_options(group)):
            out.append((group, name))
    return out


@pytest.mark.parametrize("group,name", _options())
def test_option_composes_and_builds(group, name):
    registry = setup()[1]
    choice = f"{group}=[{name}]" if group in MULTI_GROUPS else f"{group}={name}"
    cfg = compose(SMOKE + [choice, "backend.device=cpu"])
    node = cfg[group][name] if group in MULTI_GROUPS else cfg[group]
    entry, typed = registry.config_of(group, node)
    assert entry.name == name and isinstance(typed, entry.schema)
    components = Components.build(cfg, registry)
    assert components.backend.device.type == "cpu"


@pytest.mark.parametrize("experiment", sorted(yaml_options("experiment")))
def test_experiments_compose(experiment):
    cfg = compose([f"experiment={experiment}"])
    assert cfg.rl.steps > 0
    Components.build(cfg, setup()[1])


def test_pairwise_loss_and_llama_override():
    cfg = compose(SMOKE + ["rm.loss=pairwise", "policy.model=tiny-llama"])
    assert cfg.rm.loss.value == "pairwise" and cfg.policy.model == "tiny-llama"
