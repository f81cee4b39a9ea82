"""benchmarks/rl_step.py: the TRL venvs get the running torch and transformers, and no
speed-up is printed for runs on different versions (no TRL is installed or timed here)."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("rl_step", os.path.join(ROOT, "benchmarks", "rl_step.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["rl_step"] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules["rl_step"]


RUNNING = {"torch": torch.__version__, "transformers": transformers.__version__}


def _timed(tokens_per_s, **versions):
    return dict(step_s=1.0, generate_s=0.2, score_s=0.1, update_s=0.7, generate_share=0.2, tokens_per_s=tokens_per_s,
                **{**RUNNING, **versions})


def test_make_venvs_pins_the_running_torch_and_transformers(bench, tmp_path, monkeypatch):
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        if cmd[1:3] == ["-m", "venv"]:  # a fresh venv: its interpreter now exists
            os.makedirs(os.path.join(cmd[-1], "bin"))
            open(os.path.join(cmd[-1], "bin", "python"), "w").close()
        return subprocess.CompletedProcess(cmd, 0, stdout=f"{__import__('json').dumps(RUNNING)}\n", stderr="")

    monkeypatch.setattr(bench.subprocess, "run", run)
    ppo_py, trl_py = bench.make_venvs(str(tmp_path))
    assert ppo_py == str(tmp_path / "trl-ppo" / "bin" / "python") and trl_py == str(tmp_path / "trl" / "bin" / "python")
    installs = [c for c in calls if c[1:4] == ["-m", "pip", "install"]]
    pins = {f"torch=={torch.__version__}", f"transformers=={transformers.__version__}"}
    assert len(installs) == 2 and all(pins <= set(c) for c in installs)
    assert {bench.TRL_PPO_REQ, bench.TRL_REQ} == {next(a for a in c if a.startswith("trl==")) for c in installs}
    # reused venvs are pinned again: one made before (with torch 2.15) is brought back
    calls.clear()
    bench.make_venvs(str(tmp_path))
    assert not [c for c in calls if c[1:3] == ["-m", "venv"]]
    assert len([c for c in calls if c[1:4] == ["-m", "pip", "install"] and pins <= set(c)]) == 2


def test_make_venvs_stops_when_the_venv_still_has_other_versions(bench, tmp_path, monkeypatch):
    (tmp_path / "trl-ppo" / "bin").mkdir(parents=True)
    (tmp_path / "trl-ppo" / "bin" / "python").touch()
    other = '{"torch": "2.15.0", "transformers": "%s"}\n' % transformers.__version__
    monkeypatch.setattr(bench.subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 0, stdout=other))
    with pytest.raises(SystemExit, match=r"has torch 2\.15\.0, .* not torch " + torch.__version__.replace("+", r"\+")):
        bench.make_venvs(str(tmp_path))


def test_no_speed_up_is_printed_for_runs_on_different_versions(bench):
    shape = bench.SHAPES["cpu-tiny"]
    matched = {"rlhfkit-ppo": _timed(200.0), "trl-ppo": _timed(100.0, trl="1.9.2"),
               "rlhfkit-rloo": _timed(300.0), "trl-rloo": _timed(100.0, trl="1.16.0")}
    text = bench.report(shape, "cpu-tiny", matched)
    assert "| 2.00x |" in text and "| 3.00x |" in text and f"| {torch.__version__} / {transformers.__version__} |" in text
    assert bench.version_mismatches(matched) == {}
    # the case: the PPO venv got torch 2.15 while rlhfkit ran the running torch
    mixed = {**matched, "trl-ppo": _timed(100.0, trl="1.9.2", torch="2.15.0")}
    text = bench.report(shape, "cpu-tiny", mixed)
    assert "2.00x" not in text and "versions differ" in text and "| 3.00x |" in text
    (why,) = bench.version_mismatches(mixed).values()
    assert f"rlhfkit-ppo ran torch {torch.__version__}" in why and "trl-ppo ran torch 2.15.0" in why and why in text
    # a different transformers is refused as well
    assert "rlhfkit-rloo" in bench.version_mismatches({**matched, "trl-rloo": _timed(100.0, transformers="9.9.9")})


@pytest.mark.parametrize("algo,reward_head", [("ppo", "last_token"), ("ppo", "logprob"), ("rloo", "last_token")])
def test_the_rlhfkit_worker_times_a_step_against_the_current_interfaces(bench, tmp_path, algo, reward_head):
    """The rlhfkit side runs (it builds its RL context as the rl stage does): a timed step of a
    tiny model reports its phases and the tokens it generated."""
    shape = bench.Shape(n_layer=1, hidden=16, n_head=2, vocab=40, prompts=4, prompt_len=4, new_tokens=3, bf16=False,
                        device="cpu", ppo_epochs=1, rloo_k=2)
    bench.make_model_dir(shape, str(tmp_path / "model"))
    result = bench.run_rlhfkit(algo, shape, str(tmp_path / "model"), 2, 1, reward_head=reward_head)
    assert result["steps"] == 2 and result["tokens"] > 0 and result["step_s"] > 0
    assert result["generate_s"] + result["score_s"] <= result["step_s"]
