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


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_console_progress_bar_on_a_terminal_with_eta_and_metrics():
    from rlhfkit.plugins.loggers.console import format_eta, progress_line

    line = progress_line("rl", 15, 60, elapsed=30.0, metrics="loss/policy=0.1")
    assert line.startswith("[rl] #####") and "15/60" in line and "25%" in line
    assert "0:30<1:30" in line and line.endswith("loss/policy=0.1")  # 2 s per step, 45 steps left
    assert format_eta(3725) == "1:02:05"
    out = _TTY()
    lg = ConsoleLogger(ConsoleConfig(keys=["loss/sft"]), stream=out)
    assert lg.bar
    lg.rlhfkit_log_metrics(stage="sft", step=1, metrics={"loss/sft": 2.0})
    lg.rlhfkit_progress(stage="sft", step=1, total=2)
    lg.rlhfkit_progress(stage="sft", step=2, total=2)
    text = out.getvalue()
    assert "\r" in text and "2/2" in text and "loss/sft=2" in text and text.endswith("\n")
    assert "[sft    1" not in text  # on a terminal the bar replaces the per-step lines


def test_console_is_quiet_when_not_a_terminal():
    out = io.StringIO()
    lg = ConsoleLogger(ConsoleConfig(keys=["loss/sft"]), stream=out)
    assert not lg.bar
    lg.rlhfkit_progress(stage="sft", step=1, total=2)
    assert out.getvalue() == ""  # no bar, no carriage returns in CI logs


def test_tensorboard_writes_scalars_and_samples(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from rlhfkit.plugins.loggers.tensorboard import TensorBoardConfig, TensorBoardLogger

    lg = TensorBoardLogger(TensorBoardConfig())
    lg.rlhfkit_run_start(run_dir=str(tmp_path), config={})
    for step in (1, 2):
        lg.rlhfkit_log_metrics(stage="rl", step=step, metrics={"reward/proxy": 0.1 * step})
    lg.rlhfkit_log_samples(stage="rl", step=2, rows=[{"prompt": "p", "response": "r"}])
    lg.rlhfkit_run_end(run_dir=str(tmp_path), summary={})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [round(e.value, 3) for e in acc.Scalars("rl/reward/proxy")] == [0.1, 0.2]
    assert [e.step for e in acc.Scalars("rl/reward/proxy")] == [1, 2]
