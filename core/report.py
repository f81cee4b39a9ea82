"""``rlhfkit report RUN_DIR [RUN_DIR ...] [--label NAME ...]``: PNG plots against steps for
every stage, the over-optimisation plots against d = sqrt(KL to SFT), and a markdown
summary. Several run directories are overlaid, one line per run.

Plots, one per stage and panel where the run logged the metrics: ``reward`` (proxy and
gold, training and evaluation), ``kl``, ``loss`` (every ``loss/*``) and ``eos_rate``.

Over-optimisation (Gao et al. 2022, "Scaling Laws for Reward Model Overoptimization"): a
stage evaluated as it trains (``rl.eval_every``) gives gold and proxy reward against
d = sqrt(KL), the KL in nats per response from the policy to SFT on the held-out prompts.
``<stage>_gold_vs_d.png`` and ``<stage>_proxy_vs_d.png`` plot the gain over SFT against d,
runs overlaid, with the fit of Gao et al.'s eq. for RL, R(d) = d (alpha - beta log d), to
gold and a star where gold peaked; alpha, beta, R^2 and the peak are printed and written to
``summary.md``, which need no matplotlib.

Reads ``metrics.jsonl`` and ``eval.json``; a malformed metrics line is skipped and
counted in the summary. Plots need matplotlib (``pip install 'rlhfkit[report]'``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Sequence

from rlhfkit.checkpoint import atomic_write_text
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
    if not os.path.isdir(run_dir):
        raise ConfigError(f"{run_dir!r}: no such directory: give the run directories to report on.")
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


# -- over-optimisation: gold and proxy against d = sqrt(KL) ---------------------------------


@dataclass
class Point:
    """One evaluation of a policy on the held-out prompts."""

    step: int
    kl: float
    """Mean KL to SFT in nats per response."""
    gold: float
    proxy: float | None
    gold_se: float | None = None
    """Standard error of ``gold`` over the evaluation's prompts (None: not logged)."""

    @property
    def d(self) -> float:
        """Gao et al.'s distance from the initial policy, sqrt(KL); a sampled KL estimate
        can come out a hair below 0."""
        return math.sqrt(max(self.kl, 0.0))


@dataclass
class Curve:
    """A stage's evaluations in step order; ``points[0]`` is SFT (step 0, d = 0)."""

    stage: str
    points: list[Point]
    origin: str
    """Where the SFT point comes from: the stage's own evaluation at step 0 (same prompts
    and sampling stream as the later ones) or eval.json's sft row."""

    @property
    def base(self) -> Point:
        return self.points[0]

    def gains(self, attr: str) -> list[float]:
        """``attr`` (gold or proxy) of every point minus SFT's."""
        return [getattr(p, attr) - getattr(self.base, attr) for p in self.points]


@dataclass
class GaoFit:
    alpha: float
    beta: float
    r2: float
    """Coefficient of determination over the fitted points (nan if gold never moved)."""
    n: int

    def __call__(self, d: float) -> float:
        return d * (self.alpha - self.beta * math.log(d)) if d > 0 else 0.0

    @property
    def d_peak(self) -> float | None:
        """Where the fitted curve peaks: dR/dd = alpha - beta (log d + 1) = 0 (needs beta > 0)."""
        return math.exp(self.alpha / self.beta - 1) if self.beta > 0 else None


def fit_gao(d: Sequence[float], gain: Sequence[float]) -> GaoFit | None:
    """Least-squares fit of Gao et al. 2022's RL form R(d) = d (alpha - beta log d) (their
    eq. 2, with R(0) = 0) to the gold gains over SFT ``gain`` at distances ``d``. R is linear
    in (alpha, beta), with features d and -d log d, so the 2x2 normal equations solve it.
    None when the points cannot determine both (fewer than 3 with d > 0, or all at one d)."""
    pts = [(x, y) for x, y in zip(d, gain) if x > 0]
    if len(pts) < 3:
        return None
    f1 = [x for x, _ in pts]
    f2 = [-x * math.log(x) for x, _ in pts]
    ys = [y for _, y in pts]
    s11, s22, s12 = sum(a * a for a in f1), sum(b * b for b in f2), sum(a * b for a, b in zip(f1, f2))
    s1y, s2y = sum(a * y for a, y in zip(f1, ys)), sum(b * y for b, y in zip(f2, ys))
    det = s11 * s22 - s12 * s12
    if abs(det) <= 1e-12 * s11 * s22:
        return None
    alpha, beta = (s22 * s1y - s12 * s2y) / det, (s11 * s2y - s12 * s1y) / det
    mean = sum(ys) / len(ys)
    ss_tot = sum((y - mean) ** 2 for y in ys)
    ss_res = sum((y - alpha * a - beta * b) ** 2 for y, a, b in zip(ys, f1, f2))
    return GaoFit(alpha, beta, 1 - ss_res / ss_tot if ss_tot > 0 else math.nan, len(pts))


