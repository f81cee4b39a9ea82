"""Killed runs resume to the same result, bit for bit on CPU: real subprocesses are killed
(SIGKILL) or preempted (SIGTERM) mid-stage and continued with resume=..."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ..helpers import SMOKE, run_cli

pytestmark = pytest.mark.slow

ARGS = SMOKE + ["checkpoint.every=2", "rl.steps=8", "rm.epochs=2", "logger=[jsonl]"]


def _result(run_dir):
    table = json.load(open(os.path.join(run_dir, "eval.json")))
    table.pop("seconds")
    weights = open(os.path.join(run_dir, "rl", "model.safetensors"), "rb").read()
    return table, weights


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("ref") / "run")
    r = run_cli(ARGS + [f"hydra.run.dir={run_dir}"], cwd=os.path.dirname(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    return _result(run_dir)


def _start_and_signal(args, cwd, wait_for, sig):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhfkit.cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    ready = wait_for if callable(wait_for) else (lambda: os.path.exists(wait_for))
    while not ready():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


@pytest.mark.parametrize("at", ["sft/step-00000010", "rm/step-00000002", "rl/step-00000004"])
def test_sigkill_mid_stage_then_resume_matches_the_uninterrupted_run(at, uninterrupted, tmp_path):
    run_dir = str(tmp_path / "run")
    rc, _, _ = _start_and_signal(ARGS + [f"hydra.run.dir={run_dir}"], str(tmp_path),
                                 os.path.join(run_dir, "checkpoints", at), signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert not os.path.exists(os.path.join(run_dir, "eval.json"))
    r = run_cli([f"resume={run_dir}"], cwd=str(tmp_path))  # the run's own overrides are reused
    assert r.returncode == 0, r.stderr[-3000:]
    stage = at.split("/")[0]
    assert f"[{stage}] resuming at step" in r.stdout
    assert "other versions or thread counts" not in r.stderr  # the same environment: no warning
    table, weights = _result(run_dir)
    ref_table, ref_weights = uninterrupted
    assert table == ref_table  # every metric, exactly
    assert weights == ref_weights


def _rl_started(run_dir):
    """True once the rl stage has logged a step: a signal then surely lands inside rl, not between stages."""
    def ready():
        path = os.path.join(run_dir, "metrics.jsonl")
        return os.path.exists(path) and '"stage": "rl"' in open(path).read()
    return ready


def test_sigterm_writes_a_checkpoint_and_exits_143_then_resumes(uninterrupted, tmp_path):
    run_dir = str(tmp_path / "run")
    rc, _, err = _start_and_signal(ARGS + ["checkpoint.every=100", f"hydra.run.dir={run_dir}"], str(tmp_path),
                                   _rl_started(run_dir), signal.SIGTERM)
    assert rc == 143, err[-2000:]
    assert "SIGTERM" in err and f"resume={run_dir}" in err
    ckpts = os.listdir(os.path.join(run_dir, "checkpoints", "rl"))  # every=100: only the preemption one
    assert len(ckpts) == 1
    # the checkpoint records the environment it was written under; say it was another torch
    manifest = os.path.join(run_dir, "checkpoints", "rl", ckpts[0], "manifest.json")
    info = json.load(open(manifest))
    assert set(info["environment"]) == {"rlhfkit", "python", "torch", "transformers", "threads"}
    torch_now, info["environment"]["torch"] = info["environment"]["torch"], "0.0.1"
    json.dump(info, open(manifest, "w"))
    r = run_cli([f"resume={run_dir}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"(torch 0.0.1 -> {torch_now}): the resumed run continues, but will not repeat" in r.stderr
    assert _result(run_dir) == uninterrupted  # a warning, not a change: the versions are in fact the same


def test_ctrl_c_writes_a_checkpoint_and_exits_130_then_resumes(uninterrupted, tmp_path):
    run_dir = str(tmp_path / "run")
    rc, _, err = _start_and_signal(ARGS + ["checkpoint.every=100", f"hydra.run.dir={run_dir}"], str(tmp_path),
                                   _rl_started(run_dir), signal.SIGINT)
    assert rc == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "press Ctrl-C again to stop at once" in err
    assert f"rlhfkit: error: Ctrl-C (SIGINT): stopped rl at step" in err and f"rlhfkit resume={run_dir}" in err
    assert len(os.listdir(os.path.join(run_dir, "checkpoints", "rl"))) == 1  # every=100: only the Ctrl-C one
    r = run_cli([f"resume={run_dir}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert _result(run_dir) == uninterrupted


# the CLI with its checkpoint writer slowed down: a second Ctrl-C surely comes before the first is done
SLOW_SAVE = """import sys, time
from rlhfkit import loop
from rlhfkit.cli import main
save = loop.Loop.save
def slow(self, *args):
    time.sleep(120)
    return save(self, *args)
