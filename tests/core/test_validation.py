"""Every setting is validated before any work starts: declared ranges on every numeric field
of every built-in schema, unknown keys, schemas' own cross-field checks (rloo_k, the RL batch
over ranks and minibatches), and the CLI's one-line errors with no run directory."""

from __future__ import annotations

import dataclasses
import functools
import math
import shutil
import typing

import pytest
from omegaconf import OmegaConf

from rlhfkit.cli import setup
from rlhfkit.config import run_schema, validate_run
from rlhfkit.errors import ConfigError
from rlhfkit.registry import MULTI_GROUPS, STAGE_GROUP
from rlhfkit.settings import ALLOWED, show

from ..helpers import SMOKE, compose, run_cli

# options that need a setting to compose into a valid run
REQUIRED = {("data", "files"): ["data.path=prefs.jsonl"], ("data", "jsonl"): ["data.path=prefs.jsonl"],
            ("reward", "format"): ["reward.pattern=x"], ("reward", "ensemble"): ["rm.ensemble_size=2"]}
if shutil.which("bwrap") is None:  # the sandbox's program is checked too; the fields' ranges do not need it
    REQUIRED[("reward", "python_exec")] = ["reward.isolation=none"]


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)


def _numeric(hint) -> bool:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint in (int, float) or (typing.get_origin(hint) is typing.Union and len(args) == 1 and args[0] in (int, float))


def _inner_dataclass(hint):
    if dataclasses.is_dataclass(hint):
        return hint
    return next((a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)), None)


