"""The rule sources ``length`` and ``format``."""

import pytest
import torch

from rlhfkit.errors import ConfigError
from rlhfkit.plugins.rewards.rules import FormatReward, FormatRewardConfig, LengthReward, LengthRewardConfig
from rlhfkit.settings import check_values

from .test_labeller import text_rollout


def test_length_is_minus_per_token_distance_to_target():
    r = text_rollout(["p"] * 3, ["a", "b", "c"])
    r.response_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float)
    r.ended = torch.tensor([True, True, False])  # tokens before EOS: 3, 1, 5 (the last never ended)
    assert LengthReward(LengthRewardConfig(target=3, per_token=0.5))(r).tolist() == [0.0, -1.0, -1.0]
    assert LengthReward(LengthRewardConfig(target=0, per_token=0.1))(r).tolist() == pytest.approx([-0.3, -0.1, -0.5])


def test_format_bonus_or_penalty():
    r = text_rollout(["p"] * 4, ["3 + 4", " 3 + 4 \n", "3 + 4 !", "x"])
    full = FormatReward(FormatRewardConfig(pattern=r"\d+( [-+*] \d+)*", bonus=1.0, penalty=0.5))
    assert full(r).tolist() == [1.0, 1.0, -0.5, -0.5]
    search = FormatReward(FormatRewardConfig(pattern=r"\d", match="search", bonus=2.0))
    assert search(r).tolist() == [2.0, 2.0, 2.0, 0.0]


@pytest.mark.parametrize("cfg,message", [
    (FormatRewardConfig(), r"format.pattern=: give the regular expression"),
    (FormatRewardConfig(pattern="(a"), r"format.pattern=\(a: not a valid regular expression"),
    (FormatRewardConfig(pattern="a", match="all"), r"format.match=all: must be one of full, search"),
    (FormatRewardConfig(pattern="a", penalty=-1.0), r"format.penalty=-1.0: must be >= 0"),
    (LengthRewardConfig(per_token=-0.1), r"length.per_token=-0.1: must be >= 0"),
])
def test_bad_settings_are_one_line_errors(cfg, message):
    with pytest.raises(ConfigError, match=message):
        check_values(cfg, type(cfg).__name__.removesuffix("RewardConfig").lower(), None)
