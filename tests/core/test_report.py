import json

import pytest

from rlhfkit.cli import main, objective_value
from rlhfkit.errors import ConfigError


def _fake_run(path, gain):
    path.mkdir()
    rows = [{"stage": "sft", "step": s, "loss/sft": 2.0 / s} for s in (1, 2, 3)]
    rows += [{"stage": "rm", "step": s, "loss/rm": 0.7 / s} for s in (1, 2)]
    rows += [{"stage": "rl", "step": s, "reward/proxy": 0.1 * s, "rollout/kl": 0.2 * s, "loss/policy": 0.01,
              "loss/value": 0.1, "rollout/eos_rate": 0.9, "eval/gold": 0.5 + gain * s} for s in (1, 2, 3)]
    lines = [json.dumps(r) for r in rows] + ['{"stage": "rl", "step": 4, "reward/pro']  # cut short by a kill
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    table = {"num_prompts": 8, "policies": {"sft": {"gold": 0.5, "kl": 0.0}, "rl": {"gold": 0.5 + gain, "kl": 1.0}},
             "win_rate": 0.7, "tie_rate": 0.1, "gold_improvement": gain, "seconds": {"total": 60.0}}
    (path / "eval.json").write_text(json.dumps(table))
    return table


def test_report_plots_every_stage_and_overlays_runs(tmp_path, capsys):
    _fake_run(tmp_path / "kl0.1", 0.05)
    table = _fake_run(tmp_path / "kl0", -0.1)
    out = tmp_path / "report"
    main(["report", str(tmp_path / "kl0.1"), str(tmp_path / "kl0"), "--out", str(out)])
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["rl_eos_rate.png", "rl_kl.png", "rl_loss.png", "rl_reward.png", "rm_loss.png", "sft_loss.png"]
    assert all((out / p).read_bytes()[:4] == b"\x89PNG" for p in pngs)
    summary = (out / "summary.md").read_text()
    assert "| kl0.1 | rl | 0.550 |" in summary and "| kl0 | rl | 0.400 |" in summary
    assert "gold -0.100" in summary and "1 unreadable line(s)" in summary and "![rl_kl.png](rl_kl.png)" in summary
    assert "report written" in capsys.readouterr().out
    assert objective_value(table, "gold_improvement") == -0.1 and objective_value(table, "rl/kl") == 1.0
    with pytest.raises(ConfigError, match="win_rate"):
        objective_value(table, "nope")


def test_report_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path)])
    assert exc.value.code == 2 and "has no metrics.jsonl" in capsys.readouterr().err
