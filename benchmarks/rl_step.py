"""Time one RL step (rollout, scoring, update) of rlhfkit and of TRL on identical shapes.

    python benchmarks/rl_step.py                        # CPU: tiny GPT-2 (4 layers, 256 wide)
    python benchmarks/rl_step.py --shape gpt2-small     # GPU: GPT-2 small, bf16, 64x64 prompts, 128 new tokens
    python benchmarks/rl_step.py --make-venvs .bench-venvs   # first time: install the two TRL versions

Four workers, each in its own subprocess, on the same saved model directory and prompts:

* ``rlhfkit-ppo`` vs ``trl-ppo``: TRL 1.9's ``trl.experimental.ppo.PPOTrainer`` (the last TRL
  release with PPO), in the interpreter given by ``--trl-ppo-python``;
* ``rlhfkit-rloo`` vs ``trl-rloo``: the current TRL's ``RLOOTrainer``, in ``--trl-python``.

TRL PPO needs ``trl<1.10`` and current RLOO a newer TRL, so they live in two virtual
environments. ``--make-venvs DIR`` creates (or reuses) them and installs TRL with exactly
the running torch and transformers versions pinned, so both sides run the same kernels (a
venv made from inside another venv does not see that venv's packages, and an unpinned TRL
install pulls the newest torch). Every run reports its torch and transformers versions, and
no speed-up is printed for a pair whose versions differ. A worker whose TRL is missing is
reported as skipped, with the command that installs it.

Both sides generate every response to the full length (a randomly initialised policy
practically never samples EOS), with the same batch, PPO epochs and minibatches. Tokens per
second = generated tokens / wall time of the whole step. Each worker runs ``--warmup``
untimed steps, then reports the mean of ``--steps`` timed steps: generation, scoring
(reference logprobs, values, rewards) and update, with generation's share of the step.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

TRL_PPO_REQ, TRL_REQ = "trl==1.9.2", "trl==1.16.0"


@dataclass
class Shape:
    n_layer: int
    hidden: int
    n_head: int
    vocab: int
    prompts: int  # sequences per step (RLOO: prompts / k prompts, k responses each)
    prompt_len: int
    new_tokens: int
    bf16: bool
    device: str
    ppo_epochs: int = 4
    num_minibatches: int = 1
    rloo_k: int = 4


SHAPES = {
    "cpu-tiny": Shape(n_layer=4, hidden=256, n_head=4, vocab=50257, prompts=32, prompt_len=32, new_tokens=64, bf16=False, device="cpu"),
    "gpt2-small": Shape(n_layer=12, hidden=768, n_head=12, vocab=50257, prompts=64, prompt_len=64, new_tokens=128, bf16=True, device="cuda"),
}


# --- the shared model and prompts ------------------------------------------------------


def words(vocab: int) -> list[str]:
    return [f"w{i}" for i in range(vocab - 3)]  # + <pad> <eos> <unk>


def make_model_dir(shape: Shape, path: str) -> None:
    """A GPT-2 of the shape's size with a word-level tokenizer, saved as a Hugging Face
    directory: both frameworks load the policy, reference, reward model and critic from it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhfkit.plugins.policies.hf import word_level_tokenizer

    torch.manual_seed(0)
    tok = word_level_tokenizer(words(shape.vocab))
    config = GPT2Config(
        vocab_size=len(tok), n_positions=max(1024, shape.prompt_len + shape.new_tokens), n_embd=shape.hidden,
        n_layer=shape.n_layer, n_head=shape.n_head, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def prompts(shape: Shape, n: int) -> list[str]:
    import random

    rng = random.Random(0)
    vocab = words(shape.vocab)
    return [" ".join(rng.choice(vocab) for _ in range(shape.prompt_len)) for _ in range(n)]


# --- rlhfkit ------------------------------------------------------------------------------


def run_rlhfkit(algo: str, shape: Shape, model_dir: str, steps: int, warmup: int, reward_head: str = "last_token") -> dict:
    import torch

    from rlhfkit.interfaces import RLContext, RolloutConfig
    from rlhfkit.plugins.algorithms.ppo import PPO, PPOConfig
    from rlhfkit.plugins.algorithms.rloo import RLOO, RLOOConfig
    from rlhfkit.plugins.backends.single import SingleConfig, SingleDevice
    from rlhfkit.plugins.policies.hf import HFPolicyConfig, HFPolicyLoader
    from rlhfkit.plugins.reward_heads.last_token import LastTokenConfig, LastTokenHead
    from rlhfkit.plugins.reward_heads.logprob import LogProbConfig, LogProbHead
    from rlhfkit.plugins.reward_models.hf_rm import HFRewardConfig, HFRewardLoader
    from rlhfkit.rlhf.retokenize import score as score_reward

    torch.manual_seed(0)
    backend = SingleDevice(SingleConfig(device=shape.device, precision="bf16" if shape.bf16 else "fp32"))
    loader = HFPolicyLoader(HFPolicyConfig(model=model_dir))
    policy, reference = loader.load(model_dir), loader.load(model_dir)
    reference.model = backend.prepare_frozen(reference.model)
    rm_loader = HFRewardLoader(HFRewardConfig())

    def head(hidden):
        if reward_head == "logprob":  # rlhfkit's default: the critic also reads the SFT log-probabilities
            return LogProbHead(hidden, LogProbConfig())
        return LastTokenHead(hidden, LastTokenConfig())  # what TRL's value and reward models are

    reward_model = backend.prepare_frozen(rm_loader.build(model_dir, head))

    class Reward:  # reward=model's source, around the model built here
        needs, critic_init = (), None

        def setup(self, ctx, tokenizer):
            pass

        def __call__(self, rollout):
            return score_reward(reward_model, rollout.input_ids, rollout.attention_mask, rollout.sequence_response_mask)

    def make_critic(from_reward_model=True):  # the reward model here is itself a fresh head on the policy
        return rm_loader.build(model_dir, head)

    rollout = RolloutConfig(max_new_tokens=shape.new_tokens, temperature=1.0)
    ctx = RLContext(policy=policy, reference=reference, reward=Reward(), backend=backend, rollout=rollout,
                    make_critic=make_critic, demonstrations=lambda: [])
    if algo == "ppo":
        algorithm = PPO(PPOConfig(ppo_epochs=shape.ppo_epochs, num_minibatches=shape.num_minibatches, lr=1e-6, critic_lr=1e-6))
        batch = prompts(shape, shape.prompts)
    else:
        algorithm = RLOO(RLOOConfig(rloo_k=shape.rloo_k, lr=1e-6, num_minibatches=shape.num_minibatches))
        batch = prompts(shape, shape.prompts // shape.rloo_k)
    algorithm.setup(ctx)
    rows = []
    for i in range(warmup + steps):
        sync(shape.device)
        t0 = time.perf_counter()
        m = algorithm.step(batch).metrics
        sync(shape.device)
        total = time.perf_counter() - t0
        if i >= warmup:
            gen, score = m["perf/generate_s"], m["perf/score_s"]
            rows.append(dict(step_s=total, generate_s=gen, score_s=score, update_s=total - gen - score,
                             tokens=m["rollout/length"] * shape.prompts))
    return summarise(rows)


# --- TRL ----------------------------------------------------------------------------------


class PhaseTimer:
    """Wraps functions so their wall time adds up under a phase name."""

    def __init__(self, device: str):
        self.device, self.totals = device, {}

    def wrap(self, phase: str, fn):
        def timed(*args, **kwargs):
            sync(self.device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(self.device)
                self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - t0

        return timed


def trl_models(shape: Shape, model_dir: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    dtype = torch.bfloat16 if shape.bf16 else torch.float32
    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    rm = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype)
    value = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype=dtype)
    for m in (rm, value):
        m.config.pad_token_id = tok.pad_token_id
    return tok, policy, ref, rm, value


def step_callback(rows: list, timer: PhaseTimer, shape: Shape, tokens_per_step: int, warmup: int):
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def __init__(self):
            self.n = 0
            self.t0 = None

        def on_step_begin(self, args, state, control, **kw):
            sync(shape.device)
            self.t0 = time.perf_counter()
            timer.totals.clear()

        def on_step_end(self, args, state, control, **kw):
            sync(shape.device)
            now = time.perf_counter()
            # PPOTrainer has no on_step_begin: a step runs from the previous step's end
            total = now - self.t0
            self.t0 = now
            gen = timer.totals.get("generate", 0.0)
            score = timer.totals.get("gen_and_score", gen + timer.totals.get("score", 0.0)) - gen
            timer.totals.clear()
            if self.n >= warmup:
                rows.append(dict(step_s=total, generate_s=gen, score_s=score, update_s=total - gen - score, tokens=tokens_per_step))
            self.n += 1

    return Timing()


def run_trl_ppo(shape: Shape, model_dir: str, steps: int, warmup: int) -> dict:
    import torch
    import trl
    from datasets import Dataset

    try:
        from trl.experimental.ppo import PPOConfig, PPOTrainer, ppo_trainer
    except ImportError as exc:
        raise Skip(f"trl {trl.__version__} has no PPOTrainer ({exc}); install {TRL_PPO_REQ}") from exc
    tok, policy, ref, rm, value = trl_models(shape, model_dir)
    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts(shape, shape.prompts)]
    data = Dataset.from_dict({"input_ids": ids})
    timer = PhaseTimer(shape.device)
    # generation, and the scoring forwards under no_grad (training forwards have grad on)
    ppo_trainer.batch_generation = timer.wrap("generate", ppo_trainer.batch_generation)
    fwd, rew = ppo_trainer.forward, ppo_trainer.get_reward

    def scoring(fn):
        timed = timer.wrap("score", fn)
        return lambda *a, **k: timed(*a, **k) if not torch.is_grad_enabled() else fn(*a, **k)

    ppo_trainer.forward, ppo_trainer.get_reward = scoring(fwd), scoring(rew)
    B = shape.prompts
    with tempfile.TemporaryDirectory() as out:
        args = PPOConfig(
            output_dir=out, report_to="none", per_device_train_batch_size=B, gradient_accumulation_steps=1,
            num_mini_batches=shape.num_minibatches, num_ppo_epochs=shape.ppo_epochs, local_rollout_forward_batch_size=B,
            response_length=shape.new_tokens, total_episodes=B * (steps + warmup), num_sample_generations=0,
            learning_rate=1e-6, temperature=1.0, missing_eos_penalty=1.0, stop_token="eos", save_strategy="no",
            logging_steps=1000, bf16=shape.bf16, use_cpu=shape.device == "cpu", seed=0, kl_coef=0.1,
        )
        rows: list = []
        trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=rm,
                             train_dataset=data, value_model=value)
        cb = step_callback(rows, timer, shape, B * shape.new_tokens, warmup)
        trainer.add_callback(cb)
        cb.t0 = None

        orig_train = trainer.train

        def train():
            sync(shape.device)
            cb.t0 = time.perf_counter()
            return orig_train()

        train()
    return summarise(rows) | {"trl": trl.__version__}