def peak(curve: Curve) -> Point:
    """The evaluation where gold was highest (the earliest of equals; SFT if it never rose)."""
    return max(curve.points, key=lambda p: (p.gold, -p.step))


def curves(series: dict[str, dict[str, list[tuple[int, float]]]], table: dict[str, Any] | None) -> tuple[list[Curve], list[str]]:
    """The over-optimisation curve of every stage that logged evaluations (``eval/gold``
    and ``eval/kl``, from ``rl.eval_every``), its final point from eval.json; and notes on
    the stages that cannot give one."""
    out, notes = [], []
    policies = (table or {}).get("policies", {})
    for stage, metrics in series.items():
        if "eval/kl" not in metrics:
            continue
        if "eval/gold" not in metrics:
            notes.append(f"{stage}: evaluations without gold reward (the dataset has no labeller): no curve")
            continue
        at = {key: dict(metrics.get(f"eval/{key}", [])) for key in ("gold", "kl", "proxy", "gold_se")}  # the last of repeats (resume)
        points = {s: Point(s, at["kl"][s], g, at["proxy"].get(s), at["gold_se"].get(s))
                  for s, g in at["gold"].items() if s in at["kl"]}
        last = max(s for values in metrics.values() for s, _ in values)
        final = policies.get(stage, {})
        if last not in points and "gold" in final and "kl" in final:
            points[last] = Point(last, final["kl"], final["gold"], final.get("proxy"), final.get("gold_se"))
        origin = f"{stage} evaluation at step 0"
        if 0 not in points:
            sft = policies.get("sft", {})
            if "gold" not in sft:
                notes.append(f"{stage}: no SFT point (no evaluation at step 0, no eval.json sft row): no curve")
                continue
            points[0] = Point(0, 0.0, sft["gold"], sft.get("proxy"), sft.get("gold_se"))
            origin = "eval.json sft row (another sampling stream than the stage's evaluations)"
        out.append(Curve(stage, [points[s] for s in sorted(points)], origin))
    return out, notes


def gao_lines(curves_by_run: dict[str, list[Curve]], notes: list[str]) -> list[str]:
    """The over-optimisation table, as markdown (summary.md and stdout alike)."""
    lines = ["## Over-optimisation (Gao et al. 2022)", "",
             "Gold gain over SFT against d = sqrt(KL to SFT, nats per response), fitted with "
             "R(d) = d (alpha - beta log d) by least squares over the evaluations after step 0. "
             "s.e.: the peak evaluation's standard error of gold over its prompts (each point's "
             "own noise; the points share prompts and sampling stream).", "",
             "| run | stage | evals | alpha | beta | R^2 | peak step | peak d | peak gold | peak gain | final d | final gain | proxy gain | s.e. |",
             "| --- | --- |" + " ---: |" * 12]
    for label, cs in curves_by_run.items():
        for c in cs:
            fit = fit_gao([p.d for p in c.points[1:]], c.gains("gold")[1:])
            top, end = peak(c), c.points[-1]
            proxy = f"{end.proxy - c.base.proxy:+.3f}" if end.proxy is not None and c.base.proxy is not None else "-"
            se = f"{top.gold_se:.3f}" if top.gold_se is not None else "-"
            coef = [f"{fit.alpha:.4f}", f"{fit.beta:.4f}", f"{fit.r2:.3f}"] if fit else ["-", "-", "-"]
            lines.append(f"| {label} | {c.stage} | {len(c.points) - 1} | " + " | ".join(coef)
                         + f" | {top.step} | {top.d:.3f} | {top.gold:.3f} | {top.gold - c.base.gold:+.3f}"
                         + f" | {end.d:.3f} | {end.gold - c.base.gold:+.3f} | {proxy} | {se} |")
            if fit is None:
                notes.append(f"{label}/{c.stage}: too few evaluations away from SFT to fit ({len(c.points) - 1}; "
                             "3 at d > 0 needed): lower rl.eval_every or raise rl.steps")
            if not c.origin.startswith(c.stage):
                notes.append(f"{label}/{c.stage}: SFT point from the {c.origin}")
    if not any(curves_by_run.values()):
        notes.append("no run logged evaluations during training: set rl.eval_every=N (e.g. experiment=overoptimization)")
    return lines + [""] + [f"- {n}" for n in notes]


