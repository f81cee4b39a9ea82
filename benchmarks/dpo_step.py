"""The dpo stage against TRL's ``DPOTrainer``: (a) the loss values on the same inputs, (b) the
time per DPO step on the same model, batch and sequence lengths.

    python benchmarks/dpo_step.py                                   # CPU, tiny GPT-2 (4 layers, 256 wide, 50k vocab)
    python benchmarks/dpo_step.py --pairs 8 --batch 4 --steps 2 --warmup 1 --shape small   # a quick check
    python benchmarks/rl_step.py --make-venvs .bench-venvs          # first time: TRL in its own venv

Both sides load one GPT-2 built from config and saved to a temporary directory (with a
word-level tokenizer), and get the same (prompt, chosen, rejected) pairs: random words,
responses of random lengths so that padding, trimming and packing matter. Each side runs
in its own subprocess; TRL in the interpreter ``--trl-python`` (TRL 1.16 installed with the
same torch and transformers: see ``benchmarks/rl_step.py --make-venvs``).

(a) Loss values, in float64 with a policy whose weights differ from the reference's (so
that the margins are O(1) and the comparison measures the formulas, not float32 summation
order). Every pair in one batch: rlhfkit's dpo stage loss (``DPO.loss``: one packed
forward pass of every response, the reference logprobs from its cache) and TRL's
``compute_loss`` (``DPOTrainer``: loss_type sigmoid and ipo; ``trl.experimental.cpo``'s
CPOTrainer with loss_type=simpo, cpo_alpha=0, for SimPO; ``trl.experimental.orpo``'s
ORPOTrainer, beta = orpo_lambda, for ORPO: its NLL term covers the prompt tokens too, rlhfkit's
only the response's, as its SFT stage, so those two differ by design). Printed side by side with the
absolute difference; the target is 1e-6. TRL's DPOTrainer scores through its fused LM
head, which returns float32 logprobs even for a float64 model (measured: up to 4e-3 nats
off per sequence here), so for the DPO/IPO rows that head is replaced by the plain float64
computation of the same fields, TRL's loss code unchanged; TRL's end-to-end value is
printed below each.

(b) Time per step: ``--steps`` optimizer steps of ``--batch`` pairs after ``--warmup``
untimed ones, AdamW, gradient clipping 1.0, fp32. rlhfkit: the stage's step (loss, backward,
step) with the reference logprobs cached, their one-off computation timed apart. TRL: its
trainer's steps (a callback times each), with the reference model run every step (TRL's
default) and with ``precompute_ref_log_probs=True``. Both sides' torch and transformers
versions are printed; no ratio is printed when they differ.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Shape:
    n_layer: int
    hidden: int
    n_head: int
    vocab: int
    prompt_len: int
    min_response: int
    max_response: int


SHAPES = {
    "cpu-tiny": Shape(n_layer=4, hidden=256, n_head=4, vocab=50257, prompt_len=64, min_response=16, max_response=128),
    "small": Shape(n_layer=2, hidden=64, n_head=2, vocab=2000, prompt_len=16, min_response=4, max_response=24),
}
BETA, GAMMA, ORPO_LAMBDA = 0.1, 0.5, 0.1
SIMPO_BETA = 2.0


def make_model_dir(shape: Shape, path: str, seed: int = 0) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlhfkit.plugins.policies.hf import word_level_tokenizer

    torch.manual_seed(seed)
    tok = word_level_tokenizer([f"w{i}" for i in range(shape.vocab - 3)])
    config = GPT2Config(vocab_size=len(tok), n_positions=1024, n_embd=shape.hidden, n_layer=shape.n_layer,
                        n_head=shape.n_head, bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
                        pad_token_id=tok.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def make_pairs(shape: Shape, n: int) -> list[dict]:
    rng = random.Random(0)
    word = lambda: f"w{rng.randrange(shape.vocab - 3)}"
    text = lambda k: " ".join(word() for _ in range(k))
    resp = lambda: text(rng.randint(shape.min_response, shape.max_response))
    return [{"prompt": text(shape.prompt_len), "chosen": resp(), "rejected": resp()} for _ in range(n)]


def versions() -> dict:
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__}


# --- rlhfkit ------------------------------------------------------------------------------


def run_rlhfkit(model_dir: str, policy_dir: str, pairs: list[dict], batch: int, steps: int, warmup: int) -> dict:
    from types import SimpleNamespace

    import torch

    from rlhfkit.interfaces import Comparison
    from rlhfkit.plugins.backends.single import SingleConfig, SingleDevice
    from rlhfkit.plugins.policies.hf import HFPolicyConfig, HFPolicyLoader
    from rlhfkit.plugins.stages.dpo import DPO, DPOConfig, PreferenceLoss
    from rlhfkit.rlhf.preference import ReferenceLogprobs
    from rlhfkit.rlhf.dropout import disable_dropout

    torch.manual_seed(0)
    backend = SingleDevice(SingleConfig(device="cpu"))
    loader = HFPolicyLoader(HFPolicyConfig(model=model_dir))
    policy = loader.load(model_dir)
    disable_dropout(policy.model)
    ctx = SimpleNamespace(name="dpo", backend=backend, device=backend.device, data=SimpleNamespace(context=None),
                          out=SimpleNamespace(say=lambda m: None))
    units = [Comparison(p["prompt"], (p["chosen"], p["rejected"]), (1.0, 0.0)) for p in pairs]
    stages = {name: DPO(DPOConfig(loss=PreferenceLoss(name), beta=SIMPO_BETA if name == "simpo" else BETA, gamma=GAMMA,
                                  orpo_lambda=ORPO_LAMBDA))
              for name in ("dpo", "ipo", "simpo", "orpo")}
    stage = stages["dpo"]
    for s in stages.values():
        s.pad_id = policy.tokenizer.pad_token_id
    rows, offsets = stage.tokenize(ctx, policy.tokenizer, units)
    lengths = torch.tensor([len(ids) - plen for ids, plen in rows])
    # (a) in float64, the policy (policy_dir) away from the reference (model_dir): the
    # margins are O(1) and the comparison measures the formulas, not fp32 summation order
    cache = ReferenceLogprobs(lengths)
    stage.fill_reference(ctx, loader.load(model_dir).model.double().eval(), rows, cache)
    far = loader.load(policy_dir).model.double().eval()
    losses = {}
    with torch.no_grad():
        for name, s in stages.items():
            losses[name] = s.loss(ctx, far, units, offsets, rows, cache)[0].item()
    # (b) in float32, from the reference weights as a DPO stage starts
    cache = ReferenceLogprobs(lengths)
    t0 = time.perf_counter()
    stage.fill_reference(ctx, policy.model, rows, cache)  # the policy before its first update is the reference
    t_ref = time.perf_counter() - t0
    engine = backend.prepare(policy.model, torch.optim.AdamW(policy.model.parameters(), lr=1e-6), None, 1.0)
    times = []
    for i in range(warmup + steps):
        at = (i * batch) % len(units)
        idx = list(range(at, at + batch))
        t0 = time.perf_counter()
        loss, _ = stage.loss(ctx, engine, [units[j] for j in idx], [offsets[j] for j in idx], rows, cache)
        engine.backward(loss)
        engine.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return {"losses": losses, "step_s": sum(times) / len(times), "reference_s": t_ref, **versions()}


# --- TRL ----------------------------------------------------------------------------------


def run_trl(model_dir: str, policy_dir: str, pairs: list[dict], batch: int, steps: int, warmup: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    # the word-level tokenizer splits on whitespace: the completion starts with a space and
    # ends with " <eos>" (TRL then adds no EOS of its own), so both sides see the same tokens
    data = [{"prompt": p["prompt"], "chosen": f" {p['chosen']} {tok.eos_token}", "rejected": f" {p['rejected']} {tok.eos_token}"}
            for p in pairs]
    out = tempfile.mkdtemp(prefix="trl-dpo-")
    common = dict(output_dir=out, report_to=[], use_cpu=True, save_strategy="no", logging_steps=10**6, max_length=None,
                  disable_dropout=True, max_grad_norm=1.0, learning_rate=1e-6, lr_scheduler_type="constant",
                  warmup_steps=0, dataloader_num_workers=0, seed=0)

    def load(path=model_dir, dtype=torch.float32):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)

    far, ref64 = (lambda: load(policy_dir, torch.float64)), (lambda: load(model_dir, torch.float64))

    def exact_head(model) -> None:
        """Replace TRL's fused LM head (float32 logprobs whatever the model's dtype) by the
        plain float64 computation of the same fields, for ``model(..., fused_lm_head=True)``."""
        from types import SimpleNamespace

        forward = model.forward  # TRL's patched forward: without fused_lm_head it is the model's own

        def exact(*a, fused_lm_head=False, labels=None, **kw):
            if not fused_lm_head:
                return forward(*a, **kw) if labels is None else forward(*a, labels=labels, **kw)
            logits = forward(*a, **kw).logits[:, :-1].double()
            target = labels[:, 1:]
            mask = target != -100
            logp = torch.log_softmax(logits, -1)
            return SimpleNamespace(log_probs=logp.gather(-1, target.clamp(min=0)[..., None])[..., 0] * mask,
                                   entropy=-(logp.exp() * logp).sum(-1), mean_logits=logits.mean(-1),
                                   is_top1=logits.argmax(-1) == target, aux_loss=None)

        model.forward = exact

    def batch_loss(trainer, exact: bool = False) -> float:
        inputs = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
        if exact:
            exact_head(trainer.model)
            exact_head(trainer.ref_model)
        with torch.no_grad():
            return float(trainer.compute_loss(trainer.model, inputs))

    losses = {}
    for name, loss_type in (("dpo", "sigmoid"), ("ipo", "ipo")):
        t = DPOTrainer(model=far(), ref_model=ref64(), processing_class=tok, train_dataset=Dataset.from_list(data),
                       args=DPOConfig(loss_type=[loss_type], beta=BETA, per_device_train_batch_size=len(data), **common))
        losses[name + "_trl_reference"] = batch_loss(t)
        losses[name] = batch_loss(t, exact=True)
    try:
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        t = CPOTrainer(model=far(), processing_class=tok, train_dataset=Dataset.from_list(data),
                       args=CPOConfig(loss_type="simpo", cpo_alpha=0.0, beta=SIMPO_BETA, simpo_gamma=GAMMA,
                                      per_device_train_batch_size=len(data), max_length=None, max_completion_length=None,
                                      **{k: v for k, v in common.items() if k not in ("max_length", "disable_dropout")}))
        losses["simpo"] = batch_loss(t)
    except Exception as exc:  # an experimental trainer whose API moved: report, do not fail the benchmark
        losses["simpo_error"] = f"{type(exc).__name__}: {exc}"[:300]
    try:
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer

        t = ORPOTrainer(model=far(), processing_class=tok, train_dataset=Dataset.from_list(data),
                        args=ORPOConfig(beta=ORPO_LAMBDA, per_device_train_batch_size=len(data), max_length=1024,
                                        max_completion_length=None,
                                        **{k: v for k, v in common.items() if k not in ("max_length",)}))
        losses["orpo"] = batch_loss(t)
    except Exception as exc:
        losses["orpo_error"] = f"{type(exc).__name__}: {exc}"[:300]

    class Timer(TrainerCallback):
        def __init__(self):
            self.times, self.t0 = [], 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.times.append(time.perf_counter() - self.t0)

    timing = {}
    for label, precompute in (("step_s", False), ("step_s_precomputed_ref", True)):
        timer = Timer()
        t = DPOTrainer(model=load(), ref_model=load(), processing_class=tok, train_dataset=Dataset.from_list(data),
                       callbacks=[timer],
                       args=DPOConfig(loss_type=["sigmoid"], beta=BETA, per_device_train_batch_size=batch,
                                      max_steps=warmup + steps, precompute_ref_log_probs=precompute,
                                      dataloader_drop_last=True, **common))
        t.train()
        timed = timer.times[warmup:]
        timing[label] = sum(timed) / len(timed)
    return {"losses": losses, **timing, **versions()}


# --- driver -------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    pairs = json.load(open(args.pairs_file))
    fn = run_rlhfkit if args.worker == "rlhfkit" else run_trl
    policy_dir = args.model_dir + "-policy"
    print("RESULT " + json.dumps(fn(args.model_dir, policy_dir, pairs, args.batch, args.steps, args.warmup)), flush=True)


def spawn(python: str, side: str, args: argparse.Namespace, model_dir: str, pairs_file: str) -> dict:
    cmd = [python, os.path.abspath(__file__), "--worker", side, "--model-dir", model_dir, "--pairs-file", pairs_file,
           "--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="cpu-tiny")
    ap.add_argument("--pairs", type=int, default=16, help="pairs in the data set (all of them form the loss-value batch, in float64: 64 pairs at the 50k vocabulary need ~20 GB on TRL's side)")
    ap.add_argument("--batch", type=int, default=16, help="pairs per timed step")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--trl-python", default=os.path.join(".bench-venvs", "trl", "bin", "python"))
    ap.add_argument("--worker", choices=["rlhfkit", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--pairs-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    shape = SHAPES[args.shape]
    tmp = tempfile.mkdtemp(prefix="rlhfkit-dpo-bench-")
    model_dir, pairs_file = os.path.join(tmp, "model"), os.path.join(tmp, "pairs.json")
    make_model_dir(shape, model_dir)
    make_model_dir(shape, model_dir + "-policy", seed=1)  # (a)'s policy: other weights than the reference
    json.dump(make_pairs(shape, args.pairs), open(pairs_file, "w"))
    print(f"shape {args.shape}: {asdict(shape)}; {args.pairs} pairs, {args.batch} per step, {args.steps} timed steps "
          f"after {args.warmup}; {args.threads} threads")
    ours = spawn(sys.executable, "rlhfkit", args, model_dir, pairs_file)
    if not os.path.exists(args.trl_python):
        theirs = {"error": f"no TRL interpreter at {args.trl_python}: python benchmarks/rl_step.py --make-venvs .bench-venvs"}
    else:
        theirs = spawn(args.trl_python, "trl", args, model_dir, pairs_file)
    for name, r in (("rlhfkit", ours), ("trl", theirs)):
        if "error" in r:
            print(f"{name}: FAILED\n{r['error']}")
    if "error" in ours or "error" in theirs:
        raise SystemExit(1)
    print(f"versions: rlhfkit torch {ours['torch']} transformers {ours['transformers']}; "
          f"TRL torch {theirs['torch']} transformers {theirs['transformers']}")
    print("(a) loss on every pair in one batch (float64; policy and reference with different weights)")
    print(f"  {'loss':<6} {'rlhfkit':>14} {'TRL':>14} {'|diff|':>10}")
    for name in ("dpo", "ipo", "simpo", "orpo"):
        if name in theirs["losses"]:
            a, b = ours["losses"][name], theirs["losses"][name]
            print(f"  {name:<6} {a:>14.9f} {b:>14.9f} {abs(a - b):>10.2e}  {'ok' if abs(a - b) <= 1e-6 else 'MISMATCH'}")
            if name == "orpo":
                print(f"  {'':<6} (TRL's ORPO NLL term averages over prompt and response tokens; rlhfkit's, like its "
                      "SFT stage, over response tokens only)")
            if name + "_trl_reference" in theirs["losses"]:
                c = theirs["losses"][name + "_trl_reference"]
                print(f"  {'':<6} {'':>14} {c:>14.9f} {abs(a - c):>10.2e}  (TRL end to end: its fused LM head returns "
                      "float32 logprobs)")
        else:
            print(f"  {name:<6} {ours['losses'][name]:>14.9f} {'-':>14}  ({theirs['losses'].get(name + '_error', 'not run')})")
    print("(b) time per DPO step")
    print(f"  rlhfkit {ours['step_s'] * 1e3:9.1f} ms   (+ reference logprobs once: {ours['reference_s'] * 1e3:.1f} ms "
          f"for {args.pairs} pairs)")
    print(f"  TRL     {theirs['step_s'] * 1e3:9.1f} ms   (reference model every step, TRL's default)")
    print(f"  TRL     {theirs['step_s_precomputed_ref'] * 1e3:9.1f} ms   (precompute_ref_log_probs=True)")
    if (ours["torch"], ours["transformers"]) != (theirs["torch"], theirs["transformers"]):
        print("  no speed-up reported: the two sides run different torch/transformers versions")
    else:
        print(f"  speed-up: {theirs['step_s'] / ours['step_s']:.2f}x vs TRL's default, "
              f"{theirs['step_s_precomputed_ref'] / ours['step_s']:.2f}x vs TRL with precomputed reference logprobs")


if __name__ == "__main__":
    main()
