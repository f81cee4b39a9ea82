"""The ``rlhfkit`` command: a Hydra app.

``rlhfkit [overrides]`` runs the pipeline (``-m`` for a multirun sweep); ``rlhfkit plugins``
lists the installed plugins with their config fields; ``rlhfkit report RUN_DIR...`` plots
runs (see :mod:`rlhfkit.report`). Before Hydra composes anything, the plugins are loaded, their
schemas stored in Hydra's ConfigStore, and the group choices on the command line checked
against the registry, so a bad name fails before any work starts.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from importlib import resources
from typing import Sequence

from rlhfkit.errors import CheckpointError, ConfigError, RlhfkitError, UnknownPluginError
from rlhfkit.plugin_manager import Plugins, load_plugins
from rlhfkit.registry import MULTI_GROUPS, STAGE_GROUP, Registry

CONFIG_MODULE = "rlhfkit.conf"


@functools.lru_cache(maxsize=None)
def setup() -> tuple[Plugins, Registry]:
    """Load plugins, build the registry, and make Hydra aware of both. Once per process."""
    from rlhfkit.config import store_base_config

    plugins = load_plugins()
    registry = Registry.from_plugins(plugins)
    extra = [p for paths in plugins.pm.hook.rlhfkit_config_search_path() for p in (paths or [])]
    _register_search_path(extra)
    store_schemas(registry)
    store_base_config(registry)
    return plugins, registry


def store_schemas(registry: Registry) -> None:
    """Make every registered plugin selectable in Hydra (a YAML preset of the same name,
    which extends the schema itself, takes the group slot)."""
    registry.store_schemas(has_yaml=lambda group, name: name in yaml_options(group))


def _register_search_path(paths: list[str]) -> None:
    from hydra.core.plugins import Plugins as HydraPlugins
    from hydra.plugins.search_path_plugin import SearchPathPlugin

    class RlhfkitPluginConfigs(SearchPathPlugin):
        """Config directories contributed by rlhfkit plugins (``rlhfkit_config_search_path``)."""

        def manipulate_search_path(self, search_path) -> None:
            for p in paths:
                search_path.append(provider="rlhfkit-plugin", path=p)

    RlhfkitPluginConfigs.search_paths = list(paths)
    HydraPlugins.instance().register(RlhfkitPluginConfigs)
    _SEARCH_PATHS[:] = paths


_SEARCH_PATHS: list[str] = []


def yaml_options(group: str) -> set[str]:
    """Preset names available as YAML in rlhfkit's conf/ and in plugins' config dirs."""
    names: set[str] = set()
    roots = [resources.files(CONFIG_MODULE)]
    for p in _SEARCH_PATHS:
        if p.startswith("pkg://"):
            try:
                roots.append(resources.files(p[len("pkg://") :].replace("/", ".")))
            except ModuleNotFoundError:
                continue
        else:
            from pathlib import Path

            roots.append(Path(p[len("file://") :] if p.startswith("file://") else p))
    for root in roots:
        d = root.joinpath(group)
        if d.is_dir():
            names |= {f.name[:-5] for f in d.iterdir() if f.name.endswith(".yaml")}
    return names


def check_overrides(argv: Sequence[str], registry: Registry) -> None:
    """Fail early, with the available choices and the closest match, on an unknown plugin
    name in a group override (``algorithm=ppo``, ``logger=[console,wandb]``, sweeps too)."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(list(argv))
    for override in parse_overrides(args.overrides):
        group = override.key_or_group
        if group not in registry.groups() or override.is_delete():
            continue
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
        else:
            value = override.value()
            values = value if isinstance(value, list) else [value]
        options = set(registry.names(group)) | yaml_options(group)
        for v in values:
            if v is not None and str(v) not in options:
                raise UnknownPluginError(group, str(v), sorted(options))


