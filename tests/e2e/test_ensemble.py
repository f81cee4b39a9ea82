"""Reward-model ensembles through the pipeline: member 0 is the single reward model bit for
bit and the other members differ (their bootstrap resample, random start and head kind, the
defaults); members that differ only in batch order are warned about; a run killed
mid-ensemble resumes to the uninterrupted result; every RL algorithm runs with
``reward=ensemble`` and reports the members' disagreement in training and evaluation."""

import contextlib
import io
import json
import os
import signal

import pytest

from rlhfkit.cli import setup
from rlhfkit.pipeline import Run

from ..helpers import SMOKE, compose, run_cli
from .test_resume import _start_and_signal

pytestmark = pytest.mark.slow

FAST = SMOKE + ["sft.steps=10", "eval.num_prompts=8", "logger=[jsonl]"]
RM = ["stages=[rm]", "rm.epochs=2", "checkpoint.every=2"]


def run(run_dir, overrides):
    plugins, registry = setup()
    return Run(compose(FAST + overrides), registry, plugins, str(run_dir))()


def weights(rm_dir):
    """Every weight file of an rm product, by its path inside it."""
    out = {}
    for d, _, names in os.walk(rm_dir):
        for n in names:
            if n.endswith(".safetensors"):
                out[os.path.relpath(os.path.join(d, n), rm_dir)] = open(os.path.join(d, n), "rb").read()
    return out


