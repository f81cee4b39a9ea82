import io
import json
import logging
import re
import sys

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


def _screen(raw: str) -> list[str]:
    """The non-blank lines a terminal shows after ``raw``: it follows \\r, \\n, cursor-up
    (ESC[nA) and erase-line (ESC[2K), and drops colours."""
    lines, row, col = [""], 0, 0
    for token in re.findall(r"\x1b\[[0-9;?]*[A-Za-z]|\r|\n|[^\x1b\r\n]+", raw):
        if token == "\n":
            row, col = row + 1, 0
            lines += [""] * (row + 1 - len(lines))
        elif token == "\r":
            col = 0
        elif token.startswith("\x1b[") and token.endswith("A"):
            row -= int(token[2:-1] or 1)
        elif token == "\x1b[2K":
            lines[row] = ""
        elif not token.startswith("\x1b"):
            line = lines[row].ljust(col)
            lines[row], col = line[:col] + token + line[col + len(token):], col + len(token)
    return [line.rstrip() for line in lines if line.strip()]


def test_console_on_a_terminal_one_live_line_per_stage_with_messages_above():
    out, now = _TTY(), [0.0]
    lg = ConsoleLogger(ConsoleConfig(keys=["loss/sft", "loss/rm"]), stream=out)
    assert lg.bar
    lg.console.get_time = lambda: now[0]  # rich's clock: 2 s per step
    stdout = sys.stdout
    log, handler = logging.getLogger("test_console_library"), logging.StreamHandler(sys.stdout)
    log.addHandler(handler)
    lg.rlhfkit_run_start(run_dir="/x", config={})
    for step in range(1, 5):
        now[0] += 2
        lg.rlhfkit_log_metrics(stage="sft", step=step, metrics={"loss/sft": 1.0 / step})
        lg.rlhfkit_progress(stage="sft", step=step, total=4)
        if step == 2:
            assert sys.stdout is not stdout  # while a stage is live, prints go above its line
            mid = _screen(out.getvalue())[-1]
            assert mid.startswith("[sft] ") and "2/4" in mid and " 50%" in mid and "2.0 s/step" in mid
            assert "< 0:00:04" in mid and mid.endswith("loss/sft=0.5")  # 2 steps left at 2 s each
            print("rlhfkit: a message from the pipeline")
            lg.rlhfkit_checkpoint_saved(stage="sft", path="/x/sft/step_2")
            log.warning("a library's warning")  # through a handler made before the stage began
    assert sys.stdout is stdout and handler.stream is stdout
    for step in (1, 2):
        now[0] += 0.25
        lg.rlhfkit_log_metrics(stage="rm", step=step, metrics={"loss/rm": 0.7})
        lg.rlhfkit_progress(stage="rm", step=step, total=2)
    screen = _screen(out.getvalue())
    log.removeHandler(handler)
    assert screen[:4] == ["[rlhfkit] run directory: /x", "rlhfkit: a message from the pipeline",
                          "[sft] checkpoint saved: /x/sft/step_2", "a library's warning"]
    sft, rm = screen[4:]
    assert sft.startswith("[sft] ") and "4/4" in sft and "100%" in sft and "0:00:06" in sft and sft.endswith("loss/sft=0.25")
    assert rm.startswith("[rm] ") and "2/2" in rm and "4.00 step/s" in rm and rm.endswith("loss/rm=0.7")
    assert "[sft    1" not in out.getvalue()  # on a terminal the live line replaces the per-step lines


def test_console_live_line_ends_with_the_run():
    out = _TTY()
    lg = ConsoleLogger(ConsoleConfig(), stream=out)
    stdout = sys.stdout
    lg.rlhfkit_progress(stage="rl", step=3, total=10)  # a stage that then raises
    lg.rlhfkit_run_end(run_dir="/x", summary={"status": "failed"})
    assert sys.stdout is stdout and lg._live is None
    assert _screen(out.getvalue())[-1].startswith("[rl] ") and "3/10" in _screen(out.getvalue())[-1]


def test_console_is_quiet_when_not_a_terminal():
    out = io.StringIO()
    lg = ConsoleLogger(ConsoleConfig(keys=["loss/sft"]), stream=out)
    assert not lg.bar
    lg.rlhfkit_progress(stage="sft", step=1, total=2)
    assert out.getvalue() == ""  # no bar, no carriage returns in CI logs
    lg.rlhfkit_log_metrics(stage="sft", step=2, metrics={"loss/sft": 0.5})
    lg.rlhfkit_progress(stage="sft", step=2, total=2)
    lg.rlhfkit_checkpoint_saved(stage="sft", path="/x/sft")
    (line, saved) = out.getvalue().splitlines()
    assert line.startswith("[sft    2 ") and line.endswith("loss/sft=0.5") and saved == "[sft] checkpoint saved: /x/sft"


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
