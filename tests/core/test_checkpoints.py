"""Training checkpoints: manifests catch partial and corrupt ones, the store keeps the last
N, engines skip non-finite steps, and nothing pickled is ever executed on load."""

import errno
import os
import shutil

import pytest
import torch

from rlhfkit import checkpoint
from rlhfkit.checkpoint import CheckpointStore, atomic_directory, remove_temporaries, run_lock, verify, write_manifest
from rlhfkit.errors import CheckpointError, RlhfkitError
from rlhfkit.plugins.backends.common import LocalEngine
from rlhfkit.resume import Batches, Guard, rng_state, set_rng_state


def _write(tmp, payload=b"weights"):
    os.makedirs(os.path.join(tmp, "engine-0"), exist_ok=True)
    with open(os.path.join(tmp, "engine-0", "model.safetensors"), "wb") as f:
        f.write(payload * 100)
    with open(os.path.join(tmp, "trainer.pt"), "wb") as f:
        f.write(b"state")


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "no_manifest", "bad_manifest"])
def test_manifest_detects_partial_and_corrupt_checkpoints(tmp_path, damage):
    root = str(tmp_path / "ck")
    _write(root)
    write_manifest(root, step=3)
    assert verify(root) is None
    weights = os.path.join(root, "engine-0", "model.safetensors")
    if damage == "truncate":
        os.truncate(weights, 10)
    elif damage == "flip":
        data = bytearray(open(weights, "rb").read())
        data[5] ^= 0xFF
        open(weights, "wb").write(bytes(data))
    elif damage == "delete":
        os.unlink(weights)
    elif damage == "no_manifest":
        os.unlink(os.path.join(root, "manifest.json"))
    else:
        open(os.path.join(root, "manifest.json"), "w").write("{not json")
    problem = verify(root)
    assert problem is not None
    if damage in ("truncate", "flip", "delete"):
        assert "engine-0/model.safetensors" in problem


def test_store_keeps_the_last_n_and_falls_back_past_a_corrupt_one(tmp_path):
    store = CheckpointStore(str(tmp_path), keep_last=2)
    for step in (2, 4, 6):
        store.save("rl", step, _write)
    assert store.steps("rl") == [6, 4]  # step 2 pruned
    assert not any(n.startswith(".step-") for n in os.listdir(tmp_path / "checkpoints" / "rl"))  # no temp dirs left
    os.truncate(os.path.join(store.path("rl", 6), "trainer.pt"), 1)
    warnings = []
    assert store.latest("rl", warnings.append) == store.path("rl", 4)
    assert len(warnings) == 1 and "step-00000006" in warnings[0] and "trainer.pt" in warnings[0]


def test_a_writer_killed_midway_leaves_the_previous_checkpoint_intact(tmp_path):
    store = CheckpointStore(str(tmp_path), keep_last=2)
    store.save("sft", 10, _write)

    def dies(tmp):
        _write(tmp)
        raise KeyboardInterrupt  # stands in for a kill between files

    with pytest.raises(KeyboardInterrupt):
        store.save("sft", 20, dies)
    assert store.steps("sft") == [10]
    assert store.latest("sft", pytest.fail) == store.path("sft", 10)


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(Exception, match="keep_last"):
        CheckpointStore(str(tmp_path), keep_last=0)


def test_rng_states_round_trip_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    torch.save(rng_state(), tmp_path / "rng.pt")
    first = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]


def test_batches_resume_at_their_position():
    a = Batches(10, 3, seed=5)
    seen = [next(a) for _ in range(7)]  # past an epoch boundary
    b = Batches(10, 3, seed=5)
    b.load_state_dict(a.state_dict())
    assert [next(b) for _ in range(4)] == [next(a) for _ in range(4)]
    assert seen == [next(c) for c in [Batches(10, 3, seed=5)] for _ in range(7)]  # deterministic in the seed


def _engine():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    return LocalEngine(model, opt, sched, max_grad_norm=1.0)


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_a_non_finite_loss_or_gradient_skips_the_update(bad):
    engine = _engine()
    before = [p.detach().clone() for p in engine.module.parameters()]
    x = torch.ones(2, 3)
    if bad == "loss":
        loss = engine(x).sum() * float("nan")
    else:  # a finite loss (0) whose gradient is not: d/dw (w . inf) * 0 = nan
        loss = (engine(x * float("inf")).sum() * 0).nan_to_num(0.0)
        assert torch.isfinite(loss)
    engine.backward(loss)
    norm = engine.step()
    assert not torch.isfinite(torch.tensor(norm))
    assert engine.skipped_steps == 1
    assert all(torch.equal(a, b) for a, b in zip(before, engine.module.parameters()))
    assert engine.scheduler.last_epoch == 0  # the schedule did not advance either
    assert all(p.grad is None for p in engine.module.parameters())
    engine.backward(engine(x).sum())  # the next good step applies
    assert torch.isfinite(torch.tensor(engine.step())) and engine.skipped_steps == 1


def test_scale_lr_lowers_the_rest_of_the_schedule():
    engine = _engine()
    engine.scale_lr(0.5)
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.05)
    engine.backward(engine(torch.ones(1, 3)).sum())
    engine.step()
    assert engine.optimizer.param_groups[0]["lr"] == pytest.approx(0.05 / 2)  # base 0.1 * 0.5 * 1/2


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_engine_state_with_pickled_code_is_refused(tmp_path):
    engine = _engine()
    engine.save_state(str(tmp_path))
    torch.save({"optimizer": _Exploit()}, tmp_path / "engine_state.pt")
    with pytest.raises(CheckpointError, match="arbitrary code"):
        _engine().load_state(str(tmp_path))


