"""The divergence guard inside a real (tiny) pipeline: NaN losses are injected into the
SFT loss, and the RL KL bound is set below any real KL."""

import json
import os

import pytest
import torch

import rlhfkit.pipeline as pipeline
import rlhfkit.plugins.stages.sft as sft_stage
from rlhfkit.cli import setup
from rlhfkit.resume import DivergenceError

from ..helpers import SMOKE, compose

BASE = SMOKE + ["stages=[sft]", "sft.steps=12", "sft.log_every=1", "checkpoint.every=2", "logger=[jsonl]"]


@pytest.fixture
def nan_at(monkeypatch):
    """nan_at({5, 6}) makes the SFT loss NaN on those calls (1-based), whatever the step."""
    def install(calls):
        real, count = sft_stage.causal_lm_loss, [0]

        def loss(*args, **kwargs):
            count[0] += 1
            out = real(*args, **kwargs)
            return out * float("nan") if count[0] in calls else out

        monkeypatch.setattr(sft_stage, "causal_lm_loss", loss)
    return install


def _run(overrides, run_dir):
    plugins, registry = setup()
    return pipeline.Run(compose(BASE + overrides), registry, plugins, str(run_dir))()


def _metrics(run_dir):
    return [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")) if '"stage": "sft"' in x]


def test_one_bad_step_is_skipped_and_counted(nan_at, tmp_path):
    nan_at({5})
    _run([], tmp_path)
    rows = _metrics(tmp_path)
    assert rows[-1]["guard/skipped_steps"] == 1 and rows[-1]["guard/rollbacks"] == 0
    assert all(torch.isfinite(torch.tensor(r["loss/sft"])) for r in rows if r["step"] != 5)


def test_m_bad_steps_roll_back_to_the_last_good_checkpoint_with_a_lower_lr(nan_at, tmp_path, capsys):
    nan_at({5, 6, 7})  # steps 5-7 bad; checkpoint at step 4; the replayed steps are fine
    table = _run(["guard.max_bad_steps=3", "guard.lr_factor=0.25"], tmp_path)
    assert "rolled back to step 4" in capsys.readouterr().err
    rows = _metrics(tmp_path)
    final = rows[-1]
    assert final["step"] == 12 and final["guard/rollbacks"] == 1 and final["guard/lr_scale"] == 0.25
    assert [r["step"] for r in rows].count(5) == 2  # step 5 ran twice: bad, then replayed
    assert "sft" in table["policies"]


def test_after_a_rollback_the_schedule_runs_at_the_lower_rate(nan_at, tmp_path):
    _run([], tmp_path / "ref")
    ref = {r["step"]: r["lr"] for r in _metrics(tmp_path / "ref") if "lr" in r}
    nan_at({5, 6, 7})
    _run(["guard.lr_factor=0.25"], tmp_path / "guarded")
    got = {r["step"]: r["lr"] for r in _metrics(tmp_path / "guarded") if "lr" in r}  # the replayed steps' values win
    for step in range(5, 13):
        assert got[step] == pytest.approx(0.25 * ref[step])
    assert got[3] == pytest.approx(ref[3])


def test_stop_writes_a_report_and_keeps_the_checkpoints(nan_at, tmp_path):
    nan_at(set(range(5, 100)))
    with pytest.raises(DivergenceError, match="3 bad steps in a row up to step 7") as err:
        _run(["guard.on_divergence=stop"], tmp_path)
    assert "divergence.json" in str(err.value)
    report = json.load(open(tmp_path / "divergence.json"))
    assert report["stage"] == "sft" and report["step"] == 7 and report["stopped_because"] == "guard.on_divergence=stop"
    assert report["last_good_checkpoint"].endswith("step-00000004")
    assert os.path.isfile(os.path.join(report["last_good_checkpoint"], "manifest.json"))


def test_rollbacks_are_limited(nan_at, tmp_path):
    nan_at(set(range(5, 1000)))  # never recovers
    with pytest.raises(DivergenceError, match="max_rollbacks=2"):
        _run(["guard.max_rollbacks=2", "guard.max_bad_steps=2"], tmp_path)
    assert json.load(open(tmp_path / "divergence.json"))["rollbacks"] == 2


def test_kl_past_the_bound_trips_the_guard_in_rl(tmp_path):
    plugins, registry = setup()
    cfg = compose(SMOKE + ["logger=[jsonl]", "guard.kl_bound=-1", "guard.max_bad_steps=2", "guard.on_divergence=stop"])
    with pytest.raises(DivergenceError, match="rl diverged.*kl_bound=-1"):
        pipeline.Run(cfg, registry, plugins, str(tmp_path))()
    assert json.load(open(tmp_path / "divergence.json"))["step"] == 2
