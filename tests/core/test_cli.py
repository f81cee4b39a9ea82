"""The rlhfkit command: plugin listing, early errors, Hydra behaviours."""

import pytest

from rlhfkit.cli import check_overrides, setup, yaml_options
from rlhfkit.errors import UnknownPluginError

from ..helpers import run_cli


@pytest.fixture(scope="module")
def registry():
    return setup()[1]


@pytest.mark.parametrize(
    "override,group,bad",
    [
        ("algorithm=ppoo", "algorithm", "ppoo"),
        ("reward_head=last_tokn", "reward_head", "last_tokn"),
        ("logger=[console,jsonll]", "logger", "jsonll"),
        ("algorithm=ppo,a2cc", "algorithm", "a2cc"),  # a multirun sweep
    ],
)
def test_unknown_choice_fails_before_hydra(registry, override, group, bad):
    with pytest.raises(UnknownPluginError) as e:
        check_overrides(["-m", override] if "," in override and "[" not in override else [override], registry)
    assert e.value.group == group and e.value.name == bad
    assert "Did you mean" in str(e.value)


def test_valid_choices_and_presets_pass(registry):
    check_overrides(["algorithm=a2c", "reward_head=mlp", "experiment=smoke", "logger=[console]", "algorithm.kl_coef=0.1"], registry)
    assert "smoke" in yaml_options("experiment") and "ppo" in yaml_options("algorithm")


def test_cli_unknown_plugin_exit_code_and_message(tmp_path):
    r = run_cli(["algorithm=ppx"], cwd=str(tmp_path))
    assert r.returncode == 2
    assert "Unknown algorithm 'ppx'. Did you mean 'ppo'?" in r.stderr and "a2c, grpo, grpo_dapo, grpo_dr, grpo_gspo, ppo, rloo" in r.stderr
    assert not (tmp_path / "outputs").exists()  # no work started


def test_cli_wrong_type_names_field_and_type(tmp_path):
    r = run_cli(["algorithm.kl_coef=lots", "rl.steps=3.5"], cwd=str(tmp_path))
    assert r.returncode != 0
    out = r.stdout + r.stderr
    assert "algorithm.kl_coef" in out and "Float" in out
    assert not (tmp_path / "outputs").exists()


def test_cli_cfg_job_prints_composed_config(tmp_path):
    r = run_cli(["--cfg", "job", "algorithm=a2c", "algorithm.kl_coef=0.2", "backend.precision=bf16"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "_name_: a2c" in r.stdout and "kl_coef: 0.2" in r.stdout and "precision: bf16" in r.stdout
    r = run_cli(["--cfg", "job", f"hydra.run.dir={tmp_path}/run"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "run").exists()  # printing takes no run directory (nor its lock)


def test_cli_plugins_lists_fields_and_defaults(tmp_path):
    r = run_cli(["plugins"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "  ppo  (rlhfkit)" in r.stdout
    assert "algorithm.clip_eps: float = 0.2" in r.stdout
    assert "logger.jsonl.filename: str = 'metrics.jsonl'" in r.stdout


def test_cli_run_dir_that_is_a_file_is_a_one_line_error(tmp_path):
    (tmp_path / "taken").write_text("")
    for run_dir in [tmp_path / "taken", tmp_path / "taken" / "run"]:
        r = run_cli(["experiment=smoke", f"hydra.run.dir={run_dir}"], cwd=str(tmp_path))
        assert r.returncode == 2
        assert r.stderr == (f"rlhfkit: error: hydra.run.dir={run_dir}: {tmp_path / 'taken'} is a file, not a directory. "
                            "Pick another hydra.run.dir.\n")


def test_cli_unwritable_run_dir_is_a_one_line_error(tmp_path):
    import os
    import subprocess

    locked = tmp_path / "locked"
    locked.mkdir()
    if os.geteuid() == 0:  # root writes anywhere but on a read-only file system
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(locked)], capture_output=True).returncode:
            pytest.skip("cannot mount a read-only tmpfs here")
    else:
        locked.chmod(0o500)
    try:
        r = run_cli(["experiment=smoke", f"hydra.run.dir={locked}/run"], cwd=str(tmp_path))
    finally:
        if os.geteuid() == 0:
            subprocess.run(["umount", "--lazy", str(locked)])
        locked.chmod(0o700)
    assert r.returncode == 2
    assert r.stderr == (f"rlhfkit: error: hydra.run.dir={locked}/run: cannot write in {locked} (no permission, or a "
                        "read-only file system). Pick a writable hydra.run.dir.\n")


def test_a_refused_resume_leaves_the_runs_settings_unless_it_saved_something(tmp_path):
    """A resume's overrides are rewritten by Hydra as it starts; a resume that fails puts
    the run's own back, unless it saved a checkpoint or product with the new ones."""
    from rlhfkit.checkpoint import atomic_write_text
    from rlhfkit.cli import _Settings

    files = {".hydra/overrides.yaml": b"- sft.steps=5\n", ".hydra/config.yaml": b"a: 1\n", "config.yaml": b"a: 1\n"}
    (tmp_path / ".hydra").mkdir()
    ckpt = tmp_path / "checkpoints" / "sft" / "step-00000001"

    def attempt(saves: bool) -> dict:
        for rel, data in files.items():
            (tmp_path / rel).write_bytes(data)
        settings = _Settings()
        settings.record(str(tmp_path))
        for rel in files:  # what Hydra and the run write as the refused attempt starts
            (tmp_path / rel).write_bytes(b"- sft.steps=9\n")
        if saves:  # a new checkpoint, then one replaced in place (atomically, as rlhfkit writes)
            ckpt.mkdir(parents=True, exist_ok=True)
            atomic_write_text(str(ckpt / "manifest.json"), "{}")
        settings.restore(str(tmp_path))
        return {rel: (tmp_path / rel).read_bytes() for rel in files}

    assert attempt(saves=False) == files
    assert set(attempt(saves=True).values()) == {b"- sft.steps=9\n"}  # made with the new settings: they stay
    assert set(attempt(saves=True).values()) == {b"- sft.steps=9\n"}  # the manifest replaced, not added
    assert attempt(saves=False) == files  # an attempt that saved nothing, with checkpoints there from before
