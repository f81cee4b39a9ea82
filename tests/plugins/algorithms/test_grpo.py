"""GRPO and its variants on hand-made tensors against the papers' formulas, then the
algorithm on a tiny policy: an update, dynamic sampling's drop / refill / cap, resume state,
and the settings that fail before any work."""

import math

import pytest
import torch

from rlhfkit.cli import setup
from rlhfkit.config import validate_run
from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import ScoringConfig
from rlhfkit.plugins.algorithms.grpo import (
    GRPO, GRPOConfig, aggregate, clipped_objective, concat_experiences, group_advantages, importance_ratio, k3_kl,
    overlong_penalty, zero_std_groups,
)
from rlhfkit.rlhf.logprobs import response_logprobs

from ...helpers import SMOKE, compose

# --- advantages ---------------------------------------------------------------------------------


def test_group_normalised_advantages_with_and_without_std():
    r = torch.tensor([1.0, 2.0, 3.0, 0.0, 4.0, 8.0])  # two groups of G = 3
    std = group_advantages(r, 3, scale=True)
    # Shao et al. 2024 sec. 4.1.2: (r - mean) / std within the group; stds are 1 and 4 (unbiased)
    torch.testing.assert_close(std, torch.tensor([-1 / 1.0001, 0.0, 1 / 1.0001, -4 / 4.0001, 0.0, 4 / 4.0001]))
    # Dr. GRPO: centred only
    torch.testing.assert_close(group_advantages(r, 3, scale=False), torch.tensor([-1.0, 0.0, 1.0, -4.0, 0.0, 4.0]))


def test_identical_rewards_give_zero_advantage():
    r = torch.tensor([0.7, 0.7, 0.7, 0.7, 1.0, 0.0, 1.0, 1.0])
    for scale in (True, False):
        adv = group_advantages(r, 4, scale=scale)
        assert torch.equal(adv[:4], torch.zeros(4))
        assert adv[4:].abs().sum() > 0
    assert zero_std_groups(r, 4).tolist() == [True, False]


# --- losses -------------------------------------------------------------------------------------

LOSS = torch.tensor([[1.0, 2.0, 3.0, 9.0], [4.0, 9.0, 9.0, 9.0]])  # 9: padding, must not count
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("mode,expected", [
    ("seq-mean-token-mean", (6 / 3 + 4 / 1) / 2),  # GRPO eq. 3: mean over responses of per-response means
    ("token-mean", (6 + 4) / 4),  # DAPO eq. 12: one mean over all 4 tokens
    ("seq-mean-token-sum-norm", (6 / 8 + 4 / 8) / 2),  # Dr. GRPO: sums over the constant L_max = 8
])
def test_each_aggregation_mode(mode, expected):
    assert aggregate(LOSS, MASK, mode, max_len=8).item() == pytest.approx(expected)


def test_aggregation_takes_the_global_denominator():
    assert aggregate(LOSS, MASK, "token-mean", 8, denom=8.0).item() == pytest.approx(10 / 8)
    assert aggregate(LOSS, MASK, "seq-mean-token-mean", 8, denom=4.0).item() == pytest.approx(6 / 4)


def test_decoupled_clip():
    ratio = torch.tensor([[0.5, 0.9, 1.0, 1.25, 1.4]])
    lo, hi = 0.2, 0.28  # DAPO eq. 10
    pos, clipped_pos = clipped_objective(ratio, torch.tensor([1.0]), lo, hi)
    neg, clipped_neg = clipped_objective(ratio, torch.tensor([-1.0]), lo, hi)
    # A > 0: -min(r, clip(r)) caps the gain at 1 + eps_high; a low ratio is not clipped
    torch.testing.assert_close(pos, -torch.tensor([[0.5, 0.9, 1.0, 1.25, 1.28]]))
    assert clipped_pos.tolist() == [[False, False, False, False, True]]
    # A < 0: the loss max(r, clip(r)) floors at 1 - eps_low
    torch.testing.assert_close(neg, torch.tensor([[0.8, 0.9, 1.0, 1.25, 1.4]]))
    assert clipped_neg.tolist() == [[True, False, False, False, False]]
    # ratio 1 (on-policy): the loss is -A
    assert clipped_objective(torch.ones(1, 3), torch.tensor([2.5]), lo, hi)[0].tolist() == [[-2.5] * 3]


