import pytest
import torch

from rlhfkit.cli import setup
from rlhfkit.plugins.reward_heads.last_token import LastTokenConfig, LastTokenHead, last_index
from rlhfkit.plugins.reward_heads.logprob import LogProbConfig, LogProbHead
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


def test_logprob_head_scores_token_logprobs_through_the_bound_lm_head():
    torch.manual_seed(0)
    head = LogProbHead(4, LogProbConfig(logprob_weight=2.0))
    unembedding = torch.randn(7, 4)
    head.bind(unembedding)
    hidden, ids = torch.randn(2, 5, 4), torch.randint(0, 7, (2, 5))
    lp = torch.log_softmax(hidden @ unembedding.T, -1)
    expected = torch.zeros(2, 5)
    expected[:, 1:] = lp[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)  # log p(token t | < t), 0 first
    torch.testing.assert_close(head.token_logprobs(hidden, ids), expected)
    scores = head.token_scores(hidden, ids)  # zero linear part: 2 * log p
    torch.testing.assert_close(scores, 2 * expected)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1]])
    torch.testing.assert_close(head.pool(scores, mask), (scores * mask).sum(-1))  # a sum over the response
    unembedding.add_(1.0)
    torch.testing.assert_close(head.token_logprobs(hidden, ids), expected)  # a frozen copy, not a view
    assert not head.unembedding.requires_grad and "unembedding" in head.state_dict()


def test_logprob_head_with_linear_last_reads_the_last_state_relative_to_the_one_before_the_response():
    """linear=last (reward_head=logprob_last): c * sum log p + w . (h_last - h_before), so the
    linear part sees only the last token's state (and a per-prompt constant), whatever the
    states between; computed per token, so the sum pooling and per-token values still apply."""
    torch.manual_seed(0)
    unembedding = torch.randn(7, 4)
    tokens, last = (LogProbHead(4, LogProbConfig(init_std=0.5, linear=kind)) for kind in ("tokens", "last"))
    with torch.no_grad():
        tokens.linear.bias.fill_(0.7)
    last.load_state_dict(tokens.state_dict())  # the same weights: only where the linear part reads differs
    for head in (tokens, last):
        head.bind(unembedding)
    hidden, ids = torch.randn(2, 6, 4), torch.randint(0, 7, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])  # the response's tokens (right padding in row 0)
    w, b = last.linear.weight[0], last.linear.bias[0]
    lp = (last.token_logprobs(hidden, ids) * mask).sum(-1)
    expected = lp + torch.stack([hidden[0, 4] @ w - hidden[0, 1] @ w, hidden[1, 5] @ w - hidden[1, 0] @ w])
    with torch.no_grad():
        torch.testing.assert_close(last.pool(last.token_scores(hidden, ids), mask), expected)
        torch.testing.assert_close(tokens.pool(tokens.token_scores(hidden, ids), mask),
                                   lp + ((hidden @ w + b) * mask).sum(-1))  # every response token, and b per token
        moved = hidden.clone()
        moved[0, 2:4] += torch.randn(2, 4)  # states between the first and the last response token
        pooled = lambda h: last.pool(last.token_scores(h, ids), mask)  # noqa: E731
        logprobs = lambda h: (last.token_logprobs(h, ids) * mask).sum(-1)  # noqa: E731
        torch.testing.assert_close(pooled(moved) - pooled(hidden), logprobs(moved) - logprobs(hidden))  # c = 1
        # as a critic, each token's own state and the constant b, as linear=tokens scores it
        torch.testing.assert_close(last.value_scores(hidden, ids), tokens.token_scores(hidden, ids))
        torch.testing.assert_close(tokens.value_scores(hidden, ids), tokens.token_scores(hidden, ids))
        # no response mask (re-tokenized text, left padded): every attended token but the first
        attended = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
        first = attended.long().cumsum(-1) == 1
        fallback = attended * ~first
        torch.testing.assert_close(last.pool(last.token_scores(hidden, ids), fallback),
                                   (last.token_logprobs(hidden, ids) * fallback).sum(-1)
                                   + torch.stack([hidden[0, 5] @ w - hidden[0, 2] @ w, hidden[1, 5] @ w - hidden[1, 0] @ w]))


