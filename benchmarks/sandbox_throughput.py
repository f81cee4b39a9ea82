"""Throughput of ``reward=python_exec``'s sandbox: verifications per second, serial
(1 worker) vs parallel (the CPU count), and the sandbox's start-up cost within an RL step.

    python benchmarks/sandbox_throughput.py                                 # bwrap, 64 verifications
    python benchmarks/sandbox_throughput.py --metrics outputs/<run>/metrics.jsonl   # + a real run's shares
    python benchmarks/sandbox_throughput.py --step-s 1.9 --rows-per-step 256 --isolation none

The verifications go through the same path as training (``PythonExec.__call__``: a thread
pool of ``workers`` threads, each with a warm :class:`Sandbox` of its own), on a fixed mix
of short programs that pass, fail tests, fail to parse and crash, like a policy's responses.
Each is timed twice: the first call (each worker starts its sandbox: an RL run's first
step) and the next (the sandboxes are warm: every later step).

Start-up = the mean wall time of starting a sandbox (bwrap, the interpreter, the zygote) and
verifying an empty program in it; per verification = the same in a warm sandbox (a fork of
the zygote, the harness, the clean-up). Their share of an RL step: from a run's
metrics.jsonl (``--metrics``: its rl rows' ``reward/exec_sandbox_start_s`` against
``perf/step_s``), or estimated for ``--rows-per-step`` verifications
on ``workers`` workers against ``--step-s``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from types import SimpleNamespace

import torch

from rlhfkit.interfaces import Check
from rlhfkit.plugins.rewards.python_exec import PythonExec, PythonExecConfig
from rlhfkit.plugins.rewards.sandbox import Sandbox
from rlhfkit.rlhf.sampling import Rollout

# (prompt, check, response): a mix of outcomes, short programs as a code policy writes them
MIX = [
    ("make 7 from 3 4 =", Check(tests=("assert result == 7",)), "3 + 4"),
    ("make 7 from 3 4 =", Check(tests=("assert result == 7",)), "3 * 4"),
    ("make 7 from 3 4 =", Check(tests=("assert result == 7",)), "3 +"),
    ("what is 2*5?", Check(answer="10"), "print(2 * 5)"),
    ("write f(x) = 2x", Check(tests=("assert f(1) == 2", "assert f(-3) == -6")), "def f(x):\n    return 2 * x"),
    ("write f(x) = 2x", Check(tests=("assert f(1) == 2", "assert f(-3) == -6")), "def f(x):\n    return abs(2 * x)"),
    ("sum a list", Check(tests=("assert s([1, 2]) == 3",)), "def s(xs):\n    return sum(xs) / 0"),
    ("sort a list", Check(tests=("assert srt([2, 1]) == [1, 2]",)), "srt = sorted"),
]


def rollout(rows: list[tuple[str, Check, str]]) -> Rollout:
    B = len(rows)
    return Rollout(input_ids=torch.zeros(B, 2, dtype=torch.long), attention_mask=torch.ones(B, 2, dtype=torch.long),
                   prompt_width=1, response_mask=torch.ones(B, 1, dtype=torch.long), logprobs=torch.zeros(B, 1),
                   ended=torch.ones(B, dtype=torch.bool), responses=[r for _, _, r in rows], prompts=[p for p, _, _ in rows])


class MixData:
    def prompts(self, split: str) -> list[str]:
        return sorted({p for p, _, _ in MIX})

    def checks(self, prompt: str) -> Check | None:
        return next(c for p, c, _ in MIX if p == prompt)


def throughput(n: int, workers: int, isolation: str) -> dict[str, float]:
    """Verifications per second of ``n`` rows of :data:`MIX` scored in one call, as RL does:
    the first call (cold: the sandboxes start) and the second (warm)."""
    source = PythonExec(PythonExecConfig(workers=workers, isolation=isolation))
    source.setup(SimpleNamespace(components={"data": MixData()}), tokenizer=None)
    rows = [MIX[i % len(MIX)] for i in range(n)]
    source.metrics()  # the set-up probe's counts
    out: dict[str, float] = {"workers": workers, "verifications": n}
    for when in ("cold", "warm"):
        t0 = time.perf_counter()
        scores = source(rollout(rows))
        seconds = time.perf_counter() - t0
        metrics = source.metrics()
        out.update({f"{when}_seconds": seconds, f"{when}_per_s": n / seconds,
                    f"{when}_starts": metrics["reward/exec_sandbox_starts"]})
    source.close()
    out.update(seconds=out["warm_seconds"], per_s=out["warm_per_s"], mean_score=float(scores.mean()),
               pass_rate=metrics["reward/exec_pass_rate"])
    return out


def startup(n: int, isolation: str) -> tuple[float, float]:
    """Mean wall seconds of verifying an empty program serially: in a sandbox started for it
    (cold), and in a warm one."""
    cfg = PythonExecConfig(isolation=isolation)
    cold, warm = [], []
    with Sandbox(cfg) as box:
        for _ in range(n):
            with Sandbox(cfg) as fresh:
                cold.append(_empty(fresh))
            warm.append(_empty(box))
    return statistics.mean(cold), statistics.mean(warm[1:] or warm)


def _empty(box: Sandbox) -> float:
    v = box.run("", Check())
    if v.reason is not None:
        raise SystemExit(f"the sandbox does not run an empty program: {v.reason}: {v.detail}")
    return v.seconds


def rl_shares(metrics_path: str) -> dict[str, float]:
    """Over a run's rl rows: the mean step seconds, and the sandbox start-up's seconds per
    step (mean, and in the first step)."""
    rows = [row for row in map(json.loads, open(metrics_path)) if row.get("stage") == "rl" and "perf/step_s" in row]
    if not rows:
        raise SystemExit(f"{metrics_path}: no rl rows with perf/step_s (run the rl stage with the jsonl logger)")
    if "reward/exec_sandbox_start_s" not in rows[0]:
        return {"step_s": statistics.mean(r["perf/step_s"] for r in rows)}
    return {"step_s": statistics.mean(r["perf/step_s"] for r in rows),
            "run_startup_per_step_s": statistics.mean(r["reward/exec_sandbox_start_s"] for r in rows),
            "run_startup_first_step_s": rows[0]["reward/exec_sandbox_start_s"]}


def rl_step_seconds(metrics_path: str) -> float:
    steps = [row["perf/step_s"] for row in map(json.loads, open(metrics_path))
             if row.get("stage") == "rl" and "perf/step_s" in row]
    if not steps:
        raise SystemExit(f"{metrics_path}: no rl rows with perf/step_s (run the rl stage with the jsonl logger)")
    return statistics.mean(steps)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=64, help="verifications per throughput measurement")
    ap.add_argument("--startup-n", type=int, default=16, help="empty programs timed for the start-up cost")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel workers (default: CPU count)")
    ap.add_argument("--isolation", default="bwrap", choices=["bwrap", "none"])
    ap.add_argument("--step-s", type=float, help="seconds of one RL step, for the start-up's share")
    ap.add_argument("--metrics", help="a run's metrics.jsonl: the RL step time is its rl rows' mean perf/step_s")
    ap.add_argument("--rows-per-step", type=int, default=256, help="verifications per RL step (rl.prompts_per_step x samples: 64 x 4 for grpo)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)

    serial = throughput(args.n, 1, args.isolation)
    parallel = throughput(args.n, args.workers, args.isolation)
    cold_s, warm_s = startup(args.startup_n, args.isolation)
    run = rl_shares(args.metrics) if args.metrics else {}
    step_s = args.step_s if args.step_s is not None else run.get("step_s")
    out = {"isolation": args.isolation, "cpu_count": os.cpu_count(), "serial": serial, "parallel": parallel,
           "startup_s": cold_s, "warm_s": warm_s, "speedup": parallel["per_s"] / serial["per_s"], **run}
    print(f"isolation={args.isolation}, {os.cpu_count()} CPUs, {args.n} verifications of {len(MIX)} programs "
          f"(pass rate {serial['pass_rate']:.2f})")
    print(f"{'workers':>8} {'first call verif/s':>19} {'warm verif/s':>13}")
    for r in (serial, parallel):
        print(f"{r['workers']:>8} {r['cold_per_s']:>19.1f} {r['warm_per_s']:>13.1f}")
    print(f"parallel speed-up (warm): {out['speedup']:.2f}x")
    print(f"empty program, serial mean of {args.startup_n}: {cold_s * 1000:.1f} ms in a new sandbox (start-up), "
          f"{warm_s * 1000:.1f} ms in a warm one")
    if step_s is not None:
        per_step = args.rows_per_step * warm_s / args.workers  # the per-verification fork and clean-up
        first = cold_s  # the workers start their sandboxes at once, in the first step only
        verify = args.rows_per_step / parallel["per_s"]
        out.update(step_s=step_s, rows_per_step=args.rows_per_step, overhead_per_step_s=per_step,
                   overhead_share=per_step / step_s, first_step_startup_share=first / step_s,
                   verify_per_step_s=verify)
        print(f"RL step {step_s:.2f} s; {args.rows_per_step} verifications on {args.workers} workers take "
              f"{verify:.2f} s ({verify / step_s:.0%} of the step), of which the sandbox's own cost (an empty "
              f"program, warm) is {per_step:.2f} s ({per_step / step_s:.0%}); sandbox start-up: "
              f"{first:.3f} s in the first step ({first / step_s:.1%}), none after")
    if "run_startup_per_step_s" in run:
        print(f"run {args.metrics}: step {run['step_s']:.2f} s, sandbox "
              f"start-up {run['run_startup_per_step_s']:.3f} s per step ({run['run_startup_per_step_s'] / run['step_s']:.1%}; "
              f"first step {run['run_startup_first_step_s']:.3f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
