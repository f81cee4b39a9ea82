import io
import json

from rlhfkit.plugins.loggers.console import ConsoleConfig, ConsoleLogger
from rlhfkit.plugins.loggers.jsonl import JsonlConfig, JsonlLogger


def test_jsonl_writes_one_line_per_call(tmp_path):
    lg = JsonlLogger(JsonlConfig())
    lg.rlhfkit_run_start(run_dir=str(tmp_path), config={})
    lg.rlhfkit_log_metrics(stage="rl", step=3, metrics={"loss/policy": 0.5, "bad": float("nan")})
    lg.rlhfkit_log_samples(stage="rl", step=3, rows=[{"prompt": "p", "response": "r"}])
    lg.rlhfkit_run_end(run_dir=str(tmp_path), summary={})
    (row,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert row["stage"] == "rl" and row["step"] == 3 and row["loss/policy"] == 0.5 and row["bad"] is None
    (s,) = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert s["response"] == "r"


def test_console_shows_selected_keys_only():
    out = io.StringIO()
    lg = ConsoleLogger(ConsoleConfig(keys=["loss/sft"]), stream=out)
    lg.rlhfkit_log_metrics(stage="sft", step=10, metrics={"loss/sft": 1.23456, "other": 2.0})
    lg.rlhfkit_log_metrics(stage="sft", step=11, metrics={"other": 2.0})
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "loss/sft=1.235" in lines[0] and "other" not in lines[0]
    lg.rlhfkit_checkpoint_saved(stage="sft", path="/x/sft")
    assert "checkpoint saved: /x/sft" in out.getvalue()
