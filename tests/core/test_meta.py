"""Every hook is documented in docs/writing_plugins.md and exercised by a test."""

import inspect
import os
import re

from rlhfkit import hookspecs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _hooks():
    return [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("rlhfkit_")]


def test_hooks_have_docstrings_stating_semantics():
    for name in _hooks():
        doc = getattr(hookspecs, name).__doc__ or ""
        assert re.search(r"[Cc]alled", doc), f"{name}'s docstring does not say when it is called"


def test_every_hook_is_documented():
    doc = open(os.path.join(ROOT, "docs", "writing_plugins.md")).read()
    missing = [h for h in _hooks() if f"`{h}" not in doc]
    assert not missing, f"undocumented hooks: {missing}"


def test_every_hook_is_tested():
    this = os.path.abspath(__file__)
    text = ""
    for root, _, files in os.walk(os.path.join(ROOT, "tests")):
        for f in files:
            if f.endswith(".py") and os.path.join(root, f) != this:
                text += open(os.path.join(root, f)).read()
    missing = [h for h in _hooks() if h not in text]
    assert not missing, f"untested hooks: {missing}"


def test_the_test_extras_install_together():
    """``pip install -e .[test]`` gives one consistent environment: each test requirement is
    installed at a version it allows, and so is everything those packages require (the
    `sweeps` package's numpy<2 pin once kept `datasets`, whose pyarrow needs numpy 2, out)."""
    import tomllib
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        test = [Requirement(r) for r in tomllib.load(f)["project"]["optional-dependencies"]["test"]]
    assert {"datasets", "pyarrow"} <= {r.name for r in test}
    wrong = []
    for req in test:
        for r in [req] + [Requirement(s) for s in requires(req.name) or []]:
            if r.marker and not r.marker.evaluate({"extra": ""}):
                continue
            try:
                if not r.specifier.contains(version(r.name), prereleases=True):
                    wrong.append(f"{req.name}: {r} but {r.name} {version(r.name)} is installed")
            except PackageNotFoundError:
                wrong.append(f"{req.name}: {r} is not installed")
    assert not wrong, "pip install -e '.[test]': " + "; ".join(wrong)
