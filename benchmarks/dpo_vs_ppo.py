"""Issue #16 target: DPO against PPO on the default suite, the same comparisons, several seeds.

For each seed, the real CLI runs ``rlhfkit stages=[sft,rm,rl,dpo] seed=S``: one SFT policy,
one set of ranked comparisons of its samples (the RM stage and the DPO stage draw them with
the same seed), then PPO against the learned RM and DPO on the comparisons directly. Both
policies are evaluated against SFT under the dataset's gold labeller in the same table
(eval.json). Prints each seed's gold gain over SFT, win rate and KL to SFT for PPO and DPO,
and their means. Deterministic on CPU: the figures do not depend on the machine's load.

    python benchmarks/dpo_vs_ppo.py --seeds 0 1 2 --keep runs/          # the default settings
    python benchmarks/dpo_vs_ppo.py --from-runs runs/ --dpo dpo.beta=0.3 dpo.lr=3e-4
        # DPO again with other settings on the kept runs' SFT policies (stages=[dpo] from_run=...):
        # the same comparisons, the same evaluation stream, no SFT/RM/PPO rerun

Nothing is asserted: these are measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def cli(args: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "rlhfkit.cli", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"failed: rlhfkit {' '.join(args)}")


def row(seed: int, table: dict, names: list[str]) -> dict:
    out = {"seed": seed, "sft_gold": table["policies"]["sft"]["gold"]}
    versus = table.get("versus_sft") or {names[0]: {k: table[k] for k in ("win_rate", "tie_rate", "gold_improvement")}}
    for name in names:
        out[name] = {"gain": versus[name]["gold_improvement"], "win_rate": versus[name]["win_rate"],
                     "kl": table["policies"][name]["kl"], "gold": table["policies"][name]["gold"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--keep", default=None, help="keep the run directories here (default: a temporary directory)")
    ap.add_argument("--from-runs", default=None, help="rerun only DPO (with --dpo overrides) from runs kept with --keep")
    ap.add_argument("--dpo", nargs="*", default=[], help="overrides for the DPO stage (dpo.beta=0.3 ...)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args()
    rows = []
    if args.from_runs:
        tag = "-".join(a.replace("dpo.", "").replace("=", "") for a in args.dpo) or "default"
        for s in args.seeds:
            base = os.path.join(args.from_runs, f"seed{s}")
            run_dir = os.path.join(args.from_runs, f"seed{s}-dpo-{tag}")
            cli(["stages=[dpo]", f"from_run={base}", f"seed={s}", f"hydra.run.dir={run_dir}", *args.dpo])
            ppo = row(s, json.load(open(os.path.join(base, "eval.json"))), ["rl", "dpo"])["rl"]
            rows.append({**row(s, json.load(open(os.path.join(run_dir, "eval.json"))), ["dpo"]), "rl": ppo})
    else:
        root = args.keep or tempfile.mkdtemp(prefix="rlhfkit-dpo-vs-ppo-")
        for s in args.seeds:
            run_dir = os.path.join(root, f"seed{s}")
            cli(["stages=[sft,rm,rl,dpo]", f"seed={s}", f"hydra.run.dir={run_dir}", *args.dpo])
            rows.append(row(s, json.load(open(os.path.join(run_dir, "eval.json"))), ["rl", "dpo"]))
    print(f"DPO overrides: {' '.join(args.dpo) or '(defaults)'}")
    print(f"{'seed':>4} {'sft_gold':>9} | {'ppo_gain':>9} {'ppo_win':>8} {'ppo_kl':>7} | {'dpo_gain':>9} {'dpo_win':>8} {'dpo_kl':>7}")
    for r in rows:
        p, d = r["rl"], r["dpo"]
        print(f"{r['seed']:>4} {r['sft_gold']:>9.3f} | {p['gain']:>+9.3f} {p['win_rate']:>8.3f} {p['kl']:>7.2f} | "
              f"{d['gain']:>+9.3f} {d['win_rate']:>8.3f} {d['kl']:>7.2f}")
    mean = lambda name, key: statistics.mean(r[name][key] for r in rows)
    print(f"{'mean':>4} {statistics.mean(r['sft_gold'] for r in rows):>9.3f} | {mean('rl', 'gain'):>+9.3f} "
          f"{mean('rl', 'win_rate'):>8.3f} {mean('rl', 'kl'):>7.2f} | {mean('dpo', 'gain'):>+9.3f} "
          f"{mean('dpo', 'win_rate'):>8.3f} {mean('dpo', 'kl'):>7.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
