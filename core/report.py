"""``rlhfkit report RUN_DIR [RUN_DIR ...]``: PNG plots against steps for every stage, and a
markdown summary. Several run directories are overlaid, one line per run.

Plots, one per stage and panel where the run logged the metrics: ``reward`` (proxy and
gold, training and evaluation), ``kl``, ``loss`` (every ``loss/*``) and ``eos_rate``.
Reads ``metrics.jsonl`` and ``eval.json``; a malformed metrics line is skipped and
counted in the summary. Needs matplotlib (``pip install 'rlhfkit[report]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict
from typing import Any, Sequence

from rlhfkit.errors import ConfigError

PANELS: dict[str, tuple[str, ...]] = {
    "reward": ("reward/proxy", "reward/gold", "reward/score", "eval/gold", "eval/proxy"),
    "kl": ("rollout/kl", "eval/kl", "policy/kl_ref", "kl_coef"),
    "loss": (),  # every loss/* key
    "eos_rate": ("rollout/eos_rate", "eval/eos_rate"),
}
STAGES = ("sft", "rm", "rl")


def load_metrics(run_dir: str) -> tuple[dict[str, dict[str, list[tuple[int, float]]]], int]:
    """stage -> metric -> [(step, value)], and the number of unreadable lines."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise ConfigError(f"{run_dir!r} has no metrics.jsonl: is it an rlhfkit run directory (logger=[...,jsonl])?")
    series: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    bad = 0
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                stage, step = row["stage"], int(row["step"])
            except (ValueError, KeyError, TypeError):
                bad += 1  # a line cut short by a kill, say
                continue
            for k, v in row.items():
                if k in ("stage", "step", "time") or not isinstance(v, (int, float)) or isinstance(v, bool):
                    continue
                if math.isfinite(v):
                    series[stage][k].append((step, float(v)))
    return series, bad


def _panel_keys(panel: str, metrics: dict[str, Any]) -> list[str]:
    if panel == "loss":
        return sorted(k for k in metrics if k.startswith("loss/"))
    return [k for k in PANELS[panel] if k in metrics]


def make_report(run_dirs: Sequence[str], out_dir: str) -> str:
    """Write the plots and ``summary.md`` into ``out_dir``; return the summary's path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigError("rlhfkit report needs matplotlib: pip install 'rlhfkit[report]'.") from exc
    runs = {}
    for d in run_dirs:
        label = os.path.basename(os.path.normpath(d)) or d
        while label in runs:
            label += "'"
        runs[label] = (d, *load_metrics(d))
    os.makedirs(out_dir, exist_ok=True)
    plots: list[str] = []
    for stage in STAGES:
        for panel in PANELS:
            keys = sorted({k for _, series, _ in runs.values() for k in _panel_keys(panel, series.get(stage, {}))})
            if not keys:
                continue
            fig, ax = plt.subplots(figsize=(7, 4))
            for label, (_, series, _) in runs.items():
                for key in keys:
                    points = series.get(stage, {}).get(key)
                    if points:
                        xs, ys = zip(*sorted(points))
                        ax.plot(xs, ys, marker="." if len(xs) < 30 else None,
                                label=f"{label}: {key}" if len(runs) > 1 else key)
            ax.set_xlabel(f"{stage} step")
            ax.set_title(f"{stage}: {panel}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            name = f"{stage}_{panel}.png"
            fig.tight_layout()
            fig.savefig(os.path.join(out_dir, name), dpi=100)
            plt.close(fig)
            plots.append(name)
    path = os.path.join(out_dir, "summary.md")
    with open(path, "w") as f:
        f.write(summary_markdown(runs, plots))
    return path


def summary_markdown(runs: dict[str, tuple[str, Any, int]], plots: list[str]) -> str:
    lines = ["# rlhfkit run report", ""]
    cols = ["gold", "proxy", "kl", "eos_rate", "length"]
    lines += ["| run | policy | " + " | ".join(cols) + " |", "| --- | --- |" + " ---: |" * len(cols)]
    notes = []
    for label, (d, _, bad) in runs.items():
        table = _eval_table(d)
        for policy, m in (table or {}).get("policies", {}).items():
            lines.append(f"| {label} | {policy} | " + " | ".join(f"{m[c]:.3f}" if c in m else "-" for c in cols) + " |")
        if table and "win_rate" in table:
            notes.append(f"- **{label}**: RL vs SFT win rate {table['win_rate']:.3f}, gold {table['gold_improvement']:+.3f}"
                         + (f", total {table['seconds']['total']:.0f}s" if "seconds" in table else ""))
        if table is None:
            notes.append(f"- **{label}**: no eval.json (the run did not finish)")
        if bad:
            notes.append(f"- **{label}**: {bad} unreadable line(s) in metrics.jsonl skipped")
    lines += ["", *notes, "", "## Plots", ""]
    lines += [f"![{p}]({p})" for p in plots] or ["(no metrics to plot)"]
    return "\n".join(lines) + "\n"


def _eval_table(run_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(run_dir, "eval.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main(argv: Sequence[str]) -> None:
    ap = argparse.ArgumentParser(prog="rlhfkit report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", help="run directories (several are overlaid)")
    ap.add_argument("--out", help="output directory (default: <first run>/report, or ./report for several runs)")
    args = ap.parse_args(list(argv))
    out = args.out or (os.path.join(args.run_dirs[0], "report") if len(args.run_dirs) == 1 else "report")
    path = make_report(args.run_dirs, out)
    print(f"report written: {path}")
