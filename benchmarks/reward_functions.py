"""Issue #15 targets: RL from reward functions, over seeds.

1. ``verifiable``: the built-in verifiable task family checked by running the answers in the
   sandbox, ``data=verifiable reward=python_exec algorithm=grpo stages=[sft,rl]``. The gold
   column of eval.json is then the held-out pass rate (the task's labeller runs the same
   check), so the table shows SFT's and RL's pass rates.
2. ``default``: the default synthetic suite with its gold labeller as the reward,
   ``stages=[sft,rl] reward=labeller``, with ``algorithm=grpo`` and ``algorithm=ppo``: gold
   reward of SFT and RL.

Each run is the real CLI in a subprocess (:func:`pipeline_seeds.run`); runs are
deterministic, so the figures repeat. Nothing is asserted: these are measurements. SFT runs
once per target and seed (``stages=[sft]``); each algorithm's RL then starts from it
(``stages=[rl] from_run=...``), which gives the same result as ``stages=[sft,rl]`` (the RL
stage seeds itself) at a fraction of the time. The one-command equivalent of every row is
printed.

    python benchmarks/reward_functions.py [--targets verifiable default] [--seeds 0 1 2] [-- overrides]
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile

from pipeline_seeds import print_commands_and_save, run

# the verifiable task's pass rate from 8 samples per held-out prompt: one sample leaves it about
# +/-0.03 off, as large as the gains measured (see docs/algorithms.md)
COMMON = {"verifiable": ["data=verifiable", "reward=python_exec", "eval.samples_per_prompt=8"], "default": ["reward=labeller"]}
ALGORITHMS = {"verifiable": {"grpo": ["algorithm=grpo"]},
              "default": {"grpo": ["algorithm=grpo"], "ppo": ["algorithm=ppo"]}}
MEASURE = {"verifiable": "pass rate", "default": "gold"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", nargs="+", choices=sorted(COMMON), default=sorted(COMMON, reverse=True))
    ap.add_argument("--algorithms", nargs="+", default=None, help="only these (default: each target's)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides added to every run")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="rlhfkit-rewardfn-")
    rows: list[dict] = []
    for target in args.targets:
        common = COMMON[target] + args.overrides
        for seed in args.seeds:
            sft_dir = run_dir(root, target, "sft", seed)
            run(seed, common + ["stages=[sft]"], os.path.dirname(sft_dir))
            for algorithm, overrides in ALGORITHMS[target].items():
                if args.algorithms and algorithm not in args.algorithms:
                    continue
                where = os.path.dirname(run_dir(root, target, algorithm, seed))
                r = run(seed, common + overrides + ["stages=[rl]", f"from_run={sft_dir}"], where)
                r.update(target=target, algorithm=algorithm,
                         command=shlex.join(["rlhfkit", f"seed={seed}", *common, *overrides, "stages=[sft,rl]"]))
                rows.append(r)
                print_row(r, header=len(rows) == 1)
                sys.stdout.flush()
    print()
    for target in args.targets:
        for algorithm in ALGORITHMS[target]:
            mine = [r for r in rows if r["target"] == target and r["algorithm"] == algorithm]
            raised = sum(r["policies"]["rl"]["gold"] > r["policies"]["sft"]["gold"] for r in mine)
            if mine:
                print(f"{target} {algorithm}: RL above SFT ({MEASURE[target]}) on {raised} of {len(mine)} seeds")
    print_commands_and_save(rows, args.out)


def run_dir(root: str, target: str, name: str, seed: int) -> str:
    """Where :func:`pipeline_seeds.run` puts that run (``<root>/seed<seed>``)."""
    return os.path.join(root, target, name, f"seed{seed}")


def print_row(r: dict, header: bool) -> None:
    if header:
        print(f"{'target':<11} {'algorithm':<9} {'seed':>4} {'measure':<9} {'sft':>7} {'rl':>7} {'gain':>7} "
              f"{'win_rate':>8} {'rl_kl':>6} {'wall_s':>7}")
    sft, rl = r["policies"]["sft"], r["policies"]["rl"]
    print(f"{r['target']:<11} {r['algorithm']:<9} {r['seed']:>4} {MEASURE[r['target']]:<9} {sft['gold']:>7.3f} "
          f"{rl['gold']:>7.3f} {rl['gold'] - sft['gold']:>+7.3f} {r['win_rate']:>8.3f} {rl['kl']:>6.2f} {r['wall_s']:>7.1f}")


if __name__ == "__main__":
    main()
