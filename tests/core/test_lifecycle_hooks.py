"""One test per lifecycle hook, on one real (smoke-sized) pipeline run in-process with an
inline callback plugin registered for its duration."""

import json
import os
from dataclasses import dataclass

import pytest

from rlhfkit import hookimpl
from rlhfkit.cli import setup, store_schemas
from rlhfkit.pipeline import Run
from rlhfkit.registry import Registry

from ..helpers import SMOKE, compose


class Recorder:
    def __init__(self):
        self.calls = []

    @hookimpl
    def rlhfkit_run_start(self, run_dir, config):
        self.calls.append(("run_start", run_dir, config))

    @hookimpl
    def rlhfkit_log_metrics(self, stage, step, metrics):
        self.calls.append(("log_metrics", stage, step, metrics))

    @hookimpl
    def rlhfkit_log_samples(self, stage, step, rows):
        self.calls.append(("log_samples", stage, step, rows))

    @hookimpl
    def rlhfkit_progress(self, stage, step, total):
        self.calls.append(("progress", stage, step, total))

    @hookimpl
    def rlhfkit_checkpoint_saved(self, stage, path):
        self.calls.append(("checkpoint_saved", stage, path, os.path.isdir(path)))

    @hookimpl
    def rlhfkit_run_end(self, run_dir, summary):
        self.calls.append(("run_end", run_dir, summary))

    def of(self, kind):
        return [c for c in self.calls if c[0] == kind]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    plugins, registry = setup()
    rec = Recorder()
    plugins.register(rec, name="recorder")
    run_dir = str(tmp_path_factory.mktemp("run"))
    try:
        Run(compose(SMOKE + ["logger=[jsonl]"]), registry, plugins, run_dir)()
    finally:
        plugins.pm.unregister(rec)
    return rec, run_dir


def test_rlhfkit_run_start(recorded):
    rec, run_dir = recorded
    (start,) = rec.of("run_start")
    assert start[1] == run_dir
    assert start[2]["algorithm"]["_name_"] == "ppo" and start[2]["rl"]["steps"] == 3
    assert rec.calls[0][0] == "run_start"


def test_rlhfkit_progress(recorded):
    rec, _ = recorded
    by_stage = {}
    for _, stage, step, total in rec.of("progress"):
        by_stage.setdefault(stage, []).append((step, total))
    assert by_stage["sft"] == [(s, 40) for s in range(1, 41)]  # every step, logged or not
    assert by_stage["rl"] == [(1, 3), (2, 3), (3, 3)]
    assert by_stage["rm"][-1][0] == by_stage["rm"][-1][1]


def test_rlhfkit_log_metrics(recorded):
    rec, _ = recorded
    stages = {c[1] for c in rec.of("log_metrics")}
    assert {"sft", "rm", "rl", "eval"} <= stages
    rl = [c for c in rec.of("log_metrics") if c[1] == "rl"]
    assert [c[2] for c in rl] == [1, 2, 3]
    assert {"loss/policy", "loss/value", "rollout/kl", "reward/proxy", "perf/tokens_per_s"} <= set(rl[0][3])
    assert all(isinstance(v, float) for c in rl for v in c[3].values())


def test_rlhfkit_log_samples(recorded):
    rec, _ = recorded
    samples = rec.of("log_samples")
    assert {c[1] for c in samples} == {"sft", "rl"}
    assert {"prompt", "response", "gold"} <= set(samples[0][3][0])


def test_rlhfkit_checkpoint_saved(recorded):
    rec, run_dir = recorded
    saved = rec.of("checkpoint_saved")
    assert [c[1] for c in saved] == ["sft", "rm", "rl"]
    assert all(c[3] for c in saved)  # complete on disk when announced
    assert saved[0][2] == os.path.join(run_dir, "sft")


def test_rlhfkit_run_end(recorded):
    rec, run_dir = recorded
    (end,) = rec.of("run_end")
    assert rec.calls[-1][0] == "run_end"
    assert end[2]["status"] == "ok" and "win_rate" in end[2]
    with open(os.path.join(run_dir, "eval.json")) as f:
        assert json.load(f)["policies"].keys() == {"sft", "rl"}


class ExplodingAlgorithm:
    """An inline algorithm plugin whose first RL step raises."""

    @dataclass
    class Config:
        at_step: int = 1

    @hookimpl
    def rlhfkit_register_algorithms(self, register):
        def factory(cfg):
            class Boom:
                def setup(self, ctx):
                    pass

                def step(self, prompts):
                    raise RuntimeError("exploded mid-run")

            return Boom()

        register("exploding", factory, self.Config)


def test_run_end_reports_failure(tmp_path):
    plugins, _ = setup()
    rec, algo = Recorder(), ExplodingAlgorithm()
    plugins.register(rec, name="recorder-fail")
    plugins.register(algo, name="exploding-plugin", package="test-package")
    try:
        registry = Registry.from_plugins(plugins)
        store_schemas(registry)
        cfg = compose(SMOKE + ["logger=[jsonl]", "algorithm=exploding"])
        with pytest.raises(RuntimeError, match="exploded mid-run"):
            Run(cfg, registry, plugins, str(tmp_path))()
    finally:
        plugins.pm.unregister(rec)
        plugins.pm.unregister(algo)
    (end,) = rec.of("run_end")
    assert end[2]["status"] == "failed" and "exploded mid-run" in end[2]["error"]
    # the stages before the failure were saved and announced
    assert [c[1] for c in rec.of("checkpoint_saved")] == ["sft", "rm"]
    assert (tmp_path / "sft" / "model.safetensors").exists()