def test_engine_state_round_trips_weights_optimizer_and_skip_count(tmp_path):
    engine = _engine()
    engine.backward(engine(torch.ones(1, 3)).sum())
    engine.step()
    engine.skipped_steps = 2
    engine.save_state(str(tmp_path))
    fresh = _engine()
    fresh.load_state(str(tmp_path))
    for a, b in zip(engine.module.parameters(), fresh.module.parameters()):
        assert torch.equal(a, b)
    assert fresh.skipped_steps == 2 and fresh.scheduler.last_epoch == 1
    assert fresh.optimizer.state_dict()["state"][0]["exp_avg"].equal(engine.optimizer.state_dict()["state"][0]["exp_avg"])


def test_guard_counts_consecutive_bad_steps_and_kl_excursions():
    g = Guard(max_bad_steps=2, kl_bound=5.0)
    assert g.check(1, 0, 1.0) == []
    assert g.check(2, 1) and not g.tripped
    assert g.check(3, 0, 1.0) == [] and g.consecutive == 0  # a good step resets
    assert "kl_bound" in g.check(4, 0, 9.0)[0]
    assert g.check(5, 0, float("nan")) and g.tripped
    assert g.skipped_total == 1


# --- a full disk -------------------------------------------------------------------------


def _saves_then_fills_the_disk(tmp_path, monkeypatch, error):
    store = CheckpointStore(str(tmp_path), keep_last=2)
    store.save("sft", 10, _write)

    def fills(tmp):
        _write(tmp)
        raise error

    if not isinstance(error, OSError):  # torch's writers lose the errno: the file system tells
        monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(1 << 30, 1 << 30, 4096))
    with pytest.raises(CheckpointError) as e:
        store.save("sft", 20, fills)
    return store, str(e.value)


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 103680 vs 103572"),
                                   RuntimeError("basic_ios::clear: iostream error")])
def test_a_full_disk_names_the_place_and_the_last_good_checkpoint(tmp_path, monkeypatch, error):
    store, message = _saves_then_fills_the_disk(tmp_path, monkeypatch, error)
    where = os.path.join(str(tmp_path), "checkpoints", "sft")
    assert message.startswith(f"no space left on device in {where}; the last good checkpoint is {store.path('sft', 10)}")
    assert f"rlhfkit resume={tmp_path}" in message
    assert store.steps("sft") == [10] and verify(store.path("sft", 10)) is None  # the older one is intact
    assert not [n for n in os.listdir(where) if ".tmp-" in n]


def test_an_error_with_room_on_the_disk_is_not_called_a_full_disk(tmp_path):
    store = CheckpointStore(str(tmp_path), keep_last=2)

    def fails(tmp):
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        store.save("sft", 10, fails)


def test_a_full_disk_while_writing_a_stage_product_is_reported_too(tmp_path):
    def on_no_space():
        return CheckpointError("no space")

    def fills(tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(CheckpointError, match="no space"):
        with atomic_directory(str(tmp_path / "sft"), on_no_space=on_no_space) as tmp:
            fills(tmp)
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_really_full_disk_on_a_small_tmpfs(tmp_path):
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        store = CheckpointStore(str(mnt), keep_last=2)

        def write(tmp):  # torch's zip writer: "unexpected pos ..." once the disk is full
            torch.save({"w": torch.zeros(40_000)}, os.path.join(tmp, "trainer.pt"))

        store.save("rl", 1, write)
        with pytest.raises(CheckpointError) as e:
            for step in range(2, 10):
                store.save("rl", step, write)
        assert str(e.value).startswith(f"no space left on device in {mnt}/checkpoints/rl; the last good checkpoint is "
                                       f"{store.path('rl', step - 1)}")
        assert verify(store.path("rl", step - 1)) is None
    finally:
        subprocess.run(["umount", "--lazy", str(mnt)])  # a failed writer may still hold a file open


# --- the run directory's lock and what killed writers left ---------------------------------


def test_a_second_process_on_a_locked_run_directory_fails_at_once_naming_the_first(tmp_path):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", f"from rlhfkit.checkpoint import run_lock\nimport sys\n"
                               f"with run_lock({str(tmp_path)!r}):\n    print('held', flush=True)\n    sys.stdin.read()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RlhfkitError) as e:
            with run_lock(str(tmp_path)):
                pass
        assert str(e.value).startswith(f"another rlhfkit process (pid {holder.pid}) is using {tmp_path}")
    finally:
        holder.communicate("")
    with run_lock(str(tmp_path)):  # released when the holder ends
        with run_lock(str(tmp_path)):  # and re-entrant within a process
            pass


def test_temporaries_of_killed_writers_are_removed(tmp_path):
    for name in [".sft.tmp-abc/model.safetensors", ".rm.tmp-x/config.json", ".rl.old-y/x/a", ".eval.json.tmp-z"]:
        os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
        (tmp_path / name).write_text("partial")
    for keep in ["sft/model.safetensors", ".hydra/config.yaml", "metrics.jsonl"]:
        os.makedirs(os.path.dirname(tmp_path / keep), exist_ok=True)
        (tmp_path / keep).write_text("kept")
    remove_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == [".hydra", "metrics.jsonl", "sft"]
