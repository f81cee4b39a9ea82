"""The dpo stage's pieces on a tiny policy: the sequence logprobs it trains on, one forward
pass per step with every response once, ORPO without its preference term is SFT, the
reference cache's checkpoint state, and its settings checked before any work."""

from types import SimpleNamespace

import pytest
import torch

from rlhfkit.cli import setup
from rlhfkit.config import validate_run
from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import Comparison
from rlhfkit.rlhf import preference
from rlhfkit.plugins.stages.dpo import DPO, DPOConfig, Pairs, PreferenceLoss
from rlhfkit.rlhf.logprobs import logprobs_from_logits
from rlhfkit.rlhf.losses import causal_lm_loss
from rlhfkit.rlhf.preference import ReferenceLogprobs, sequence_logprobs
from rlhfkit.rlhf.tokenize import pad_rows

from ...helpers import SMOKE, compose, run_cli

BATCH = [
    Comparison("copy a b =", ("a b", "b a", "a a b"), (2.0, 0.0, 1.0)),
    Comparison("reverse a b c =", ("c b a", "a b c c b"), (1.0, 0.0)),
    Comparison("count a in a a b =", ("2", "3", "1", "two"), (1.0, 0.0, 0.0, 0.0)),  # ties among the rejected
]


def _stage(tiny_policy, **cfg):
    stage = DPO(DPOConfig(**cfg))
    stage.pad_id = tiny_policy.tokenizer.pad_token_id
    ctx = SimpleNamespace(name="dpo", backend=SimpleNamespace(all_reduce_sum=None, world_size=1),
                          device=torch.device("cpu"), data=SimpleNamespace(context=None))
    rows, offsets = stage.tokenize(ctx, tiny_policy.tokenizer, BATCH)
    cache = ReferenceLogprobs(torch.tensor([len(ids) - plen for ids, plen in rows]))
    return stage, ctx, rows, offsets, cache


def _by_hand(model, rows):
    """Each response's summed token logprobs, one unpadded row at a time."""
    out = []
    for ids, plen in rows:
        x = torch.tensor([ids])
        lp = logprobs_from_logits(model(input_ids=x).logits[:, :-1], x[:, 1:])[0]
        out.append(lp[plen - 1 :].sum())
    return torch.stack(out)


@pytest.mark.parametrize("packing", [True, False])
def test_sequence_logprobs_packed_or_padded_equal_one_row_at_a_time(tiny_policy, packing):
    model = tiny_policy.model.eval()
    stage, ctx, rows, _, _ = _stage(tiny_policy, packing=packing, pack_length=32)
    with torch.no_grad():
        got = sequence_logprobs(model, rows, stage.pad_id, ctx.device, stage.pack_length)
        want = _by_hand(model, rows)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("loss", list(PreferenceLoss))
def test_one_forward_pass_per_step_with_every_response_once(tiny_policy, monkeypatch, loss):
    calls = []
    real = preference.target_logprobs

    def counting(model, input_ids, targets, **kw):
        calls.append(int(targets[:, 1:].sum()))
        return real(model, input_ids, targets, **kw)

    monkeypatch.setattr(preference, "target_logprobs", counting)
    stage, ctx, rows, offsets, cache = _stage(tiny_policy, loss=loss)
    cache.logps = torch.zeros(len(rows))
    total, metrics = stage.loss(ctx, tiny_policy.model, BATCH, offsets, rows, cache)
    # one pass; its targets are each response's tokens once, though "a b" is in 2 pairs and "2" in 3
    assert calls == [int(cache.lengths.sum())]
    assert torch.isfinite(total) and total.requires_grad
    assert set(metrics) >= {"loss/dpo", "dpo/reward_accuracy", "dpo/margin", "dpo/chosen_reward", "dpo/rejected_reward",
                            "dpo/chosen_logprob", "dpo/rejected_logprob"}


