"""Packaging: a non-editable install finds its configs, and a third-party plugin package
installed from examples/ is selectable by name through real package metadata."""

import json
import os
import subprocess
import sys
import zipfile

import pytest

from ..helpers import SMOKE, run_cli

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "rlhfkit-example-plugin")


def pip(*args):
    r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]


@pytest.fixture(scope="module")
def example_site(tmp_path_factory):
    site = str(tmp_path_factory.mktemp("site"))
    pip("install", "--quiet", "--no-deps", "--no-build-isolation", "--target", site, EXAMPLE)
    return site


def test_wheel_installs_under_one_import_name_with_configs(tmp_path):
    pip("wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), ROOT)
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    names = zipfile.ZipFile(tmp_path / wheel).namelist()
    assert "rlhfkit/conf/config.yaml" in names and "rlhfkit/conf/algorithm/ppo.yaml" in names
    assert "rlhfkit/plugins/algorithms/ppo.py" in names and "rlhfkit/pipeline.py" in names
    tops = {n.split("/")[0] for n in names}
    assert tops <= {"rlhfkit", f"rlhfkit-{wheel.split('-')[1]}.dist-info"}, tops  # no top-level core/ or plugins/
    # installed (not editable) somewhere else, run from an unrelated directory: configs found
    site = tmp_path / "site"
    pip("install", "--quiet", "--no-deps", "--target", str(site), str(tmp_path / wheel))
    r = run_cli(["--cfg", "job"], cwd=str(tmp_path), env_extra={"PYTHONPATH": str(site)})
    assert r.returncode == 0, r.stderr
    assert "_name_: ppo" in r.stdout
    r = subprocess.run([sys.executable, "-c", "import rlhfkit.conf, sys; print(rlhfkit.conf.__file__)"],
                       cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": str(site)}, capture_output=True, text=True)
    assert r.stdout.startswith(str(site))


def test_example_plugin_listed_with_its_package(example_site, tmp_path):
    r = run_cli(["plugins"], cwd=str(tmp_path), env_extra={"PYTHONPATH": example_site})
    assert r.returncode == 0, r.stderr
    assert "reinforce  (rlhfkit-example-plugin)" in r.stdout and "max_pool  (rlhfkit-example-plugin)" in r.stdout
    assert "algorithm.kl_coef: float = 0.05" in r.stdout
    assert "reinforce_fast" in r.stdout  # the YAML preset from the plugin's search path


def test_example_plugin_selected_by_name_from_the_cli(example_site, tmp_path):
    run_dir = str(tmp_path / "run")
    r = run_cli(SMOKE + ["algorithm=reinforce", "algorithm.kl_coef=0.1", "reward_head=max_pool", f"hydra.run.dir={run_dir}"],
                cwd=str(tmp_path), env_extra={"PYTHONPATH": example_site})
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    cfg = open(os.path.join(run_dir, "config.yaml")).read()
    assert "_name_: reinforce" in cfg and "_name_: max_pool" in cfg and "kl_coef: 0.1" in cfg
    assert os.path.isdir(os.path.join(run_dir, "rl"))
    # a wrong type in a third-party plugin's field is caught by its schema, too
    r = run_cli(["algorithm=reinforce", "algorithm.kl_coef=high"], cwd=str(tmp_path), env_extra={"PYTHONPATH": example_site})
    assert r.returncode != 0 and "algorithm.kl_coef" in r.stderr + r.stdout


def test_example_stage_runs_from_the_cli(example_site, tmp_path):
    env = {"PYTHONPATH": example_site}
    run_dir = tmp_path / "run"
    # best_of_n scores with the run's reward source: reward=model needs an rm product, checked before any work
    r = run_cli(SMOKE + ["stages=[sft,best_of_n]", f"hydra.run.dir={run_dir}"], cwd=str(tmp_path), env_extra=env)
    assert r.returncode != 0 and "Stage 'rm' is not in stages" in r.stderr and not (run_dir / "sft").exists()
    r = run_cli(SMOKE + ["stages=[sft,rm,best_of_n]", "best_of_n.steps=4", "best_of_n.num_prompts=16",
                         f"hydra.run.dir={run_dir}"], cwd=str(tmp_path), env_extra=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    table = json.load(open(run_dir / "eval.json"))
    assert list(table["policies"]) == ["sft", "best_of_n"]  # evaluated against SFT, like every trained policy
    assert (run_dir / "best_of_n" / "manifest.json").is_file()
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    assert [x["step"] for x in rows if x["stage"] == "best_of_n" and "loss/best_of_n" in x] == [4]


def test_example_plugin_yaml_preset_from_its_search_path(example_site, tmp_path):
    # rlhfkit_config_search_path: the plugin adds pkg://rlhfkit_example.conf
    r = run_cli(["--cfg", "job", "algorithm=reinforce_fast"], cwd=str(tmp_path), env_extra={"PYTHONPATH": example_site})
    assert r.returncode == 0, r.stderr
    assert "_name_: reinforce" in r.stdout and "lr: 0.0003" in r.stdout


def test_without_the_plugin_its_names_are_unknown(tmp_path):
    r = run_cli(["algorithm=reinforce"], cwd=str(tmp_path))
    assert r.returncode == 2 and "Unknown algorithm 'reinforce'" in r.stderr
