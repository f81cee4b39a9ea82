"""Bad data through the CLI: a clear error that loses nothing already saved, or
skip-and-count with the count reported."""

import json
import os
import random

import pytest

from ..helpers import SMOKE, run_cli

pytestmark = pytest.mark.slow


def _prefs(path, n=120, extra=()):
    rng = random.Random(0)
    with open(path, "w") as f:
        for _ in range(n):
            xs = [rng.choice("abcdefgh") for _ in range(4)]
            f.write(json.dumps({"prompt": "reverse " + " ".join(xs) + " =", "chosen": " ".join(reversed(xs)),
                                "rejected": " ".join(rng.sample(xs, 4))}) + "\n")
        for line in extra:
            f.write(line + "\n")
    return str(path)


def test_a_bad_record_is_a_clear_error_that_loses_nothing_saved_and_resume_finishes(tmp_path):
    prefs = _prefs(tmp_path / "prefs.jsonl")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "reverse a b c ="}\n{"prompt": "sort b a ="}\n')
    run_dir = str(tmp_path / "run")
    args = SMOKE + ["data=jsonl", f"data.path={prefs}", f"data.prompts={prompts}", f"hydra.run.dir={run_dir}"]
    r = run_cli(args + ["stages=[sft,rm]"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    prompts.write_text('{"prompt": "reverse a b c ="}\n{"prompt": "sort b a ="}\n{"prompt": ""}\n')
    r = run_cli([f"resume={run_dir}", "stages=[sft,rm,rl]"], cwd=str(tmp_path))
    assert r.returncode == 1
    assert f"{prompts}:3: empty prompt in field 'prompt'" in r.stderr and "bad_data=skip" in r.stderr
    assert "Traceback" not in r.stderr
    for stage in ("sft", "rm"):  # nothing already saved is lost
        assert os.path.isfile(os.path.join(run_dir, stage, "manifest.json"))
    prompts.write_text('{"prompt": "reverse a b c ="}\n{"prompt": "sort b a ="}\n')
    r = run_cli([f"resume={run_dir}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[sft] already complete" in r.stdout and "[rm] already complete" in r.stdout
    assert "rl" in json.load(open(os.path.join(run_dir, "eval.json")))["policies"]


def test_skip_and_count_reports_every_kind_of_bad_record(tmp_path):
    long_prompt = json.dumps({"prompt": " ".join(["a"] * 100) + " =", "chosen": "a", "rejected": "b"})
    prefs = _prefs(tmp_path / "prefs.jsonl", extra=[
        "{not json", '{"prompt": "p =", "chosen": "", "rejected": "a"}', '{"prompt": "p =", "rejected": "a"}', long_prompt])
    run_dir = str(tmp_path / "run")
    r = run_cli(SMOKE + ["data=jsonl", f"data.path={prefs}", "bad_data=skip", f"hydra.run.dir={run_dir}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    skipped = json.load(open(os.path.join(run_dir, "eval.json")))["data_skipped"]
    assert skipped == {"malformed JSON": 1, "empty response in field 'chosen'": 1, "missing field 'chosen'": 1,
                       "prompt longer than the context": 1}
    assert "skipped 4 bad record(s)" in r.stderr
    logged = [json.loads(x) for x in open(os.path.join(run_dir, "metrics.jsonl")) if '"data/skipped"' in x]
    assert logged[-1]["data/skipped"] == 4


def test_a_prompt_longer_than_the_context_is_an_error_by_default(tmp_path):
    long_prompt = json.dumps({"prompt": " ".join(["a"] * 100) + " =", "chosen": "a", "rejected": "b"})
    prefs = _prefs(tmp_path / "prefs.jsonl", extra=[long_prompt])
    r = run_cli(SMOKE + ["data=jsonl", f"data.path={prefs}", "data.test_fraction=0", f"hydra.run.dir={tmp_path / 'run'}"],
                cwd=str(tmp_path))
    assert r.returncode == 1
    assert f"{prefs}:121: prompt longer than the context (101 tokens; the model takes 64)" in r.stderr


def test_special_tokens_and_lone_surrogates_in_the_text_are_bad_data_not_crashes(tmp_path):
    """A literal <eos>, <pad> or <unk> crashed the tiny models' embedding (IndexError) and a
    lone surrogate crashed the tokenizer: now each is a bad record, in either mode."""
    extra = [json.dumps({"prompt": "reverse a <eos> b =", "chosen": "b a", "rejected": "a b"}),
             json.dumps({"prompt": "reverse a b =", "chosen": "b <pad> a", "rejected": "<unk>"}),
             '{"prompt": "reverse \\ud800 a =", "chosen": "a", "rejected": "b"}']
    prefs = _prefs(tmp_path / "special.jsonl", extra=extra[:2])
    r = run_cli(SMOKE + ["data=jsonl", f"data.path={prefs}", "data.test_fraction=0", f"hydra.run.dir={tmp_path / 'error'}"],
                cwd=str(tmp_path))
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert (f"{prefs}:121: special token in field 'prompt' ('<eos>' is the tokenizer's eos_token, so it would not be "
            "read as text)") in r.stderr
    prefs = _prefs(tmp_path / "prefs.jsonl", extra=extra)
    args = SMOKE + ["data=jsonl", f"data.path={prefs}"]
    run_dir = tmp_path / "skip"
    r = run_cli(args + ["bad_data=skip", f"hydra.run.dir={run_dir}"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.load(open(run_dir / "eval.json"))["data_skipped"] == {
        "special token in field 'prompt'": 1, "special token in field 'chosen'": 1, "lone surrogate in a string": 1}
    r = run_cli(args + [f"hydra.run.dir={tmp_path / 'surrogate'}"], cwd=str(tmp_path))  # bad_data=error
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"{prefs}:123: lone surrogate in a string ('\\ud800' is half of a UTF-16 pair, not a character)" in r.stderr


def test_a_file_with_nothing_usable_is_named_with_the_skip_counts(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n \n")
    r = run_cli(SMOKE + ["data=jsonl", f"data.path={empty}", f"hydra.run.dir={tmp_path / 'empty'}"], cwd=str(tmp_path))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"data.path={empty}: no records (the file is empty or blank)" in r.stderr and "vocabulary" not in r.stderr
    bad = _prefs(tmp_path / "bad.jsonl", n=0, extra=['{"question": "p"}', "{oops", '{"prompt": ""}'])
    r = run_cli(SMOKE + ["data=jsonl", f"data.path={bad}", "bad_data=skip", f"hydra.run.dir={tmp_path / 'bad'}"],
                cwd=str(tmp_path))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"data.path={bad}: no usable record (bad_data=skip skipped 3 bad record(s): " in r.stderr
    assert "1 x unrecognised record" in r.stderr and "1 x malformed JSON" in r.stderr and "1 x empty prompt in field 'prompt'" in r.stderr
