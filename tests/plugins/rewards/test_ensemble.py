"""``reward=ensemble``: the objectives on hand-made member scores, one forward pass per
member over the whole batch, centring, the disagreement metrics, and the one-line errors."""

import json
import os

import pytest
import torch

from rlhfkit.cli import setup
from rlhfkit.config import EvalConfig, validate_run
from rlhfkit.errors import ConfigError
from rlhfkit.plugins.reward_models.hf_rm import HFRewardConfig, HFRewardLoader
from rlhfkit.plugins.rewards.ensemble import EnsembleReward, EnsembleRewardConfig, ensemble_objective
from rlhfkit.plugins.stages.rm import ENSEMBLE_FILE, bootstrap, ensemble_members, member_head, perturb_head
from rlhfkit.rlhf.sampling import Rollout
from rlhfkit.rlhf.tokenize import encode_pairs

from ...conftest import head_builder
from ...helpers import SMOKE, compose

SCORES = torch.tensor([[1.0, -1.0, 0.5],
                       [3.0, -1.0, 0.0],
                       [2.0, 2.0, 1.0]])  # (K=3 members, B=3 rows)


def test_objectives_on_hand_made_scores():
    assert ensemble_objective(SCORES, "mean").tolist() == pytest.approx([2.0, 0.0, 0.5])
    assert ensemble_objective(SCORES, "wco").tolist() == [1.0, -1.0, 0.0]  # min over members
    # UWO: mean - lambda * (1/K) sum (r_k - mean)^2: row 0 has variance 2/3, row 1 variance 2, row 2 1/6
    assert ensemble_objective(SCORES, "uwo", 0.5).tolist() == pytest.approx([2 - 1 / 3, 0 - 1.0, 0.5 - 1 / 12])
    assert ensemble_objective(SCORES, "uwo", 0.0).tolist() == pytest.approx([2.0, 0.0, 0.5])


def test_members_take_rm_member_heads_in_turn_and_member_0_the_runs_head():
    assert [member_head(["last_token", "mean_pool"], k) for k in range(5)] == [None, "last_token", "mean_pool",
                                                                                 "last_token", "mean_pool"]
    assert [member_head([], k) for k in range(3)] == [None, None, None]


def test_bootstrap_resamples_differ_per_member_and_leave_the_global_rng():
    units = list(range(50))
    torch.manual_seed(3)
    before = torch.get_rng_state()
    a, b = bootstrap(units, 1), bootstrap(units, 7920)
    assert torch.equal(torch.get_rng_state(), before)
    assert a == bootstrap(units, 1) and a != b  # deterministic per seed, different between members
    assert len(a) == len(units) and set(a) <= set(units) and len(set(a)) < len(units)  # with replacement


def test_a_members_random_start_moves_only_the_heads_weight_matrices():
    """rm.member_init_std: members 1.. start from the single RM's head plus N(0, std) on its
    weight matrices; the bias and the log-likelihood's weight stay, and so does the global RNG."""
    from rlhfkit.plugins.reward_heads.logprob import LogProbConfig, LogProbHead

    heads = [LogProbHead(64, LogProbConfig()) for _ in range(3)]
    before = torch.get_rng_state()
    perturb_head(heads[0], 0.1, 1)
    perturb_head(heads[1], 0.1, 1)
    perturb_head(heads[2], 0.1, 7920)
    assert torch.equal(torch.get_rng_state(), before)
    w = [h.linear.weight.detach() for h in heads]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])  # deterministic per member seed
    assert 0.07 < float(w[2].std()) < 0.13 and float(w[2].abs().max()) > 0
    assert all(float(h.linear.bias.detach()) == 0 and float(h.logprob_weight.detach()) == 1 for h in heads)


class Ctx:
    """What the source reads of a stage context."""

    def __init__(self, product, synthetic, backend):
        self.products = {"rm": product}
        self.components = {"reward_model": HFRewardLoader(HFRewardConfig()), "reward_head": head_builder, "data": synthetic}
        self.backend, self.device, self.eval = backend, backend.device, EvalConfig(num_prompts=16, batch_size=8)

        class Data:
            context = None
        self.data = Data()


@pytest.fixture
def product(policy_dir, tmp_path):
    """An rm product of three members with different heads (and biases), laid out as the rm stage lays it out."""
    path = str(tmp_path / "rm")
    loader = HFRewardLoader(HFRewardConfig())
    members = ["."] + [f"members/{k}" for k in (1, 2)]
    for k, rel in enumerate(members):
        torch.manual_seed(100 + k)
        rm = loader.build(policy_dir, head_builder)
        rm.set_bias(0.1 * k)
        os.makedirs(os.path.join(path, rel), exist_ok=True)
        rm.save(os.path.join(path, rel))
    with open(os.path.join(path, ENSEMBLE_FILE), "w") as f:
        json.dump({"members": members}, f)
    return path


def rollout_of(tok, prompts, responses):
    e = encode_pairs(tok, prompts, responses, torch.device("cpu"))
    B = len(prompts)
    return Rollout(input_ids=e.input_ids, attention_mask=e.attention_mask, prompt_width=1,
                   response_mask=torch.ones(B, 1), logprobs=torch.zeros(B, 1), ended=torch.ones(B, dtype=torch.bool),
                   responses=list(responses), prompts=list(prompts))


