"""``stages=[sft,rm,best_of_n]``: rejection-sampling fine-tuning (best-of-n, as in Llama 2's
section 3.2.2): sample ``n`` responses per RL prompt from the SFT policy, keep the one the
run's reward source (``reward=...``) scores highest, and fine-tune the SFT policy on those."""

from dataclasses import dataclass

import torch

from rlhfkit import hookimpl
from rlhfkit.interfaces import StepResult
from rlhfkit.resume import Batches, TrackingBackend, seed_everything
from rlhfkit.rlhf.losses import causal_lm_loss, n_targets
from rlhfkit.rlhf.masked import dp_denominator
from rlhfkit.rlhf.tokenize import pad_rows, tokenize_pair
from rlhfkit.settings import bounded


@dataclass
class BestOfNConfig:
    n: int = bounded(4, ge=2)
    """Responses sampled per prompt."""
    num_prompts: int = bounded(64, ge=1)
    """RL prompts to sample for (the first ones of the train split)."""
    steps: int = bounded(20, ge=1)
    batch_size: int = bounded(16, ge=1)
    lr: float = bounded(1e-4, gt=0)


class BestOfN:
    needs = ("sft",)
    data = ("prompts",)
    produces = "policy"
    uses_reward = True  # the reward source's own needs (reward=model: 'rm') count as this stage's

    def __init__(self, cfg: BestOfNConfig):
        self.cfg = cfg

    def run(self, ctx):
        cfg, backend = self.cfg, ctx.backend
        seed_everything(ctx.seed + 7)  # the same draws on a rerun, and on resume
        sampler = ctx.load_policy("sft")  # frozen, on the device
        tok = sampler.tokenizer
        ctx.data.bind(sampler)
        reward, generate = ctx.components["reward"], ctx.components["generator"]
        reward.setup(ctx, tok)
        best = []
        for p in backend.shard(ctx.data.prompts("train", tok, ctx.rollout.max_new_tokens)[: cfg.num_prompts]):
            with torch.no_grad(), backend.autocast():
                r = generate(sampler.model, tok, [p] * cfg.n, ctx.rollout, ctx.device)  # n rows
                best.append(tokenize_pair(tok, p, r.responses[int(reward(r).argmax())]))  # (ids, prompt length)
        rows = backend.gather_objects(best)  # every rank's picks, on every rank
        policy = ctx.components["policy"].load(ctx.products["sft"])
        tracked = TrackingBackend(backend)  # what the loop checkpoints and restores on resume
        engine = tracked.prepare(policy.model, torch.optim.Adam(policy.model.parameters(), lr=cfg.lr), None, 1.0,
                                 batch_size=cfg.batch_size)
        batches = Batches(len(rows), cfg.batch_size, ctx.seed + 7)

        def step(_):
            e = pad_rows(backend.shard([rows[i] for i in next(batches)]), tok.pad_token_id, ctx.device)
            denom = dp_denominator(n_targets(e.loss_mask), backend.all_reduce_sum, backend.world_size)  # global tokens
            with backend.autocast():
                logits = engine(input_ids=e.input_ids, attention_mask=e.attention_mask).logits
                loss = causal_lm_loss(logits, e.input_ids, e.loss_mask, denom=denom)
            engine.backward(loss)
            return StepResult({"loss/best_of_n": loss.item(), "grad_norm": engine.step()})

        ctx.train(cfg.steps, 5, step, tracked, {"batches": batches})
        ctx.save(policy)


@hookimpl
def rlhfkit_register_stages(register):
    register("best_of_n", BestOfN, BestOfNConfig)