def test_logprob_last_is_registered_with_linear_last_and_refuses_mean_pooling():
    from omegaconf import OmegaConf

    from rlhfkit.plugins.reward_heads.logprob import LogProbLastConfig
    from rlhfkit.settings import Invalid

    registry = setup()[1]
    entry = registry.get("reward_head", "logprob_last")
    head = registry.build("reward_head", OmegaConf.structured(entry.stored_schema))(12)
    assert isinstance(head, LogProbHead) and head.linear_kind == "last" and head.pool_kind == "sum"
    with pytest.raises(Invalid, match=r"^linear=last: .*set reward_head.pool=sum"):
        LogProbLastConfig(pool="mean").validate()
    LogProbConfig(pool="mean").validate()  # the linear part on every token averages as before
    from rlhfkit.config import validate_run
    from rlhfkit.errors import ConfigError

    from ...helpers import SMOKE, compose

    for overrides in (["reward_head=logprob_last", "reward_head.pool=mean"], ["reward_head.linear=last", "reward_head.pool=mean"]):
        with pytest.raises(ConfigError, match=r"^reward_head.linear=last: .*set reward_head.pool=sum"):  # before any work
            validate_run(compose(SMOKE + overrides), registry)


def test_logprob_head_needs_its_lm_head():
    from rlhfkit.errors import ConfigError

    unbound = LogProbHead(4, LogProbConfig())
    with pytest.raises(ConfigError, match="select reward_head=last_token"):  # a loader that does not bind it
        unbound.token_scores(torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.long))
    bound = LogProbHead(4, LogProbConfig())
    bound.bind(torch.randn(7, 4))
    with pytest.raises(ConfigError, match="select reward_head=last_token"):  # one that passes no token ids
        bound.token_scores(torch.randn(1, 3, 4))


def test_logprob_head_builds_through_the_registry():
    from omegaconf import OmegaConf

    registry = setup()[1]
    entry = registry.get("reward_head", "logprob")
    head = registry.build("reward_head", OmegaConf.structured(entry.stored_schema))(12)
    assert isinstance(head, LogProbHead) and head.reads_tokens and head.logprob_weight.item() == 1.0


def test_score_passes_the_response_mask_only_to_models_that_take_it_through_wrappers_and_compile():
    from rlhfkit.rlhf.retokenize import score

    class Takes(torch.nn.Module):
        def forward(self, input_ids, attention_mask, per_token=False, response_mask=None):
            return (response_mask if response_mask is not None else attention_mask).sum(-1).float()

    class Old(torch.nn.Module):  # a third-party reward model written before response_mask
        def forward(self, input_ids, attention_mask):
            return attention_mask.sum(-1).float()

    class Engine(torch.nn.Module):  # a backend's wrapper, as DDP's and DeepSpeed's: .module, forward(**kw)
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    ids, mask, response = torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5), torch.tensor([[0, 0, 1, 1, 1]])
    assert score(Engine(Engine(Takes())), ids, mask, response).item() == 3.0
    assert score(Engine(Old()), ids, mask, response).item() == 5.0
    compiled = torch.compile(Takes(), backend="eager")  # an OptimizedModule: the model is its ._orig_mod
    assert score(Engine(compiled), ids, mask, response).item() == 3.0


def test_heads_bound_to_equal_lm_heads_share_one_frozen_copy():
    """An ensemble's K members and the critic hold one fp32 LM-head copy, not K + 1: equal
    copies are shared when bound, when loaded from a state dict and after a move."""
    weight = torch.randn(300, 8)
    a, b, c, other = (LogProbHead(8, LogProbConfig()) for _ in range(4))
    a.bind(weight)
    b.bind(weight.clone())
    assert a.unembedding.data_ptr() == b.unembedding.data_ptr() != weight.data_ptr()  # a copy, shared
    before = weight.clone()
    weight.add_(1.0)  # the live LM head trains on: the frozen copy does not move
    assert torch.equal(a.unembedding, before)
    c.load_state_dict(a.state_dict())
    assert c.unembedding.data_ptr() == a.unembedding.data_ptr() and torch.equal(c.unembedding, before)
    other.bind(before + 0.5)
    assert other.unembedding.data_ptr() != a.unembedding.data_ptr()  # another model's head: its own copy
    a.double(), c.double()  # a move (another device, another dtype) shares again
    assert a.unembedding.dtype == torch.float64 and a.unembedding.data_ptr() == c.unembedding.data_ptr()
    assert b.unembedding.dtype == torch.float32  # the one not moved keeps its copy