def test_dpo_stage_loss_is_the_group_mean_of_the_papers_loss(tiny_policy):
    """At the reference itself every margin is 0: each pair's loss is log 2 and so is the
    mean; the implicit rewards are 0 and the accuracy 0 (no strict wins)."""
    model = tiny_policy.model.eval()
    stage, ctx, rows, offsets, cache = _stage(tiny_policy, beta=0.3)
    with torch.no_grad():
        cache.logps = sequence_logprobs(model, rows, stage.pad_id, ctx.device, stage.pack_length)
        loss, metrics = stage.loss(ctx, model, BATCH, offsets, rows, cache)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)
    assert metrics["dpo/margin"] == pytest.approx(0.0, abs=1e-5)
    # best_vs_rest: the same mean (every pair is log 2), from fewer pairs; a wrong pairing would still be log 2,
    # so check the pairs themselves
    stage.cfg.pairs = Pairs.best_vs_rest
    win, lose, _ = stage.pairs([c.scores for c in BATCH])
    assert len(win) == 2 + 1 + 3


def test_orpo_without_its_preference_term_is_sft(tiny_policy):
    """ORPO eq. 6 with lambda = 0: the SFT stage's loss (mean NLL per response token) on
    each comparison's best response."""
    model = tiny_policy.model.eval()
    stage, ctx, rows, offsets, cache = _stage(tiny_policy, loss=PreferenceLoss.orpo, orpo_lambda=0.0)
    cache.logps = torch.zeros(len(rows))
    with torch.no_grad():
        loss, _ = stage.loss(ctx, model, BATCH, offsets, rows, cache)
        best = [rows[o + c.scores.index(max(c.scores))] for c, o in zip(BATCH, offsets)]
        e = pad_rows(best, tiny_policy.tokenizer.pad_token_id, ctx.device)
        sft = causal_lm_loss(model(input_ids=e.input_ids, attention_mask=e.attention_mask).logits, e.input_ids, e.loss_mask)
        with_or, _ = _stage(tiny_policy, loss=PreferenceLoss.orpo, orpo_lambda=1.0)[0].loss(ctx, model, BATCH, offsets, rows, cache)
    assert loss.item() == pytest.approx(sft.item(), rel=1e-5)
    assert with_or.item() > loss.item() + 0.1  # the odds-ratio term is there when lambda > 0


def test_reference_cache_round_trips_and_refuses_other_data():
    cache = ReferenceLogprobs(torch.tensor([3, 4, 2]))
    cache.logps = torch.tensor([-1.0, -2.0, -3.0])
    again = ReferenceLogprobs(torch.tensor([3, 4, 2]))
    again.load_state_dict(cache.state_dict())
    assert torch.equal(again.logps, cache.logps) and again.passes == 0
    with pytest.raises(ValueError, match="the data changed"):
        ReferenceLogprobs(torch.tensor([3, 4])).load_state_dict(cache.state_dict())


@pytest.mark.parametrize("override,message", [
    ("dpo.beta=0", "dpo.beta=0.0: must be > 0"),
    ("dpo.label_smoothing=0.5", "dpo.label_smoothing=0.5: must be in [0, 0.5)"),
    ("dpo.loss=ipo dpo.label_smoothing=0.1", "dpo.label_smoothing=0.1: applies to loss=dpo and loss=simpo, not loss=ipo"),
    ("dpo.batch_size=0", "dpo.batch_size=0: must be >= 1"),
    ("dpo.gamma=-1", "dpo.gamma=-1.0: must be >= 0"),
    ("+dpo.betta=0.2", "dpo.betta: no such setting; did you mean dpo.beta?"),
])
def test_bad_settings_are_one_line_errors_before_any_work(monkeypatch, override, message):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError) as err:
        validate_run(compose(SMOKE + ["stages=[sft,dpo]"] + override.split()), setup()[1])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_an_unknown_loss_is_a_one_line_error_from_the_cli(tmp_path):
    r = run_cli(SMOKE + ["stages=[sft,dpo]", "dpo.loss=kto", f"hydra.run.dir={tmp_path / 'run'}"], cwd=str(tmp_path))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "dpo.loss=kto: Invalid value 'kto', expected one of [dpo, ipo, simpo, orpo]" in r.stderr
    assert not (tmp_path / "run").exists()


def test_every_rank_needs_a_comparison(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match=r"^dpo.batch_size=2: must be >= the number of ranks \(4\)"):
        validate_run(compose(SMOKE + ["stages=[sft,dpo]", "dpo.batch_size=2", "backend=ddp", "rl.prompts_per_step=16"]),
                     setup()[1])
