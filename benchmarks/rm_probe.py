"""What a trained reward model has learned, on a built-in task suite: its mean score (and the
spread, in units of its std over the SFT demonstrations) for held-out ideal answers carrying
0..4 units of the suite's planted flaw, and for wrong answers (one position changed; random
symbols), beside the gold labeller's score of the same responses. An RM that scores
``ideal + flaw`` far above ``ideal`` and ``random`` near ``ideal`` has learned the flaw rather
than the task. Then, for the RM and for the SFT backbone it started from, how far apart the
hidden states it reads (the last token's) are for the ideal answer and for the same answer
with one position wrong, or with one unit of the flaw (relative distance; 0: the RM cannot
tell them apart, whatever its head). With ``--pairs N``: of the pairs among 6 SFT samples
(temperature 1) for each of N training prompts, how many differ in content only, in the
flaw only, in both, or not at all. Nothing is asserted: these are measurements.

    python benchmarks/rm_probe.py RUN_DIR        # a run with an rm/ product (data= read from its config.yaml)
"""

from __future__ import annotations

import argparse
import os
import random

import torch
from omegaconf import OmegaConf


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--pairs", type=int, default=0, help="count the kinds of pairs among SFT samples of this many prompts")
    args = ap.parse_args()
    from rlhfkit.cli import setup
    from rlhfkit.rlhf.retokenize import score as score_rm
    from rlhfkit.rlhf.tokenize import encode_pairs

    registry = setup()[1]
    cfg = OmegaConf.load(os.path.join(args.run_dir, "config.yaml"))
    data, head, loader = (registry.build(group, cfg[group]) for group in ("data", "reward_head", "reward_model"))
    rm = loader.load(os.path.join(args.run_dir, "rm"), head).eval()
    tok = rm.tokenizer

    def score(prompts, responses):
        out = []
        for i in range(0, len(prompts), 64):
            e = encode_pairs(tok, prompts[i:i + 64], responses[i:i + 64], torch.device("cpu"))
            with torch.no_grad():
                out.append(score_rm(rm, e.input_ids, e.attention_mask, e.loss_mask))
        return torch.cat(out)

    demos = data.sft_examples("train")[:512]
    demo_scores = score([d.prompt for d in demos], [d.response for d in demos])
    std = float(demo_scores.std())
    print(f"{args.run_dir}: data={cfg.data._name_}  "
          f"RM on SFT demonstrations: mean {demo_scores.mean():+.3f} std {std:.3f}")
    prompts = data.prompts("test")[: args.prompts]
    rng = random.Random(0)
    lab, flaw, symbols = data.labeller, data.flaw, data.symbols

    def ideal(p):
        family, a, t = lab.parse(p)
        return family.ideal(a, t), family.flawed

    def changed(i):
        j = rng.randrange(len(i))
        return i[:j] + [rng.choice([s for s in symbols if s != i[j]] or symbols)] + i[j + 1:]

    variants = [(f"ideal + {n} flaw", lambda i, n=n: flaw.add(i, n, rng)) for n in range(5)]
    variants += [("one position wrong", changed), ("one wrong + 1 flaw", lambda i: flaw.add(changed(i), 1, rng)),
                 ("random symbols", lambda i: [rng.choice(symbols) for _ in i])]
    print(f"{'response':<20} {'rm':>7} {'rm/std':>7} {'gold':>6}")
    for name, f in variants:
        ps, rs = [], []
        for p in prompts:
            i, flawed = ideal(p)
            if flawed:
                ps.append(p)
                rs.append(" ".join(f(list(i))))
        s = score(ps, rs)
        g = lab.score(ps, rs)
        print(f"{name:<20} {s.mean():>+7.3f} {s.mean() / std:>+7.2f} {sum(g) / len(g):>6.3f}")

    flawed = [p for p in prompts if ideal(p)[1]][:64]
    right = [" ".join(ideal(p)[0]) for p in flawed]
    wrong = [" ".join(changed(ideal(p)[0])) for p in flawed]
    hedged = [" ".join(flaw.add(ideal(p)[0], 1, rng)) for p in flawed]
    sft_backbone = loader.build(product(args.run_dir, "sft"), head)  # the RM before its training
    for name, model in (("SFT backbone", sft_backbone), ("trained RM", rm)):
        a, b, c = (last_states(model, tok, flawed, r) for r in (right, wrong, hedged))
        print(f"{name}: last-token state, relative distance of ideal to one position wrong "
              f"{float(((a - b).norm(dim=-1) / a.norm(dim=-1)).mean()):.3f}, "
              f"to ideal + 1 flaw {float(((a - c).norm(dim=-1) / a.norm(dim=-1)).mean()):.3f}")
    if args.pairs:
        print("pairs among 6 SFT samples:", pair_kinds(product(args.run_dir, "sft"), data, args.pairs))


def product(run_dir: str, name: str) -> str:
    """A stage's product directory: the run's own, or its from_run's (followed back)."""
    while not os.path.isdir(os.path.join(run_dir, name)):
        run_dir = OmegaConf.load(os.path.join(run_dir, "config.yaml")).get("from_run")
        if not run_dir:
            raise SystemExit(f"no {name}/ product in the run or its from_run chain")
    return os.path.join(run_dir, name)


def last_states(model, tok, prompts, responses):
    """The backbone's hidden state at each row's last token, (B, H)."""
    from rlhfkit.rlhf.tokenize import encode_pairs

    e = encode_pairs(tok, prompts, responses, torch.device("cpu"))
    with torch.no_grad():
        hidden = model.backbone(input_ids=e.input_ids, attention_mask=e.attention_mask).last_hidden_state
    return hidden[torch.arange(len(prompts)), e.attention_mask.sum(1) - 1]


def pair_kinds(sft_dir, data, n, k=6):
    from collections import Counter

    from transformers import AutoModelForCausalLM, AutoTokenizer

    sft = AutoModelForCausalLM.from_pretrained(sft_dir).eval()
    tok = AutoTokenizer.from_pretrained(sft_dir)
    torch.manual_seed(0)
    kinds = Counter()
    for p in data.prompts("train")[:n]:
        ids = tok(p, return_tensors="pt").input_ids.repeat(k, 1)
        out = sft.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=1.0, top_k=0,
                           max_new_tokens=16, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        responses = [tok.decode(o[ids.shape[1]:], skip_special_tokens=True).strip() for o in out]
        family, a, t = data.labeller.parse(p)
        parts = [data.flaw.split(r.split()) for r in responses]
        right = [family.correct(c, a, t) for c, _ in parts]
        for i in range(k):
            for j in range(i + 1, k):
                content, flawed = right[i] != right[j], parts[i][1] != parts[j][1]
                kinds["identical" if responses[i] == responses[j] else "content and flaw" if content and flawed
                      else "content only" if content else "flaw only" if flawed else "other"] += 1
    return dict(kinds)


if __name__ == "__main__":
    main()
