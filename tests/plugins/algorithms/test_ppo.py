import pytest
import torch

from rlhfkit.plugins.algorithms.ppo import PPO, PPOConfig, clipped_policy_loss, clipped_value_loss, policy_objective


def _params(model):
    return torch.cat([p.detach().flatten().clone() for p in model.parameters()])


def test_first_minibatch_has_zero_kl_and_unit_ratio(rl_ctx):
    torch.manual_seed(0)
    ppo = PPO(PPOConfig(ppo_epochs=2, num_minibatches=2))
    ppo.setup(rl_ctx)
    metrics = ppo.step(["copy a b c =", "reverse a b c d =", "sort c b a =", "count a in a b a ="] * 4).metrics
    first = ppo.minibatch_stats[0]
    assert first["policy/ratio"] == pytest.approx(1.0, abs=1e-5)
    assert first["policy/clipfrac"] == 0.0
    assert first["policy/kl_ref"] == pytest.approx(0.0, abs=1e-5)
    assert metrics["rollout/kl"] == pytest.approx(0.0, abs=1e-4)  # policy == SFT reference
    # later minibatches see an updated policy
    assert any(abs(s["policy/ratio"] - 1.0) > 1e-6 for s in ppo.minibatch_stats[1:])


def test_ppo_step_updates_policy_and_critic_but_not_reference(rl_ctx):
    torch.manual_seed(0)
    ppo = PPO(PPOConfig(ppo_epochs=1, num_minibatches=1, lr=1e-3))
    ppo.setup(rl_ctx)
    before_p, before_ref, before_v = _params(rl_ctx.policy.model), _params(rl_ctx.reference.model), _params(ppo.critic)
    before_rm = _params(rl_ctx.reward.rm)
    ppo.step(["copy a b c =", "sort c b a ="] * 4)
    assert not torch.equal(before_p, _params(rl_ctx.policy.model))
    assert not torch.equal(before_v, _params(ppo.critic))
    assert torch.equal(before_ref, _params(rl_ctx.reference.model))
    assert torch.equal(before_rm, _params(rl_ctx.reward.rm))  # the critic is a copy


def test_critic_is_initialised_from_reward_model(rl_ctx):
    ppo = PPO(PPOConfig())
    ppo.setup(rl_ctx)
    assert torch.equal(_params(ppo.critic), _params(rl_ctx.reward.rm))
    assert ppo.critic is not rl_ctx.reward.rm


def test_ptx_term_is_present_and_weighted(rl_ctx):
    pg, ptx = torch.tensor(0.5), torch.tensor(2.0)
    assert policy_objective(pg, ptx, 0.25).item() == pytest.approx(1.0)
    assert policy_objective(pg, None, 0.25).item() == pytest.approx(0.5)
    torch.manual_seed(0)
    ppo = PPO(PPOConfig(ppo_epochs=1, num_minibatches=1, ptx_coef=0.5))
    ppo.setup(rl_ctx)
    m = ppo.step(["copy a b c =", "sort c b a ="] * 2).metrics
    s = ppo.minibatch_stats[0]
    assert s["loss/ptx"] > 0  # an untrained model has a large SFT loss
    assert s["loss/total"] == pytest.approx(s["loss/policy"] + 0.5 * s["loss/ptx"], rel=1e-5)
    assert m["loss/ptx"] > 0


def test_ptx_changes_the_update(rl_ctx, policy_loader, policy_dir):
    def run(coef):
        rl_ctx.policy = policy_loader.load(policy_dir)
        torch.manual_seed(0)
        ppo = PPO(PPOConfig(ppo_epochs=1, num_minibatches=1, ptx_coef=coef, lr=1e-3))
        ppo.setup(rl_ctx)
        ppo.step(["copy a b c ="] * 4)
        return _params(rl_ctx.policy.model)

    assert not torch.allclose(run(0.0), run(1.0))


def test_missing_eos_penalty_replaces_score(rl_ctx):
    from rlhfkit.rlhf.rollout import collect

    rl_ctx.rollout.max_new_tokens = 1  # nothing can end in one token unless it is EOS
    torch.manual_seed(0)
    exp = collect(rl_ctx, ["copy a b c d e ="] * 8, missing_eos_penalty=-3.0)
    truncated = ~exp.rollout.ended
    assert truncated.any()
    assert torch.all(exp.scores[truncated] == -3.0)
    assert torch.all(exp.scores[~truncated] == exp.rm_scores[~truncated])


def test_adaptive_kl_is_updated_by_step(rl_ctx):
    ppo = PPO(PPOConfig(adaptive_kl=True, kl_coef=0.1, target_kl=6.0, kl_horizon=100, ppo_epochs=1))
    ppo.setup(rl_ctx)
    ppo.step(["copy a b c ="] * 4)  # KL = 0 < target: coefficient shrinks by 20% * 4/100
    assert ppo.kl.value == pytest.approx(0.1 * (1 - 0.2 * 4 / 100))


def test_dropout_is_off_during_rl(rl_ctx):
    rl_ctx.policy.model.config.resid_pdrop = 0.5
    for m in rl_ctx.policy.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.5
    PPO(PPOConfig()).setup(rl_ctx)
    assert all(m.p == 0.0 for m in rl_ctx.policy.model.modules() if isinstance(m, torch.nn.Dropout))


