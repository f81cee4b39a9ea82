"""``reward=combined``: a weighted sum of other reward sources, ``sum_i w_i * r_i(rollout)``,
for example the trained reward model plus a length or format rule::

    rlhfkit reward=combined 'reward.terms={model: 1.0, length: 0.5}' 'reward.options={length: {target: 5}}'
    rlhfkit reward=combined 'reward.terms={model: 1.0, length: 0.5}' +reward.options.length.target=5

``terms`` maps each source's name (any installed reward source but ``combined``) to its
weight (replacing the whole mapping: Hydra adds no new key to a typed node without ``+``);
``options.<name>`` holds that source's own settings, checked against its schema
before any work, like ``reward.<field>`` is when the source is used alone. The sum needs
what any term needs (``model``: the ``rm`` stage), a value model starts from a model term's
reward model (``critic_init``), and each RL step logs every term's mean raw (unweighted)
score as ``reward/term/<name>`` beside the terms' own metrics."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlhfkit import hookimpl
from rlhfkit.context import StageContext
from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import Dataset, RewardSource, optional
from rlhfkit.registry import NAME_KEY, Registry, installed
from rlhfkit.rlhf.sampling import Rollout
from rlhfkit.settings import Invalid, check_keys, check_values

GROUP = "reward"
NAME = "combined"


@dataclass
class CombinedRewardConfig:
    terms: Any = None
    """Reward source name -> weight: ``'reward.terms={model: 1.0, length: 0.5}'``."""
    options: Any = None
    """Each term's own settings by its name: ``'reward.options={length: {target: 5}}'``, or
    one at a time with a ``+``: ``+reward.options.length.target=5``."""

    def validate(self, run: Any = None) -> None:
        for name, config in term_configs(self, installed()).items():
            check_values(config, f"reward.options.{name}", run)  # ranges, then the term schema's own validate


def term_configs(cfg: CombinedRewardConfig, reg: Registry) -> dict[str, Any]:
    """name -> the term's typed config: the terms and their weights checked, and each
    term's settings against its schema's fields and types."""
    choices = [n for n in reg.names(GROUP) if n != NAME]
    example = "'reward.terms={model: 1.0, length: 0.5}'"
    terms, options = cfg.terms or {}, cfg.options or {}
    if not isinstance(terms, dict) or not terms:
        raise Invalid("terms", terms, f"name the sources to add up with their weights ({example}); "
                      f"sources: {', '.join(choices)}")
    for name, weight in terms.items():
        if name not in choices:
            raise Invalid("terms", terms, f"unknown reward source '{name}'; choose from {', '.join(choices)}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise Invalid(f"terms.{name}", weight, "the weight must be a finite number")
    if not isinstance(options, dict):
        raise Invalid("options", options, "give each term's settings under its name: 'reward.options={length: {target: 5}}'")
    for name, settings in options.items():
        if name not in terms:
            raise Invalid(f"options.{name}", settings, f"'{name}' is not one of the terms ({', '.join(terms)})")
        if not isinstance(settings, dict):
            raise Invalid(f"options.{name}", settings, f"give {name}'s settings as a mapping: "
                          f"'reward.options={{{name}: {{<field>: <value>}}}}'")
    out = {}
    for name in terms:
        path = f"reward.options.{name}"
        node = OmegaConf.create({**options.get(name, {}), NAME_KEY: name})  # as if it were reward=<name>
        try:
            check_keys(node, reg.get(GROUP, name).stored_schema, path)
            out[name] = reg.config_of(GROUP, node)[1]
        except OmegaConfBaseException as exc:  # a value of the wrong type
            raise ConfigError(f"{path}: {str(exc).splitlines()[0]}") from None
    return out


class CombinedReward:
    def __init__(self, cfg: CombinedRewardConfig):
        reg = installed()
        self.weights = dict(cfg.terms)
        self.terms: dict[str, RewardSource] = {n: reg.get(GROUP, n).factory(c) for n, c in term_configs(cfg, reg).items()}
        self.needs = tuple(dict.fromkeys(need for t in self.terms.values() for need in t.needs))
        self._sums = {n: 0.0 for n in self.terms}
        self._rows = 0

    @property
    def critic_init(self) -> str | None:
        """A model term's reward model, for the value model to start from."""
        return next((c for t in self.terms.values() if (c := optional(t, RewardSource, "critic_init"))), None)

    def check_data(self, data: Dataset) -> None:
        for term in self.terms.values():
            optional(term, RewardSource, "check_data")(data)

    def setup(self, ctx: StageContext, tokenizer: Any) -> None:
        for term in self.terms.values():
            term.setup(ctx, tokenizer)

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        total = None
        for name, term in self.terms.items():
            r = term(rollout).float()  # (B,)
            self._sums[name] += float(r.sum())
            total = self.weights[name] * r if total is None else total + self.weights[name] * r
        self._rows += len(rollout.responses)
        return total

    def metrics(self) -> dict[str, float]:
        """The terms' own metrics, and each term's mean raw score since the last call."""
        out: dict[str, float] = {}
        for term in self.terms.values():
            out.update(optional(term, RewardSource, "metrics")())
        for name in self.terms:
            out[f"reward/term/{name}"] = self._sums[name] / max(self._rows, 1)
            self._sums[name] = 0.0
        self._rows = 0
        return out


@hookimpl
def rlhfkit_register_rewards(register):
    register(NAME, CombinedReward, CombinedRewardConfig)
