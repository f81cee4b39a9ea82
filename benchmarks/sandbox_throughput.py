"""Throughput of ``reward=python_exec``'s sandbox: verifications per second, serial
(1 worker) vs parallel (the CPU count), and the sandbox's start-up cost within an RL step.

    python benchmarks/sandbox_throughput.py                                 # bwrap, 64 verifications
    python benchmarks/sandbox_throughput.py --metrics outputs/<run>/metrics.jsonl   # + share of an RL step
    python benchmarks/sandbox_throughput.py --step-s 1.9 --rows-per-step 64 --isolation none

The verifications go through the same path as training (``PythonExec.__call__``: a thread
pool of ``workers`` threads, each running :func:`run_python`), on a fixed mix of short
programs that pass, fail tests, fail to parse and crash, like a policy's responses.

Start-up = the mean wall time of verifying an empty program (interpreter and sandbox
start, harness, teardown), serially. Its share of an RL step = ``rows_per_step`` start-ups
spread over the parallel workers, divided by the RL step's time: ``--step-s``, or the mean
``perf/step_s`` of the ``rl`` rows of a run's metrics.jsonl (``--metrics``; a run's default
is 64 prompts per step, one verification each).
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
from rlhfkit.plugins.rewards.sandbox import run_python
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
    """Verifications per second of ``n`` rows of :data:`MIX` scored in one call, as RL does."""
    source = PythonExec(PythonExecConfig(workers=workers, isolation=isolation))
    source.setup(SimpleNamespace(components={"data": MixData()}), tokenizer=None)
    rows = [MIX[i % len(MIX)] for i in range(n)]
    source.metrics()  # the set-up probe's counts
    t0 = time.perf_counter()
    scores = source(rollout(rows))
    seconds = time.perf_counter() - t0
    metrics = source.metrics()
    return {"workers": workers, "verifications": n, "seconds": seconds, "per_s": n / seconds,
            "mean_score": float(scores.mean()), "pass_rate": metrics["reward/exec_pass_rate"]}


def startup(n: int, isolation: str) -> float:
    """Mean wall seconds of verifying an empty program, serially."""
    cfg = PythonExecConfig(isolation=isolation)
    times = []
    for _ in range(n):
        v = run_python("", Check(), cfg)
        if v.reason is not None:
            raise SystemExit(f"the sandbox does not run an empty program: {v.reason}: {v.detail}")
        times.append(v.seconds)
    return statistics.mean(times)


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
    ap.add_argument("--rows-per-step", type=int, default=64, help="verifications per RL step (rl.prompts_per_step x samples)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)

    serial = throughput(args.n, 1, args.isolation)
    parallel = throughput(args.n, args.workers, args.isolation)
    start_s = startup(args.startup_n, args.isolation)
    step_s = args.step_s if args.step_s is not None else rl_step_seconds(args.metrics) if args.metrics else None
    out = {"isolation": args.isolation, "cpu_count": os.cpu_count(), "serial": serial, "parallel": parallel,
           "startup_s": start_s, "speedup": parallel["per_s"] / serial["per_s"]}
    print(f"isolation={args.isolation}, {os.cpu_count()} CPUs, {args.n} verifications of {len(MIX)} programs "
          f"(pass rate {serial['pass_rate']:.2f})")
    print(f"{'workers':>8} {'seconds':>8} {'verif/s':>8}")
    for r in (serial, parallel):
        print(f"{r['workers']:>8} {r['seconds']:>8.2f} {r['per_s']:>8.1f}")
    print(f"parallel speed-up: {out['speedup']:.2f}x")
    print(f"sandbox start-up (empty program, serial mean of {args.startup_n}): {start_s * 1000:.0f} ms")
    if step_s is not None:
        per_step = args.rows_per_step * start_s / args.workers
        verify = args.rows_per_step / parallel["per_s"]
        out.update(step_s=step_s, rows_per_step=args.rows_per_step, startup_per_step_s=per_step,
                   startup_share=per_step / step_s, verify_per_step_s=verify)
        print(f"RL step {step_s:.2f} s; {args.rows_per_step} verifications on {args.workers} workers take "
              f"{verify:.2f} s ({verify / step_s:.0%} of the step), of which sandbox start-up {per_step:.2f} s "
              f"({per_step / step_s:.0%} of the step)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
