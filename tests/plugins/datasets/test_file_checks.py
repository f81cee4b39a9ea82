"""data=files: per-prompt check data (a reference answer, tests) for verifiable rewards,
with mapped field names; bad check data is an error naming file and line, or counted."""

import pytest

from rlhfkit.errors import DataError
from rlhfkit.interfaces import Check
from rlhfkit.plugins.datasets.files import FieldNames, FileData, FileDataConfig

from .test_files import _jsonl, data

MBPP = {"text": "Write a function to add two numbers.", "code": "def add(a, b):\n    return a + b",
        "test_list": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]}


def test_answers_and_tests_by_prompt(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [
        {"prompt": "2 + 2 =", "answer": "4"},
        {"prompt": "6 * 7 =", "answer": 42},
        {"prompt": "half of 3 =", "answer": 1.5, "completion": "1.5"},
        {"prompt": "add", "tests": ["assert add(1, 2) == 3"], "chosen": "def add(a, b): return a + b", "rejected": "no"},
        {"prompt": "plain", "completion": "x"},
        {"prompt": "2 + 2 =", "answer": "5"},  # a repeated prompt keeps its first check data
    ])
    d = data(p)
    assert d.checks("2 + 2 =") == Check(answer="4")
    assert d.checks("6 * 7 =") == Check(answer="42")
    assert d.checks("half of 3 =") == Check(answer="1.5")
    assert d.checks("add") == Check(tests=("assert add(1, 2) == 3",))
    assert d.checks("plain") is None and d.checks("never seen") is None


def test_mbpp_field_names_map(tmp_path):
    p = _jsonl(tmp_path / "mbpp.jsonl", [MBPP])
    d = data(p, fields=FieldNames(prompt="text", completion="code", tests="test_list"))
    assert d.sft_examples("train")[0].response == MBPP["code"]
    assert d.checks(MBPP["text"]) == Check(answer=None, tests=tuple(MBPP["test_list"]))
    unmapped = data(p, fields=FieldNames(prompt="text", completion="code"))
    assert unmapped.checks(MBPP["text"]) is None  # 'test_list' is not the tests field unless mapped


def test_checks_read_every_source_first(tmp_path):
    """A verifier may ask before any stage read the prompts (a from_run RL run)."""
    p = _jsonl(tmp_path / "d.jsonl", [{"prompt": f"q{i}", "answer": str(i)} for i in range(10)])
    d = FileData(FileDataConfig(path=p, test_fraction=0.3))
    assert [d.checks(f"q{i}").answer for i in range(10)] == [str(i) for i in range(10)]  # train and held-out


BAD = [
    ({"prompt": "p", "tests": "assert f() == 1"}, "field 'tests' is not a list of strings", "got str"),
    ({"prompt": "p", "tests": ["assert f() == 1", 3]}, "field 'tests' is not a list of strings", "non-string item"),
    ({"prompt": "p", "tests": ["assert f() == 1", "assert f( == 2"]}, "test in field 'tests' is not valid Python", "item 1: "),
    ({"prompt": "p", "answer": ["4"]}, "field 'answer' is not a string or a number", "got list"),
    ({"prompt": "p", "answer": True}, "field 'answer' is not a string or a number", "got bool"),
]


@pytest.mark.parametrize("line,reason,detail", BAD)
def test_bad_check_data_is_an_error_naming_file_and_line(tmp_path, line, reason, detail):
    p = _jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "answer": "1"}, line])
    with pytest.raises(DataError) as err:
        data(p).prompts("train")
    msg = str(err.value)
    assert msg.startswith(f"{p}:2: {reason}") and detail in msg and "bad_data=skip" in msg


def test_bad_check_data_is_skipped_and_counted(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"prompt": "ok", "answer": "1"}] + [line for line, _, _ in BAD])
    d = FileData(FileDataConfig(path=p, on_error="skip", test_fraction=0.0))
    assert d.prompts("train") == ["ok"]
    assert d.skipped == {"field 'tests' is not a list of strings": 2, "test in field 'tests' is not valid Python": 1,
                         "field 'answer' is not a string or a number": 2}
    assert d.checks("ok") == Check(answer="1") and d.checks("p") is None


def test_mapped_tests_field_is_checked_under_its_own_name(tmp_path):
    p = _jsonl(tmp_path / "d.jsonl", [{"text": "good", "test_list": ["assert 1"]}, {"text": "bad", "test_list": ["assert 1 +"]}])
    d = FileData(FileDataConfig(path=p, on_error="skip", test_fraction=0.0, fields=FieldNames(prompt="text", tests="test_list")))
    assert d.prompts("train") == ["good"] and d.checks("good") == Check(tests=("assert 1",))
    assert d.skipped == {"test in field 'test_list' is not valid Python": 1}
    assert d.issues.first["test in field 'test_list' is not valid Python"] == f"{p}:2"
