"""A third-party package adds a stage and a reward source (one file, two entry points, no
core edits) and the CLI runs them; stage lists that cannot run fail before any work."""

import json
import os
import textwrap

import pytest

from ..helpers import SMOKE, run_cli

pytestmark = pytest.mark.slow

PLUGIN = '''
"""A tiny stage (behaviour cloning on demonstrations, from the SFT policy) and a reward
source (shorter responses score higher), written against rlhfkit's public API only."""
from dataclasses import dataclass

import torch

from rlhfkit import hookimpl
from rlhfkit.interfaces import StepResult
from rlhfkit.resume import Batches, TrackingBackend
from rlhfkit.rlhf.losses import causal_lm_loss, n_targets
from rlhfkit.rlhf.masked import dp_denominator
from rlhfkit.rlhf.tokenize import pad_rows


@dataclass
class CloneConfig:
    steps: int = 3
    lr: float = 1e-3


class Clone:
    needs = ("sft",)
    data = ("demonstrations",)
    produces = "policy"
    uses_reward = False

    def __init__(self, cfg):
        self.cfg = cfg

    def run(self, ctx):
        policy = ctx.components["policy"].load(ctx.products["sft"])
        ctx.data.bind(policy)
        rows = [(ids, plen) for _, ids, plen in ctx.data.demonstrations(policy.tokenizer)]
        tracked = TrackingBackend(ctx.backend)
        engine = tracked.prepare(policy.model, torch.optim.SGD(policy.model.parameters(), lr=self.cfg.lr))
        batches = Batches(len(rows), 8, ctx.seed + 50)

        def step(_):
            e = pad_rows(ctx.backend.shard([rows[i] for i in next(batches)]), policy.tokenizer.pad_token_id, ctx.device)
            denom = dp_denominator(n_targets(e.loss_mask), ctx.backend.all_reduce_sum, ctx.backend.world_size)
            loss = causal_lm_loss(engine(input_ids=e.input_ids, attention_mask=e.attention_mask).logits, e.input_ids,
                                  e.loss_mask, denom=denom)
            engine.backward(loss)
            engine.step()
            return StepResult({"loss/clone": loss.item()})

        ctx.train(self.cfg.steps, 1, step, tracked, {"batches": batches})
        ctx.save(policy)


@dataclass
class BrevityConfig:
    per_token: float = 0.1


class Brevity:
    needs = ()

    def __init__(self, cfg):
        self.cfg = cfg

    def setup(self, ctx, tokenizer):
        pass

    def __call__(self, rollout):
        self.rows = getattr(self, "rows", 0) + len(rollout.prompts)
        return -self.cfg.per_token * rollout.response_mask.float().sum(-1)

    def metrics(self):  # optional: logged with each RL step
        rows, self.rows = getattr(self, "rows", 0), 0
        return {"reward/brevity_rows": float(rows)}


@hookimpl
def rlhfkit_register_stages(register):
    register("clone", Clone, CloneConfig)


@hookimpl
def rlhfkit_register_rewards(register):
    register("brevity", Brevity, BrevityConfig)
'''


@pytest.fixture(scope="module")
def third_party(tmp_path_factory):
    """A package on PYTHONPATH with its dist-info, as pip would leave it."""
    site = tmp_path_factory.mktemp("site")
    (site / "rlhfkit_brevity.py").write_text(PLUGIN)
    info = site / "rlhfkit_brevity-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rlhfkit-brevity\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[rlhfkit]\nbrevity = rlhfkit_brevity\n")
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_third_party_stage_and_reward_source_run_from_the_cli(third_party, tmp_path):
    listing = run_cli(["plugins"], cwd=str(tmp_path), env_extra=third_party)
    assert "clone  (rlhfkit-brevity)" in listing.stdout and "brevity  (rlhfkit-brevity)" in listing.stdout
    assert "clone.steps: int = 3" in listing.stdout
    run_dir = tmp_path / "run"
    # RL against a reward function: no reward-model stage at all
    r = run_cli(SMOKE + ["stages=[sft,clone,rl]", "reward=brevity", "reward.per_token=0.5", "clone.steps=2",
                         "algorithm=rloo", f"hydra.run.dir={run_dir}"], cwd=str(tmp_path), env_extra=third_party)
    assert r.returncode == 0, r.stderr[-3000:]
    table = json.load(open(run_dir / "eval.json"))
    assert list(table["policies"]) == ["sft", "clone", "rl"]
    assert set(table["versus_sft"]) == {"clone", "rl"}
    for m in table["policies"].values():  # the proxy column is the reward source's score
        assert m["proxy"] < 0
    assert not (run_dir / "rm").exists()
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    assert [r["step"] for r in rows if r["stage"] == "clone" and "loss/clone" in r] == [1, 2]
    rl_rows = [r for r in rows if r["stage"] == "rl" and "loss/policy" in r]
    assert rl_rows and all(r["reward/brevity_rows"] > 0 for r in rl_rows)  # the source's own metrics, logged
    assert (run_dir / "clone" / "manifest.json").is_file()


@pytest.mark.parametrize("args,message", [
    (["stages=[sft,rl]"], "Stage 'rm' is not in stages=['sft', 'rl'], so its checkpoint comes from from_run, but from_run is not set"),
    (["stages=[rl]", "reward=brevity"], "Stage 'sft' is not in stages=['rl']"),
    (["stages=[sft,rl,rm]"], "'rl' needs 'rm', which runs after it. Put 'rm' before 'rl'."),
    (["stages=[sft,clone,rm]", "data=jsonl", "data.path=DATA", "data.format=prompt_completion"],
     "'rm' reads comparisons, which data=files does not have"),
    (["stages=[sft,tune]"], "stages=[sft,tune]: each must be one of ['clone', 'dpo', 'rl', 'rm', 'sft']"),
])
def test_a_stage_list_that_cannot_run_fails_before_any_work(third_party, tmp_path, args, message):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "a"}) + "\n" for i in range(20)))
    run_dir = tmp_path / "run"
    args = [a.replace("DATA", str(data)) for a in args]
    r = run_cli(SMOKE + args + [f"hydra.run.dir={run_dir}"], cwd=str(tmp_path), env_extra=third_party)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert message in r.stderr, r.stderr[-2000:]
    assert not (run_dir / "sft").exists()