def test_gspo_sequence_ratio_and_its_clipping():
    old = torch.zeros(2, 3)
    new = torch.tensor([[0.1, 0.3, 5.0], [1e-4, 3e-4, 0.0]], requires_grad=True)  # col 2 of row 0 is padding
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    s = importance_ratio(new, old, mask, "sequence")
    # Zheng et al. 2025 eq. 7: exp of the mean token log-ratio over the valid tokens
    torch.testing.assert_close(s, torch.tensor([[math.exp(0.2)], [math.exp(4e-4 / 3)]]))
    assert importance_ratio(new, old, mask, "token").shape == (2, 3)
    loss, clipped = clipped_objective(s, torch.tensor([1.0, 1.0]), 3e-4, 4e-4)  # eq. 5, GSPO's range
    assert clipped.tolist() == [[True], [False]]  # exp(0.2) is far above 1 + 4e-4; row 1 is inside
    aggregate(loss.expand_as(mask), mask, "seq-mean-token-mean", 3).backward()
    assert new.grad[0].abs().sum() == 0  # the clipped sequence gives no gradient, to any of its tokens
    # the unclipped one: d/dx_t of -s/2 with s = exp(mean x) -> -s / (2 * 3) on each token
    torch.testing.assert_close(new.grad[1], torch.full((3,), -math.exp(4e-4 / 3) / 6))


def test_k3_in_the_loss_and_k1_in_the_reward():
    logprobs = torch.log(torch.tensor([[0.5, 0.25]]))
    ref = torch.log(torch.tensor([[0.25, 0.25]]))
    # GRPO eq. 4: pi_ref / pi - log(pi_ref / pi) - 1
    torch.testing.assert_close(k3_kl(logprobs, ref), torch.tensor([[0.5 - math.log(0.5) - 1, 0.0]]))
    assert (k3_kl(torch.randn(50), torch.randn(50)) >= 0).all()
    algo = GRPO(GRPOConfig(kl_in="reward", kl_coef=0.5))
    exp = _fake_experience(scores=[1.0, 0.0], logprobs=logprobs.expand(2, 2), ref=ref.expand(2, 2))
    algo.ctx = _Ctx(max_new_tokens=2)
    scores, rewards = algo.rewards(exp)
    # InstructGPT eq. 2 per response: r - beta * sum_t (log pi - log pi_ref) = r - 0.5 * log 2
    torch.testing.assert_close(rewards, torch.tensor([1.0, 0.0]) - 0.5 * math.log(2))
    algo = GRPO(GRPOConfig(kl_in="loss", kl_coef=0.5))
    algo.ctx = _Ctx(max_new_tokens=2)
    assert torch.equal(algo.rewards(exp)[1], torch.tensor([1.0, 0.0]))  # the KL stays out of the reward


def test_overlong_penalty_piecewise():
    lengths = torch.tensor([3, 6, 7, 8, 9, 10])
    # DAPO eq. 13 with L_max = 10, L_cache = 4: 0 up to 6, then (6 - |y|) / 4, -1 at L_max
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4), torch.tensor([0.0, 0.0, -0.25, -0.5, -0.75, -1.0]))
    torch.testing.assert_close(overlong_penalty(lengths, 10, 4, penalty=0.5), torch.tensor([0.0, 0.0, -0.125, -0.25, -0.375, -0.5]))
    assert torch.equal(overlong_penalty(lengths, 10, 0), torch.zeros(6))  # off


class _Ctx:
    def __init__(self, max_new_tokens):
        from rlhfkit.interfaces import RolloutConfig

        self.rollout = RolloutConfig(max_new_tokens=max_new_tokens)


def _fake_experience(scores, logprobs, ref):
    from rlhfkit.rlhf.rollout import Experience

    B, R = logprobs.shape
    mask = torch.ones(B, R)
    return Experience(None, logprobs, ref, torch.tensor(scores), torch.tensor(scores), None, mask)


# --- the algorithm on a tiny policy -------------------------------------------------------------


def test_grpo_is_critic_free_and_updates_the_policy(rl_ctx):
    rl_ctx.make_critic = lambda: pytest.fail("GRPO asked for a critic")
    algo = GRPO(GRPOConfig(num_generations=2, lr=1e-3, epochs=2, num_minibatches=2))
    algo.setup(rl_ctx)
    before = torch.cat([p.detach().flatten().clone() for p in rl_ctx.policy.model.parameters()])
    torch.manual_seed(0)
    m = algo.step(["copy a b c =", "sort c b a =", "reverse a b =", "count a in a a ="]).metrics
    after = torch.cat([p.detach().flatten() for p in rl_ctx.policy.model.parameters()])
    assert not torch.equal(before, after)
    assert {"loss/policy", "grpo/clip_frac", "grpo/kl", "grpo/advantage_std", "grpo/zero_std_groups",
            "grpo/refill_rounds", "reward/proxy", "rollout/kl", "rollout/eos_rate"} <= set(m)
    assert m["rollout/kl"] == pytest.approx(0.0, abs=1e-4)  # policy == reference while sampling
    assert m["grpo/kl"] > 0  # measured after the first of 4 updates moved the policy
    state = algo.state_dict()
    again = GRPO(GRPOConfig(num_generations=2))
    again.setup(rl_ctx)
    again.load_state_dict(state)
    assert torch.equal(again.shuffle.get_state(), algo.shuffle.get_state())


