"""benchmarks/sandbox_throughput.py runs on small settings and its figures add up (the real
timings are taken on an idle machine)."""

import importlib.util
import json
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ISOLATION = "bwrap" if shutil.which("bwrap") else "none"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sandbox_throughput", os.path.join(ROOT, "benchmarks", "sandbox_throughput.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_serial_vs_parallel_and_the_start_up_share_of_an_rl_step(bench, tmp_path, capsys):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(row) + "\n" for row in [
        {"stage": "sft", "step": 1, "perf/step_s": 9.0}, {"stage": "rl", "step": 1, "perf/step_s": 1.0},
        {"stage": "rl", "step": 2, "perf/step_s": 3.0}]))
    out = bench.main(["--n", "8", "--startup-n", "2", "--workers", "2", "--isolation", ISOLATION,
                      "--metrics", str(metrics), "--rows-per-step", "16", "--json", str(tmp_path / "out.json")])
    assert out["serial"]["workers"] == 1 and out["parallel"]["workers"] == 2
    for r in (out["serial"], out["parallel"]):  # the mix: 4 of its 8 programs pass
        assert r["verifications"] == 8 and r["pass_rate"] == 0.5 and r["per_s"] == pytest.approx(8 / r["seconds"])
        assert 1 <= r["cold_starts"] <= r["workers"] and r["warm_starts"] == 0  # warm from the second call on
    assert out["step_s"] == 2.0  # the rl rows' mean perf/step_s
    assert out["overhead_per_step_s"] == pytest.approx(16 * out["warm_s"] / 2)
    assert out["overhead_share"] == pytest.approx(out["overhead_per_step_s"] / 2.0)
    assert out["first_step_startup_share"] == pytest.approx(out["startup_s"] / 2.0)
    assert out["warm_s"] < out["startup_s"]
    assert json.load(open(tmp_path / "out.json")) == out
    assert "verif/s" in capsys.readouterr().out
