"""Issue 17 target: reward-model ensembles against over-optimisation (Coste et al. 2023).

For each suite and seed it trains SFT and an ensemble of ``--members`` reward models once
(``stages=[sft,rm] rm.ensemble_size=K``), then runs RL three times from that run
(``from_run``), with the KL penalty off and evaluations every ``--eval-every`` steps
(``experiment=overoptimization``, shortened with ``--steps``):

- ``single``: ``reward=model``, which scores with member 0. Member 0 is trained exactly as
  the single reward model of ``rm.ensemble_size=1`` is (same seed, data, start and batches;
  tests/e2e/test_ensemble.py checks the weights are equal), so this is the single-RM run,
  with no second RM stage to pay for. The other members differ from it in their seed, their
  bootstrap resample (``rm.bootstrap``), their head's random start (``rm.member_init_std``)
  and their head (``rm.member_heads``, by default ``logprob_last``).
- ``uwo``: ``reward=ensemble reward.objective=uwo reward.uwo_lambda=--lam``.
- ``wco``: ``reward=ensemble reward.objective=wco``.

It prints, per suite and seed, each run's gold at SFT, at its peak (and the step) and at
the end, the final KL and the ensemble's disagreement at the end, then whether each
ensemble run keeps gold above the single-RM run at the same step: at how many of the
evaluated steps (SFT's excluded) it is at least as high, its mean margin, and its margin at
the end. Measurements only; nothing is asserted.

    python benchmarks/ensembles.py --suites synthetic --seeds 0 [--steps 100] [-- overrides]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from overoptimization import curve  # noqa: E402  (the same curves as that benchmark)

from rlhfkit.report import show_environment  # noqa: E402

METHODS = {
    "single": ["reward=model"],
    "uwo": ["reward=ensemble", "reward.objective=uwo"],
    "wco": ["reward=ensemble", "reward.objective=wco"],
}


def launch(name: str, overrides: list[str], root: str) -> str:
    """Run the CLI into ``root/name``, unless a finished run is there already (``--root`` of
    an earlier invocation: its runs are reused). Returns the run directory."""
    run_dir = os.path.join(root, name)
    if os.path.isfile(os.path.join(run_dir, "eval.json")):
        return run_dir
    cmd = [sys.executable, "-m", "rlhfkit.cli", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{name} failed")
    return run_dir


def disagreement(run_dir: str) -> float | None:
    """The ensemble's mean disagreement (std over members) on the final policy's samples."""
    with open(os.path.join(run_dir, "eval.json")) as f:
        rl = json.load(f)["policies"]["rl"]
    return rl.get("reward/ensemble/std_mean")


def suite_seed(suite: str, seed: int, args: argparse.Namespace, root: str) -> dict:
    base = [f"data={suite}", f"seed={seed}", *args.overrides]
    name = f"{suite}-s{seed}"
    # experiment=overoptimization here too: it chooses the RM's head and epochs, which the RL runs must match
    rm_run = launch(f"{name}-rm", [*base, "experiment=overoptimization", "stages=[sft,rm]",
                                   f"rm.ensemble_size={args.members}"], root)
    with open(os.path.join(rm_run, "rm", "ensemble.json")) as f:
        members = json.load(f)
    out = {"suite": suite, "seed": seed, "rm_accuracy": members["accuracy"], "member_accuracy": members["member_accuracy"],
           "runs": {}}
    for method, extra in METHODS.items():
        overrides = [*base, "experiment=overoptimization", "stages=[rl]", f"from_run={rm_run}", f"rl.steps={args.steps}",
                     f"rl.eval_every={args.eval_every}", *extra]
        if method == "uwo":
            overrides.append(f"reward.uwo_lambda={args.lam}")
        run_dir = launch(f"{name}-{method}", overrides, root)
        out["runs"][method] = {"curve": curve(run_dir), "std_end": disagreement(run_dir)}
    return out


def summarise(r: dict) -> None:
    runs = r["runs"]
    single = {x["step"]: x for x in runs["single"]["curve"]}
    accs = " ".join(f"{a:.3f}" for a in r["member_accuracy"])
    print(f"\n{r['suite']} seed {r['seed']}: RM held-out accuracy ensemble {r['rm_accuracy']:.3f} (members {accs})")
    print(f"{'run':<7} {'sft':>6} {'peak':>6} {'@step':>6} {'end':>6} {'kl_end':>7} {'std_end':>8}   vs single at the same step")
    for method, res in runs.items():
        rows = res["curve"]
        peak, end = max(rows, key=lambda x: x["gold"]), rows[-1]
        std = f"{res['std_end']:.3f}" if res["std_end"] is not None else "-"
        line = (f"{method:<7} {rows[0]['gold']:>6.3f} {peak['gold']:>6.3f} {peak['step']:>6} {end['gold']:>6.3f} "
                f"{end['kl']:>7.2f} {std:>8}")
        if method != "single":
            pairs = [(x, single[x["step"]]) for x in rows[1:] if x["step"] in single]
            margins = [x["gold"] - s["gold"] for x, s in pairs]
            kept = sum(m >= 0 for m in margins)
            # below by more than two standard errors of the difference (the two evaluations' noise, as if independent)
            clearly = sum(m < -2 * math.hypot(x["gold_se"], s["gold_se"]) for m, (x, s) in zip(margins, pairs)
                          if x["gold_se"] is not None and s["gold_se"] is not None)
            line += (f"   >= single at {kept}/{len(margins)} steps, mean margin {sum(margins) / len(margins):+.3f}, "
                     f"at the end {margins[-1]:+.3f}, below it by > 2 s.e. at {clearly}")
        print(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", nargs="+", default=["synthetic"], help="data=... choices (the built-in suites)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--members", type=int, default=3, help="rm.ensemble_size")
    ap.add_argument("--lam", type=float, default=1.0, help="reward.uwo_lambda")
    ap.add_argument("--steps", type=int, default=200, help="rl.steps of each RL run")
    ap.add_argument("--eval-every", type=int, default=10, help="rl.eval_every")
    ap.add_argument("--out", default=None, help="write every curve as JSON here")
    ap.add_argument("--root", default=None, help="where the runs go (default: a new temporary directory); "
                                                 "finished runs found there are reused")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides passed to every run")
    args = ap.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="rlhfkit-ensembles-")
    os.makedirs(root, exist_ok=True)
    results = []
    for suite in args.suites:
        for seed in args.seeds:
            results.append(suite_seed(suite, seed, args, root))
            summarise(results[-1])
            sys.stdout.flush()
            if args.out:
                with open(args.out, "w") as f:
                    json.dump(results, f, indent=2)
    print(f"\ncommand: python benchmarks/ensembles.py {' '.join(sys.argv[1:])}   runs in {root}")
    print(f"environment: {show_environment()}")


if __name__ == "__main__":
    main()
