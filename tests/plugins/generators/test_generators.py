"""The rollout engines (group ``generator``): static and dynamic KV cache, compiled decode
step, transformers' generate, and a third-party engine picked by name."""

import pytest
import torch

from rlhfkit import hookimpl
from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import Generator, RolloutConfig
from rlhfkit.plugins.generators.hf_generate import HFGenerateConfig, HFGenerator
from rlhfkit.plugins.generators.kv_cache import KVCacheConfig, KVCacheGenerator
from rlhfkit.rlhf.rollout import policy_logprobs
from rlhfkit.rlhf.sampling import _static_cache, draw_uniforms, sample

CPU = torch.device("cpu")
PROMPTS = ["copy a b c =", "sort d c b a e =", "reverse a b =", "count a in a b a ="]


def _hf_greedy(model, tok, prompt, n):
    ids = torch.tensor([tok(prompt, add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(params=["tiny-gpt2", "tiny-llama"])
def policy(request, synthetic):
    from rlhfkit.plugins.policies.hf import HFPolicyConfig, HFPolicyLoader

    torch.manual_seed(0)
    p = HFPolicyLoader(HFPolicyConfig(model=request.param, hidden_size=32, n_layer=2, n_head=2)).build(synthetic)
    p.model.eval()
    return p


def test_static_cache_is_preallocated_and_matches_dynamic_cache(policy):
    from transformers import StaticCache

    assert isinstance(_static_cache(policy.model, 16), StaticCache)
    cfg = RolloutConfig(max_new_tokens=8, temperature=0.8, top_p=0.9)
    u = draw_uniforms(len(PROMPTS), cfg.max_new_tokens)
    static = KVCacheGenerator(KVCacheConfig(static_cache=True))(policy.model, policy.tokenizer, PROMPTS, cfg, CPU, uniforms=u)
    dynamic = KVCacheGenerator(KVCacheConfig(static_cache=False))(policy.model, policy.tokenizer, PROMPTS, cfg, CPU, uniforms=u)
    assert torch.equal(static.input_ids, dynamic.input_ids)
    torch.testing.assert_close(static.logprobs, dynamic.logprobs, atol=1e-5, rtol=1e-5)


def test_static_cache_under_bf16_autocast(policy):
    """fp32 weights under bf16 autocast, the path of every GPU run: a RoPE model (Llama)
    hands the cache fp32 keys and bf16 values, which a plain StaticCache cannot store."""
    cfg = RolloutConfig(max_new_tokens=8)
    u = draw_uniforms(len(PROMPTS), cfg.max_new_tokens)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        static = KVCacheGenerator(KVCacheConfig(static_cache=True))(policy.model, policy.tokenizer, PROMPTS, cfg, CPU, uniforms=u)
        dynamic = KVCacheGenerator(KVCacheConfig(static_cache=False))(policy.model, policy.tokenizer, PROMPTS, cfg, CPU, uniforms=u)
        trainer = policy_logprobs(policy.model, static, cfg.temperature)
    assert torch.equal(static.input_ids, dynamic.input_ids)
    m = static.response_mask.bool()
    torch.testing.assert_close(static.logprobs[m], dynamic.logprobs[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(static.logprobs[m], trainer[m], atol=1e-2, rtol=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # transformers' generate, on the same static cache
        theirs = HFGenerator(HFGenerateConfig(cache_implementation="static"))(
            policy.model, policy.tokenizer, PROMPTS, cfg, CPU, greedy=True)
        ours = KVCacheGenerator(KVCacheConfig())(policy.model, policy.tokenizer, PROMPTS, cfg, CPU, greedy=True)
    assert torch.equal(theirs.input_ids, ours.input_ids)


def test_kv_cache_greedy_matches_generate_and_logprobs_match_trainer(policy):
    model, tok = policy.model, policy.tokenizer
    r = KVCacheGenerator(KVCacheConfig())(model, tok, PROMPTS, RolloutConfig(max_new_tokens=6), CPU, greedy=True)
    for i, p in enumerate(PROMPTS):
        n = int(r.response_mask[i].sum())
        assert r.response_ids[i, :n].tolist() == _hf_greedy(model, tok, p, 6)[:n]
    cfg = RolloutConfig(max_new_tokens=8, temperature=0.7, top_k=5)
    r = KVCacheGenerator(KVCacheConfig())(model, tok, PROMPTS, cfg, CPU)
    m = r.response_mask.bool()
    torch.testing.assert_close(r.logprobs[m], policy_logprobs(model, r, cfg.temperature)[m], atol=1e-4, rtol=1e-4)


def test_stops_early_once_every_sequence_has_ended(policy):
    """A policy that always says EOS: one forward pass (the prompt), no decode steps."""
    model, tok = policy.model, policy.tokenizer
    calls = []

    def always_eos(module, args, kwargs, out):
        calls.append(1)
        out.logits[..., tok.eos_token_id] = 1e4
        return out

    handle = model.register_forward_hook(always_eos, with_kwargs=True)
    try:
        r = sample(model, tok, PROMPTS, RolloutConfig(max_new_tokens=10), CPU)
    finally:
        handle.remove()
    assert r.response_ids.shape[1] == 1 and bool(r.ended.all())
    assert len(calls) == 1


def test_compiled_decode_step_gives_the_same_samples(tiny_policy):
    """compile=eager traces the decode step with torch.compile (dynamo) on CPU; on GPU
    compile=reduce-overhead also captures it as a CUDA graph."""
    model, tok = tiny_policy.model.eval(), tiny_policy.tokenizer
    cfg = RolloutConfig(max_new_tokens=6)
    u = draw_uniforms(2, cfg.max_new_tokens)
    plain = KVCacheGenerator(KVCacheConfig())(model, tok, PROMPTS[:2], cfg, CPU, uniforms=u)
    gen = KVCacheGenerator(KVCacheConfig(compile="eager"))
    compiled = gen(model, tok, PROMPTS[:2], cfg, CPU, uniforms=u)
    assert gen.decode_step(model) is gen.decode_step(model)  # compiled once per model
    assert torch.equal(plain.input_ids, compiled.input_ids)
    torch.testing.assert_close(plain.logprobs, compiled.logprobs, atol=1e-5, rtol=1e-5)


def test_kv_cache_config_errors():
    with pytest.raises(ConfigError, match="compile"):
        KVCacheGenerator(KVCacheConfig(compile="fast"))
    with pytest.raises(ConfigError, match="static_cache"):
        KVCacheGenerator(KVCacheConfig(static_cache=False, compile="default"))


def test_hf_generate_engine_agrees_with_kv_cache(policy):
    model, tok = policy.model, policy.tokenizer
    ours = KVCacheGenerator(KVCacheConfig())(model, tok, PROMPTS, RolloutConfig(max_new_tokens=6), CPU, greedy=True)
    theirs = HFGenerator(HFGenerateConfig())(model, tok, PROMPTS, RolloutConfig(max_new_tokens=6), CPU, greedy=True)
    assert isinstance(theirs.response_ids, torch.Tensor) and isinstance(HFGenerator(HFGenerateConfig()), Generator)
    assert ours.prompts == theirs.prompts == list(PROMPTS)  # each row's prompt text, for reward functions
    for i in range(len(PROMPTS)):
        n = int(ours.response_mask[i].sum())
        assert int(theirs.response_mask[i].sum()) == n
        assert ours.response_ids[i, :n].tolist() == theirs.response_ids[i, :n].tolist()
    torch.manual_seed(0)
    cfg = RolloutConfig(max_new_tokens=8, temperature=0.7)
    r = HFGenerator(HFGenerateConfig())(model, tok, PROMPTS, cfg, CPU)
    m = r.response_mask.bool()
    torch.testing.assert_close(r.logprobs[m], policy_logprobs(model, r, cfg.temperature)[m], atol=1e-4, rtol=1e-4)
    assert torch.all(r.response_ids[~m] == tok.pad_token_id)


def test_hf_generate_ignores_the_checkpoint_generation_config(policy, tmp_path):
    """A checkpoint's generation_config (a repetition penalty, no repeated tokens, top_k=1)
    must not reshape what generate samples: the logprobs score the raw distribution."""
    from transformers import AutoModelForCausalLM

    tok, cfg = policy.tokenizer, RolloutConfig(max_new_tokens=6)
    engine = HFGenerator(HFGenerateConfig())
    plain = engine(policy.model, tok, PROMPTS, cfg, CPU, greedy=True)
    gc = policy.model.generation_config
    gc.repetition_penalty, gc.no_repeat_ngram_size, gc.do_sample, gc.top_k = 100.0, 1, True, 1
    policy.model.save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert model.generation_config.repetition_penalty == 100.0
    assert torch.equal(engine(model, tok, PROMPTS, cfg, CPU, greedy=True).input_ids, plain.input_ids)
    torch.manual_seed(0)
    sampled = engine(model, tok, PROMPTS * 4, cfg, CPU)
    assert not torch.equal(sampled.input_ids, engine(model, tok, PROMPTS * 4, cfg, CPU, greedy=True).input_ids)
    m = sampled.response_mask.bool()
    torch.testing.assert_close(sampled.logprobs[m], policy_logprobs(model, sampled, cfg.temperature)[m], atol=1e-4, rtol=1e-4)
    assert model.generation_config.repetition_penalty == 100.0  # lent a blank config, given its own back


class ConstantEngine:
    """A third-party rollout engine: answers every prompt with EOS."""

    calls = 0

    def __init__(self, cfg):
        self.inner = KVCacheGenerator(KVCacheConfig())

    def __call__(self, model, tokenizer, prompts, cfg, device, **kw):
        ConstantEngine.calls += 1
        return self.inner(model, tokenizer, prompts, RolloutConfig(max_new_tokens=1), device, **kw)


class EnginePlugin:
    @hookimpl
    def rlhfkit_register_generators(self, register):
        from dataclasses import make_dataclass

        register("constant_engine", ConstantEngine, make_dataclass("ConstantEngineConfig", []))


def test_pipeline_samples_with_the_selected_generator(tmp_path):
    from rlhfkit.cli import setup, store_schemas
    from rlhfkit.pipeline import Run
    from rlhfkit.registry import Registry

    from ...helpers import SMOKE, compose

    plugins, _ = setup()
    plugin = EnginePlugin()
    plugins.register(plugin, name="engine-plugin", package="engine-package")
    try:
        registry = Registry.from_plugins(plugins)
        store_schemas(registry)
        assert registry.get("generator", "constant_engine").package == "engine-package"
        cfg = compose(SMOKE + ["stages=[sft]", "logger=[]", "generator=constant_engine"])
        ConstantEngine.calls = 0
        table = Run(cfg, registry, plugins, str(tmp_path / "run"))()
    finally:
        plugins.pm.unregister(plugin)
    assert ConstantEngine.calls > 0
    assert table["policies"]["sft"]["length"] <= 1.0  # every response is at most one token