class ScriptedReward:
    """Scores by prompt: a ``tie`` prompt's responses all score 1, a ``spread`` prompt's
    alternate 0, 1 (its G = 2 adjacent copies differ)."""

    needs, critic_init = (), None

    def __call__(self, rollout):
        return torch.tensor([1.0 if p.startswith("tie") else float(i % 2) for i, p in enumerate(rollout.prompts)])


@pytest.fixture
def scripted(rl_ctx):
    rl_ctx.reward = ScriptedReward()
    rl_ctx.scoring = ScoringConfig(score_micro_batch_size=0)  # one scoring pass: row i is row i
    stream = iter([["tie c =", "spread d a b ="], ["spread e a b c =", "tie f ="], ["spread g =", "spread h ="]])
    calls = []
    rl_ctx.more_prompts = lambda: calls.append(1) or next(stream)
    return rl_ctx, calls


def test_dynamic_sampling_drops_and_refills(scripted):
    ctx, calls = scripted
    algo = GRPO(GRPOConfig(num_generations=2, num_minibatches=1, dynamic_sampling=True, max_refill_rounds=3,
                           missing_eos_penalty=None, kl_in="loss"))  # 2-prompt steps: one minibatch; rewards = scores
    algo.setup(ctx)
    exp, rewards, stats = algo.sample_groups(["tie a =", "spread b ="])
    # slot 0 ties; round 1's slot 0 ties too; round 2's slot 0 ("spread e") replaces it; then all filled: stop
    assert exp.rollout.prompts == ["spread e a b c ="] * 2 + ["spread b ="] * 2
    assert len(calls) == 2 and stats["grpo/refill_rounds"] == 2 and stats["grpo/unfilled_groups"] == 0
    assert stats["grpo/zero_std_groups"] == 0.5  # of the step's own batch
    assert rewards.tolist() == [0.0, 1.0, 0.0, 1.0]
    assert (group_advantages(rewards, 2) != 0).all()
    # the merged rows (prompts of other widths, re-padded) still score as they were sampled
    fresh, _ = response_logprobs(ctx.policy.model, exp.rollout, ctx.rollout.temperature)
    torch.testing.assert_close(fresh * exp.mask, exp.logprobs, atol=1e-5, rtol=1e-4)
    # and one step trains on them
    m = algo.step(["spread i =", "spread j ="]).metrics
    assert m["grpo/refill_rounds"] == 0 and len(calls) == 2  # nothing to replace: no extra prompts drawn


def test_dynamic_sampling_stops_at_the_cap(scripted):
    ctx, calls = scripted
    algo = GRPO(GRPOConfig(num_generations=2, dynamic_sampling=True, max_refill_rounds=1, missing_eos_penalty=None,
                           kl_in="loss"))  # rewards = scores
    algo.setup(ctx)
    exp, rewards, stats = algo.sample_groups(["tie a =", "spread b ="])
    assert len(calls) == 1 and stats["grpo/refill_rounds"] == 1
    assert stats["grpo/unfilled_groups"] == 0.5  # still tied: trained on as it is, with zero advantage
    assert exp.rollout.prompts == ["tie a ="] * 2 + ["spread b ="] * 2
    assert group_advantages(rewards, 2)[:2].tolist() == [0.0, 0.0]


def test_without_dynamic_sampling_ties_are_kept(scripted):
    ctx, calls = scripted
    algo = GRPO(GRPOConfig(num_generations=2, missing_eos_penalty=None))
    algo.setup(ctx)
    exp, _, stats = algo.sample_groups(["tie a =", "spread b ="])
    assert not calls and stats["grpo/zero_std_groups"] == 0.5 and len(exp.rollout.prompts) == 4