def parse_overrides(overrides: Sequence[str]) -> list:
    """Hydra's parsed overrides; a malformed one (``'sft.steps=[1'``) is a one-line error."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.append(parser.parse_override(text))
        except HydraException as exc:
            raise ConfigError(f"{text}: malformed override ({one_line(exc)}); write key=value, "
                              "quoting a value with brackets, commas or spaces") from None
    return parsed


def one_line(exc: BaseException) -> str:
    """A Hydra or OmegaConf error message, with its causes, on one line and without their
    object-type details."""
    noise = ("full_key:", "reference_type", "object_type", "See https://hydra.cc")
    lines: list[str] = []
    cause: BaseException | None = exc
    while cause is not None:
        lines += [x.strip().rstrip(".") for x in str(cause).splitlines()
                  if x.strip() not in ("", "None") and not x.strip().startswith(noise)]
        cause = cause.__cause__
    return ": ".join(dict.fromkeys(lines)) or type(exc).__name__


MAX_CHECKED_JOBS = 256  # a larger sweep has its later jobs checked as each one starts


def check_config(argv: Sequence[str], registry: Registry) -> None:
    """Compose the config that each job of this command will run with, and validate every
    setting (:func:`rlhfkit.config.validate_run`), before Hydra creates a run directory. A
    sweep (``-m``) is checked job by job over its listed choices; values a sweeper draws
    itself (Optuna's intervals) are checked as each job starts."""
    import itertools

    from hydra import compose, initialize_config_module
    from hydra._internal.utils import get_args_parser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from rlhfkit.config import validate_run

    args = get_args_parser().parse_args(list(argv))
    if not _runs_a_job(argv) or args.config_path or args.config_dir:
        return  # printing, not running (or a config tree of the user's own: checked when the run starts)
    choices = []
    for text, override in zip(args.overrides, parse_overrides(args.overrides)):
        if not (args.multirun and override.is_sweep_override()):
            choices.append([text])
        elif override.is_discrete_sweep():
            choices.append([f"{override.get_key_element()}={v}" for v in override.sweep_string_iterator()])
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        for job in itertools.islice(itertools.product(*choices), MAX_CHECKED_JOBS):
            try:
                cfg = compose(config_name=args.config_name or "config", overrides=list(job))
            except (HydraException, OmegaConfBaseException) as exc:
                raise ConfigError(one_line(exc)) from None
            validate_run(cfg, registry)


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def resume_argv(argv: list[str], outputs: str = "outputs") -> list[str]:
    """``resume=true`` or ``resume=<run dir>``: the command line that continues that run.
    The run's own overrides (Hydra keeps them in ``<run dir>/.hydra/overrides.yaml``) come
    first, those given now replace them key by key, and the run directory is the old one."""
    import glob

    values = [a.split("=", 1)[1] for a in argv if _key(a) == "resume" and "=" in a]
    if not values or values[-1].lower() in ("false", ""):
        return argv
    if any(a in ("-m", "--multirun") for a in argv):
        raise ConfigError("resume continues one run: drop -m/--multirun, and resume each job of a sweep by its directory.")
    given = [a.split("=", 1)[1] for a in argv if _key(a) == "hydra.run.dir"]
    if values[-1].lower() != "true":
        run_dir = values[-1]
    elif given:
        run_dir = given[-1]
    else:  # the newest run under outputs/
        runs = [d for d in glob.glob(os.path.join(outputs, "*", "*")) if os.path.isfile(os.path.join(d, "config.yaml"))]
        if not runs:
            raise ConfigError(f"resume=true found no run under {outputs}/. Pass resume=<the run directory to continue>.")
        run_dir = max(runs, key=lambda d: os.path.getmtime(os.path.join(d, "config.yaml")))
    saved = os.path.join(run_dir, ".hydra", "overrides.yaml")
    if not os.path.isfile(os.path.join(run_dir, "config.yaml")):
        raise ConfigError(f"resume: {run_dir!r} is not an rlhfkit run directory (no config.yaml).")
    if not os.path.isfile(saved):
        raise ConfigError(f"resume: {saved} is missing, so the run's overrides are unknown. Resume with "
                          f"hydra.run.dir={run_dir} resume=true and the run's overrides.")
    from omegaconf import OmegaConf

    now = [a for a in argv if _key(a) not in ("resume", "hydra.run.dir")]
    keys = {_key(a) for a in now if "=" in a}
    old = [str(a) for a in OmegaConf.load(saved) if _key(str(a)) not in keys | {"resume", "hydra.run.dir"}]
    return old + now + [f"hydra.run.dir={run_dir}", "resume=true"]


def list_plugins(registry: Registry, plugins: Plugins, out=sys.stdout) -> None:
    for group in registry.groups():
        print(f"{group}:", file=out)
        for entry in registry.entries(group):
            print(f"  {entry.name}  ({entry.package})", file=out)
            prefix = f"{group}.{entry.name}" if group in MULTI_GROUPS else entry.name if group == STAGE_GROUP else group
            for name, typ, default in entry.fields():
                print(f"      {prefix}.{name}: {typ} = {default!r}", file=out)
        presets = sorted(yaml_options(group) - set(registry.names(group)))
        if presets:
            print(f"  presets: {', '.join(presets)}", file=out)


def _fail(exc: Exception | str, code: int = 2) -> None:
    print(f"rlhfkit: error: {exc}", file=sys.stderr)
    sys.exit(code)


def objective_value(table: dict, name: str) -> float:
    """The sweep objective ``name`` from a final evaluation table: a top-level key
    (``gold_improvement``, ``win_rate``) or ``policy/metric`` (``rl/gold``)."""
    if name in table and isinstance(table[name], (int, float)):
        return float(table[name])
    policy, _, metric = name.partition("/")
    try:
        return float(table["policies"][policy][metric])
    except (KeyError, TypeError, ValueError):
        keys = [k for k, v in table.items() if isinstance(v, (int, float))]
        keys += [f"{p}/{m}" for p, ms in table.get("policies", {}).items() for m in ms]
        raise ConfigError(f"objective={name!r} is not in this run's evaluation table; choose one of {sorted(keys)}.") from None


def _task(cfg) -> float | None:
    from hydra.core.hydra_config import HydraConfig

    from rlhfkit.pipeline import Run

    plugins, registry = setup()
    run_dir = HydraConfig.get().runtime.output_dir
    from rlhfkit.resume import DivergenceError, Preempted

    try:
        with _run_lock(run_dir):
            table = Run(cfg, registry, plugins, run_dir)()
    except Preempted as exc:
        _fail(exc, exc.exit_code)  # 143 on SIGTERM: what schedulers expect of a preempted job; 130 on Ctrl-C
    except DivergenceError as exc:
        _fail(exc, 3)
    except (ConfigError, CheckpointError) as exc:
        _RESUMED.restore(run_dir)  # a resume refused for its settings or the run's checkpoints: the run's own stay
        _fail(exc, 1)
    except RlhfkitError as exc:  # bad data, say: the new settings stand, and a plain resume= replays them
        _fail(exc, 1)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the stages started
        resume = (f" Continue from its last checkpoint with: rlhfkit resume={run_dir}"
                  if os.path.isfile(os.path.join(run_dir, "config.yaml")) else "")
        _fail(f"interrupted (Ctrl-C): stopped at once, without writing a checkpoint.{resume}", 130)
    try:  # what a Hydra sweeper (Optuna) optimises; plain runs ignore it
        return objective_value(table, cfg.objective)
    except ConfigError as exc:
        if len(table.get("policies", {})) > 1 and HydraConfig.get().mode.name == "MULTIRUN":
            print(f"rlhfkit: warning: {exc}", file=sys.stderr)
        return None


class _Settings:
    """The settings files of a run being resumed, as they were before this attempt. Hydra
    rewrites the overrides as the attempt starts, so a resume refused for its settings (a
    ConfigError, or a CheckpointError: other ensemble-member settings than the saved
    members', a corrupt checkpoint) would replay the refused overrides on the next plain
    ``resume=``. :meth:`restore` puts the recorded ones back, unless a checkpoint or product
    was saved since (the new settings made it). An attempt stopped by bad data keeps its
    settings: the user fixes the data and resumes as they asked."""

    FILES = (os.path.join(".hydra", "overrides.yaml"), os.path.join(".hydra", "config.yaml"), "config.yaml")

    def __init__(self) -> None:
        self.root: str | None = None
        self.saved: dict[str, bytes] = {}  # FILES, relative to root, that were there
        self.manifests: dict[str, tuple[int, int]] = {}

    def record(self, run_dir: str) -> None:
        self.root = os.path.abspath(run_dir)
        self.manifests = self._manifests(self.root)
        for rel in self.FILES:
            with contextlib.suppress(OSError), open(os.path.join(self.root, rel), "rb") as f:
                self.saved[rel] = f.read()

    def restore(self, run_dir: str) -> None:
        if (self.root != os.path.abspath(run_dir) or os.environ.get("RANK", "0") != "0"
                or self._manifests(self.root) != self.manifests):
            return  # not the resumed run, not rank 0, or a checkpoint or product was saved since
        from rlhfkit.checkpoint import atomic_write_bytes

        for rel, data in self.saved.items():
            with contextlib.suppress(OSError):
                atomic_write_bytes(os.path.join(self.root, rel), data)

    @staticmethod
    def _manifests(root: str) -> dict[str, tuple[int, int]]:
        """Every manifest (a checkpoint's or a product's) under ``root``: its identity and
        modification time, so any one written, replaced or removed since shows."""
        from rlhfkit.checkpoint import MANIFEST

        found = {}
        for d, _, files in os.walk(root):
            if MANIFEST in files:
                with contextlib.suppress(OSError):
                    st = os.stat(os.path.join(d, MANIFEST))
                    found[d] = (st.st_ino, st.st_mtime_ns)
        return found


_RESUMED = _Settings()


def _run_lock(run_dir: str):
    """The run directory's lock, taken by rank 0 only under torchrun (one lock per run: no
    rank waits on another)."""
    from rlhfkit.checkpoint import run_lock

    return run_lock(run_dir) if os.environ.get("RANK", "0") == "0" else contextlib.nullcontext()


def check_output_dir(argv: Sequence[str]) -> str | None:
    """Fail before Hydra does (with a traceback) on a ``hydra.run.dir`` (``hydra.sweep.dir``
    with -m) given on the command line that is a file, lies under one, or is not writable.
    Returns the run directory when it is a plain path (no ``${...}``), else None."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [a.split("=", 1)[1] for a in argv if _key(a) == key]
    if not given:
        return None
    value = given[-1]
    literal, interpolated, _ = value.partition("${")
    path = os.path.abspath((os.path.dirname(literal) if interpolated else literal) or ".")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(f"{key}={value}: {existing} is a file, not a directory. Pick another {key}.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={value}: cannot write in {existing} (no permission, or a read-only file system). "
                          f"Pick a writable {key}.")
    return None if interpolated or multirun or not _runs_a_job(argv) else path


def _runs_a_job(argv: Sequence[str]) -> bool:
    """False for command lines that only print (``--cfg``, ``--help``, ``--info`` ...)."""
    from hydra._internal.utils import get_args_parser

    args = get_args_parser().parse_args(list(argv))
    return not (args.cfg or args.help or args.hydra_help or args.info or args.shell_completion)


def main(argv: Sequence[str] | None = None) -> None:
    try:
        _main(argv)
    except KeyboardInterrupt:  # before the run started (the run catches its own)
        _fail("interrupted (Ctrl-C).", 130)


def _main(argv: Sequence[str] | None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    lock = contextlib.ExitStack()
    try:
        plugins, registry = setup()
        if argv[:1] == ["plugins"]:
            list_plugins(registry, plugins)
            return
        if argv[:1] == ["report"]:
            from rlhfkit.report import main as report_main

            report_main(argv[1:])
            return
        argv = resume_argv(argv)
        check_overrides(argv, registry)
        check_config(argv, registry)
        run_dir = check_output_dir(argv)
        if run_dir and argv[-1:] == ["resume=true"]:  # resume_argv's command line: Hydra is about to overwrite
            _RESUMED.record(run_dir)
        if run_dir:  # locked before Hydra writes .hydra/ into it (a running run's overrides)
            lock.enter_context(_run_lock(run_dir))
    except RlhfkitError as exc:
        _fail(exc)
    import hydra

    entry = hydra.main(version_base="1.3", config_path=f"pkg://{CONFIG_MODULE}", config_name="config")(_task)
    sys.argv = [sys.argv[0] if sys.argv else "rlhfkit", *argv]
    with lock:
        entry()


if __name__ == "__main__":
    main()
