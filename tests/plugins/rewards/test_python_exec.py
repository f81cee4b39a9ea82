"""``reward=python_exec``: settings validated before any work (a missing bwrap names the install
command), rollouts scored through the sandbox with each prompt's check data from the
dataset, failures counted by reason in ``metrics()``, prompts without check data, and a
whole ``stages=[sft,rl] reward=python_exec`` run from the CLI."""

from __future__ import annotations

import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from rlhfkit.cli import setup
from rlhfkit.config import validate_run
from rlhfkit.errors import ConfigError, DataError
from rlhfkit.interfaces import Check
from rlhfkit.plugins.rewards.python_exec import PythonExec, PythonExecConfig
from rlhfkit.plugins.rewards.sandbox import REASONS, SandboxError
from rlhfkit.rlhf.sampling import Rollout

from ...helpers import SMOKE, compose, run_cli

needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (apt-get install -y bubblewrap)")


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


# --- settings ------------------------------------------------------------------------------


@needs_bwrap
def test_python_exec_is_a_registered_reward_source_with_validated_settings():
    validate_run(compose(SMOKE + ["reward=python_exec", "reward.timeout_s=2", "reward.workers=2"]), setup()[1])
    for override, message in [("reward.timeout_s=0", "reward.timeout_s=0.0: must be in (0, 3600]"),
                              ("reward.memory_mb=8", "reward.memory_mb=8: must be in [64, 1048576]"),
                              ("reward.max_procs=1", "reward.max_procs=1: must be in [4, 4096]"),
                              ("reward.workers=-1", "reward.workers=-1: must be in [0, 256]"),
                              ("reward.isolation=docker", "reward.isolation=docker: must be one of bwrap, none"),
                              ("reward.missing_check=ignore", "reward.missing_check=ignore: must be one of error, skip")]:
        with pytest.raises(ConfigError, match="^" + override.split("=")[0]) as err:
            validate_run(compose(SMOKE + ["reward=python_exec", override]), setup()[1])
        assert str(err.value).startswith(message)


@pytest.mark.parametrize("how", ["path", "setting"])
def test_a_missing_bwrap_fails_before_any_work_with_the_install_command(how, monkeypatch, tmp_path):
    overrides = SMOKE + ["reward=python_exec"]
    if how == "path":
        monkeypatch.setenv("PATH", str(tmp_path))  # no bwrap on PATH
    else:
        overrides.append("reward.bwrap=/nonexistent/bwrap")
    with pytest.raises(ConfigError) as err:
        validate_run(compose(overrides), setup()[1])
    message = str(err.value)
    assert message.startswith("reward.bwrap=") and "apt-get install -y bubblewrap" in message
    assert "reward.isolation=none" in message and "\n" not in message
    # trusted code may run without the sandbox
    validate_run(compose(overrides + ["reward.isolation=none"]), setup()[1])


@pytest.mark.slow
def test_the_cli_prints_the_missing_bwrap_error_in_one_line_and_makes_no_run(tmp_path):
    run_dir = tmp_path / "run"
    r = run_cli(SMOKE + ["reward=python_exec", "reward.bwrap=/nonexistent/bwrap", f"hydra.run.dir={run_dir}"],
                cwd=str(tmp_path))
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert "apt-get install -y bubblewrap" in r.stderr and not run_dir.exists()


# --- scoring rollouts ----------------------------------------------------------------------


class CheckedData:
    """A dataset whose prompts have check data (``Dataset.checks``), but for ``unchecked``."""

    def __init__(self, checks: dict[str, Check], unchecked: tuple[str, ...] = ()):
        self._checks, self.unchecked = checks, unchecked
        self.sources = {p: f"tasks.jsonl:{i + 1}" for i, p in enumerate([*checks, *unchecked])}

    def prompts(self, split: str) -> list[str]:
        return [*self._checks, *self.unchecked] if split == "train" else list(self._checks)

    def checks(self, prompt: str) -> Check | None:
        return self._checks.get(prompt)


