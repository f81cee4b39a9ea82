"""The fused LM-head logprobs: exact values and gradients, used where the model allows,
and the plain path where it does not."""

import pytest
import torch

from rlhfkit.interfaces import RolloutConfig
from rlhfkit.rlhf import logprobs
from rlhfkit.rlhf.fused import chosen_logprobs
from rlhfkit.rlhf.logprobs import entropy_from_logits, logprobs_from_logits, response_logits, response_logprobs
from rlhfkit.rlhf.sampling import sample


def test_values_and_gradients_are_exact():
    torch.manual_seed(0)
    h = torch.randn(37, 8, dtype=torch.float64, requires_grad=True)
    w = torch.randn(50, 8, dtype=torch.float64, requires_grad=True)
    b = torch.randn(50, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 50, (37,))
    assert torch.autograd.gradcheck(lambda h, w, b: chosen_logprobs(h, w, b, t, 0.7, chunk=8)[0], (h, w, b))

    logp, ent = chosen_logprobs(h, w, b, t, 0.7, chunk=8)
    ref = torch.log_softmax((h @ w.t() + b) / 0.7, -1)
    torch.testing.assert_close(logp, ref.gather(-1, t[:, None]).squeeze(-1))
    torch.testing.assert_close(ent, -(ref.exp() * ref).sum(-1))
    assert not ent.requires_grad


PROMPTS = ["copy a b c =", "sort d c b a e =", "reverse a ="]


@pytest.fixture(params=["tiny-gpt2", "tiny-llama"])
def policy_and_rollout(request, synthetic):
    from rlhfkit.plugins.policies.hf import HFPolicyConfig, HFPolicyLoader

    torch.manual_seed(0)
    p = HFPolicyLoader(HFPolicyConfig(model=request.param, hidden_size=32, n_layer=2, n_head=2)).build(synthetic)
    r = sample(p.model.eval(), p.tokenizer, PROMPTS, RolloutConfig(max_new_tokens=6), torch.device("cpu"))
    return p.model, r, p.tokenizer


def _grads(model, fn):
    model.zero_grad()
    fn().backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_fused_path_matches_the_plain_path_on_real_models(policy_and_rollout, monkeypatch):
    model, r, _ = policy_and_rollout
    m = r.response_mask.float()
    calls = []
    real = logprobs.chosen_logprobs
    monkeypatch.setattr(logprobs, "chosen_logprobs", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused, fused_ent = response_logprobs(model, r, 0.8)
    assert calls, "the fused path should apply to GPT-2 and Llama"
    logits = response_logits(model, r)
    torch.testing.assert_close(fused, logprobs_from_logits(logits, r.response_ids, 0.8), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_ent, entropy_from_logits(logits, 0.8), atol=1e-5, rtol=1e-5)
    g_fused = _grads(model, lambda: (response_logprobs(model, r, 0.8)[0] * m).sum())
    g_plain = _grads(model, lambda: (logprobs_from_logits(response_logits(model, r), r.response_ids, 0.8) * m).sum())
    torch.testing.assert_close(g_fused, g_plain, atol=1e-5, rtol=1e-4)


def test_models_with_transformed_logits_take_the_plain_path(policy_and_rollout):
    """A model whose logits are not just head(hidden) (here: scaled) fails the check."""
    model, r, _ = policy_and_rollout
    handle = model.register_forward_hook(lambda mod, args, out: setattr(out, "logits", out.logits * 0.5) or out)
    try:
        logp, _ = response_logprobs(model, r, 1.0)
        expected = logprobs_from_logits(response_logits(model, r), r.response_ids, 1.0)
    finally:
        handle.remove()
    torch.testing.assert_close(logp, expected)
    assert model in logprobs._UNFUSABLE


def test_the_lm_head_projects_in_fp32_under_bf16_autocast(policy_and_rollout):
    """Under autocast the trunk runs in bf16 but the LM head does not, on every path that
    makes logprobs (fused, plain, sampler): bf16 logits would be off by up to half a unit in
    the last place (0.03 nats at a logit of 8), and that noise would enter the PPO ratio."""
    model, r, tokenizer = policy_and_rollout
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(100.0)  # logits of several units, where bf16 rounds by hundredths

    def fp32_head_logprobs(rollout, temperature):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            hidden = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                           position_ids=rollout.position_ids, output_hidden_states=True).hidden_states[-1]
        R = rollout.response_mask.shape[1]
        logits = torch.nn.functional.linear(hidden[:, -(R + 1) : -1].float(), head.weight, head.bias)
        return logprobs_from_logits(logits, rollout.response_ids, temperature)

    m = r.response_mask.bool()
    expected = fp32_head_logprobs(r, 0.8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, _ = response_logprobs(model, r, 0.8)
        plain = logprobs_from_logits(response_logits(model, r), r.response_ids, 0.8)
        sampled = sample(model, tokenizer, PROMPTS * 4, RolloutConfig(max_new_tokens=6, temperature=4.0), torch.device("cpu"))
    torch.testing.assert_close(fused[m], expected[m], atol=1e-4, rtol=0)
    torch.testing.assert_close(plain[m], expected[m], atol=1e-4, rtol=0)
    ms = sampled.response_mask.bool()
    torch.testing.assert_close(sampled.logprobs[ms], fp32_head_logprobs(sampled, 4.0)[ms], atol=1e-4, rtol=0)
