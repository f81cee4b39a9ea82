"""Adds this package's config directory (presets such as algorithm=reinforce_fast)."""

from rlhfkit import hookimpl


@hookimpl
def rlhfkit_config_search_path():
    return ["pkg://rlhfkit_example.conf"]
