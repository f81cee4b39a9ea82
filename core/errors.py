"""Errors raised for bad input. Each message names the problem and how to fix it."""


class RlhfkitError(Exception):
    """Base class for errors that the CLI prints without a traceback."""


class UnknownPluginError(RlhfkitError, KeyError):
    def __init__(self, group: str, name: str, available: list[str]):
        import difflib

        self.group, self.name, self.available = group, name, sorted(available)
        close = difflib.get_close_matches(name, self.available, n=1, cutoff=0.0)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        super().__init__(
            f"Unknown {group} '{name}'.{hint} Available {group} choices: "
            f"{', '.join(self.available) or '(none installed)'}. "
            f"Install a plugin package that provides '{name}', or pick one of these."
        )

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


class DuplicatePluginError(RlhfkitError):
    pass


class PluginLoadError(RlhfkitError):
    pass


class ConfigError(RlhfkitError):
    pass


class DataError(RlhfkitError):
    pass


class CheckpointError(RlhfkitError):
    pass
