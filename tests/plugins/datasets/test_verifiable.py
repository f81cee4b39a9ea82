"""The verifiable family ``make`` of data=synthetic: its ideal answers pass its own tests
when run in reward=python_exec's convention; the gold labeller agrees with the tests
without running anything; the default suite is unchanged."""

import ast
import hashlib
import json
import os
import time

import pytest

from rlhfkit.interfaces import Check
from rlhfkit.plugins.datasets.synthetic import (
    FAMILIES, GoldLabeller, SyntheticConfig, SyntheticTasks, arithmetic_value, ideal_response, make_targets, parse_prompt,
)


def run_tests(response: str, tests) -> bool:
    """The sandbox's convention, in-process with plain ``exec`` (trusted strings only): the
    response runs as a module; each test then runs in its globals with ``response`` and
    ``result`` (the value of its last statement if that is an expression) bound."""
    try:
        tree = ast.parse(response)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        g = {"__name__": "__main__"}
        exec(compile(tree, "<response>", "exec"), g)
        result = eval(compile(ast.Expression(last.value), "<response>", "eval"), g) if last else None
        g.update(response=response, result=result)
        for test in tests:
            exec(test, g)
    except Exception:
        return False
    return True


@pytest.fixture(scope="module")
def make():
    return SyntheticTasks(SyntheticConfig(families=["make"], num_demonstrations=300, num_test_prompts=100))


def test_ideal_answers_pass_their_own_tests(make):
    examples = make.sft_examples("train") + make.sft_examples("test")
    assert {len(parse_prompt(e.prompt)[1]) for e in examples} == {2, 3}
    for e in examples:
        check = make.checks(e.prompt)
        assert check.answer is None and len(check.tests) == 2  # a correct response scores 2/2 under python_exec
        assert run_tests(e.response, check.tests), e
        assert make.labeller.score_one(e.prompt, e.response) == 1.0
    for p in make.prompts("train")[:50] + make.prompts("test"):
        assert run_tests(" ".join(ideal_response(*parse_prompt(p))), make.checks(p).tests)


def test_check_convention_and_other_families(make):
    assert make.checks("make 7 from 3 4 =") == Check(tests=(
        "assert result == 7", "assert sorted(map(int, __import__('re').findall(r'\\d+', response))) == [3, 4]"))
    assert make.checks("reverse c a f =") == Check(answer="f a c", tests=())
    assert make.checks("not a prompt of this suite") is None


# (response, passes) for "make 7 from 3 4 ="; run with plain exec here, so benign strings only
BENIGN = [
    ("3 + 4", True), ("4 + 3", True), ("(3 + 4)", True), ("-(-3) - -4", True), ("+3 + 4", True),
    ("True * 3 + 4", True),  # as Python: True is 1, and the digits are still 3 and 4
    ("3 * 4", False), ("7", False), ("3 + 4 + 0", False), ("3.0 + 4", False), ("3 + 4 !", False), ("3 +", False),
    ("", False), ("x = 3 + 4", False), ("3 + 4\n5 - 3 + 4 - 5 + 1", False), ("34 - 27", False), ("3 + 4 == 7", False),
    ("  3 + 4", False), ("3 4 +", False), ("'3 + 4'", False),
]


@pytest.mark.parametrize("response,passes", BENIGN)
def test_labeller_matches_the_tests(make, response, passes):
    prompt = "make 7 from 3 4 ="
    assert run_tests(response, make.checks(prompt).tests) is passes
    assert GoldLabeller().score_one(prompt, response) == float(passes)


def test_labeller_never_runs_the_response(tmp_path):
    """Strings that would write a file, loop forever, kill the process or compute for
    ages if run: each scores 0, at once, and nothing happens."""
    marker = tmp_path / "ran"
    hostile = [
        f"__import__('os').system('touch {marker}') or 3 + 4",
        f"open({str(marker)!r}, 'w').write('x') and 3 + 4",
        "[3 + 4 for _ in iter(int, 1)]",
        "__import__('os').kill(__import__('os').getpid(), 9)",
        "3 ** 4 ** 9 ** 9 - 3 ** 4 ** 9 ** 9 + 3 + 4",
        "int('3') + 4",  # would pass if run: the labeller only evaluates numbers and + - *
        "(" * 5000 + "3 + 4" + ")" * 5000,
        "3" + " + 0" * 20000,
        "3 + 4\x00",
    ]
    g = GoldLabeller()
    t0 = time.perf_counter()
    assert [g.score_one("make 7 from 3 4 =", h) for h in hostile] == [0.0] * len(hostile)
    assert time.perf_counter() - t0 < 5 and not marker.exists() and os.getpid()
    assert arithmetic_value("__import__('os')") is None and arithmetic_value("2 * -3 + 1") == -5


def test_vocabulary_grows_only_with_make(make):
    default = SyntheticTasks(SyntheticConfig())
    assert default.vocabulary() == list(FAMILIES) + ["in", "=", "!"] + list("abcdefgh") + [str(i) for i in range(10)]
    words = make.vocabulary()
    assert words[: len(default.vocabulary())] == default.vocabulary() and len(set(words)) == len(words)
    targets = make_targets(2, 3)
    assert min(targets) == 1 - 9 * 9 and max(targets) == 9 * 9 * 9
    assert {"make", "from", "+", "-", "*"} | {str(t) for t in targets} <= set(words)
    for e in make.sft_examples("train") + make.sft_examples("test"):
        assert set(e.prompt.split()) | set(e.response.split()) <= set(words)


def test_default_suite_is_unchanged():
    """The default run's data, byte for byte, as main generated it before ``make`` existed."""
    d = SyntheticTasks(SyntheticConfig())
    sampler = lambda prompts, n: [[" ".join(p.split()[1:3][: i % 3 + 1]) for i in range(n)] for p in prompts]  # noqa: E731
    blob = json.dumps([d.vocabulary(), [(e.prompt, e.response) for s in ("train", "test") for e in d.sft_examples(s)],
                       d.prompts("train"), d.prompts("test"),
                       [(c.prompt, c.responses, c.scores) for s in ("train", "test") for c in d.comparisons(s, sampler)]])
    assert hashlib.sha256(blob.encode()).hexdigest() == "17b64420cb2c699bf1519e245ba30c062a6a0e2b229fe20d0db1cabf69a10d4d"


def test_too_few_prompts_for_the_held_out_share_is_a_config_error():
    from rlhfkit.errors import ConfigError

    with pytest.raises(ConfigError, match="lower data.num_test_prompts"):
        SyntheticTasks(SyntheticConfig(families=["make"], make_max_terms=2, num_test_prompts=2000, num_demonstrations=10))\
            .sft_examples("train")


def test_a_correct_make_answer_scores_full_marks_under_python_exec(make):
    """Every check of a make prompt passes for any right expression (no reference text to
    compare a value with), and a wrong one fails the value test."""
    from rlhfkit.plugins.rewards.sandbox import SandboxLimits, run_python

    limits = SandboxLimits(isolation="none")
    check = make.checks("make 7 from 3 4 =")
    right, wrong = run_python("4 + 3", check, limits), run_python("3 * 4", check, limits)
    assert (right.passed, right.total, right.score(0.0)) == (2, 2, 1.0)
    assert (wrong.passed, wrong.total) == (1, 2)
