import pytest
import torch

from rlhfkit.cli import setup
from rlhfkit.plugins.reward_heads.last_token import LastTokenConfig, LastTokenHead, last_index
from rlhfkit.plugins.reward_heads.mean_pool import MeanPoolConfig, MeanPoolHead
from rlhfkit.plugins.reward_heads.mlp import MLPConfig, MLPHead


def test_last_index_with_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 1, 1, 0]])
    assert last_index(mask).tolist() == [2, 4, 3]


def test_last_token_head_reads_the_eos_position():
    head = LastTokenHead(4, LastTokenConfig(init_std=1.0))
    hidden = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    scores = head.token_scores(hidden)
    out = head.pool(scores, mask)
    torch.testing.assert_close(out, torch.stack([scores[0, 2], scores[1, 4]]))


def test_mean_pool_head_averages_valid_positions():
    head = MeanPoolHead(4, MeanPoolConfig(init_std=1.0))
    scores = torch.tensor([[1.0, 3.0, 100.0]])
    assert head.pool(scores, torch.tensor([[1, 1, 0]])).item() == pytest.approx(2.0)


def test_mlp_head_is_nonlinear_and_zero_initialised():
    head = MLPHead(8, MLPConfig(width=16, activation="tanh"))
    hidden = torch.randn(2, 3, 8)
    assert torch.all(head.token_scores(hidden) == 0)  # zero last layer: rewards start at 0
    assert isinstance(head.net[1], torch.nn.Tanh) and head.net[0].out_features == 16


@pytest.mark.parametrize("name,cls", [("last_token", LastTokenHead), ("mean_pool", MeanPoolHead), ("mlp", MLPHead)])
def test_heads_build_through_the_registry(name, cls):
    from omegaconf import OmegaConf

    registry = setup()[1]
    entry = registry.get("reward_head", name)
    builder = registry.build("reward_head", OmegaConf.structured(entry.stored_schema))
    head = builder(12)
    assert isinstance(head, cls)
    assert head.token_scores(torch.randn(1, 3, 12)).shape == (1, 3)
