"""The dpo stage through the CLI: beside PPO in one table, resumed after SIGKILL without
recomputing its reference logprobs, on a pairs file and a K-wise ranked file (with LoRA),
and a third-party KTO stage built from the same library pieces, selected by name."""

import json
import os
import signal

import pytest

from ..helpers import SMOKE, run_cli
from .test_resume import _start_and_signal

pytestmark = pytest.mark.slow

REFERENCE_LINE = "[dpo] reference logprobs of"
DPO_METRICS = {"loss/dpo", "dpo/reward_accuracy", "dpo/margin", "dpo/chosen_reward", "dpo/rejected_reward",
               "dpo/chosen_logprob", "dpo/rejected_logprob"}


def _rows(run_dir, stage):
    return [r for r in map(json.loads, open(os.path.join(run_dir, "metrics.jsonl"))) if r["stage"] == stage]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("sft") / "run")
    r = run_cli(SMOKE + ["stages=[sft]", "sft.steps=10", f"hydra.run.dir={run_dir}"], cwd=os.path.dirname(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def test_ppo_and_dpo_side_by_side_in_one_table(sft_run, tmp_path):
    run_dir = str(tmp_path / "run")
    r = run_cli(SMOKE + ["stages=[rm,rl,dpo]", f"from_run={sft_run}", "rl.steps=2", "dpo.steps=3", "dpo.log_every=1",
                         f"hydra.run.dir={run_dir}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    table = json.load(open(os.path.join(run_dir, "eval.json")))
    assert list(table["policies"]) == ["sft", "rl", "dpo"]
    assert set(table["versus_sft"]) == {"rl", "dpo"}
    for name in ("rl", "dpo"):  # the same columns for both: gold, proxy (the RM exists), KL to SFT, EOS rate, length
        assert set(table["policies"][name]) >= {"gold", "proxy", "kl", "eos_rate", "length"}
        assert os.path.isfile(os.path.join(run_dir, name, "manifest.json"))
    assert table["policies"]["dpo"]["kl"] != table["policies"]["rl"]["kl"]
    rows = [row for row in _rows(run_dir, "dpo") if "loss/dpo" in row]
    assert [row["step"] for row in rows] == [1, 2, 3] and all(DPO_METRICS <= set(row) for row in rows)
    assert rows[0]["loss/dpo"] == pytest.approx(0.6931, abs=2e-3)  # at the reference: every margin is 0
    assert r.stdout.count(REFERENCE_LINE) == 1


ARGS = SMOKE + ["stages=[dpo]", "dpo.steps=6", "dpo.log_every=1", "checkpoint.every=2", "logger=[jsonl]"]


def test_sigkill_then_resume_restores_the_reference_logprobs_and_matches(sft_run, tmp_path):
    ref_dir = str(tmp_path / "uninterrupted")
    r = run_cli(ARGS + [f"from_run={sft_run}", f"hydra.run.dir={ref_dir}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count(REFERENCE_LINE) == 1
    run_dir = str(tmp_path / "run")
    rc, out, _ = _start_and_signal(ARGS + [f"from_run={sft_run}", f"hydra.run.dir={run_dir}"], str(tmp_path),
                                   os.path.join(run_dir, "checkpoints", "dpo", "step-00000004"), signal.SIGKILL)
    assert rc == -signal.SIGKILL and REFERENCE_LINE in out
    r = run_cli([f"resume={run_dir}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[dpo] resuming at step" in r.stdout
    assert REFERENCE_LINE not in r.stdout  # restored from the checkpoint, not recomputed
    first, again = (json.load(open(os.path.join(d, "eval.json"))) for d in (ref_dir, run_dir))
    assert again["policies"] == first["policies"]
    weights = lambda d: open(os.path.join(d, "dpo", "model.safetensors"), "rb").read()
    assert weights(run_dir) == weights(ref_dir)
    loss = lambda d: [row["loss/dpo"] for row in _rows(d, "dpo") if "loss/dpo" in row][-2:]
    assert loss(run_dir) == loss(ref_dir)


def _write(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_a_pairs_file_with_ipo(tmp_path):
    records = [{"prompt": f"say q{i} twice", "chosen": f"q{i} q{i}", "rejected": f"q{i}"} for i in range(40)]
    data = _write(tmp_path / "prefs.jsonl", records)
    run_dir = tmp_path / "run"
    r = run_cli(SMOKE + ["stages=[sft,dpo]", "data=jsonl", f"data.path={data}", "sft.steps=5", "dpo.loss=ipo", "dpo.beta=0.1",
                         "dpo.steps=2", "dpo.log_every=1", f"hydra.run.dir={run_dir}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "reference logprobs of 76 responses" in r.stdout  # 38 training pairs (5% held out), 2 responses each
    rows = [row for row in _rows(str(run_dir), "dpo") if "loss/dpo" in row]
    # IPO at the reference: (0 - 1/(2 beta))^2 = 25 with beta = 0.1
    assert rows[0]["loss/dpo"] == pytest.approx(25.0, rel=1e-3)
    assert list(json.load(open(run_dir / "eval.json"))["policies"]) == ["sft", "dpo"]


def test_a_kwise_ranked_file_with_lora_and_ties(tmp_path):
    # K = 4 with a tie: C(4,2) - 1 = 5 pairs each (an all-tied record is a bad record of the files dataset)
    records = [{"prompt": f"count to q{i}", "responses": [f"q{i} a b c", f"q{i} a b", f"q{i} a", f"q{i}"],
                "ranking": [1, 2, 3, 3]} for i in range(40)]
    data = _write(tmp_path / "ranked.jsonl", records)
    run_dir = tmp_path / "run"
    r = run_cli(SMOKE + ["stages=[sft,dpo]", "data=jsonl", f"data.path={data}", "data.test_fraction=0.1", "sft.steps=5",
                         "policy.lora.enabled=true", "policy.lora.r=4", "dpo.steps=2", "dpo.log_every=1", "dpo.lr=1e-2",
                         f"hydra.run.dir={run_dir}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [row for row in _rows(str(run_dir), "dpo") if "loss/dpo" in row]
    # the reference is the policy with its adapter disabled: at step 1 (adapter B = 0) every margin is 0
    assert rows[0]["loss/dpo"] == pytest.approx(0.6931, abs=1e-4) and rows[0]["dpo/margin"] == pytest.approx(0, abs=1e-4)
    assert rows[1]["dpo/margin"] != pytest.approx(0, abs=1e-4)  # the adapter learned
    assert (run_dir / "dpo" / "manifest.json").is_file()


KTO_PLUGIN = '''
"""KTO (Ethayarajh et al. 2024) as a third-party stage: each comparison's best response is
desirable, the others undesirable; built from rlhfkit's public pieces only."""
from dataclasses import dataclass

import torch

from rlhfkit import hookimpl
from rlhfkit.interfaces import StepResult
from rlhfkit.resume import Batches, TrackingBackend
from rlhfkit.rlhf.masked import dp_denominator
from rlhfkit.rlhf.preference import ReferenceLogprobs, log_ratios, sequence_logprobs
from rlhfkit.rlhf.tokenize import tokenize_pair


@dataclass
class KTOConfig:
    steps: int = 3
    beta: float = 0.1
    lr: float = 1e-3


class KTO:
    needs = ("sft",)
    data = ("comparisons",)
    produces = "policy"
    uses_reward = False

    def __init__(self, cfg):
        self.cfg = cfg

    def run(self, ctx):
        sft = ctx.load_policy("sft")
        ctx.data.bind(sft)
        comparisons = ctx.data.comparisons("train", ctx.sampler(sft), sft.tokenizer)
        policy = ctx.components["policy"].load(ctx.products["sft"])
        tok = policy.tokenizer
        rows = [tokenize_pair(tok, c.prompt, r) for c in comparisons for r in c.responses]
        desirable = torch.tensor([s == max(c.scores) for c in comparisons for s in c.scores])
        cache = ReferenceLogprobs(torch.tensor([len(ids) - p for ids, p in rows]))
        tracked = TrackingBackend(ctx.backend)
        engine = tracked.prepare(policy.model, torch.optim.AdamW(policy.model.parameters(), lr=self.cfg.lr))
        batches = Batches(len(rows), 16, ctx.seed + 60)

        def step(i):
            if cache.logps is None:
                with torch.no_grad():
                    cache.logps = sequence_logprobs(engine, rows, tok.pad_token_id, ctx.device, 256)
            idx = ctx.backend.shard(next(batches))
            ratio = log_ratios(sequence_logprobs(engine, [rows[j] for j in idx], tok.pad_token_id, ctx.device, 256),
                               cache.logps[idx])
            sign = desirable[idx].float() * 2 - 1     # KTO eq. 8 with z_ref = 0
            value = torch.sigmoid(self.cfg.beta * sign * ratio)
            denom = dp_denominator(float(len(idx)), ctx.backend.all_reduce_sum, ctx.backend.world_size)
            loss = (1 - value).sum() / denom
            engine.backward(loss)
            engine.step()
            return StepResult({"loss/kto": loss.item()})

        ctx.train(self.cfg.steps, 1, step, tracked, {"batches": batches, "reference": cache})
        ctx.save(policy)


@hookimpl
def rlhfkit_register_stages(register):
    register("kto", KTO, KTOConfig)
'''


def test_a_third_party_kto_stage_is_selectable_by_name(sft_run, tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "rlhfkit_kto.py").write_text(KTO_PLUGIN)
    info = site / "rlhfkit_kto-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rlhfkit-kto\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[rlhfkit]\nkto = rlhfkit_kto\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    run_dir = tmp_path / "run"
    r = run_cli(SMOKE + ["stages=[kto,dpo]", f"from_run={sft_run}", "kto.steps=2", "dpo.steps=1",
                         f"hydra.run.dir={run_dir}"], cwd=str(tmp_path), env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert list(json.load(open(run_dir / "eval.json"))["policies"]) == ["sft", "kto", "dpo"]
    losses = [row["loss/kto"] for row in _rows(str(run_dir), "kto") if "loss/kto" in row]
    assert len(losses) == 2 and losses[0] == pytest.approx(0.5, abs=1e-3)  # 1 - sigmoid(0) at the reference
