"""Issue #3 target: over-optimisation (Gao et al. 2022) on the synthetic suite.

Runs ``experiment=overoptimization`` (long RL stage, slow learning rate, evaluated as it
goes) twice, differing only in the KL coefficient: 0 and ``--kl-coef``. Prints gold reward, proxy (RM) reward and KL to SFT against RL steps, then a
summary: where gold peaked, how far it fell, whether proxy kept rising, and the largest KL
each run reached. Measurements only; nothing is asserted.

    python benchmarks/overoptimization.py [--kl-coef 0.1] [--seed 0] [-- overrides]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from omegaconf import OmegaConf


def curve(run_dir: str) -> list[dict]:
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if r["stage"] == "rl" and "eval/gold" in r:
                rows.append({"step": r["step"], "gold": r["eval/gold"], "proxy": r["eval/proxy"], "kl": r["eval/kl"], "length": r["eval/length"]})
    with open(os.path.join(run_dir, "eval.json")) as f:
        final = json.load(f)
    steps = int(OmegaConf.load(os.path.join(run_dir, "config.yaml")).rl.steps)
    sft, rl = final["policies"]["sft"], final["policies"]["rl"]
    start = {"step": 0, "gold": sft["gold"], "proxy": sft["proxy"], "kl": 0.0, "length": sft["length"]}
    end = {"step": steps, "gold": rl["gold"], "proxy": rl["proxy"], "kl": rl["kl"], "length": rl["length"]}
    return [start, *rows, end]


def run(name: str, overrides: list[str], root: str) -> list[dict]:
    run_dir = os.path.join(root, name)
    cmd = [sys.executable, "-m", "rlhfkit.cli", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"{name} failed")
    return curve(run_dir)


def summarise(name: str, rows: list[dict]) -> None:
    print(f"\n{name}")
    print(f"{'step':>6} {'gold':>8} {'proxy':>8} {'kl':>8} {'length':>7}")
    for r in rows:
        print(f"{r['step']:>6} {r['gold']:>8.3f} {r['proxy']:>8.3f} {r['kl']:>8.2f} {r['length']:>7.2f}")
    peak = max(rows, key=lambda r: r["gold"])
    last = rows[-1]
    print(
        f"gold peaks at {peak['gold']:.3f} (step {peak['step']}) and ends at {last['gold']:.3f} "
        f"({last['gold'] - peak['gold']:+.3f}); proxy {rows[0]['proxy']:.3f} -> {peak['proxy']:.3f} at the gold peak "
        f"-> {last['proxy']:.3f} at the end; max KL {max(r['kl'] for r in rows):.2f} nats"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kl-coef", type=float, default=0.1, help="the KL coefficient of the second run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write both curves as JSON here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="rlhfkit-overopt-")
    common = ["experiment=overoptimization", f"seed={args.seed}", *args.overrides]
    no_kl = run("no_kl", common, root)
    with_kl = run("with_kl", [*common, f"algorithm.kl_coef={args.kl_coef}"], root)
    summarise("KL penalty off (algorithm.kl_coef=0)", no_kl)
    summarise(f"KL penalty on (algorithm.kl_coef={args.kl_coef})", with_kl)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"no_kl": no_kl, "with_kl": with_kl}, f, indent=2)


if __name__ == "__main__":
    main()
