"""Every option of every config group composes and builds on CPU."""

import pytest

from rlhfkit.cli import setup, yaml_options
from rlhfkit.pipeline import Components
from rlhfkit.registry import MULTI_GROUPS, STAGE_GROUP

from ..helpers import SMOKE, compose


def _options():
    registry = setup()[1]
    out = []
    for group in registry.groups():
        if group == STAGE_GROUP:  # stages are picked by stages=[...]: see test_stages_compose
            continue
        for name in sorted(set(registry.names(group)) | yaml_options(group)):
            out.append((group, name))
    return out


@pytest.fixture
def clean_dist_env(monkeypatch):
    """Distributed backends built in-process join a world of one; leave no trace."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# options that need a setting to build (files are read lazily, so none need to exist)
REQUIRED = {("data", "files"): ["data.path=prefs.jsonl"], ("data", "jsonl"): ["data.path=prefs.jsonl"],
            ("reward", "format"): ["reward.pattern=x"], ("reward", "combined"): ["reward.terms={model: 1.0, length: 0.5}"],
            ("reward", "ensemble"): ["rm.ensemble_size=2"]}


@pytest.mark.parametrize("group,name", _options())
def test_option_composes_and_builds(group, name, clean_dist_env):
    registry = setup()[1]
    choice = f"{group}=[{name}]" if group in MULTI_GROUPS else f"{group}={name}"
    cfg = compose(SMOKE + [choice] + REQUIRED.get((group, name), []))
    node = cfg[group][name] if group in MULTI_GROUPS else cfg[group]
    entry, typed = registry.config_of(group, node)
    # a plugin builds itself; a YAML preset (zero3) builds the plugin whose schema it extends
    assert (entry.name == name if name in registry.names(group) else name in yaml_options(group))
    assert isinstance(typed, entry.schema)
    components = Components(cfg, registry)
    built = components[group]
    assert (built if group in MULTI_GROUPS else [built]) and components["backend"].device.type == "cpu"
    assert components["backend"].world_size == 1


@pytest.mark.parametrize("experiment", sorted(yaml_options("experiment")))
def test_experiments_compose(experiment):
    cfg = compose([f"experiment={experiment}"])
    assert cfg.rl.steps > 0
    components = Components(cfg, setup()[1])
    for group in ("backend", "data", "policy", "reward_model", "reward_head", "reward", "algorithm", "generator"):
        components[group]


def test_stages_compose():
    """Each registered stage's config sits at its own key, typed by its schema."""
    registry = setup()[1]
    cfg = compose(SMOKE + ["stages=[sft,rm,rl]", "rl.eval_every=2"])
    for name in registry.names(STAGE_GROUP):
        entry = registry.get(STAGE_GROUP, name)
        stage = entry.factory(entry.schema(**{k: v for k, v in cfg[name].items()}))
        assert stage.produces in ("policy", "reward_model")


def test_pairwise_loss_and_llama_override():
    cfg = compose(SMOKE + ["rm.loss=pairwise", "policy.model=tiny-llama"])
    assert cfg.rm.loss.value == "pairwise" and cfg.policy.model == "tiny-llama"


def test_a_plugin_by_name_is_the_runs_own_choice_or_one_with_its_defaults():
    """Components.named (rm.member_heads builds ensemble members' heads so): the chosen
    plugin, with the run's settings, for its own name; another name, built once."""
    from rlhfkit.plugins.reward_heads.mlp import MLPHead

    components = Components(compose(SMOKE + ["reward_head=logprob", "reward_head.init_std=0.5"]), setup()[1])
    assert components.named("reward_head", "logprob") is components["reward_head"]
    mlp = components.named("reward_head", "mlp")
    assert mlp is components.named("reward_head", "mlp") and isinstance(mlp(8), MLPHead)