def _plot_overoptimisation(plt: Any, curves_by_run: dict[str, list[Curve]], out_dir: str) -> list[str]:
    names = []
    for stage in sorted({c.stage for cs in curves_by_run.values() for c in cs}):
        for attr in ("gold", "proxy"):
            fig, ax = plt.subplots(figsize=(7, 4.5))
            drawn = False
            for label, cs in curves_by_run.items():
                for c in (c for c in cs if c.stage == stage):
                    if any(getattr(p, attr) is None for p in c.points):
                        continue
                    ds, ys = [p.d for p in c.points], c.gains(attr)
                    top = peak(c)
                    line, = ax.plot(ds, ys, marker=".", label=f"{label}: gold peak {top.gold:.3f} at d={top.d:.2f}"
                                    if attr == "gold" else label)
                    drawn = True
                    if attr == "gold":
                        fit = fit_gao(ds[1:], ys[1:])
                        if fit:
                            grid = [max(ds) * i / 100 for i in range(101)]
                            ax.plot(grid, [fit(x) for x in grid], "--", color=line.get_color(), alpha=0.7,
                                    label=f"{label}: fit a={fit.alpha:.3f} b={fit.beta:.3f} R²={fit.r2:.2f}")
                        ax.plot([top.d], [top.gold - c.base.gold], "*", ms=14, color=line.get_color())  # the peak
            if not drawn:
                plt.close(fig)
                continue
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_xlabel("d = sqrt(KL to SFT)  (KL in nats per response)")
            ax.set_ylabel(f"{attr} reward - SFT's")
            ax.set_title(f"{stage}: {attr} against d" + (" (Gao et al. 2022: R = d(α - β log d))" if attr == "gold" else ""))
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            names.append(_save(plt, fig, out_dir, f"{stage}_{attr}_vs_d.png"))
    return names


def make_report(run_dirs: Sequence[str], out_dir: str, labels: Sequence[str] | None = None) -> tuple[str, list[str], bool]:
    """Write the plots and ``summary.md`` into ``out_dir``; return the summary's path, the
    over-optimisation table's lines (markdown) and whether plots were drawn (they need
    matplotlib; the summary does not)."""
    if labels and len(labels) != len(run_dirs):
        raise ConfigError(f"--label was given {len(labels)} time(s) for {len(run_dirs)} run directories: give one per run, in order.")
    runs = {}
    for i, d in enumerate(run_dirs):
        label = labels[i] if labels else os.path.basename(os.path.normpath(d)) or d
        while label in runs:
            label += "'"
        runs[label] = (d, *load_metrics(d))
    curves_by_run, notes = {}, []
    for label, (d, series, _) in runs.items():
        curves_by_run[label], problems = curves(series, eval_table(d))
        notes += [f"{label}/{p}" for p in problems]
    gao = gao_lines(curves_by_run, notes)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    os.makedirs(out_dir, exist_ok=True)
    plots: list[str] = []
    for stage in STAGES if plt else ():
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
            plots.append(_save(plt, fig, out_dir, f"{stage}_{panel}.png"))
    if plt:
        plots += _plot_overoptimisation(plt, curves_by_run, out_dir)
    path = os.path.join(out_dir, "summary.md")
    atomic_write_text(path, summary_markdown(runs, plots, gao, plotted=plt is not None))
    return path, gao, plt is not None


