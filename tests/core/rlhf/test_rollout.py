"""Scoring and training passes: length-bucketed micro-batches, same-pass logprobs, logits
only where they are needed, gradient accumulation and checkpointing change nothing but
speed and memory."""

import copy

import pytest
import torch

from rlhfkit.interfaces import ScoringConfig
from rlhfkit.rlhf.memory import enable_gradient_checkpointing
from rlhfkit.plugins.algorithms.a2c import A2C, A2CConfig
from rlhfkit.plugins.algorithms.ppo import PPO, PPOConfig
from rlhfkit.plugins.algorithms.rloo import RLOO, RLOOConfig
from rlhfkit.rlhf.logprobs import response_logits
from rlhfkit.rlhf.rollout import buckets, collect, micro_batches, policy_logprobs, rollout_metrics
from rlhfkit.rlhf.sampling import sample

PROMPTS = ["copy a b c =", "reverse a b c d e f g =", "sort c b a =", "count a in a b a =",
           "copy x =", "sort h g f e d c b a =", "reverse q r =", "count b in b b b c ="]


def _params(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def test_buckets_sort_by_length_and_agree_across_ranks():
    lengths = torch.tensor([5, 1, 9, 3, 7])
    parts = buckets(lengths, 2)
    assert [p.tolist() for p in parts] == [[1, 3], [0, 4], [2]]
    assert len(buckets(lengths[:4], 2, max_rows=5)) == len(parts)  # a rank with one row fewer
    one_row = buckets(torch.tensor([4]), 1, max_rows=2)
    assert len(one_row) == 2 and all(len(p) == 1 for p in one_row)  # padded with a repeat
    assert [p.tolist() for p in buckets(lengths, 0)] == [[0, 1, 2, 3, 4]]


def test_response_logits_project_only_response_positions(rl_ctx):
    model = rl_ctx.policy.model.eval()
    r = sample(model, rl_ctx.policy.tokenizer, PROMPTS, rl_ctx.rollout, torch.device("cpu"))
    full = model(input_ids=r.input_ids, attention_mask=r.attention_mask, position_ids=r.position_ids).logits
    P, R = r.prompt_width, r.response_mask.shape[1]
    torch.testing.assert_close(response_logits(model, r), full[:, P - 1 : P + R - 1], atol=1e-5, rtol=1e-5)


def test_trimmed_micro_batches_drop_shared_padding(rl_ctx):
    torch.manual_seed(0)
    exp = collect(rl_ctx, PROMPTS, critic=rl_ctx.reward.rm)
    assert exp.rollout.prompts == list(PROMPTS)
    for rows, sub in micro_batches(exp, torch.arange(len(PROMPTS)), 3):
        assert sub.rollout.input_ids.shape[0] == len(rows)
        assert bool(sub.rollout.attention_mask[:, 0].any())  # no all-padding first column
        assert int(sub.mask.sum(-1).max()) == sub.mask.shape[1]  # no all-padding last column
        assert torch.equal(sub.logprobs, exp.logprobs[rows, : sub.mask.shape[1]])


@pytest.mark.parametrize("recompute", [False, True])
def test_micro_batched_scoring_equals_one_pass(rl_ctx, recompute):
    ctx = copy.copy(rl_ctx)
    torch.manual_seed(0)
    ctx.scoring = ScoringConfig(recompute_logprobs=recompute)
    whole = collect(ctx, PROMPTS, critic=rl_ctx.reward.rm)
    torch.manual_seed(0)
    ctx.scoring = ScoringConfig(score_micro_batch_size=3, recompute_logprobs=recompute)
    micro = collect(ctx, PROMPTS, critic=rl_ctx.reward.rm)
    assert torch.equal(whole.rollout.input_ids, micro.rollout.input_ids)
    for a, b in ((whole.logprobs, micro.logprobs), (whole.ref_logprobs, micro.ref_logprobs),
                 (whole.values, micro.values), (whole.rm_scores, micro.rm_scores)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # same-pass logprobs are the trainer's logprobs (the policy is the reference here)
    torch.testing.assert_close(whole.logprobs, whole.ref_logprobs, atol=1e-4, rtol=1e-4)
    assert set(whole.timings) == {"generate", "score"}


def test_logprob_gap_is_logged_and_near_zero_in_fp32(rl_ctx):
    ctx = copy.copy(rl_ctx)
    ctx.scoring = ScoringConfig(logprob_gap_rows=3)
    exp = collect(ctx, PROMPTS, critic=rl_ctx.reward.rm)
    metrics = rollout_metrics(exp, exp.logprobs - exp.ref_logprobs, 0.1, 1.0)
    assert 0.0 <= metrics["rollout/logprob_gap_mean"] <= metrics["rollout/logprob_gap_max"] < 1e-4
    ctx.scoring = ScoringConfig(logprob_gap_rows=0)
    assert "rollout/logprob_gap_max" not in collect(ctx, PROMPTS).diagnostics


def _off_by(delta):
    """A sampler whose logprobs are ``delta`` nats off the policy's: a stand-in for the
    rounding of bf16 decode kernels, large enough to see."""

    def generate(*args, **kwargs):
        r = sample(*args, **kwargs)
        r.logprobs = r.logprobs - delta * r.response_mask
        return r

    return generate


def test_reduced_precision_recomputes_logprobs_by_default(rl_ctx):
    from rlhfkit.plugins.backends.single import SingleConfig, SingleDevice

    ctx = copy.copy(rl_ctx)
    ctx.generate = _off_by(0.25)
    fp32 = collect(ctx, PROMPTS)  # fp32: the sampler's logprobs, checked on a few rows
    assert torch.equal(fp32.logprobs, fp32.rollout.logprobs * fp32.mask)
    assert abs(fp32.diagnostics["rollout/logprob_gap_max"] - 0.25) < 1e-3
    ctx.backend = SingleDevice(SingleConfig(device="cpu", precision="bf16"))
    bf16 = collect(ctx, PROMPTS)  # bf16: recomputed by a training-style pass; the gap of every row
    m = bf16.mask.bool()
    with ctx.backend.autocast():
        recomputed = policy_logprobs(ctx.policy.model, bf16.rollout, ctx.rollout.temperature)
    torch.testing.assert_close(bf16.logprobs[m], recomputed[m])
    assert abs(bf16.diagnostics["rollout/logprob_gap_mean"] - 0.25) < 1e-2
    ctx.scoring = ScoringConfig(recompute_logprobs=False)  # the setting still wins
    kept = collect(ctx, PROMPTS)
    assert torch.equal(kept.logprobs, kept.rollout.logprobs * kept.mask)


def _train(ctx, make, scoring, checkpointing=False):
    ctx = copy.copy(ctx)
    ctx.policy = copy.deepcopy(ctx.policy)
    ctx.scoring = scoring
    if checkpointing:
        enable_gradient_checkpointing(ctx.policy.model)
    torch.manual_seed(0)
    algo = make()
    algo.setup(ctx)
    metrics = algo.step(PROMPTS).metrics
    return _params(ctx.policy.model), metrics


@pytest.mark.parametrize("make", [
    lambda: PPO(PPOConfig(ppo_epochs=2, num_minibatches=2, lr=1e-3)),
    lambda: A2C(A2CConfig(num_minibatches=1, lr=1e-3)),
    lambda: RLOO(RLOOConfig(rloo_k=2, lr=1e-3)),
], ids=["ppo", "a2c", "rloo"])
def test_gradient_accumulation_and_checkpointing_leave_the_update_unchanged(rl_ctx, make):
    base, m0 = _train(rl_ctx, make, ScoringConfig())
    accumulated, m1 = _train(rl_ctx, make, ScoringConfig(train_micro_batch_size=3, score_micro_batch_size=2))
    checkpointed, _ = _train(rl_ctx, make, ScoringConfig(), checkpointing=True)
    assert not torch.equal(base, _params(rl_ctx.policy.model))  # the step did move the policy
    torch.testing.assert_close(accumulated, base, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(checkpointed, base, atol=2e-5, rtol=1e-4)
    assert m1["loss/policy"] == pytest.approx(m0["loss/policy"], abs=1e-4)