def numeric_fields(schema: type, path: str):
    """(path, dataclass field, type hint) of every int/float field, nested schemas included."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        where = f"{path}.{f.name}" if path else f.name
        inner = _inner_dataclass(hints[f.name])
        if inner is not None:
            yield from numeric_fields(inner, where)
        elif _numeric(hints[f.name]):
            yield where, f, hints[f.name]


def bad_value(f: dataclasses.Field, hint) -> float | int:
    allowed = f.metadata.get(ALLOWED)
    is_int = hint is int or int in typing.get_args(hint)
    if allowed is not None and allowed.ge is not None:
        return allowed.ge - 1
    if allowed is not None and allowed.gt is not None:
        return allowed.gt
    if allowed is not None and allowed.le is not None:
        return allowed.le + 1
    if allowed is not None and allowed.lt is not None:
        return allowed.lt
    assert not is_int, f"{f.name}: an int setting with no declared range (declare one with rlhfkit.settings.bounded)"
    return math.nan


def _cases():
    registry = setup()[1]
    cases = [(None, None, path, f, hint) for path, f, hint in numeric_fields(run_schema(setup()[1]), "")]
    for group in registry.groups():
        for entry in registry.entries(group):
            if entry.package != "rlhfkit" or group == STAGE_GROUP:  # stage settings are run-schema fields
                continue
            prefix = f"{group}.{entry.name}" if group in MULTI_GROUPS else group
            cases += [(group, entry.name, path, f, hint) for path, f, hint in numeric_fields(entry.schema, prefix)]
    return cases


CASES = _cases()


@functools.lru_cache(maxsize=None)
def _composed(group: str | None, name: str | None):
    if group is None:
        cfg = compose(SMOKE)
    else:
        choice = f"{group}=[{name}]" if group in MULTI_GROUPS else f"{group}={name}"
        cfg = compose(SMOKE + [choice] + REQUIRED.get((group, name), []))
    validate_run(cfg, setup()[1])  # the composed default is valid
    return cfg


def test_the_walk_covers_every_kind_of_schema():
    groups = {group for group, *_ in CASES}
    assert {None, "algorithm", "policy", "data", "reward_head"} <= groups
    paths = {path for *_, path, _, _ in CASES}
    assert {"sft.batch_size", "rollout.top_p", "seed", "algorithm.rloo_k", "policy.lora.r", "data.k_min"} <= paths
    assert len(CASES) > 80


@pytest.mark.parametrize("group,name,path,f,hint", CASES, ids=[f"{n or 'run'}:{p}" for _, n, p, _, _ in CASES])
def test_every_numeric_field_rejects_a_bad_value_naming_it(group, name, path, f, hint):
    registry = setup()[1]
    cfg = _composed(group, name)
    bad = bad_value(f, hint)
    cfg = cfg.copy()
    OmegaConf.update(cfg, path, bad)
    with pytest.raises(ConfigError) as err:
        validate_run(cfg, registry)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}={show(OmegaConf.select(cfg, path))}: must be "), message


def _choice_cases():
    registry = setup()[1]
    out = []
    for group in registry.groups():
        for entry in registry.entries(group):
            for f in dataclasses.fields(entry.schema):
                allowed = f.metadata.get(ALLOWED)
                if entry.package == "rlhfkit" and group != STAGE_GROUP and allowed is not None and allowed.choices:
                    prefix = f"{group}.{entry.name}" if group in MULTI_GROUPS else group
                    out.append((group, entry.name, f"{prefix}.{f.name}", allowed.choices))
    return out


@pytest.mark.parametrize("group,name,path,choices", _choice_cases())
def test_fields_with_choices_reject_another_value_naming_them(group, name, path, choices):
    cfg = _composed(group, name).copy()
    OmegaConf.update(cfg, path, "no_such_choice")
    with pytest.raises(ConfigError, match=rf"^{path}=no_such_choice: must be one of {', '.join(choices)}$"):
        validate_run(cfg, setup()[1])


def test_choices_cover_the_backends_and_heads():
    paths = {path for _, _, path, _ in _choice_cases()}
    assert {"backend.precision", "backend.frozen_models", "reward_head.activation"} <= paths


@pytest.mark.parametrize("override,message", [
    ("sft.batch_size=-1", "sft.batch_size=-1: must be >= 1"),
    ("sft.steps=0", "sft.steps=0: must be >= 1"),
    ("rl.steps=-1", "rl.steps=-1: must be >= 1"),
    ("sft.lr=0", "sft.lr=0.0: must be > 0"),
    ("algorithm.lr=-1", "algorithm.lr=-1.0: must be > 0"),
    ("rm.epochs=0", "rm.epochs=0: must be >= 1"),
    ("rollout.max_new_tokens=0", "rollout.max_new_tokens=0: must be >= 1"),
    ("rollout.top_p=0", "rollout.top_p=0.0: must be in (0, 1]"),
    ("rollout.top_p=2", "rollout.top_p=2.0: must be in (0, 1]"),
    ("rollout.temperature=0", "rollout.temperature=0.0: must be > 0"),
    ("seed=-1", "seed=-1: must be >= 0"),
    ("eval.num_prompts=0", "eval.num_prompts=0: must be >= 1"),
    ("sft.pack_length=0", "sft.pack_length=0: must be >= 1"),
    ("rl.prompts_per_step=0", "rl.prompts_per_step=0: must be >= 1"),
    ("stages=[sft,kto]", "stages=[sft,kto]: each must be one of"),
    ("data.k_min=5 data.k_max=4", "data.k_min=5: must be <= k_max (4)"),
])
def test_issue_examples_are_one_line_errors(override, message):
    with pytest.raises(ConfigError) as err:
        validate_run(compose(SMOKE + override.split()), setup()[1])
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("override,message", [
    ("+sft.stepz=3", "sft.stepz: no such setting; did you mean sft.steps?"),
    ("+rollout.temprature=0.5", "rollout.temprature: no such setting; did you mean rollout.temperature?"),
    ("+algorithm.klcoef=0.5", "algorithm.klcoef: no such setting; did you mean algorithm.kl_coef?"),
    ("+logger.console.key=[a]", "logger.console.key: no such setting; did you mean logger.console.keys?"),
    ("+sed=3", "sed: no such setting; did you mean seed?"),
])
def test_unknown_keys_under_typed_nodes_are_rejected(override, message):
    with pytest.raises(ConfigError, match="no such setting") as err:
        validate_run(compose(SMOKE + [override]), setup()[1])
    assert str(err.value).startswith(message)


def test_rloo_k_is_checked_up_front():
    with pytest.raises(ConfigError, match=r"^algorithm.rloo_k=1: must be >= 2$"):
        validate_run(compose(SMOKE + ["algorithm=rloo", "algorithm.rloo_k=1"]), setup()[1])


# --- item 7: the RL batch splits evenly over ranks and minibatches ---------------------------


@pytest.mark.parametrize("algorithm", ["ppo", "a2c", "rloo"])
def test_uneven_shards_are_rejected_up_front(algorithm, monkeypatch):
    """prompts_per_step=10 on 4 ranks would give 2/3/2/3 rows: ranks would run different
    numbers of optimizer steps (a hang) or rloo groups would straddle ranks."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    registry = setup()[1]
    cfg = compose(SMOKE + ["backend=ddp", f"algorithm={algorithm}", "algorithm.num_minibatches=1", "rl.prompts_per_step=10"])
    with pytest.raises(ConfigError, match=r"^rl.prompts_per_step=10: must be a multiple of 4 \(world size 4 x algorithm.num_minibatches=1\)"):
        validate_run(cfg, registry)
    OmegaConf.update(cfg, "rl.prompts_per_step", 12)
    assert validate_run(cfg, registry).world_size == 4
    OmegaConf.update(cfg, "algorithm.num_minibatches", 2)  # 3 rows per rank do not cut into 2 minibatches
    with pytest.raises(ConfigError, match=r"must be a multiple of 8 \(world size 4 x algorithm.num_minibatches=2\)"):
        validate_run(cfg, registry)
    # an RL-free run does not care
    OmegaConf.update(cfg, "stages", ["sft", "rm"])
    validate_run(cfg, registry)


