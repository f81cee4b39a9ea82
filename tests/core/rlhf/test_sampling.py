import torch

from rlhfkit.interfaces import RolloutConfig
from rlhfkit.rlhf.rollout import policy_logprobs
from rlhfkit.rlhf.sampling import sample


def test_greedy_sampling_matches_transformers_generate(tiny_policy):
    model, tok = tiny_policy.model.eval(), tiny_policy.tokenizer
    prompts = ["copy a b c =", "sort d c b a e ="]
    cfg = RolloutConfig(max_new_tokens=6)
    ours = sample(model, tok, prompts, cfg, torch.device("cpu"), greedy=True)
    for i, p in enumerate(prompts):  # one at a time: no padding on the HF side
        ids = torch.tensor([tok(p, add_special_tokens=False)["input_ids"]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        theirs = out[0, ids.shape[1]:].tolist()
        n = int(ours.response_mask[i].sum())
        assert ours.response_ids[i, :n].tolist() == theirs[:n]


def test_sampled_logprobs_match_recomputed_logprobs(tiny_policy):
    torch.manual_seed(0)
    model, tok = tiny_policy.model.eval(), tiny_policy.tokenizer
    cfg = RolloutConfig(max_new_tokens=8, temperature=0.7)
    r = sample(model, tok, ["copy a b c =", "count a in a b a =", "reverse h g ="], cfg, torch.device("cpu"))
    with torch.no_grad():
        recomputed = policy_logprobs(model, r, cfg.temperature)
    m = r.response_mask.bool()
    torch.testing.assert_close(r.logprobs[m], recomputed[m], atol=1e-4, rtol=1e-4)
    # after EOS everything is masked and padded
    assert torch.all(r.response_ids[~m] == tok.pad_token_id)


def test_top_k_one_is_greedy(tiny_policy):
    model, tok = tiny_policy.model.eval(), tiny_policy.tokenizer
    prompts = ["copy a b c ="] * 4
    greedy = sample(model, tok, prompts, RolloutConfig(max_new_tokens=5), torch.device("cpu"), greedy=True)
    topk = sample(model, tok, prompts, RolloutConfig(max_new_tokens=5, top_k=1), torch.device("cpu"))
    assert torch.equal(greedy.response_ids, topk.response_ids)


def test_sampling_is_independent_of_batch_composition(tiny_policy):
    from rlhfkit.rlhf.sampling import draw_uniforms

    model, tok = tiny_policy.model.eval(), tiny_policy.tokenizer
    prompts = ["copy a b c =", "sort d c b a e =", "reverse a b =", "count a in a b a ="]
    cfg = RolloutConfig(max_new_tokens=6)
    torch.manual_seed(3)
    u = draw_uniforms(len(prompts), cfg.max_new_tokens)
    whole = sample(model, tok, prompts, cfg, torch.device("cpu"), uniforms=u)
    halves = [sample(model, tok, prompts[i : i + 2], cfg, torch.device("cpu"), uniforms=u[i : i + 2]) for i in (0, 2)]
    assert whole.responses == halves[0].responses + halves[1].responses
    assert whole.prompts == prompts and whole.select(torch.tensor([2, 0])).prompts == [prompts[2], prompts[0]]
    assert whole.trimmed().prompts == prompts


def test_decoding_continues_while_any_rank_is_alive(tiny_policy):
    """Under ZeRO-3 a rank whose sequences all ended must keep running forward passes
    while another rank still decodes; any_alive carries the other ranks' answer."""
    model, tok = tiny_policy.model.eval(), tiny_policy.tokenizer
    calls = []
    orig = model.forward
    model.forward = lambda *a, **k: calls.append(1) or orig(*a, **k)
    cfg = RolloutConfig(max_new_tokens=6)
    r = sample(model, tok, ["copy a ="], cfg, torch.device("cpu"), greedy=True, any_alive=lambda local: True)
    assert len(calls) == cfg.max_new_tokens  # prefill + one per remaining step: never stopped early
    calls.clear()
    sample(model, tok, ["copy a ="], cfg, torch.device("cpu"), greedy=True, any_alive=lambda local: False)
    assert len(calls) == 1
    assert r.response_mask.shape[1] == cfg.max_new_tokens