CHECKS = {
    "make 7 from 3 4 =": Check(tests=("assert result == 7",
                                      r"assert sorted(map(int, __import__('re').findall(r'\d+', response))) == [3, 4]")),
    "what is 2*5?": Check(answer="10"),
    "write f(x) = 2x": Check(tests=("assert f(1) == 2", "assert f(2) == 4", "assert f(-1) == -2", "assert f(0) == 0")),
}


def rollout(prompts: list[str], responses: list[str]) -> Rollout:
    B = len(prompts)
    return Rollout(input_ids=torch.zeros(B, 4, dtype=torch.long), attention_mask=torch.ones(B, 4, dtype=torch.long),
                   prompt_width=2, response_mask=torch.ones(B, 2, dtype=torch.long), logprobs=torch.zeros(B, 2),
                   ended=torch.ones(B, dtype=torch.bool), responses=responses, prompts=prompts)


def source(checks=CHECKS, unchecked=(), **cfg) -> PythonExec:
    reward = PythonExec(PythonExecConfig(**{"workers": 2, "timeout_s": 2.0, "cpu_s": 1, **cfg}))
    reward.setup(SimpleNamespace(components={"data": CheckedData(checks, unchecked)}), tokenizer=None)
    return reward


@pytest.mark.parametrize("isolation", [pytest.param("bwrap", marks=needs_bwrap), "none"])
def test_rollouts_are_scored_by_their_prompts_checks(isolation):
    reward = source(isolation=isolation, failure_reward=-1.0)
    rows = [
        ("make 7 from 3 4 =", "3 + 4", 1.0),
        ("make 7 from 3 4 =", "7", 0.5),  # right value, numbers not used
        ("make 7 from 3 4 =", "3 +", -1.0),  # syntax error
        ("what is 2*5?", "2 * 5", 1.0),
        ("what is 2*5?", "print(10)", 1.0),  # result None: the last printed line
        ("what is 2*5?", "11", 0.0),
        ("write f(x) = 2x", "def f(x):\n    return x + x if x > 0 else 0", 0.75),  # f(-1) fails
        ("write f(x) = 2x", "def f(x):\n    return f(x)\nf(1)", -1.0),  # RecursionError: a crash
        ("write f(x) = 2x", "while True:\n    pass", -1.0),  # timeout
    ]
    scores = reward(rollout([p for p, _, _ in rows], [r for _, r, _ in rows]))
    assert scores.dtype == torch.float32 and scores.shape == (len(rows),)
    assert scores.tolist() == [s for _, _, s in rows]
    metrics = reward.metrics()
    assert set(metrics) == {"reward/exec_pass_rate", "reward/exec_skipped", "reward/exec_s",
                            "reward/exec_sandbox_starts", "reward/exec_sandbox_start_s",
                            *(f"reward/exec_fail_{r}" for r in REASONS)}
    assert metrics["reward/exec_pass_rate"] == 3 / 9
    assert 1 <= metrics["reward/exec_sandbox_starts"] <= 2 and metrics["reward/exec_sandbox_start_s"] > 0
    expected = {"tests_failed": 3, "syntax_error": 1, "crash": 1, "timeout": 1}
    assert {r: metrics[f"reward/exec_fail_{r}"] for r in REASONS} == {r: expected.get(r, 0) for r in REASONS}
    assert metrics["reward/exec_s"] > 0
    # counts are per call: the next call starts from zero, with the same keys
    again = reward.metrics()
    assert set(again) == set(metrics) and all(v == 0 for v in again.values())


@pytest.mark.parametrize("isolation", [pytest.param("bwrap", marks=needs_bwrap), "none"])
def test_workers_keep_their_sandboxes_warm_across_steps(isolation):
    reward = source(isolation=isolation)
    rows = [("make 7 from 3 4 =", "3 + 4"), ("make 7 from 3 4 =", "3 * 4")] * 4
    batch = rollout([p for p, _ in rows], [r for _, r in rows])
    assert reward(batch).tolist() == [1.0, 0.5] * 4
    first = reward.metrics()
    assert 1 <= first["reward/exec_sandbox_starts"] <= 2  # one per worker, at most
    assert reward(batch).tolist() == [1.0, 0.5] * 4
    second = reward.metrics()  # the next step reuses them: no start-up at all
    assert second["reward/exec_sandbox_starts"] == 0 and second["reward/exec_sandbox_start_s"] == 0
    # a row that kills its sandbox scores a crash; that worker's next row starts a fresh one
    killer = rollout(["make 7 from 3 4 ="] * 2, ["import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", "3 + 4"])
    assert reward(killer).tolist() == [0.0, 1.0]
    reward.close()
    assert all(box.proc is None for box in reward.boxes)