def test_leftover_rows_are_rejected_on_one_process():
    cfg = compose(SMOKE + ["rl.prompts_per_step=10", "algorithm.num_minibatches=4"])
    with pytest.raises(ConfigError, match=r"^rl.prompts_per_step=10: must be a multiple of 4 \(world size 1 x"):
        validate_run(cfg, setup()[1])


def test_a_single_process_backend_ignores_the_launchers_world_size(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert validate_run(compose(SMOKE + ["rl.prompts_per_step=4", "algorithm.num_minibatches=4"]), setup()[1]).world_size == 1


def test_ppo_step_uses_every_row_in_equal_minibatches(rl_ctx):
    from rlhfkit.plugins.algorithms.ppo import PPO, PPOConfig

    ppo = PPO(PPOConfig(ppo_epochs=1, num_minibatches=2, lr=1e-3))
    ppo.setup(rl_ctx)
    with pytest.raises(ConfigError, match=r"rl.prompts_per_step=5: must be a multiple of 2 \(world size 1 x"):
        ppo.step(["copy a b c ="] * 5)  # checked before any rollout; it used to drop the fifth row
    ppo.step(["copy a b c =", "sort c b a ="] * 4)
    assert len(ppo.minibatch_stats) == 2


def test_batches_refuse_a_non_positive_batch_size():
    from rlhfkit.resume import Batches

    with pytest.raises(ValueError):
        Batches(10, -1, 0)  # used to loop forever on next()
    with pytest.raises(ValueError):
        Batches(10, 0, 0)


# --- the CLI -----------------------------------------------------------------------------------


@pytest.mark.parametrize("args,message", [
    (["sft.batch_size=-1"], "rlhfkit: error: sft.batch_size=-1: must be >= 1"),
    (["rollout.max_new_tokens=0"], "rlhfkit: error: rollout.max_new_tokens=0: must be >= 1"),
    (["sft.steps=[1"], "rlhfkit: error: sft.steps=[1: malformed override"),
    (["+sft.stepz=3"], "rlhfkit: error: sft.stepz: no such setting; did you mean sft.steps?"),
    (["-m", "algorithm.kl_coef=0.1,-1"], "rlhfkit: error: algorithm.kl_coef=-1.0: must be >= 0"),
])
def test_cli_rejects_a_bad_setting_in_one_line_before_the_run_directory_exists(tmp_path, args, message):
    r = run_cli(args + SMOKE, cwd=str(tmp_path), timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert lines == [lines[0]] and lines[0].startswith(message), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "multirun").exists()
