"""``reward=combined``: a weighted sum of sources; its needs, critic and metrics come from
its terms; every term setting is checked against the term's schema before any work."""

from dataclasses import dataclass

import pytest
import torch

from rlhfkit.cli import setup
from rlhfkit.config import validate_run
from rlhfkit.errors import ConfigError
from rlhfkit.plugins.rewards import combined
from rlhfkit.plugins.rewards.combined import CombinedReward, CombinedRewardConfig
from rlhfkit.registry import Entry, Registry

from ...helpers import SMOKE, compose
from .test_labeller import Ctx, text_rollout


@dataclass
class CountingConfig:
    value: float = 1.0


class Counting:
    """A source with a product need, a critic and metrics of its own."""

    needs = ("rm", "sft")

    def __init__(self, cfg):
        self.cfg, self.calls, self.critic_init = cfg, 0, None

    def setup(self, ctx, tokenizer):
        self.critic_init = "/runs/x/rm"

    def __call__(self, rollout):
        self.calls += 1
        return torch.full((len(rollout.responses),), self.cfg.value)

    def metrics(self):
        calls, self.calls = self.calls, 0
        return {"reward/counting_calls": float(calls)}


@pytest.fixture
def with_counting(monkeypatch):
    real = setup()[1]
    entries = {g: {e.name: e for e in real.entries(g)} for g in real.groups()}
    entries["reward"]["counting"] = Entry("reward", "counting", Counting, CountingConfig, "tests")
    monkeypatch.setattr(combined, "installed", lambda: Registry(entries))


def test_weighted_sum_needs_critic_and_metrics(with_counting, synthetic):
    cfg = CombinedRewardConfig(terms={"length": 0.5, "counting": -2.0, "labeller": 1.0},
                               options={"length": {"target": 1, "per_token": 1.0}, "counting": {"value": 3.0}})
    source = CombinedReward(cfg)
    assert source.needs == ("rm", "sft")  # the union of the terms', once each
    assert source.critic_init is None
    source.setup(Ctx(synthetic), tokenizer=None)
    assert source.critic_init == "/runs/x/rm"  # passed through from the term with a reward model
    r = text_rollout(["reverse c a f =", "reverse c a f ="], ["f a c", "c a f"])
    r.response_mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])  # 2 tokens and 0 tokens before EOS
    length, labels = torch.tensor([-1.0, -1.0]), torch.tensor([1.0, 1 / 3])
    expected = 0.5 * length - 2.0 * 3.0 + labels
    assert torch.allclose(source(r), expected)
    source(r.select(torch.tensor([0])))  # a second micro-batch: one row
    m = source.metrics()
    assert m == pytest.approx({"reward/counting_calls": 2.0, "reward/term/length": -1.0, "reward/term/counting": 3.0,
                               "reward/term/labeller": (1 + 1 / 3 + 1) / 3})
    again = source.metrics()  # nothing scored since: the same keys, reset
    assert set(again) == set(m) and again["reward/term/counting"] == 0.0 and again["reward/counting_calls"] == 0.0


def test_check_data_asks_every_term(tmp_path):
    source = CombinedReward(CombinedRewardConfig(terms={"length": 1.0, "labeller": 1.0}))

    class NoLabeller:
        labeller = None

    with pytest.raises(ConfigError, match="reward=labeller: the dataset"):
        source.check_data(NoLabeller())


@pytest.mark.parametrize("args,message", [
    ([], r"reward.terms={}: name the sources to add up with their weights .*sources: .*format, labeller, length, model"),
    (["reward.terms={model:1.0,lenth:0.5}"], r"unknown reward source 'lenth'; choose from .*format, labeller, length, model"),
    (["reward.terms={model:1.0,combined:0.5}"], r"unknown reward source 'combined'"),
    (["reward.terms={length:lots}"], r"reward.terms.length=lots: the weight must be a finite number"),
    (["reward.terms={length:1}", "+reward.options.length.target=-1"], r"reward.options.length.target=-1: must be >= 0"),
    (["reward.terms={length:1}", "+reward.options.length.targt=3"], r"reward.options.length.targt: no such setting; did you mean reward.options.length.target\?"),
    (["reward.terms={length:1}", "+reward.options.length.target=lots"], r"reward.options.length: Value 'lots'"),
    (["reward.terms={length:1}", "+reward.options.lenth.target=3"], r"'lenth' is not one of the terms \(length\)"),
    (["reward.terms={format:1}"], r"reward.options.format.pattern=: give the regular expression"),
])
def test_bad_terms_and_term_settings_fail_when_the_config_is_checked(args, message):
    _, registry = setup()
    with pytest.raises(ConfigError, match=message):
        validate_run(compose(SMOKE + ["reward=combined"] + args), registry)


def test_term_settings_compose_from_the_command_line():
    _, registry = setup()
    for options in (["+reward.options.length.target=5"], ["reward.options={length: {target: 5}}"]):
        cfg = compose(SMOKE + ["reward=combined", "reward.terms={model: 1.0, length: 0.5}"] + options)
        validate_run(cfg, registry)
        source = registry.build("reward", cfg.reward)
        assert source.weights == {"model": 1.0, "length": 0.5} and source.needs == ("rm",)
        assert source.terms["length"].cfg.target == 5 and source.terms["length"].cfg.per_token == 0.1