loop.Loop.save = slow
main()
"""


def test_a_second_ctrl_c_stops_at_once_with_a_one_line_message(tmp_path):
    run_dir = str(tmp_path / "run")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, *ARGS, "checkpoint.every=100", f"hydra.run.dir={run_dir}"],
                            cwd=str(tmp_path), env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline, ready = time.time() + 300, _rl_started(run_dir)
    while not ready():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    lines = []
    while not lines or "press Ctrl-C again" not in lines[-1]:
        lines.append(proc.stderr.readline())
        assert lines[-1], "".join(lines)[-3000:]
    t = time.time()
    proc.send_signal(signal.SIGINT)
    err = "".join(lines) + proc.communicate(timeout=60)[1]
    assert proc.returncode == 130, err[-3000:]
    assert time.time() - t < 60  # did not wait for the (slowed) checkpoint
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert err.strip().splitlines()[-1] == ("rlhfkit: error: interrupted (Ctrl-C): stopped at once, without writing a "
                                            f"checkpoint. Continue from its last checkpoint with: rlhfkit resume={run_dir}")
    rl = os.path.join(run_dir, "checkpoints", "rl")
    assert not os.path.isdir(rl) or os.listdir(rl) == []  # no half-written checkpoint left


def test_a_corrupt_latest_checkpoint_is_skipped_for_the_previous_one(uninterrupted, tmp_path):
    run_dir = str(tmp_path / "run")
    rc, _, _ = _start_and_signal(ARGS + [f"hydra.run.dir={run_dir}"], str(tmp_path),
                                 os.path.join(run_dir, "checkpoints", "rl", "step-00000004"), signal.SIGKILL)
    assert rc == -signal.SIGKILL
    ckdir = os.path.join(run_dir, "checkpoints", "rl")
    newest = sorted(os.listdir(ckdir))[-1]
    with open(os.path.join(ckdir, newest, "engine-0", "model.safetensors"), "r+b") as f:
        f.truncate(100)  # a torn write
    r = run_cli([f"resume={run_dir}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{newest} is corrupt or partial: engine-0/model.safetensors" in r.stderr
    assert _result(run_dir) == uninterrupted


def test_resume_true_continues_the_newest_run_under_outputs_and_overrides_win(tmp_path):
    args = SMOKE + ["stages=[sft]", "sft.steps=6", "checkpoint.every=2", "logger=[jsonl]"]
    os.makedirs(tmp_path / "outputs" / "2026-01-01" / "00-00-00")  # an older, unrelated directory
    r = run_cli(args, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    # a finished stage is not run again: its product is on disk and verifies
    r = run_cli(["resume=true", "sft.steps=8"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[sft] already complete" in r.stdout
    runs = [d for d in (tmp_path / "outputs").glob("*/*") if (d / "config.yaml").exists()]
    assert len(runs) == 1  # no new run directory
    assert "steps: 8" in (runs[0] / "config.yaml").read_text()


def test_resume_of_a_directory_that_is_not_a_run_is_a_clear_error(tmp_path):
    r = run_cli([f"resume={tmp_path}"], cwd=str(tmp_path))
    assert r.returncode == 2
    assert "not an rlhfkit run directory" in r.stderr


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("short") / "run")
    r = run_cli(SMOKE + ["stages=[sft]", "sft.steps=2", "logger=[jsonl]", f"hydra.run.dir={run_dir}"], cwd=os.path.dirname(run_dir))
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir


def test_a_run_directory_in_use_is_refused_at_once_by_new_runs_and_resume(short_run, tmp_path):
    from rlhfkit.checkpoint import run_lock

    holder = subprocess.Popen([sys.executable, "-c", f"from rlhfkit.checkpoint import run_lock\nimport sys\n"
                               f"with run_lock({short_run!r}):\n    print('held', flush=True)\n    sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    files = ["config.yaml", "metrics.jsonl", os.path.join(".hydra", "overrides.yaml"), os.path.join(".hydra", "config.yaml")]
    before = {f: open(os.path.join(short_run, f), "rb").read() for f in files}
    try:
        assert holder.stdout.readline().strip() == "held"
        for args in ([f"resume={short_run}"], SMOKE + ["stages=[sft]", f"hydra.run.dir={short_run}"]):
            r = run_cli(args, cwd=str(tmp_path))
            assert r.returncode == 2, r.stderr[-3000:]
            assert r.stderr == (f"rlhfkit: error: another rlhfkit process (pid {holder.pid}) is using {short_run}. "
                                "Wait for it to end or stop it, or pick another hydra.run.dir.\n")
    finally:
        holder.communicate("")
    assert {f: open(os.path.join(short_run, f), "rb").read() for f in files} == before  # nothing touched
    with run_lock(short_run):
        pass  # free again


def test_stage_products_half_written_by_a_killed_run_are_removed_on_the_next_start(short_run, tmp_path):
    debris = [".sft.tmp-k1lled", ".rm.tmp-k1lled", ".rl.old-k1lled", ".eval.json.tmp-k1lled"]
    for name in debris:
        os.makedirs(os.path.join(short_run, name, "x")) if ".json" not in name else open(os.path.join(short_run, name), "w").close()
    r = run_cli([f"resume={short_run}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert not [n for n in os.listdir(short_run) if n in debris]