@needs_bwrap
def test_a_prompt_without_check_data_is_an_error_or_a_counted_skip():
    reward = source(unchecked=("tell me a joke",))
    # at the first step, whichever prompts it scores: the dataset's every prompt is checked
    with pytest.raises(DataError, match=r"no answer or tests for the prompt 'tell me a joke' \(tasks.jsonl:4\): .*"
                                        "reward.missing_check=skip"):
        reward(rollout(["what is 2*5?"], ["10"]))
    skipping = source(unchecked=("tell me a joke",), missing_check="skip", failure_reward=-0.25)
    scores = skipping(rollout(["what is 2*5?", "tell me a joke"], ["10", "no"]))
    assert scores.tolist() == [1.0, -0.25]
    metrics = skipping.metrics()
    assert metrics["reward/exec_skipped"] == 1 and metrics["reward/exec_pass_rate"] == 1.0


@needs_bwrap
def test_check_data_that_is_not_python_names_the_prompt_and_its_line():
    reward = source({"p": Check(tests=("assert result ==",))})
    with pytest.raises(DataError, match=r"test 0 of the prompt 'p' \(tasks.jsonl:1\) is not valid Python"):
        reward(rollout(["p"], ["1"]))


@needs_bwrap
def test_a_sandbox_that_cannot_start_fails_at_setup(refusing_bwrap):
    with pytest.raises(SandboxError, match="sandbox_error: bwrap: No permissions to create new namespace"):
        source(bwrap=refusing_bwrap)


# --- the whole pipeline --------------------------------------------------------------------

DATASET = '''
"""The synthetic suite with check data on every prompt: the response must be Python that
defines nothing called `bad` (a random policy's text mostly is not Python at all)."""
from rlhfkit import hookimpl
from rlhfkit.interfaces import Check
from rlhfkit.plugins.datasets.synthetic import SyntheticConfig, SyntheticTasks


class Checked(SyntheticTasks):
    def checks(self, prompt):
        return Check(tests=("assert 'bad' not in dir()", "assert isinstance(response, str)"))


@hookimpl
def rlhfkit_register_datasets(register):
    register("checked", Checked, SyntheticConfig)
'''


@pytest.mark.slow
@needs_bwrap
def test_rl_against_python_exec_from_the_cli(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "rlhfkit_checked.py").write_text(DATASET)
    info = site / "rlhfkit_checked-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rlhfkit-checked\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[rlhfkit]\nchecked = rlhfkit_checked\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    run_dir = tmp_path / "run"
    small = ["data.num_demonstrations=256", "data.num_rm_prompts=24", "data.num_rm_test_prompts=8",
             "data.num_rl_prompts=64", "data.num_test_prompts=64"]
    r = run_cli(SMOKE + ["data=checked", *small, "stages=[sft,rl]", "reward=python_exec", "reward.workers=2",
                         "sft.steps=4", "algorithm=rloo", "algorithm.rloo_k=2", "rl.steps=2", "rl.prompts_per_step=8",
                         "eval.num_prompts=8", f"hydra.run.dir={run_dir}"],
                cwd=str(tmp_path), env_extra=env)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    rl_rows = [row for row in rows if row["stage"] == "rl" and "loss/policy" in row]
    assert len(rl_rows) == 2
    for row in rl_rows:  # the step's rows were verified in the sandbox: passed, or failed for a counted reason
        assert row["reward/exec_s"] > 0 and 0 <= row["reward/exec_pass_rate"] <= 1 and row["reward/exec_skipped"] == 0
        assert all(row[f"reward/exec_fail_{reason}"] == int(row[f"reward/exec_fail_{reason}"]) for reason in REASONS)
    table = json.load(open(run_dir / "eval.json"))
    assert all(0 <= m["proxy"] <= 1 for m in table["policies"].values())  # the proxy column: the pass fraction
