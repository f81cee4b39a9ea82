"""W&B sweeps, Hydra multirun and the Optuna sweeper through the real command."""

import glob
import json
import os
import random
from importlib import resources
from pathlib import Path

import pytest
import yaml

from rlhfkit.cli import check_overrides, setup

from ..helpers import SMOKE, compose, read_wandb_run, run_cli

SWEEP_FILE = resources.files("rlhfkit.conf") / "sweeps" / "ppo_kl.yaml"


def _sweep():
    return yaml.safe_load(SWEEP_FILE.read_text())


def _agent_command(sweep, seed=0):
    """The argv a W&B agent runs for one trial, built by wandb's own code."""
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    rng = random.Random(seed)
    params = {}
    for name, spec in sweep["parameters"].items():
        params[name] = {"value": rng.choice(spec["values"]) if "values" in spec else rng.uniform(spec["min"], spec["max"])}
    args = create_sweep_command_args({"args": params})
    command = []
    for part in create_sweep_command(list(sweep["command"])):
        if part == "${args_no_hyphens}":
            command += args["args_no_hyphens"]
        elif part.startswith("${"):
            continue  # ${env}, ${interpreter}: the launcher, not our arguments
        else:
            command.append(part)
    return command


def _sweep_violations(sweep) -> list[str]:
    """What W&B's controller reports for a sweep config: its JSON schema (a copy of the
    ``sweeps`` package's, which pins numpy<2), with its format checks, and min < max."""
    import jsonschema

    schema = json.loads((Path(__file__).parent / "wandb_sweep_schema.json").read_text())
    formats = jsonschema.FormatChecker()
    formats.checks("float")(lambda v: isinstance(v, float))
    formats.checks("integer")(lambda v: isinstance(v, int))
    found = [e.message for e in jsonschema.Draft7Validator(schema, format_checker=formats).iter_errors(sweep)]
    for name, spec in sweep.get("parameters", {}).items():
        if isinstance(spec, dict) and isinstance(spec.get("min"), (int, float)) and isinstance(spec.get("max"), (int, float)) and spec["min"] >= spec["max"]:
            found.append(f"{name}: min {spec['min']} is not less than max {spec['max']}")
    return found


def test_sweep_file_is_valid_for_wandb():
    assert _sweep_violations(_sweep()) == []


@pytest.mark.parametrize("mend, expected", [
    (lambda s: s.update(method="bayesian"), "'bayesian' is not one of"),
    (lambda s: s["parameters"].update(seed=3), "3 is not valid under any of the given schemas"),
    (lambda s: s["parameters"]["algorithm.lr"].update(min=0.001), "min 0.001 is not less than max"),
    (lambda s: s["metric"].update(goal="up"), "'up' is not one of"),
])
def test_the_sweep_check_catches_mistakes(mend, expected):
    sweep = _sweep()
    mend(sweep)
    assert any(expected in v for v in _sweep_violations(sweep)), _sweep_violations(sweep)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cli_accepts_the_agents_argument_list(seed):
    sweep = _sweep()
    command = _agent_command(sweep, seed)
    assert command[0] == "rlhfkit" and "${args_no_hyphens}" in sweep["command"]
    args = command[1:]
    assert any(a.startswith("algorithm.kl_coef=") for a in args)
    registry = setup()[1]
    check_overrides(args, registry)
    cfg = compose(SMOKE + args)
    typed = registry.config_of("algorithm", cfg.algorithm)[1]
    kl = float(next(a for a in args if a.startswith("algorithm.kl_coef=")).split("=")[1])
    assert typed.kl_coef == pytest.approx(kl)
    # the metric the sweep optimises is one the pipeline logs (under the eval stage)
    assert sweep["metric"]["name"] == "eval/gold_improvement"


@pytest.mark.slow
def test_agent_trial_runs_and_logs_the_sweep_metric(tmp_path):
    command = _agent_command(_sweep())
    run_dir = str(tmp_path / "trial")
    env = {"WANDB_MODE": "offline", "WANDB_SWEEP_ID": "local-test", "WANDB_API_KEY": "f" * 40}
    r = run_cli([*SMOKE, *command[1:], f"hydra.run.dir={run_dir}"], cwd=str(tmp_path), env_extra=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (record,) = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert "eval/gold_improvement" in read_wandb_run(record)["summary"]
    everything = "".join(open(f, errors="ignore").read() for f in glob.glob(run_dir + "/**/*", recursive=True) if os.path.isfile(f))
    assert "f" * 40 not in everything  # the API key is nowhere in the run directory


@pytest.mark.slow
def test_multirun_over_algorithms_and_seeds(tmp_path):
    sweep = str(tmp_path / "sweep")
    r = run_cli(["-m", *SMOKE, "algorithm=ppo,a2c", "seed=0,1", "rl.steps=2", f"hydra.sweep.dir={sweep}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    seen = set()
    for job in range(4):
        cfg = yaml.safe_load(open(os.path.join(sweep, str(job), "config.yaml")))
        assert os.path.isfile(os.path.join(sweep, str(job), "eval.json"))
        seen.add((cfg["algorithm"]["_name_"], cfg["seed"]))
    assert seen == {("ppo", 0), ("ppo", 1), ("a2c", 0), ("a2c", 1)}


@pytest.mark.slow
def test_optuna_sweeper(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install 'rlhfkit[optuna]'")
    sweep = str(tmp_path / "optuna")
    r = run_cli(["-m", *SMOKE, "hparams_search=optuna_kl", "hydra.sweeper.n_trials=2", "rl.steps=2",
                 f"hydra.sweep.dir={sweep}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = yaml.safe_load(open(os.path.join(sweep, "optimization_results.yaml")))
    assert set(result["best_params"]) == {"algorithm.kl_coef", "algorithm.lr"}
    values = [json.load(open(p))["gold_improvement"] for p in glob.glob(os.path.join(sweep, "*", "eval.json"))]
    assert len(values) == 2 and result["best_value"] == pytest.approx(max(values))
