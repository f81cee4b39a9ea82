"""Issue #17 target: with the defaults, RL raises gold reward over SFT on every built-in task
suite, for every RL algorithm, on every seed (``reward=model``: the learned reward model).

For each suite (``data=synthetic``, ``numbers``, ``words``) and seed, SFT and the reward
model run once (``stages=[sft,rm]``); each algorithm's RL then starts from that run
(``stages=[rl] from_run=<dir>``), which gives the same result as the whole pipeline
``stages=[sft,rm,rl]`` (the RL stage seeds itself) at a fraction of the time. Each run is
the real CLI in a subprocess (:func:`pipeline_seeds.run`). Prints, per run, SFT gold, RL
gold, the gain and its standard error (``se``), KL to SFT and the proxy reward, with the
reward model's held-out accuracy and normalising bias; then "raised on N of M" (and on how
many by more than two standard errors) per suite and algorithm, and the one-command
equivalent of every row. Nothing is asserted: these are measurements.

    python benchmarks/suites.py [--suites synthetic numbers words] [--seeds 0 1 2]
                                [--algorithms ppo a2c rloo grpo] [--out rows.json] [-- overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile

from pipeline_seeds import print_commands_and_save, run

SUITES = ("synthetic", "numbers", "words")
ALGORITHMS = ("ppo", "a2c", "rloo", "grpo")


def rm_metrics(run_dir: str) -> dict:
    """The rm stage's held-out accuracy and normalising bias, from the run's metrics.jsonl."""
    out = {}
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            row = json.loads(line)
            if row.get("stage") == "rm":
                out.update({k.split("/")[1]: v for k, v in row.items() if k in ("rm/accuracy", "rm/bias")})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suites", nargs="+", choices=SUITES, default=list(SUITES))
    ap.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--root", default=None, help="keep the run directories here (default: a temporary directory)")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides added to every run")
    args = ap.parse_args()
    root = args.root or tempfile.mkdtemp(prefix="rlhfkit-suites-")
    rows: list[dict] = []
    for suite in args.suites:
        common = [f"data={suite}", "reward=model", *args.overrides]
        for seed in args.seeds:
            base = os.path.join(root, suite, "sft_rm")
            run(seed, common + ["stages=[sft,rm]"], base)
            rm = rm_metrics(os.path.join(base, f"seed{seed}"))
            for algorithm in args.algorithms:
                chosen = [f"algorithm={algorithm}"]
                r = run(seed, common + chosen + ["stages=[rl]", f"from_run={os.path.join(base, f'seed{seed}')}"],
                        os.path.join(root, suite, algorithm))
                r.update(suite=suite, algorithm=algorithm, rm=rm,
                         command=shlex.join(["rlhfkit", f"seed={seed}", *common, *chosen]))
                rows.append(r)
                print_row(r, header=len(rows) == 1)
                sys.stdout.flush()
    print(f"\noverrides: {' '.join(args.overrides) or '(the defaults)'}   runs under {root}")
    for suite in args.suites:
        for algorithm in args.algorithms:
            mine = [r for r in rows if r["suite"] == suite and r["algorithm"] == algorithm]
            raised = sum(gain(r) > 0 for r in mine)
            clear = sum(gain(r) > 2 * r.get("gold_improvement_se", float("inf")) for r in mine)
            print(f"{suite:<10} {algorithm:<5} gold raised over SFT on {raised} of {len(mine)} seeds, by more than "
                  f"2 standard errors on {clear}   (mean gain {sum(map(gain, mine)) / len(mine):+.3f})")
    print_commands_and_save(rows, args.out)


def gain(r: dict) -> float:
    return r["policies"]["rl"]["gold"] - r["policies"]["sft"]["gold"]


def print_row(r: dict, header: bool) -> None:
    if header:
        print(f"{'suite':<10} {'algo':<5} {'seed':>4} {'rm_acc':>6} {'rm_bias':>7} {'sft_gold':>8} {'rl_gold':>7} "
              f"{'gain':>7} {'se':>6} {'rl_kl':>6} {'proxy':>6} {'win':>6} {'wall_s':>6}")
    sft, rl = r["policies"]["sft"], r["policies"]["rl"]
    print(f"{r['suite']:<10} {r['algorithm']:<5} {r['seed']:>4} {r['rm'].get('accuracy', float('nan')):>6.3f} "
          f"{r['rm'].get('bias', float('nan')):>+7.2f} {sft['gold']:>8.3f} {rl['gold']:>7.3f} {gain(r):>+7.3f} "
          f"{r.get('gold_improvement_se', float('nan')):>6.3f} "
          f"{rl['kl']:>6.2f} {rl['proxy']:>+6.2f} {r['win_rate']:>6.3f} {r['wall_s']:>6.1f}")


if __name__ == "__main__":
    main()
