"""Issue #3 targets: the default ``rlhfkit`` run over several seeds.

For each seed it runs the real CLI (a subprocess, exactly as a user would), then reads the
run directory's eval.json. Prints wall time, gold reward of SFT and RL, the win rate of RL
over SFT under the gold labeller, and KL. Nothing is asserted: these are measurements.

    python benchmarks/pipeline_seeds.py --seeds 0 1 2 [-- extra overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from rlhfkit.report import show_environment


def run(seed: int, overrides: list[str], root: str) -> dict:
    run_dir = os.path.join(root, f"seed{seed}")
    cmd = [sys.executable, "-m", "rlhfkit.cli", f"seed={seed}", f"hydra.run.dir={run_dir}", *overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"seed {seed} failed")
    with open(os.path.join(run_dir, "eval.json")) as f:
        table = json.load(f)
    return {"seed": seed, "wall_s": wall, **table}


def print_commands_and_save(rows: list[dict], out: str | None) -> None:
    """The one-command equivalent of every row (``row["command"]``), and the rows as JSON to ``out``."""
    print("\ncommands:")
    for r in rows:
        print(f"  {r['command']}")
    print(f"environment: {show_environment()}")  # other versions or thread counts give other figures
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides passed to every run")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="rlhfkit-bench-")
    rows = [run(s, args.overrides, root) for s in args.seeds]
    print(f"overrides: {' '.join(args.overrides) or '(default run)'}   cpus: {os.cpu_count()}")
    print(f"{'seed':>4} {'wall_s':>7} {'sft_gold':>9} {'rl_gold':>8} {'gain':>7} {'se':>6} {'win_rate':>9} {'ties':>6} {'rl_kl':>7} {'rl_eos':>7}")
    for r in rows:
        sft, rl = r["policies"]["sft"], r["policies"]["rl"]
        print(
            f"{r['seed']:>4} {r['wall_s']:>7.1f} {sft['gold']:>9.3f} {rl['gold']:>8.3f} {r['gold_improvement']:>+7.3f} "
            f"{r.get('gold_improvement_se', float('nan')):>6.3f} "
            f"{r['win_rate']:>9.3f} {r['tie_rate']:>6.3f} {rl['kl']:>7.2f} {rl['eos_rate']:>7.3f}"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
