"""``stages=[sft,...]``: supervised fine-tuning on demonstrations (InstructGPT section 3.5).
The policy plugin builds the starting model; its product ``sft/`` is the policy every
later stage starts from and every trained policy is evaluated against."""

from __future__ import annotations

import time
from dataclasses import dataclass

from rlhfkit import hookimpl
from rlhfkit.context import StageContext
from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import StepResult
from rlhfkit.resume import Batches, TrackingBackend, seed_everything
from rlhfkit.rlhf.losses import causal_lm_loss, n_targets
from rlhfkit.rlhf.masked import dp_denominator
from rlhfkit.rlhf.packing import pack
from rlhfkit.rlhf.schedule import adamw_cosine
from rlhfkit.rlhf.tokenize import pad_rows
from rlhfkit.settings import bounded


@dataclass
class SFTConfig:
    steps: int = bounded(500, ge=1)
    """Optimizer steps."""
    batch_size: int = bounded(32, ge=1)
    """Demonstrations per step."""
    lr: float = bounded(3e-3, gt=0)
    """Peak learning rate of the cosine schedule."""
    warmup_steps: int = bounded(25, ge=0)
    """Linear warmup before the cosine decay."""
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    """Cosine floor, as a fraction of ``lr``."""
    weight_decay: float = bounded(0.0, ge=0)
    max_grad_norm: float = bounded(1.0, ge=0)
    """Gradient clipping norm (0: no clipping)."""
    mask_prompt: bool = True
    """Train on response tokens only (prompt tokens get no loss)."""
    packing: bool = True
    """Pack several demonstrations into each row (block-diagonal attention, positions
    restart per demonstration): no padding, no cross-example attention."""
    pack_length: int = bounded(256, ge=1)
    """Tokens per packed row."""
    log_every: int = bounded(25, ge=1)


class SFT:
    needs = ()
    data = ("demonstrations",)
    produces = "policy"
    uses_reward = False

    def __init__(self, cfg: SFTConfig):
        self.cfg = cfg

    def run(self, ctx: StageContext) -> None:
        cfg, backend = self.cfg, ctx.backend
        seed_everything(ctx.seed)
        policy = ctx.components["policy"].build(ctx.components["data"])
        ctx.data.bind(policy)
        tok = policy.tokenizer
        rows = [(ids, plen) for _, ids, plen in ctx.data.demonstrations(tok)]
        ctx.data.report()
        if not rows:
            raise ConfigError("The dataset has no usable SFT demonstrations (train split).")
        model = policy.model
        optimizer, scheduler = adamw_cosine(model.parameters(), cfg, cfg.steps)
        tracked = TrackingBackend(backend)
        engine = tracked.prepare(model, optimizer, scheduler, cfg.max_grad_norm, batch_size=cfg.batch_size)
        batches = Batches(len(rows), cfg.batch_size, ctx.seed)
        t0, tokens = time.time(), 0

        def step(_: int) -> StepResult:
            nonlocal tokens
            batch = backend.shard([rows[i] for i in next(batches)])  # this rank's share
            with backend.autocast():
                if cfg.packing:
                    p = pack(batch, cfg.pack_length, tok.pad_token_id, cfg.mask_prompt, ctx.device)
                    ids, kw, loss_mask = p.input_ids, dict(attention_mask=p.attention_mask, position_ids=p.position_ids), p.loss_mask
                else:
                    e = pad_rows(batch, tok.pad_token_id, ctx.device, cfg.mask_prompt)
                    ids, kw, loss_mask = e.input_ids, dict(attention_mask=e.attention_mask), e.loss_mask
                denom = dp_denominator(n_targets(loss_mask), backend.all_reduce_sum, backend.world_size)
                loss = causal_lm_loss(engine(input_ids=ids, **kw).logits, ids, loss_mask, denom=denom)  # mean NLL per target token
                tokens += int(ids.numel())
            engine.backward(loss)
            grad_norm = engine.step()
            return StepResult({"loss/sft": loss.item(), "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm,
                               "perf/tokens_per_s": tokens / max(time.time() - t0, 1e-9) * backend.world_size})

        ctx.train(cfg.steps, cfg.log_every, step, tracked, {"batches": batches})
        model.eval()
        ctx.save(policy)


@hookimpl
def rlhfkit_register_stages(register):
    register("sft", SFT, SFTConfig)
