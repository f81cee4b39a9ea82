"""Issue 17 target: over-optimisation (Gao et al. 2022) on a built-in suite.

Runs ``experiment=overoptimization`` (no KL penalty, a long RL stage evaluated every few
steps from step 0) and the same with ``algorithm.kl_coef=--kl-coef``, and with
``--ensemble`` a third run scored by ``reward=ensemble`` (KL off too; by default 3
members and the uncertainty-weighted objective; member 0 is the preset's ``mean_pool`` RM,
members 1 and 2 the default ``rm.member_heads``, ``logprob_last``). Prints each run's
evaluations (step, KL, d = sqrt(KL), gold, proxy) and the over-optimisation table of
``rlhfkit report``: Gao et al.'s R(d) = d (alpha - beta log d) fitted to the gold gain over
SFT (alpha, beta, R^2), and where gold peaked (step, d, gold, gain over SFT). The report
itself (plots against d, runs overlaid) is written to ``<root>/report``. Measurements
only; nothing is asserted.

    python benchmarks/overoptimization.py [--kl-coef 0.1] [--seed 0] [--ensemble ['rm.ensemble_size=3 reward.objective=uwo']]
                                          [--root DIR] [-- overrides]

The SFT and RM stages run once (in the no-KL run); the other runs reuse them
(``from_run=``, ``stages=[rl]``), so the runs differ only in what the RL stage does.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time

from rlhfkit.report import curves, eval_table, load_metrics, make_report, show_environment


ENSEMBLE = ["rm.ensemble_size=3", "reward.objective=uwo"]
"""The ``--ensemble`` run's settings unless given."""


def launch(name: str, overrides: list[str], root: str) -> str:
    """Run ``rlhfkit`` into ``<root>/<name>``; return that directory."""
    run_dir = os.path.join(root, name)
    cmd = [sys.executable, "-m", "rlhfkit.cli", f"hydra.run.dir={run_dir}", *overrides]
    print(f"$ rlhfkit {' '.join(shlex.quote(o) for o in [f'hydra.run.dir={run_dir}', *overrides])}", flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{name} failed")
    print(f"  {name}: {time.time() - t0:.0f} s", flush=True)
    return run_dir


def curve(run_dir: str) -> list[dict]:
    """The run's RL evaluations as rows (step, kl, d, gold, its standard error gold_se,
    proxy), SFT first (d = 0) and eval.json's last; [] for a run without evaluations
    (``rlhfkit report``'s curves)."""
    found, _ = curves(load_metrics(run_dir)[0], eval_table(run_dir))
    return [{"step": p.step, "kl": p.kl, "d": p.d, "gold": p.gold, "gold_se": p.gold_se, "proxy": p.proxy}
            for p in found[0].points] if found else []


def run(name: str, overrides: list[str], root: str) -> list[dict]:
    """:func:`launch`, then the run's :func:`curve` (benchmarks/ensembles.py uses both)."""
    return curve(launch(name, overrides, root))


def show(name: str, run_dir: str) -> None:
    print(f"\n{name} ({run_dir})")
    found, notes = curves(load_metrics(run_dir)[0], eval_table(run_dir))
    for c in found:
        print(f"{'step':>6} {'kl':>8} {'d':>7} {'gold':>7} {'se':>6} {'proxy':>7}")
        for p in c.points:
            proxy = f"{p.proxy:>7.3f}" if p.proxy is not None else f"{'-':>7}"
            se = f"{p.gold_se:>6.3f}" if p.gold_se is not None else f"{'-':>6}"
            print(f"{p.step:>6} {p.kl:>8.3f} {p.d:>7.3f} {p.gold:>7.3f} {se} {proxy}")
    for n in notes:
        print(f"  {n}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kl-coef", type=float, default=0.1, help="the KL coefficient of the second run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ensemble", nargs="?", const="", default=None,
                    help="add a run with reward=ensemble (and these overrides, quoted), KL off")
    ap.add_argument("--root", default=None, help="where the runs go (default: a new temporary directory)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every run (e.g. data=... rl.steps=...)")
    args = ap.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="rlhfkit-overopt-")
    common = ["experiment=overoptimization", f"seed={args.seed}", *args.overrides]
    runs = {"no-KL": launch("no_kl", common, root)}
    rl_only = [*common, f"from_run={runs['no-KL']}", "stages=[rl]"]
    runs[f"KL {args.kl_coef:g}"] = launch("kl", [*rl_only, f"algorithm.kl_coef={args.kl_coef}"], root)
    if args.ensemble is not None:  # the same SFT; K reward models, member 0 the single RM (bit for bit)
        extra = shlex.split(args.ensemble)
        given = {o.split("=", 1)[0] for o in extra}
        extra = [o for o in ENSEMBLE if o.split("=", 1)[0] not in given] + extra
        runs["ensemble no-KL"] = launch("ensemble", [*rl_only[:-1], "stages=[rm,rl]", "reward=ensemble", *extra], root)
    for name, run_dir in runs.items():
        show(name, run_dir)
    path, gao, _ = make_report(list(runs.values()), os.path.join(root, "report"), list(runs))
    print("\n" + "\n".join(gao))
    print(f"\nreport: {path}\nenvironment: {show_environment()}")


if __name__ == "__main__":
    main()