def test_concat_experiences_pads_prompts_and_responses(rl_ctx):
    from rlhfkit.rlhf.rollout import collect

    torch.manual_seed(0)
    a = collect(rl_ctx, ["copy a ="])
    b = collect(rl_ctx, ["sort c b a d e f g ="])
    assert a.rollout.prompt_width < b.rollout.prompt_width
    both = concat_experiences([a, b], pad_id=0)
    assert both.rollout.prompt_width == max(a.rollout.prompt_width, b.rollout.prompt_width)
    assert both.rollout.responses == a.rollout.responses + b.rollout.responses
    fresh, _ = response_logprobs(rl_ctx.policy.model, both.rollout, rl_ctx.rollout.temperature)
    torch.testing.assert_close(fresh * both.mask, both.logprobs, atol=1e-5, rtol=1e-4)


def test_dynamic_sampling_needs_a_prompt_stream(rl_ctx):
    with pytest.raises(ConfigError, match="dynamic_sampling"):
        GRPO(GRPOConfig(dynamic_sampling=True)).setup(rl_ctx)


# --- settings -----------------------------------------------------------------------------------


@pytest.mark.parametrize("override,message", [
    ("algorithm.num_generations=1", "algorithm.num_generations=1: must be >= 2"),
    ("algorithm.loss_agg=mean", "algorithm.loss_agg=mean: must be one of seq-mean-token-mean, token-mean"),
    ("algorithm.ratio_level=seq", "algorithm.ratio_level=seq: must be one of token, sequence"),
    ("algorithm.kl_in=both", "algorithm.kl_in=both: must be one of loss, reward"),
    ("algorithm.clip_eps_low=1.0", "algorithm.clip_eps_low=1.0: must be in (0, 1)"),
    ("algorithm.overlong_buffer=12", "algorithm.overlong_buffer=12: must be < rollout.max_new_tokens=12"),
    ("algorithm.adaptive_kl=true algorithm.kl_coef=0", "algorithm.adaptive_kl=true: needs algorithm.kl_coef > 0"),
    ("algorithm.num_minibatches=3", "rl.prompts_per_step=16: must be a multiple of 3"),
    ("algorithm.max_refill_rounds=0", "algorithm.max_refill_rounds=0: must be >= 1"),
], ids=lambda x: x.split("=")[0] if "=" in x else x)
def test_bad_settings_are_one_line_errors(override, message, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError) as err:
        validate_run(compose(SMOKE + ["algorithm=grpo", *override.split()]), setup()[1])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("preset,expected", [
    ("grpo", {"scale_rewards": True, "loss_agg": "seq-mean-token-mean", "ratio_level": "token", "kl_in": "reward"}),
    ("grpo_dr", {"scale_rewards": False, "loss_agg": "seq-mean-token-sum-norm"}),
    ("grpo_dapo", {"clip_eps_high": 0.28, "loss_agg": "token-mean", "dynamic_sampling": True, "overlong_buffer": 4}),
    ("grpo_gspo", {"ratio_level": "sequence", "clip_eps_low": 3e-4, "clip_eps_high": 4e-4}),
])
def test_variant_presets_compose_into_the_grpo_plugin(preset, expected, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = compose(SMOKE + [f"algorithm={preset}"])
    validate_run(cfg, setup()[1])
    assert cfg.algorithm._name_ == "grpo"
    assert {k: cfg.algorithm[k] for k in expected} == expected


@pytest.mark.parametrize("kl_in", ["loss", "reward"])
def test_k3_kl_term_of_the_loss(rl_ctx, kl_in):
    from rlhfkit.rlhf.minibatch import MicroBatch
    from rlhfkit.rlhf.rollout import collect

    algo = GRPO(GRPOConfig(num_generations=2, kl_coef=0.5, kl_in=kl_in))
    algo.setup(rl_ctx)
    torch.manual_seed(0)
    exp = collect(rl_ctx, ["copy a b =", "copy a b ="])
    exp.ref_logprobs = (exp.logprobs - 0.1) * exp.mask  # the reference 0.1 nats below the policy on every token
    rows = torch.arange(2)
    _, m = algo.loss(MicroBatch(rows, exp.select(rows).trimmed(), 2.0, True), torch.tensor([1.0, -1.0]))
    k3 = math.exp(-0.1) + 0.1 - 1  # GRPO eq. 4 with pi_ref / pi = e^-0.1
    assert m["loss/kl"] == pytest.approx(k3, rel=1e-3)  # per-token mean of a constant
    assert m["loss/policy"] == pytest.approx(0.0, abs=1e-5)  # ratio 1: -mean(A) = 0
    expected = m["loss/policy"] + (0.5 * k3 if kl_in == "loss" else 0.0)
    assert m["loss/total"] == pytest.approx(expected, rel=1e-3, abs=1e-7)