def run_trl_rloo(shape: Shape, model_dir: str, steps: int, warmup: int) -> dict:
    import trl
    from datasets import Dataset

    try:
        from trl import RLOOConfig, RLOOTrainer
    except ImportError as exc:
        raise Skip(f"trl {trl.__version__} has no RLOOTrainer; install {TRL_REQ}") from exc
    if "num_generations" not in RLOOConfig.__dataclass_fields__:
        raise Skip(f"trl {trl.__version__} has the old RLOOTrainer; install {TRL_REQ}")
    tok, policy, ref, rm, _ = trl_models(shape, model_dir)
    del ref  # RLOOTrainer builds its own reference from the policy
    k, B = shape.rloo_k, shape.prompts
    data = Dataset.from_dict({"prompt": prompts(shape, B // k) * (steps + warmup + 1)})
    timer = PhaseTimer(shape.device)
    with tempfile.TemporaryDirectory() as out:
        args = RLOOConfig(
            output_dir=out, report_to="none", per_device_train_batch_size=B, gradient_accumulation_steps=1,
            steps_per_generation=1, num_iterations=1, num_generations=k, max_completion_length=shape.new_tokens,
            max_steps=steps + warmup, learning_rate=1e-6, temperature=1.0, top_k=0, top_p=1.0, beta=0.1,
            save_strategy="no", logging_steps=1000, bf16=shape.bf16, use_cpu=shape.device == "cpu", seed=0,
            shuffle_dataset=False, log_completions=False,
        )
        trainer = RLOOTrainer(model=policy, reward_funcs=rm, args=args, train_dataset=data, processing_class=tok,
                              reward_processing_classes=tok)
        trainer._generate_single_turn = timer.wrap("generate", trainer._generate_single_turn)
        trainer._generate_and_score_completions = timer.wrap("gen_and_score", trainer._generate_and_score_completions)
        rows: list = []
        trainer.add_callback(step_callback(rows, timer, shape, B * shape.new_tokens, warmup))
        trainer.train()
    return summarise(rows) | {"trl": trl.__version__}


# --- plumbing -------------------------------------------------------------------------------


class Skip(Exception):
    pass


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def summarise(rows: list[dict]) -> dict:
    if not rows:
        raise RuntimeError("no timed steps were recorded")
    mean = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    mean["tokens_per_s"] = mean["tokens"] / mean["step_s"]
    mean["generate_share"] = mean["generate_s"] / mean["step_s"]
    mean["steps"] = len(rows)
    return mean


PAIRS = (("rlhfkit-ppo", "trl-ppo"), ("rlhfkit-rloo", "trl-rloo"))  # (ours, theirs): the speed-up is ours / theirs

WORKERS = {
    "rlhfkit-ppo": lambda *a, **kw: run_rlhfkit("ppo", *a, **kw),
    "trl-ppo": run_trl_ppo,
    "rlhfkit-rloo": lambda *a, **kw: run_rlhfkit("rloo", *a, **kw),
    "trl-rloo": run_trl_rloo,
}


def worker_main(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape]
    versions = running_versions()
    try:
        extra = {"reward_head": args.reward_head} if args.worker.startswith("rlhfkit") else {}
        result = WORKERS[args.worker](shape, args.model_dir, args.steps, args.warmup, **extra)
        result |= versions
    except Skip as exc:
        result = {"skipped": str(exc)}
    except ImportError as exc:
        result = {"skipped": f"{exc}"}
    print("RESULT " + json.dumps(result), flush=True)


SHARED = ("torch", "transformers")  # must be the same version on both sides of a comparison


def running_versions() -> dict[str, str]:
    """The versions this interpreter imports (``2.13.0+cpu``: with the build's local label)."""
    import importlib

    return {name: str(importlib.import_module(name).__version__) for name in SHARED}


def install_command(py: str, trl_req: str, versions: dict[str, str]) -> list[str]:
    """pip install of TRL into a venv with torch and transformers pinned to ``versions``
    (local labels such as ``+cpu`` included: the same build, not just the same release)."""
    return [py, "-m", "pip", "install", "-q", trl_req, "datasets", *(f"{name}=={versions[name]}" for name in SHARED)]


def venv_versions(py: str) -> dict[str, str]:
    code = f"import importlib, json; print(json.dumps({{n: str(importlib.import_module(n).__version__) for n in {SHARED!r}}}))"
    out = subprocess.run([py, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def make_venvs(root: str) -> tuple[str, str]:
    """The two TRL venvs under ``root``, created or reused, with torch and transformers at
    the running versions (pip leaves matching ones alone and replaces others)."""
    want = running_versions()
    pythons = []
    for name, req in (("trl-ppo", TRL_PPO_REQ), ("trl", TRL_REQ)):
        path = os.path.join(root, name)
        py = os.path.join(path, "bin", "python")
        if not os.path.exists(py):
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", path], check=True)
        cmd = install_command(py, req, want)
        if subprocess.run(cmd).returncode:
            raise SystemExit(f"{' '.join(cmd)} failed. A local torch build ({want['torch']}) comes from PyTorch's "
                             "index: set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/<cpu|cu1xx> and rerun.")
        got = venv_versions(py)
        if got != want:
            raise SystemExit(f"{path} has {versions_text(got)} after installing, not {versions_text(want)}.")
        pythons.append(py)
    return pythons[0], pythons[1]


def versions_text(versions: dict) -> str:
    return ", ".join(f"{name} {versions.get(name, '?')}" for name in SHARED)


def version_mismatches(results: dict) -> dict[str, str]:
    """pair -> why its speed-up is not shown: the two runs' torch or transformers differ."""
    out = {}
    for ours, theirs in PAIRS:
        a, b = results.get(ours, {}), results.get(theirs, {})
        if "tokens_per_s" in a and "tokens_per_s" in b and any(a.get(n) != b.get(n) for n in SHARED):
            out[ours] = (f"no speed-up for {ours} vs {theirs}: {ours} ran {versions_text(a)}, {theirs} ran "
                         f"{versions_text(b)}. Pin them alike (--make-venvs DIR reinstalls the TRL venvs with this "
                         f"interpreter's versions).")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cpu-tiny")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per worker")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--only", nargs="*", choices=sorted(WORKERS), help="run these workers only")
    ap.add_argument("--trl-ppo-python", default=sys.executable, help=f"interpreter with {TRL_PPO_REQ}")
    ap.add_argument("--trl-python", default=sys.executable, help=f"interpreter with {TRL_REQ}")
    ap.add_argument("--make-venvs", metavar="DIR", help="create (or reuse) the two TRL venvs under DIR")
    ap.add_argument("--reward-head", choices=["last_token", "logprob"], default="last_token",
                    help="rlhfkit's reward and value head: last_token (as TRL's models) or logprob (rlhfkit's default)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker_main(args)
    if args.make_venvs:
        args.trl_ppo_python, args.trl_python = make_venvs(args.make_venvs)
    shape = SHAPES[args.shape]
    pythons = {"rlhfkit-ppo": sys.executable, "rlhfkit-rloo": sys.executable,
               "trl-ppo": args.trl_ppo_python, "trl-rloo": args.trl_python}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "model")
        make_model_dir(shape, model_dir)
        for name in args.only or ["rlhfkit-ppo", "trl-ppo", "rlhfkit-rloo", "trl-rloo"]:
            cmd = [pythons[name], __file__, "--worker", name, "--model-dir", model_dir, "--shape", args.shape,
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
                   "--reward-head", args.reward_head]
            env = dict(os.environ, TRL_EXPERIMENTAL_SILENCE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled")
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                results[name] = {"error": (proc.stderr or proc.stdout)[-2000:]}
            else:
                results[name] = json.loads(line[-1][len("RESULT "):])
            print(f"{name}: {json.dumps(results[name])[:400]}", file=sys.stderr, flush=True)
    print(report(shape, args.shape, results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shape": asdict(shape), "results": results}, f, indent=2)
    if version_mismatches(results):
        raise SystemExit(1)


def report(shape: Shape, name: str, results: dict) -> str:
    lines = [
        f"shape {name}: GPT-2 {shape.n_layer} layers x {shape.hidden} wide, vocab {shape.vocab}, "
        f"{shape.prompts} sequences x ({shape.prompt_len} prompt + {shape.new_tokens} new tokens), "
        f"{'bf16' if shape.bf16 else 'fp32'} on {shape.device}; PPO {shape.ppo_epochs} epochs x "
        f"{shape.num_minibatches} minibatch; RLOO k={shape.rloo_k}",
        "",
        "| run | torch / transformers | step (s) | generate (s) | score (s) | update (s) | gen. share | tokens/s | speed-up |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    mismatched = version_mismatches(results)
    for ours, theirs in PAIRS:
        for run in (ours, theirs):
            r = results.get(run)
            if r is None:
                continue
            if "tokens_per_s" not in r:
                lines.append(f"| {run} | {r.get('skipped') or 'error: ' + r.get('error', '')[-200:].replace(chr(10), ' ')} ||||||||")
                continue
            other = results.get(theirs, {})
            speed = ""
            if run == ours and "tokens_per_s" in other:
                speed = "versions differ" if ours in mismatched else f"{r['tokens_per_s'] / other['tokens_per_s']:.2f}x"
            label = run + (f" (trl {r['trl']})" if "trl" in r else "")
            lines.append(
                f"| {label} | {r.get('torch', '?')} / {r.get('transformers', '?')} | {r['step_s']:.3f} | {r['generate_s']:.3f} | "
                f"{r['score_s']:.3f} | {r['update_s']:.3f} | {r['generate_share']:.0%} | {r['tokens_per_s']:.0f} | {speed} |"
            )
    return "\n".join(lines + [""] * bool(mismatched) + list(mismatched.values()))


if __name__ == "__main__":
    main()
