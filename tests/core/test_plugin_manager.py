"""Third-party plugins through real package metadata (a dist-info directory on sys.path)."""

import importlib
import sys
import textwrap

import pytest

from rlhfkit.errors import DuplicatePluginError, PluginLoadError
from rlhfkit.plugin_manager import load_plugins
from rlhfkit.registry import Registry


def install_fake_dist(root, dist, module, source, ep_name):
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[rlhfkit]\n{ep_name} = {module}\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("fake_rlhfkit_")]:
        del sys.modules[name]


def test_import_failure_names_package_and_exception(site):
    install_fake_dist(site, "broken-plugin-pkg", "fake_rlhfkit_broken", "raise RuntimeError('boom at import')\n", "broken")
    with pytest.raises(PluginLoadError) as e:
        load_plugins()
    msg = str(e.value)
    assert "broken-plugin-pkg" in msg and "RuntimeError: boom at import" in msg and "pip uninstall" in msg


def test_third_party_plugin_loads_like_builtins(site):
    install_fake_dist(site, "good-plugin-pkg", "fake_rlhfkit_good", """
        from dataclasses import dataclass
        from rlhfkit import hookimpl

        @dataclass
        class Cfg:
            x: int = 1

        @hookimpl
        def rlhfkit_register_algorithms(register):
            register("fake_algo", lambda cfg: cfg, Cfg)
    """, "fake_algo")
    registry = Registry.from_plugins(load_plugins())
    assert registry.get("algorithm", "fake_algo").package == "good-plugin-pkg"


def test_same_name_as_builtin_names_both_packages(site):
    install_fake_dist(site, "clash-pkg", "fake_rlhfkit_clash", """
        from dataclasses import dataclass
        from rlhfkit import hookimpl

        @dataclass
        class Cfg:
            x: int = 1

        @hookimpl
        def rlhfkit_register_algorithms(register):
            register("ppo", lambda cfg: cfg, Cfg)
    """, "my_ppo")
    with pytest.raises(DuplicatePluginError) as e:
        Registry.from_plugins(load_plugins())
    assert "'rlhfkit'" in str(e.value) and "'clash-pkg'" in str(e.value)


def test_unknown_hook_is_reported_with_its_package(site):
    install_fake_dist(site, "typo-pkg", "fake_rlhfkit_typo", """
        from rlhfkit import hookimpl

        @hookimpl
        def rlhfkit_register_algorithmz(register):
            pass
    """, "typo")
    with pytest.raises(PluginLoadError, match="typo-pkg"):
        load_plugins()