def rows(run_dir):
    return [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def sft(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sft") / "run"
    run(run_dir, ["stages=[sft]"])
    return run_dir


@pytest.fixture(scope="module")
def ensemble(sft, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ens") / "run"
    with contextlib.redirect_stderr(io.StringIO()) as err:
        run(run_dir, RM + [f"from_run={sft}", "rm.ensemble_size=2", "reward=ensemble"])
    (run_dir / "stderr.txt").write_text(err.getvalue())
    return run_dir


SAME_START = "members start from the same reward head and train on the same comparisons"


def test_member_0_is_the_single_reward_model_and_the_others_differ(sft, ensemble, tmp_path):
    run(tmp_path / "single", RM + [f"from_run={sft}"])
    single, ens = weights(tmp_path / "single" / "rm"), weights(ensemble / "rm")
    assert set(ens) == set(single) | {f"members/1/{f}" for f in single}
    assert all(ens[f] == single[f] for f in single)  # bit for bit: reward=model on the ensemble is the single-RM run
    assert ens["members/1/reward_head.safetensors"] != single["reward_head.safetensors"]
    info = json.load(open(ensemble / "rm" / "ensemble.json"))
    assert info["members"] == [".", "members/1"] and info["bootstrap"] is True and info["member_init_std"] == 0.03
    assert info["member_heads"] == ["logprob_last"]  # a head of another kind: the linear part on the last token
    member_1 = json.load(open(ensemble / "rm" / "members" / "1" / "reward_model.json"))
    assert (member_1["head_class"], member_1["head_linear"]) == ("LogProbHead", "last")
    assert json.load(open(ensemble / "rm" / "reward_model.json"))["head_linear"] == "tokens"  # member 0: reward_head
    logged = [r for r in rows(ensemble) if r["stage"] == "rm" and "rm/ensemble_size" in r][0]
    assert logged["rm/ensemble_size"] == 2 and logged["rm/accuracy"] == info["accuracy"]
    assert [logged[f"rm/member/{k}/accuracy"] for k in range(2)] == info["member_accuracy"]
    assert {r["stage"] for r in rows(ensemble)} >= {"rm", "rm/member-1"}  # each member trains in the loop
    assert not os.path.exists(ensemble / "checkpoints" / "rm" / "member-0")  # the trained members now live in the product
    sft_eval = json.load(open(ensemble / "eval.json"))["policies"]["sft"]
    assert sft_eval["reward/ensemble/std_mean"] > 0  # the evaluation reports the members' disagreement
    assert SAME_START not in (ensemble / "stderr.txt").read_text()  # the defaults make the members differ


def test_rm_scale_gives_unit_std_over_sft_samples_without_changing_training(sft, tmp_path):
    """rm.scale (the default) multiplies the trained model's rewards by 1 / their std over the
    held-out comparisons' responses (SFT samples); the training and the bias are untouched."""
    from rlhfkit.plugins.reward_heads.last_token import LastTokenConfig, LastTokenHead
    from rlhfkit.plugins.reward_models.hf_rm import HFRewardConfig, HFRewardLoader

    run(tmp_path / "scaled", RM + [f"from_run={sft}", "reward_head=last_token"])
    run(tmp_path / "unscaled", RM + [f"from_run={sft}", "reward_head=last_token", "rm.scale=false"])
    scaled, unscaled = (json.load(open(tmp_path / d / "rm" / "reward_model.json")) for d in ("scaled", "unscaled"))
    logged = [r for r in rows(tmp_path / "scaled") if "rm/gain" in r][0]
    assert unscaled["gain"] == 1.0 and scaled["gain"] == logged["rm/gain"] != 1.0
    assert scaled["bias"] == unscaled["bias"]
    assert weights(tmp_path / "scaled" / "rm") == weights(tmp_path / "unscaled" / "rm")
    head = lambda h: LastTokenHead(h, LastTokenConfig())  # noqa: E731
    loaded = HFRewardLoader(HFRewardConfig()).load(str(tmp_path / "scaled" / "rm"), head)
    assert loaded.gain == scaled["gain"]


def test_a_gain_saved_with_the_starting_classifier_changes_nothing(sft, tmp_path):
    """reward_model=seq_cls path=<a trained reward model> trains from it: the gain it was saved
    with is reset before training and normalising, so it is not applied twice."""
    seq = ["reward_model=seq_cls"]
    run(tmp_path / "first", RM + [f"from_run={sft}"] + seq)
    start = tmp_path / "first" / "rm"
    meta = json.load(open(start / "reward_model.json"))
    results = []
    for gain in (1.0, 5.0):
        json.dump({**meta, "gain": gain}, open(start / "reward_model.json", "w"))
        run(tmp_path / f"gain{gain}", RM + [f"from_run={sft}", f"reward_model.path={start}"] + seq)
        results.append((json.load(open(tmp_path / f"gain{gain}" / "rm" / "reward_model.json")),
                        weights(tmp_path / f"gain{gain}" / "rm")))
    assert results[0] == results[1]


ARGS = RM + ["rm.ensemble_size=2", "reward=ensemble"]


def _result(run_dir):
    table = json.load(open(os.path.join(run_dir, "eval.json")))
    table.pop("seconds")
    return table, weights(os.path.join(run_dir, "rm"))


def test_members_differ_by_their_start_alone_and_batch_order_alone_is_warned(sft, ensemble, tmp_path):
    """rm.member_init_std perturbs members 1.. (never member 0); with no bootstrap and no
    start noise the members differ only in batch order, and the stage says so. A member head
    of another kind that starts with the same weights (logprob_last: zeros, as logprob) is
    not warned about."""
    heads = {}
    for name, extra in (("alike", ["rm.member_heads=[]", "rm.member_init_std=0"]), ("start", ["rm.member_heads=[]"]),
                        ("kind", ["rm.member_init_std=0"])):
        with contextlib.redirect_stderr(io.StringIO()) as err:
            run(tmp_path / name, ARGS + [f"from_run={sft}", "rm.bootstrap=false"] + extra)
        assert (SAME_START in err.getvalue()) == (name == "alike")
        heads[name] = weights(tmp_path / name / "rm")
    assert heads["kind"]["members/1/reward_head.safetensors"] != heads["alike"]["members/1/reward_head.safetensors"]
    diverse = weights(ensemble / "rm")
    for f in ("reward_head.safetensors", "model.safetensors"):  # member 0: the single RM whatever the settings
        assert heads["alike"][f] == heads["start"][f] == diverse[f]
    assert heads["alike"]["members/1/reward_head.safetensors"] != heads["start"]["members/1/reward_head.safetensors"]


def test_killed_mid_ensemble_resumes_to_the_uninterrupted_run_only_with_its_member_settings(sft, ensemble, tmp_path):
    args = ARGS + [f"from_run={sft}"]
    reference = _result(ensemble)  # the fixture ran these settings uninterrupted

    run_dir = tmp_path / "run"
    rc, _, _ = _start_and_signal(FAST + args + [f"hydra.run.dir={run_dir}"], str(tmp_path),
                                 str(run_dir / "checkpoints" / "rm" / "member-1" / "step-00000002"), signal.SIGKILL)
    assert rc == -signal.SIGKILL and not (run_dir / "rm").exists()
    assert (run_dir / "checkpoints" / "rm" / "member-0" / "trained" / "manifest.json").exists()
    recorded = {f: (run_dir / f).read_bytes() for f in (".hydra/overrides.yaml", ".hydra/config.yaml", "config.yaml")}
    other = run_cli([f"resume={run_dir}", "rm.member_init_std=0.1"], cwd=str(tmp_path))  # would mix two ensembles
    assert other.returncode != 0 and "Traceback" not in other.stderr
    assert ("trained with rm.bootstrap=true rm.member_init_std=0.03 rm.member_heads=[logprob_last]: resume with "
            "those settings") in other.stderr
    assert {f: (run_dir / f).read_bytes() for f in recorded} == recorded  # the refused overrides are not kept
    r = run_cli([f"resume={run_dir}"], cwd=str(tmp_path))  # so a plain resume replays the run's own
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[rm] member 0 already trained in" in r.stdout and "[rm/member-1] resuming at step" in r.stdout
    assert _result(run_dir) == reference  # every metric and every member's weights, exactly
    assert not (run_dir / "checkpoints" / "rm" / "members.json").exists()  # done: the record goes with the members


def test_members_of_other_heads_train_with_them_and_score_together(sft, ensemble, tmp_path):
    """rm.member_heads gives members 1..K-1 heads of other kinds, in turn; member 0 stays the
    single reward model, and reward=ensemble loads each member with its own head."""
    run(tmp_path / "mixed", RM + [f"from_run={sft}", "rm.ensemble_size=3", "rm.member_heads=[mean_pool,logprob]",
                                  "reward=ensemble"])
    rm = tmp_path / "mixed" / "rm"
    classes = [json.load(open(rm / d / "reward_model.json"))["head_class"] for d in (".", "members/1", "members/2")]
    assert classes == ["LogProbHead", "MeanPoolHead", "LogProbHead"]  # the run's own head by name too
    assert json.load(open(rm / "ensemble.json"))["member_heads"] == ["mean_pool", "logprob"]
    mixed, same = weights(rm), weights(ensemble / "rm")
    assert all(mixed[f] == same[f] for f in ("reward_head.safetensors", "model.safetensors"))  # member 0
    table = run(tmp_path / "rl", [f"from_run={tmp_path / 'mixed'}", "stages=[rl]", "reward=ensemble",
                                  "reward.objective=wco", "rl.steps=1", "rl.prompts_per_step=8"])
    assert table["policies"]["rl"]["reward/ensemble/std_mean"] > 0
    assert all(f"reward/ensemble/member/{k}" in table["policies"]["rl"] for k in range(3))


@pytest.mark.parametrize("algorithm,objective", [("ppo", "uwo"), ("a2c", "wco"), ("rloo", "mean"), ("grpo", "uwo")])
def test_every_algorithm_runs_with_the_ensemble(ensemble, tmp_path, algorithm, objective):
    table = run(tmp_path / "rl", [f"from_run={ensemble}", "stages=[rl]", f"algorithm={algorithm}", "reward=ensemble",
                                  f"reward.objective={objective}", "rl.steps=2", "rl.eval_every=1",
                                  "rl.prompts_per_step=8"])
    assert table["policies"]["rl"]["reward/ensemble/std_mean"] > 0
    logged = [r for r in rows(tmp_path / "rl") if r["stage"] == "rl"]
    train = [r for r in logged if "reward/proxy" in r]
    assert len(train) == 2 and all(r["reward/ensemble/std_mean"] > 0 for r in train)
    assert all(r["reward/ensemble/std_max"] >= r["reward/ensemble/std_mean"] for r in train)
    assert any("eval/reward/ensemble/std_mean" in r for r in logged)  # rl.eval_every's evaluations report it too