def test_resumable_state_is_the_kl_controller_and_shuffler_and_the_pipeline_sees_both_engines(rl_ctx, tmp_path):
    from rlhfkit.resume import TrackingBackend

    rl_ctx.backend = tracked = TrackingBackend(rl_ctx.backend)
    ppo = PPO(PPOConfig(adaptive_kl=True, kl_coef=0.1, target_kl=6.0, kl_horizon=100, ppo_epochs=1))
    ppo.setup(rl_ctx)
    ppo.step(["copy a b c ="] * 4)
    assert [e.module for e in tracked.engines] == [ppo.policy.module, ppo.value.module]  # policy and critic
    torch.save(ppo.state_dict(), tmp_path / "algo.pt")
    state = torch.load(tmp_path / "algo.pt", weights_only=True)  # tensors and numbers only
    fresh = PPO(PPOConfig(adaptive_kl=True, kl_coef=0.1, target_kl=6.0, kl_horizon=100))
    fresh.shuffle = torch.Generator()
    fresh.load_state_dict(state)
    assert fresh.kl.value == ppo.kl.value != 0.1
    assert torch.equal(torch.randperm(50, generator=fresh.shuffle), torch.randperm(50, generator=ppo.shuffle))


def _entropy_step(rl_ctx, micro_batch_size, entropy_coef):
    """The policy's first-minibatch gradient (before clipping) and the step's metrics."""
    import copy

    from rlhfkit.interfaces import ScoringConfig

    ctx = copy.copy(rl_ctx)
    ctx.policy = copy.deepcopy(rl_ctx.policy)
    ctx.scoring = ScoringConfig(train_micro_batch_size=micro_batch_size)
    torch.manual_seed(0)
    ppo = PPO(PPOConfig(ppo_epochs=1, num_minibatches=1, entropy_coef=entropy_coef))
    ppo.setup(ctx)
    grads, step = [], ppo.policy.step
    ppo.policy.step = lambda: grads.append(torch.cat([p.grad.flatten().clone() for p in ctx.policy.model.parameters()])) or step()
    metrics = ppo.step(["copy a b c =", "reverse a b c d e f g =", "sort c b a =", "count a in a b a =",
                        "copy x =", "sort h g f e d c b a =", "reverse q r =", "count b in b b b c ="]).metrics
    return grads[0], metrics


def test_entropy_bonus_gradient_is_the_same_with_micro_batches(rl_ctx):
    """The entropy term averages over the minibatch's tokens, like the policy loss: split
    into micro-batches of 2 rows, the accumulated gradient is the unsplit one."""
    whole, m_whole = _entropy_step(rl_ctx, 0, entropy_coef=0.5)
    split, m_split = _entropy_step(rl_ctx, 2, entropy_coef=0.5)
    torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-5)
    assert m_split["policy/entropy"] == pytest.approx(m_whole["policy/entropy"], rel=1e-5)
    assert m_split["loss/total"] == pytest.approx(m_whole["loss/total"], rel=1e-5)
    assert m_whole["loss/total"] == pytest.approx(m_whole["loss/policy"] - 0.5 * m_whole["policy/entropy"], rel=1e-5)


def test_the_reward_models_bias_shifts_the_critics_values(rl_ctx):
    """The critic starts as the RM, bias included: a bias of 2 lowers every value by 2
    (it used to leak in as a constant offset from the rewards, a length bias in GAE)."""
    from rlhfkit.rlhf.rollout import collect

    def values(bias):
        rl_ctx.reward.rm.set_bias(bias)
        torch.manual_seed(0)
        exp = collect(rl_ctx, ["copy a b c =", "sort c b a =", "reverse a b ="] * 2, critic=rl_ctx.make_critic())
        return exp.values, exp.rm_scores, exp.mask

    v0, r0, mask = values(0.0)
    v2, r2, _ = values(2.0)
    torch.testing.assert_close(r2, r0 - 2.0)
    torch.testing.assert_close(v2 * mask, (v0 - 2.0) * mask)


def test_value_loss_is_clipped():
    old = torch.zeros(1, 2)
    returns = torch.tensor([[1.0, 1.0]])
    new = torch.tensor([[1.0, 1.0]], requires_grad=True)  # moved 1.0, clip is 0.2
    loss, clipfrac = clipped_value_loss(new, old, returns, torch.ones(1, 2), clip=0.2)
    # clipped value 0.2 -> error 0.8^2; unclipped error 0: the max keeps the clipped one
    assert loss.item() == pytest.approx(0.5 * 0.64)
    assert clipfrac.item() == 1.0
    loss.backward()
    assert torch.all(new.grad == 0)  # the clipped branch carries no gradient to the new value


def test_policy_loss_ratio_one_is_minus_mean_advantage():
    logp = torch.tensor([[-1.0, -2.0, -0.5]])
    adv = torch.tensor([[1.0, -2.0, 4.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, st = clipped_policy_loss(logp, logp.clone(), adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-(1.0 - 2.0) / 2)
    assert st["ratio"].item() == pytest.approx(1.0)
    assert st["clipfrac"].item() == 0.0


def test_policy_loss_clips_large_ratio():
    old = torch.zeros(1, 1)
    new = torch.tensor([[1.0]])  # ratio e
    loss, st = clipped_policy_loss(new, old, torch.ones(1, 1), torch.ones(1, 1), clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.2)
    assert st["clipfrac"].item() == 1.0