def summary_markdown(runs: dict[str, tuple[str, Any, int]], plots: list[str], gao: list[str], plotted: bool = True) -> str:
    lines = ["# rlhfkit run report", ""]
    cols = ["gold", "proxy", "kl", "eos_rate", "length"]
    lines += ["| run | policy | " + " | ".join(cols) + " |", "| --- | --- |" + " ---: |" * len(cols)]
    notes, envs = [], {}
    for label, (d, _, bad) in runs.items():
        table = eval_table(d)
        if table and "environment" in table:
            envs[label] = show_environment(table["environment"])
        for policy, m in (table or {}).get("policies", {}).items():
            lines.append(f"| {label} | {policy} | " + " | ".join(f"{m[c]:.3f}" if c in m else "-" for c in cols) + " |")
        if table and "win_rate" in table:
            notes.append(f"- **{label}**: RL vs SFT win rate {table['win_rate']:.3f}, gold {table['gold_improvement']:+.3f}"
                         + (f", total {table['seconds']['total']:.0f}s" if "seconds" in table else ""))
        if table is None:
            notes.append(f"- **{label}**: no eval.json (the run did not finish)")
        if bad:
            notes.append(f"- **{label}**: {bad} unreadable line(s) in metrics.jsonl skipped")
    if len(set(envs.values())) > 1:  # the same config can give other figures under other versions or thread counts
        notes.append("- **the runs' environments differ**, so equal settings need not give equal curves: "
                     + "; ".join(f"{label}: {env}" for label, env in envs.items()))
    lines += ["", *notes, "", *gao, "", "## Plots", ""]
    if not plotted:
        lines.append(NO_MATPLOTLIB)
    else:
        lines += [f"![{p}]({p})" for p in plots] or ["(no metrics to plot)"]
    return "\n".join(lines) + "\n"


NO_MATPLOTLIB = "(plots skipped: matplotlib is not installed; pip install 'rlhfkit[report]')"


def environment() -> dict[str, Any]:
    """What a run's figures depend on besides its config and seed, as ``eval.json`` records
    it: the versions of the numerical libraries and torch's thread count. A run repeats
    exactly under the same ones (CPU figures are deterministic for a given thread count), not
    across them. torch is imported here, not at the top: ``rlhfkit report`` does without it."""
    import platform

    import torch
    import transformers

    from rlhfkit import __version__

    return {"rlhfkit": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "threads": torch.get_num_threads()}


def environment_changes(saved: dict[str, Any] | None, now: dict[str, Any]) -> str:
    """What differs between a saved ``environment`` and ``now``, as ``torch 2.12.0 -> 2.13.0,
    threads 1 -> 2``; empty when nothing does or nothing was saved (an older checkpoint)."""
    if not saved:
        return ""
    return ", ".join(f"{k} {saved.get(k)} -> {v}" for k, v in now.items() if saved.get(k) != v)


def show_environment(env: dict[str, Any] | None = None) -> str:
    """A run's ``environment`` (default: this process's, :func:`environment`) on one line."""
    return ", ".join(f"{k} {v}" for k, v in (environment() if env is None else env).items())


def eval_table(run_dir: str) -> dict[str, Any] | None:
    try:
        with open(os.path.join(run_dir, "eval.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main(argv: Sequence[str]) -> None:
    ap = argparse.ArgumentParser(prog="rlhfkit report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dirs", nargs="+", help="run directories (several are overlaid)")
    ap.add_argument("--label", action="append", help="a run's name in the plots and tables, once per run directory, in order "
                    "(default: the directory's name)")
    ap.add_argument("--out", help="output directory (default: <first run>/report, or ./report for several runs)")
    args = ap.parse_args(list(argv))
    out = args.out or (os.path.join(args.run_dirs[0], "report") if len(args.run_dirs) == 1 else "report")
    path, gao, plotted = make_report(args.run_dirs, out, args.label)
    print("\n".join(gao))
    if not plotted:
        print(NO_MATPLOTLIB)
    print(f"report written: {path}")


def _save(plt: Any, fig: Any, out_dir: str, name: str) -> str:
    """Write ``fig`` to ``out_dir/name`` and close it; return ``name``."""
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=100)
    plt.close(fig)
    return name