def test_one_forward_pass_per_member_over_the_whole_batch(product, synthetic, backend, tiny_policy):
    source = EnsembleReward(EnsembleRewardConfig(objective="wco", center=False))
    assert source.needs == ("rm",)
    source.setup(Ctx(product, synthetic, backend), tiny_policy.tokenizer)
    assert source.critic_init == product  # member 0, at the product's top level, reads the policy's tokens
    assert ensemble_members(product) == [product] + [os.path.join(product, "members", k) for k in "12"]
    calls = []
    for k, m in enumerate(source.scorer.members):
        m.register_forward_hook(lambda mod, args, out, k=k: calls.append((k, args[0].shape[0])))
    demos = synthetic.sft_examples("train")[:6]
    r = rollout_of(tiny_policy.tokenizer, [d.prompt for d in demos], [d.response for d in demos])
    scores = source(r)
    assert calls == [(0, 6), (1, 6), (2, 6)]  # each member once, on all 6 rows
    each = torch.stack([m(r.input_ids, r.attention_mask) for m in source.scorer.members])  # (K, B)
    assert scores.shape == (6,) and torch.allclose(scores, each.min(0).values)
    assert not torch.allclose(each[0], each[1])  # the members differ
    m = source.metrics()
    std = each.std(0, unbiased=False)
    assert m["reward/ensemble/std_mean"] == pytest.approx(float(std.mean()), rel=1e-5)
    assert m["reward/ensemble/std_max"] == pytest.approx(float(std.max()), rel=1e-5)
    assert m["reward/ensemble/var_mean"] == pytest.approx(float((std**2).mean()), rel=1e-5)
    assert m["reward/ensemble/member/2"] == pytest.approx(float(each[2].mean()), rel=1e-5)
    assert m["reward/ensemble/mean"] == pytest.approx(float(each.mean()), rel=1e-5)
    again = source.metrics()  # nothing scored since: the same keys, zeros
    assert set(again) == set(m) and all(v == 0 for v in again.values())


def test_centring_puts_the_demonstrations_at_mean_zero(product, synthetic, backend, tiny_policy):
    ctx = Ctx(product, synthetic, backend)
    demos = synthetic.sft_examples("train")[:16]  # those the rm stage normalises each member on
    r = rollout_of(tiny_policy.tokenizer, [d.prompt for d in demos], [d.response for d in demos])
    raw = EnsembleReward(EnsembleRewardConfig(objective="uwo", uwo_lambda=2.0, center=False))
    raw.setup(ctx, tiny_policy.tokenizer)
    centred = EnsembleReward(EnsembleRewardConfig(objective="uwo", uwo_lambda=2.0))
    centred.setup(ctx, tiny_policy.tokenizer)
    assert abs(float(raw(r).mean())) > 1e-3
    assert float(centred(r).mean()) == pytest.approx(0.0, abs=1e-5)
    assert torch.allclose(centred(r) - raw(r), torch.full((16,), -float(raw(r).mean())), atol=1e-5)  # a shift only


def test_a_single_reward_model_is_refused(policy_dir, synthetic, backend, tiny_policy, tmp_path):
    path = str(tmp_path / "rm")
    HFRewardLoader(HFRewardConfig()).build(policy_dir, head_builder).save(path)
    with pytest.raises(ConfigError, match=r"reward=ensemble: the reward model at .* is a single one, not an ensemble\. "
                                          r"Train one with stages=\[\.\.\.,rm,\.\.\.\] rm\.ensemble_size=K"):
        EnsembleReward(EnsembleRewardConfig()).setup(Ctx(path, synthetic, backend), tiny_policy.tokenizer)


@pytest.mark.parametrize("overrides,message", [
    (["reward=ensemble"], r"reward=ensemble scores with several reward models, but rm.ensemble_size=1: set "
                          r"rm.ensemble_size=K with K >= 2"),
    (["rm.ensemble_size=0"], r"rm.ensemble_size=0: must be >= 1"),
    (["reward=ensemble", "rm.ensemble_size=3", "reward.uwo_lambda=-1"], r"reward.uwo_lambda=-1(\.0)?: must be >= 0"),
    (["reward=ensemble", "rm.ensemble_size=3", "reward.objective=median"],
     r"^reward.objective=median: must be one of mean, wco, uwo$"),
    (["rm.ensemble_size=3", "rm.member_heads=[last_token,lasttoken]"],
     r"^rm.member_heads=\[last_token,lasttoken\]: unknown reward head 'lasttoken'; choose from last_token, logprob, "),
])
def test_bad_settings_fail_before_any_work(overrides, message):
    registry = setup()[1]
    with pytest.raises(ConfigError, match=message):
        validate_run(compose(SMOKE + overrides), registry)


def test_from_run_with_a_single_reward_model_is_refused(policy_dir, tmp_path):
    run = tmp_path / "prev"
    HFRewardLoader(HFRewardConfig()).build(policy_dir, head_builder).save(str(run / "rm"))
    registry = setup()[1]
    with pytest.raises(ConfigError, match=r"reward=ensemble: the reward model at .*prev/rm is a single one"):
        validate_run(compose(SMOKE + ["reward=ensemble", "stages=[rl]", f"from_run={run}"]), registry)


def test_from_run_with_a_member_head_no_plugin_registers_is_refused(policy_dir, tmp_path):
    rm = tmp_path / "prev" / "rm"
    HFRewardLoader(HFRewardConfig()).build(policy_dir, head_builder).save(str(rm))
    (rm / "members" / "1").mkdir(parents=True)
    (rm / ENSEMBLE_FILE).write_text(json.dumps({"members": [".", "members/1"], "member_heads": ["attention_pool"]}))
    with pytest.raises(ConfigError, match=r"the ensemble at .*prev/rm has a member with reward head 'attention_pool', "
                                          r"which no installed plugin registers \(installed: last_token, logprob, "):
        validate_run(compose(SMOKE + ["reward=ensemble", "stages=[rl]", f"from_run={tmp_path / 'prev'}"]), setup()[1])
