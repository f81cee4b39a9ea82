import json
import math
import random

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


def test_report_says_when_overlaid_runs_ran_under_other_versions_or_thread_counts(tmp_path):
    env = {"rlhfkit": "0.1.0", "python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.23.0", "threads": 1}
    for name, threads in (("a", 1), ("b", 1), ("c", 2)):
        _fake_run(tmp_path / name, 0.05)
        table = json.loads((tmp_path / name / "eval.json").read_text())
        (tmp_path / name / "eval.json").write_text(json.dumps(table | {"environment": env | {"threads": threads}}))
    main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "same")])
    assert "environments differ" not in (tmp_path / "same" / "summary.md").read_text()
    main(["report", str(tmp_path / "a"), str(tmp_path / "c"), "--out", str(tmp_path / "differ")])
    summary = (tmp_path / "differ" / "summary.md").read_text()
    assert "the runs' environments differ" in summary
    assert "a: rlhfkit 0.1.0, python 3.11.7, torch 2.13.0+cpu, transformers 5.23.0, threads 1; c: " in summary


def test_report_on_a_directory_that_is_not_a_run(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", str(tmp_path)])
    assert exc.value.code == 2 and "has no metrics.jsonl" in capsys.readouterr().err


# -- over-optimisation: gold and proxy against d = sqrt(KL), Gao et al.'s fit ----------------

from rlhfkit.report import Curve, Point, curves, fit_gao, peak  # noqa: E402


def gao(d, alpha, beta):
    return d * (alpha - beta * math.log(d))


def test_the_gao_fit_recovers_alpha_and_beta_exactly():
    ds = [0.3, 0.6, 1.0, 1.5, 2.2, 3.0]
    fit = fit_gao(ds, [gao(d, 0.12, 0.09) for d in ds])
    assert fit.alpha == pytest.approx(0.12, abs=1e-12) and fit.beta == pytest.approx(0.09, abs=1e-12)
    assert fit.r2 == pytest.approx(1.0, abs=1e-12) and fit.n == 6
    assert fit.d_peak == pytest.approx(math.exp(0.12 / 0.09 - 1))
    assert fit(0.0) == 0.0 and fit(1.0) == pytest.approx(0.12)


def test_the_gao_fit_on_noisy_points_gives_r2_below_one_and_near_the_truth():
    rng = random.Random(0)
    ds = [0.1 * i for i in range(1, 41)]
    ys = [gao(d, 0.1, 0.08) + rng.gauss(0, 0.01) for d in ds]
    fit = fit_gao(ds, ys)
    mean = sum(ys) / len(ys)
    res = sum((y - gao(d, fit.alpha, fit.beta)) ** 2 for d, y in zip(ds, ys))
    assert fit.r2 == pytest.approx(1 - res / sum((y - mean) ** 2 for y in ys))
    assert 0.8 < fit.r2 < 1.0
    assert fit.alpha == pytest.approx(0.1, abs=0.01) and fit.beta == pytest.approx(0.08, abs=0.01)
    # pure noise around 0: nothing to explain
    assert fit_gao(ds, [rng.gauss(0, 0.01) for _ in ds]).r2 < 0.3


def test_the_gao_fit_refuses_points_that_cannot_determine_it():
    assert fit_gao([0.5, 1.0], [0.1, 0.1]) is None  # two points for two coefficients
    assert fit_gao([0.0, 0.0, 0.0, 1.0, 2.0], [0, 0, 0, 0.1, 0.1]) is None  # d = 0 carries nothing
    assert fit_gao([0.7, 0.7, 0.7], [0.1, 0.2, 0.3]) is None  # one distance: features collinear


def test_peak_is_the_highest_gold_and_the_earliest_of_equals():
    c = Curve("rl", [Point(0, 0.0, 0.6, 0.0), Point(10, 0.25, 0.7, 0.3), Point(20, 1.0, 0.7, 0.5),
                     Point(30, 4.0, 0.4, 0.9)], "rl evaluation at step 0")
    top = peak(c)
    assert (top.step, top.d, top.gold) == (10, 0.5, 0.7)
    assert c.gains("gold") == pytest.approx([0, 0.1, 0.1, -0.2]) and c.gains("proxy") == pytest.approx([0, 0.3, 0.5, 0.9])
    assert Point(1, -1e-4, 0.5, None).d == 0.0  # a sampled KL a hair below 0


def _overopt_run(path, alpha=0.2, beta=0.15, step0=True, evals=True):
    """A run evaluated every 10 steps whose gold follows Gao's curve; the last point is eval.json's."""
    path.mkdir()
    rows = [{"stage": "sft", "step": 1, "loss/sft": 1.0}]
    for s in range(0 if step0 else 10, 100, 10):
        d = s / 25
        rows.append({"stage": "rl", "step": s, "rollout/kl": d * d})
        if evals:
            rows.append({"stage": "rl", "step": s, "eval/gold": 0.6 + (gao(d, alpha, beta) if d else 0.0),
                         "eval/proxy": 0.1 * d, "eval/kl": d * d, "eval/gold_se": 0.01 + s / 10000})
    rows.append({"stage": "rl", "step": 100, "rollout/kl": 16.0})
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    final = {"gold": 0.6 + gao(4.0, alpha, beta), "proxy": 0.4, "kl": 16.0}
    table = {"num_prompts": 8, "policies": {"sft": {"gold": 0.59, "proxy": 0.0, "kl": 0.0}, "rl": final},
             "win_rate": 0.5, "tie_rate": 0.1, "gold_improvement": final["gold"] - 0.59}
    (path / "eval.json").write_text(json.dumps(table))


def test_curves_take_the_step0_evaluation_as_origin_and_eval_json_as_the_end(tmp_path):
    from rlhfkit.report import eval_table, load_metrics

    _overopt_run(tmp_path / "a")
    (c,), notes = curves(load_metrics(str(tmp_path / "a"))[0], eval_table(str(tmp_path / "a")))
    assert [p.step for p in c.points] == list(range(0, 101, 10)) and notes == []
    assert c.base.gold == 0.6 and c.origin == "rl evaluation at step 0"  # not eval.json's sft row (0.59)
    assert c.points[-1].d == 4.0
    _overopt_run(tmp_path / "b", step0=False)
    (c,), _ = curves(load_metrics(str(tmp_path / "b"))[0], eval_table(str(tmp_path / "b")))
    assert c.base.gold == 0.59 and c.origin.startswith("eval.json sft row")


def test_report_plots_gold_and_proxy_against_d_and_prints_the_fit(tmp_path, capsys):
    _overopt_run(tmp_path / "no_kl")
    _overopt_run(tmp_path / "kl", alpha=0.05, beta=0.01)
    out = tmp_path / "report"
    main(["report", str(tmp_path / "no_kl"), str(tmp_path / "kl"), "--label", "no KL", "--label", "KL 0.1", "--out", str(out)])
    for name in ("rl_gold_vs_d.png", "rl_proxy_vs_d.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    summary = (out / "summary.md").read_text()
    # the fitted curve peaks at exp(alpha / beta - 1) = 1.40; the best evaluation is at d = 1.6 (step 40)
    g = 0.6 + gao(1.6, 0.2, 0.15)
    assert g > 0.6 + gao(1.2, 0.2, 0.15) and g == max(0.6 + gao(s / 25, 0.2, 0.15) for s in range(10, 101, 10))
    for text in (printed, summary):
        assert f"| no KL | rl | 10 | 0.2000 | 0.1500 | 1.000 | 40 | 1.600 | {g:.3f} | {g - 0.6:+.3f} | 4.000 |" in text
        rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith(("| no KL | rl | 10", "| KL 0.1 | rl | 10"))}
        assert rows["no KL"].endswith("| 0.014 |")  # the peak's (step 40) standard error
        assert rows["KL 0.1"].endswith("| - |")  # its peak is eval.json's end, which logged none
        assert "| KL 0.1 | rl | 10 | 0.0500 | 0.0100 | 1.000 | 100 | 4.000 |" in text  # still rising at the end (eval.json)
    assert "![rl_gold_vs_d.png](rl_gold_vs_d.png)" in summary


def test_report_notes_runs_it_cannot_fit(tmp_path, capsys):
    _overopt_run(tmp_path / "none", evals=False)
    main(["report", str(tmp_path / "none"), "--out", str(tmp_path / "r1")])
    assert "no run logged evaluations during training: set rl.eval_every" in capsys.readouterr().out
    path = tmp_path / "few"
    path.mkdir()
    rows = [{"stage": "rl", "step": s, "eval/gold": 0.6, "eval/kl": s / 10} for s in (0, 10)] + [{"stage": "rl", "step": 20}]
    (path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    main(["report", str(path), "--out", str(tmp_path / "r2")])
    out = capsys.readouterr().out
    assert "few/rl: too few evaluations away from SFT to fit (1; 3 at d > 0 needed)" in out
    assert "| few | rl | 1 | - | - | - | 0 |" in out  # the peak is still marked (SFT: gold never rose)


def test_report_bad_input_is_one_line(tmp_path, capsys):
    for argv, message in (
        ([str(tmp_path / "missing")], "no such directory"),
        ([str(tmp_path), "--label", "a", "--label", "b"], "--label was given 2 time(s) for 1 run directories"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(["report", *argv])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_report_without_matplotlib_still_prints_the_fit(tmp_path, capsys, monkeypatch):
    import sys

    _overopt_run(tmp_path / "run")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    main(["report", str(tmp_path / "run"), "--out", str(tmp_path / "r")])
    out = capsys.readouterr().out
    assert "| run | rl | 10 | 0.2000 | 0.1500 | 1.000 |" in out and "pip install 'rlhfkit[report]'" in out
    assert not list((tmp_path / "r").glob("*.png")) and "plots skipped" in (tmp_path / "r" / "summary.md").read_text()


def test_environment_changes_names_what_differs_and_nothing_for_an_older_checkpoint():
    from rlhfkit.report import environment_changes

    now = {"torch": "2.13.0", "transformers": "5.23.0", "threads": 2}
    assert environment_changes({"torch": "2.12.0", "transformers": "5.23.0", "threads": 1}, now) == \
        "torch 2.12.0 -> 2.13.0, threads 1 -> 2"
    assert environment_changes(dict(now), now) == ""
    assert environment_changes(None, now) == ""  # written before checkpoints recorded it
