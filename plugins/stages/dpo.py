"""``stages=[sft,dpo]``: offline preference optimisation of the SFT policy on ranked
comparisons, with no reward model and no sampling during training: DPO (Rafailov et al.
2023), IPO (Azar et al. 2023), SimPO (Meng et al. 2024) or ORPO (Hong et al. 2024), picked
by ``dpo.loss``. The losses are :mod:`rlhfkit.rlhf.preference`; this stage feeds them.

It reads the same comparisons as the ``rm`` stage (a K-wise comparison gives its C(K,2)
pairs, ties none; on the synthetic suite the SFT policy's samples drawn with the RM stage's
seed, so both learn from identical data). Each step forwards every response of its
comparisons once, packed, and only response tokens go through the LM head. The reference
(SFT) logprobs of every response are computed once, before the first update, and kept in
the stage's checkpointed state: a resumed stage restores them instead of recomputing.
Its product ``dpo/`` is evaluated against SFT beside ``rl/`` in ``eval.json``."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any, Sequence

import torch

from rlhfkit import hookimpl
from rlhfkit.config import RunInfo
from rlhfkit.context import StageContext
from rlhfkit.errors import ConfigError
from rlhfkit.interfaces import Comparison, PolicyLoader, StepResult, optional
from rlhfkit.resume import Batches, TrackingBackend, seed_everything
from rlhfkit.rlhf.dropout import disable_dropout
from rlhfkit.rlhf.losses import comparison_pairs, group_mean
from rlhfkit.rlhf.masked import dp_denominator
from rlhfkit.rlhf.preference import (
    ReferenceLogprobs, best_vs_rest_pairs, dpo_loss, ipo_loss, log_ratios, odds_ratio_loss, sequence_logprobs, simpo_loss,
)
from rlhfkit.rlhf.schedule import adamw_cosine
from rlhfkit.rlhf.tokenize import tokenize_pair
from rlhfkit.settings import Invalid, bounded


class PreferenceLoss(str, Enum):
    dpo = "dpo"
    """Rafailov et al. 2023: -log sigmoid(beta * log-ratio margin); cDPO with label_smoothing."""
    ipo = "ipo"
    """Azar et al. 2023: (length-normalised log-ratio margin - 1/(2 beta))^2."""
    simpo = "simpo"
    """Meng et al. 2024: reference-free, length-normalised, target margin gamma."""
    orpo = "orpo"
    """Hong et al. 2024: reference-free, NLL of the chosen + orpo_lambda * odds-ratio term."""


class Pairs(str, Enum):
    all = "all"
    """Every strictly ordered pair of a comparison: C(K,2) (InstructGPT's RM)."""
    best_vs_rest = "best_vs_rest"
    """The best-ranked response against each lower-ranked one: K - 1 pairs."""


@dataclass
class DPOConfig:
    loss: PreferenceLoss = PreferenceLoss.dpo
    """dpo, ipo, simpo or orpo."""
    beta: float = bounded(0.1, gt=0)
    """Inverse temperature of the implicit reward (DPO, IPO's tau, SimPO's beta; SimPO's paper uses 2-10)."""
    label_smoothing: float = bounded(0.0, ge=0, lt=0.5)
    """Probability that a preference label is flipped (cDPO); loss=dpo and loss=simpo only."""
    gamma: float = bounded(0.5, ge=0)
    """SimPO's target reward margin (loss=simpo)."""
    orpo_lambda: float = bounded(0.1, ge=0)
    """Weight of ORPO's odds-ratio term against its NLL term (loss=orpo)."""
    pairs: Pairs = Pairs.all
    """all (C(K,2) pairs per comparison) or best_vs_rest (K - 1)."""
    epochs: int = bounded(2, ge=1)
    """Passes over the comparisons (when steps=0)."""
    steps: int = bounded(0, ge=0)
    """Optimizer steps; 0: epochs x comparisons / batch_size."""
    batch_size: int = bounded(16, ge=1)
    """Comparisons (prompts) per step, all their pairs included."""
    lr: float = bounded(3e-4, gt=0)
    """Peak learning rate of the cosine schedule (1e-3 drifted to KL ~4.7 and lost gold on all 3 default-suite seeds; 3e-4 gained on all 3)."""
    warmup_steps: int = bounded(10, ge=0)
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    weight_decay: float = bounded(0.0, ge=0)
    max_grad_norm: float = bounded(1.0, ge=0)
    """Gradient clipping norm (0: no clipping)."""
    packing: bool = True
    """Pack a step's responses into rows (block-diagonal attention); else pad each to the longest."""
    pack_length: int = bounded(256, ge=1)
    """Tokens per packed row (a longer response gets a row of its own length)."""
    reference_batch_size: int = bounded(64, ge=1)
    """Responses per forward pass when computing the reference logprobs."""
    log_every: int = bounded(25, ge=1)

    def validate(self, run: RunInfo) -> None:
        if self.label_smoothing and self.loss in (PreferenceLoss.ipo, PreferenceLoss.orpo):
            raise Invalid("label_smoothing", self.label_smoothing, f"applies to loss=dpo and loss=simpo, not loss={self.loss.value}")
        if "dpo" in run.stages and self.batch_size < run.world_size:
            raise Invalid("batch_size", self.batch_size, f"must be >= the number of ranks ({run.world_size}): each rank takes a share")


class DPO:
    needs = ("sft",)
    data = ("comparisons",)
    produces = "policy"
    uses_reward = False

    def __init__(self, cfg: DPOConfig):
        self.cfg = cfg
        self.pack_length = cfg.pack_length if cfg.packing else None

    def run(self, ctx: StageContext) -> None:
        cfg, backend, loader = self.cfg, ctx.backend, ctx.components["policy"]
        seed_everything(ctx.seed + 1)  # the rm stage's seed and order: the same sampled comparisons
        sft = ctx.load_policy("sft")
        ctx.data.bind(sft)
        comparisons = ctx.data.comparisons("train", ctx.sampler(sft), sft.tokenizer)
        ctx.data.report()
        del sft
        units = [c for c in comparisons if len(self.pairs([c.scores])[0])]  # all-tied comparisons give no pair
        if not units:
            raise ConfigError("The dataset has no usable comparisons for DPO (train split): every one is missing, "
                              "too long for the context, or all tied.")
        if len(units) < backend.world_size:  # every rank takes at least one comparison a step
            raise ConfigError(f"DPO has {len(units)} usable comparisons, fewer than the {backend.world_size} ranks: "
                              "use fewer ranks or more data.")
        seed_everything(ctx.seed + 6)
        policy = optional(loader, PolicyLoader, "adapt")(loader.load(ctx.products["sft"]))  # LoRA: a fresh adapter
        # under LoRA the reference is the policy with its adapter disabled; else the policy
        # itself before its first update (the SFT weights): no second copy either way
        reference = optional(loader, PolicyLoader, "shared_reference")(policy)
        disable_dropout(policy.model)  # the training pass must score like the reference pass
        self.pad_id = policy.tokenizer.pad_token_id
        rows, self.offsets = self.tokenize(ctx, policy.tokenizer, units)
        cache = ReferenceLogprobs(torch.tensor([len(ids) - plen for ids, plen in rows]))

        steps = cfg.steps or cfg.epochs * math.ceil(len(units) / cfg.batch_size)
        optimizer, scheduler = adamw_cosine(policy.model.parameters(), cfg, steps)
        tracked = TrackingBackend(backend)
        engine = tracked.prepare(policy.model, optimizer, scheduler, cfg.max_grad_norm, batch_size=cfg.batch_size)
        batches = Batches(len(units), cfg.batch_size, ctx.seed + 6)

        def step(i: int) -> StepResult:
            if cache.logps is None:  # not restored from a checkpoint: compute it before the first update
                if i != 1:
                    raise RuntimeError(f"dpo: no reference logprobs at step {i}")
                self.fill_reference(ctx, reference.model if reference is not None else engine, rows, cache)
            mine = backend.shard(next(batches))  # this rank's comparisons
            with backend.autocast():
                loss, metrics = self.loss(ctx, engine, [units[u] for u in mine],
                                          [self.offsets[u] for u in mine], rows, cache)
            engine.backward(loss)
            grad_norm = engine.step()
            return StepResult({**metrics, "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm})

        ctx.train(steps, cfg.log_every, step, tracked, {"batches": batches, "reference": cache})
        policy.model.eval()
        ctx.save(policy)

    def pairs(self, scores: Sequence[Sequence[float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(win, lose, group) indices into the flattened responses of comparisons with ``scores``."""
        return (comparison_pairs if self.cfg.pairs == Pairs.all else best_vs_rest_pairs)(scores)

    def tokenize(self, ctx: StageContext, tok: Any, units: Sequence[Comparison]) -> tuple[list[tuple[list[int], int]], list[int]]:
        """(ids, prompt tokens) of every response, cut to the context, and where each
        comparison's responses start in that list."""
        rows, offsets = [], []
        for c in units:
            offsets.append(len(rows))
            for r in c.responses:
                ids, plen = tokenize_pair(tok, c.prompt, r)
                if ctx.data.context:  # the prompt leaves room for >= 1 response token (DataView.comparisons)
                    ids = ids[: ctx.data.context]
                rows.append((ids, max(plen, 1)))
        return rows, offsets

    @torch.no_grad()
    def fill_reference(self, ctx: StageContext, model: Any, rows: Sequence[tuple[list[int], int]],
                       cache: ReferenceLogprobs) -> None:
        """Each rank scores its share of the responses, in the same number of passes on
        every rank (ZeRO-3 gathers weights in each one), then all ranks exchange them."""
        backend, bs = ctx.backend, self.cfg.reference_batch_size
        mine = backend.shard(list(range(len(rows))))
        passes = math.ceil(math.ceil(len(rows) / backend.world_size) / bs)
        got: list[tuple[int, float]] = []
        dtype = torch.float32
        for k in range(passes):
            part = mine[k * bs : (k + 1) * bs]
            with backend.autocast():
                logps = sequence_logprobs(model, [rows[i] for i in part or [0]], self.pad_id, ctx.device, self.pack_length)
            dtype = logps.dtype
            got += list(zip(part, logps.tolist()))  # an empty share made a pass for the others' sake
            cache.passes += 1
        logps = torch.empty(len(rows), dtype=dtype)  # the policy's logprob dtype (fp32; fp64 for an fp64 model)
        for i, v in backend.gather_objects(got):
            logps[i] = v
        cache.logps = logps
        ctx.out.say(f"[{ctx.name}] reference logprobs of {len(rows)} responses: {passes} forward passes per rank, "
                    "cached for the stage (and its checkpoints)")

    def loss(self, ctx: StageContext, model: Any, batch: Sequence[Comparison], offsets: Sequence[int],
             rows: Sequence[tuple[list[int], int]], cache: ReferenceLogprobs) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of this rank's comparisons ``batch`` (whose responses start at
        ``offsets`` in ``rows``), normalised so that the average over ranks is the loss of
        the whole batch, and its metrics."""
        cfg, backend, device = self.cfg, ctx.backend, ctx.device
        index = [o + j for c, o in zip(batch, offsets) for j in range(len(c.responses))]  # every response once
        logps = sequence_logprobs(model, [rows[i] for i in index], self.pad_id, device, self.pack_length)  # (n,)
        ref_logps = cache.logps[index].to(device)
        lengths = cache.lengths[index].to(device, logps.dtype)
        win, lose, group = (t.to(device) for t in self.pairs([c.scores for c in batch]))  # (M,) each
        lw, ll, rw, rl, nw, nl = logps[win], logps[lose], ref_logps[win], ref_logps[lose], lengths[win], lengths[lose]
        denom = dp_denominator(float(len(batch)), backend.all_reduce_sum, backend.world_size)  # prompts with pairs
        if cfg.loss == PreferenceLoss.dpo:
            per_pair = dpo_loss(lw, ll, rw, rl, cfg.beta, cfg.label_smoothing)
            reward_w, reward_l = cfg.beta * log_ratios(lw, rw), cfg.beta * log_ratios(ll, rl)  # DPO eq. 5
        elif cfg.loss == PreferenceLoss.ipo:
            per_pair = ipo_loss(lw, ll, rw, rl, nw, nl, cfg.beta)
            reward_w, reward_l = cfg.beta * log_ratios(lw, rw), cfg.beta * log_ratios(ll, rl)
        elif cfg.loss == PreferenceLoss.simpo:
            per_pair = simpo_loss(lw, ll, nw, nl, cfg.beta, cfg.gamma, cfg.label_smoothing)
            reward_w, reward_l = cfg.beta * lw / nw, cfg.beta * ll / nl  # SimPO eq. 4
        else:
            per_pair, _ = odds_ratio_loss(lw, ll, nw, nl)
            reward_w, reward_l = cfg.orpo_lambda * lw / nw, cfg.orpo_lambda * ll / nl
        loss = group_mean(per_pair, group, len(batch), denom)
        if cfg.loss == PreferenceLoss.orpo:  # ORPO eq. 6: L_SFT + lambda * L_OR
            loss = self.chosen_nll(ctx, batch, logps, lengths) + cfg.orpo_lambda * loss
        reward_w, reward_l = reward_w.detach(), reward_l.detach()
        metrics = {f"loss/{ctx.name}": loss.item(), "dpo/reward_accuracy": (reward_w > reward_l).float().mean().item(),
                   "dpo/margin": (reward_w - reward_l).mean().item(), "dpo/chosen_reward": reward_w.mean().item(),
                   "dpo/rejected_reward": reward_l.mean().item(), "dpo/chosen_logprob": lw.detach().mean().item(),
                   "dpo/rejected_logprob": ll.detach().mean().item()}
        return loss, metrics

    def chosen_nll(self, ctx: StageContext, batch: Sequence[Comparison], logps: torch.Tensor,
                   lengths: torch.Tensor) -> torch.Tensor:
        """ORPO's L_SFT: the mean NLL per token of each comparison's best-ranked
        response(s), over the whole batch (the SFT stage's loss on those responses)."""
        flat = [s == max(c.scores) for c in batch for s in c.scores]
        best = torch.tensor(flat, device=logps.device)
        denom = dp_denominator(lengths[best].sum(), ctx.backend.all_reduce_sum, ctx.backend.world_size)
        return -logps[best].sum() / denom


@hookimpl
def rlhfkit_register_stages(register):
    register("dpo", DPO, DPOConfig)
