"""``stages=[...,rm,...]``: the reward model, trained on K-wise ranked comparisons of the
SFT policy's samples (InstructGPT section 3.5, eq. 1). Its product ``rm/`` is what
``reward=model`` scores RL rollouts with.

``rm.ensemble_size=K`` trains K reward models one after the other (Coste et al. 2023,
"Reward Model Ensembles Help Mitigate Overoptimization"). Member 0 is the single reward
model: trained exactly as ``rm.ensemble_size=1`` trains it (same seed, data, start and
checkpoints), so ``reward=model`` on an ensemble's product is the single-RM run. Members
1..K-1 each draw their own seed (batch order), their own bootstrap resample of the
comparisons (``rm.bootstrap``) and their own random start: N(0, ``rm.member_init_std``,
0.03) added to their reward head's weight matrices. ``rm.member_heads`` gives them heads of
other kinds, which extrapolate differently off the SFT samples (by default ``logprob_last``:
the answer's log-likelihood as member 0 reads it, the flaw from the last token alone). Members that differ only in
batch order score much alike (the stage warns); README "Reward-model ensembles" has the
measurements. Each member is normalised on its own. The product is then::

    rm/                member 0: what reward=model, a value model and from_run read
    rm/members/<k>/    members 1 .. K-1, each a reward-model directory like rm/ itself
    rm/ensemble.json   the members' directories and heads, held-out accuracies and biases

and ``reward=ensemble`` scores with all of them. A finished member is kept under
``checkpoints/rm/member-<k>/trained/`` until the product is written: a run killed
mid-ensemble resumes at the member it was training."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Sequence

import torch

from rlhfkit import hookimpl
from rlhfkit.checkpoint import MANIFEST, atomic_write_text, verify
from rlhfkit.context import StageContext
from rlhfkit.errors import CheckpointError, ConfigError
from rlhfkit.interfaces import Comparison, RewardModel, RewardModelLoader, StepResult, optional
from rlhfkit.resume import Batches, TrackingBackend, seed_everything
from rlhfkit.rlhf.losses import comparison_pairs, kwise_loss, pairwise_loss
from rlhfkit.rlhf.masked import dp_denominator
from rlhfkit.rlhf.retokenize import reward_model_context, score
from rlhfkit.rlhf.schedule import adamw_cosine
from rlhfkit.rlhf.tokenize import encode_pairs
from rlhfkit.registry import installed
from rlhfkit.settings import Invalid, bounded, show


class RMLoss(str, Enum):
    kwise = "kwise"
    """InstructGPT: all C(K,2) pairs of a prompt form one batch element."""
    pairwise = "pairwise"
    """One (chosen, rejected) pair per batch element."""


@dataclass
class RMConfig:
    loss: RMLoss = RMLoss.kwise
    """kwise (InstructGPT) or pairwise."""
    epochs: int = bounded(2, ge=1)
    batch_size: int = bounded(16, ge=1)
    """Prompts (kwise) or pairs (pairwise) per step."""
    lr: float = bounded(1e-3, gt=0)
    warmup_steps: int = bounded(10, ge=0)
    min_lr_ratio: float = bounded(0.1, ge=0, le=1)
    weight_decay: float = bounded(0.0, ge=0)
    max_grad_norm: float = bounded(1.0, ge=0)
    normalize: bool = True
    """Shift rewards so the SFT demonstrations score mean 0."""
    scale: bool = True
    """Also scale rewards to std 1 over SFT samples (the held-out comparisons' responses), as
    Ziegler et al. 2019 normalise theirs, so that a KL coefficient weighs the same against
    every reward model, whatever scale its training happened to give it."""
    log_every: int = bounded(25, ge=1)
    ensemble_size: int = bounded(1, ge=1)
    """Reward models to train, each from its own seed (Coste et al. 2023); 1: one, as in
    InstructGPT. ``reward=ensemble`` scores with all of them."""
    bootstrap: bool = True
    """Train ensemble members 1..K-1 each on its own bootstrap resample of the training
    comparisons (as many, drawn with replacement), so that they differ in their data as well
    as their seed. Member 0, the single reward model, trains on the comparisons as they are."""
    member_init_std: float = bounded(0.03, ge=0)
    """Ensemble members 1..K-1 start with N(0, this) noise added to their reward head's weight
    matrices (its parameters of two or more dimensions), each from its own seed, so that they
    differ in their start too; member 0 starts as the single reward model does. 0: no noise.
    0.03 held best over the built-in suites against 0 and 0.1 (README "Reward-model ensembles")."""
    member_heads: list[str] = field(default_factory=lambda: ["logprob_last"])
    """Reward heads (``reward_head`` names) of ensemble members 1..K-1, taken in turn. Member 0
    always uses ``reward_head``: it is the single reward model. Members of one kind learn the
    comparisons' flaw alike and agree where a policy exploits it (Eisenstein et al. 2023);
    heads of other kinds extrapolate in their own ways off the SFT samples, so the members
    disagree there, and ``uwo`` and ``wco`` hold back. The default, ``logprob_last``, reads
    the answer through the SFT model's log-likelihood as the default ``logprob`` head does,
    and the flaw through the last token's state instead of every token's. Heads that cannot
    read the answer (``last_token``, ``mlp``) protect as well where the single RM is
    exploited but cost gold where it is not: the members' mean then ranks answers worse. A
    name that is the run's ``reward_head`` takes its settings, another that head's defaults.
    ``[]``: every member uses ``reward_head``. The default was chosen over the built-in
    suites and seeds 0-2 against ``[last_token,mlp]`` (the former default), and against
    ``[]`` where members of one kind fail, on ``words`` (README "Reward-model ensembles").
    A reward model with a head of its own (``reward_model=seq_cls``) ignores it."""

    def validate(self, run: Any = None) -> None:
        if not self.member_heads:
            return
        heads = installed().names("reward_head")
        unknown = [h for h in self.member_heads if h not in heads]
        if unknown:
            raise Invalid("member_heads", self.member_heads, f"unknown reward head {unknown[0]!r}; choose from "
                          f"{', '.join(heads)}")


ENSEMBLE_FILE, MEMBER_FILE, MEMBERS_DIR = "ensemble.json", "member.json", "members"
MEMBERS_SETTINGS_FILE = "members.json"  # under checkpoints/rm/ while the members train


def member_seed(seed: int, k: int) -> int:
    """Member ``k``'s seed (its batch order, bootstrap sample, head noise and any random
    initialisation); member 0 keeps the single reward model's (``seed + 1``)."""
    return seed + 1 + 7919 * k


def bootstrap(units: Sequence[Any], seed: int) -> list[Any]:
    """A bootstrap resample: ``len(units)`` drawn with replacement, from a private generator
    (the global RNG is left as it was)."""
    idx = torch.randint(len(units), (len(units),), generator=torch.Generator().manual_seed(seed))
    return [units[i] for i in idx.tolist()]


def perturb_head(head: torch.nn.Module, std: float, seed: int) -> None:
    """Add N(0, ``std``) noise to ``head``'s weight matrices (parameters of two or more
    dimensions; biases and scalar gains are left as they are), from a private generator."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            if p.dim() >= 2:
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.device, p.dtype), alpha=std)


def member_head(heads: Sequence[str], k: int) -> str | None:
    """The reward head member ``k`` trains with, by ``rm.member_heads`` (``heads``): None
    for the run's ``reward_head``."""
    return heads[(k - 1) % len(heads)] if k and heads else None


def head_builder(components: Any, name: str | None) -> Any:
    """The ``reward_head`` builder of a member whose head is ``name`` (:func:`member_head`)."""
    return components["reward_head"] if name is None else components.named("reward_head", name)


def ensemble_members_with_heads(path: str) -> list[tuple[str, str | None]]:
    """The reward models in the ``rm`` product at ``path``: member 0 (the product itself)
    and, for an ensemble, ``members/<k>``; each one's directory and reward head (None: the
    run's ``reward_head``), from the ``rm.member_heads`` it was trained with."""
    meta = os.path.join(path, ENSEMBLE_FILE)
    if not os.path.isfile(meta):
        return [(path, None)]
    try:
        with open(meta) as f:
            info = json.load(f)
        members, heads = info["members"], info.get("member_heads") or []
        dirs = [os.path.normpath(os.path.join(path, m)) for m in members]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{meta} is unreadable ({exc}): train the rm stage again.") from None
    if not isinstance(heads, list) or not all(isinstance(h, str) for h in heads):
        raise CheckpointError(f"{meta} has member_heads={heads!r}, not a list of reward heads: train the rm stage again.")
    return [(d, member_head(heads, k)) for k, d in enumerate(dirs)]


def ensemble_members(path: str) -> list[str]:
    """The directories of the reward models in the ``rm`` product at ``path``
    (:func:`ensemble_members_with_heads`)."""
    return [d for d, _ in ensemble_members_with_heads(path)]


def accuracy_of(rewards: torch.Tensor, comparisons: Sequence[Comparison]) -> float:
    """The fraction of strictly ordered pairs that ``rewards`` (one per completion, in
    order) order the same way as the labels."""
    if not comparisons:
        return float("nan")
    win, lose, _ = comparison_pairs([c.scores for c in comparisons])
    return float((rewards[win] > rewards[lose]).float().mean())


def link_tree(src: str, dst: str, skip: frozenset[str] = frozenset()) -> None:
    """Hard-link (or, across file systems, copy) every file under ``src`` into ``dst``,
    but the top-level ``skip`` names."""
    for d, _, names in os.walk(src):
        rel = os.path.relpath(d, src)
        os.makedirs(os.path.join(dst, rel), exist_ok=True)
        for n in names:
            if rel == "." and n in skip:
                continue
            a, b = os.path.join(d, n), os.path.normpath(os.path.join(dst, rel, n))
            try:
                os.link(a, b)
            except OSError:
                shutil.copy2(a, b)


class Member:
    """A trained member as written under ``checkpoints/rm/member-<k>/trained/``: the reward
    model and what the ensemble's report needs of it (``member.json``)."""

    def __init__(self, model: RewardModel, record: dict[str, Any]):
        self.model, self.record = model, record

    def save(self, path: str) -> None:
        self.model.save(path)
        with open(os.path.join(path, MEMBER_FILE), "w") as f:
            json.dump(self.record, f)


class EnsembleProduct:
    """The ``rm`` product of an ensemble, assembled from the trained members' directories."""

    def __init__(self, trained: list[str], info: dict[str, Any]):
        self.trained, self.info = trained, info

    def save(self, path: str) -> None:
        skip = frozenset({MANIFEST, MEMBER_FILE})
        members = ["."]
        link_tree(self.trained[0], path, skip)
        for k, src in enumerate(self.trained[1:], start=1):
            members.append(f"{MEMBERS_DIR}/{k}")
            link_tree(src, os.path.join(path, MEMBERS_DIR, str(k)), skip)
        with open(os.path.join(path, ENSEMBLE_FILE), "w") as f:
            json.dump({"members": members, **self.info}, f, indent=2)


def as_pairs(comparisons: Sequence[Comparison]) -> list[tuple[str, str, str]]:
    """(prompt, chosen, rejected) for every strictly ordered pair."""
    win, lose, group = comparison_pairs([c.scores for c in comparisons])
    flat = [(c.prompt, r) for c in comparisons for r in c.responses]
    return [(flat[w][0], flat[w][1], flat[l][1]) for w, l in zip(win.tolist(), lose.tolist())]


class RM:
    needs = ("sft",)
    data = ("comparisons",)
    produces = "reward_model"
    uses_reward = False

    def __init__(self, cfg: RMConfig):
        self.cfg = cfg
        self.head_start: list[torch.Tensor] | None = None  # member 0's head before training
        self.head_kind: Any = None  # and its class and settings

    def run(self, ctx: StageContext) -> None:
        seed_everything(ctx.seed + 1)
        # from the product on disk (what a stage run alone does): the SFT stage's object may be sharded
        sft = ctx.load_policy("sft")
        ctx.data.bind(sft)
        sample = ctx.sampler(sft)
        train = ctx.data.comparisons("train", sample, sft.tokenizer)
        test = ctx.data.comparisons("test", sample, sft.tokenizer)
        ctx.data.report()
        if not train:
            raise ConfigError("The dataset has no usable comparisons for the reward model (train split).")
        base = optional(ctx.components["reward_model"], RewardModelLoader, "base_model") or ctx.products["sft"]
        self.sft_tok = sft.tokenizer
        if self.cfg.ensemble_size == 1:
            rm, metrics, steps, _ = self.train_member(ctx, base, train, test, 0)
            ctx.out.log("rm", steps, metrics)
            ctx.save(rm)
        else:
            self.ensemble(ctx, base, train, test)

    def train_member(self, ctx: StageContext, base: str, train: list[Comparison], test: list[Comparison],
                     k: int) -> tuple[RewardModel, dict[str, float], int, torch.Tensor]:
        """Train reward model ``k`` of the ensemble (0: the single one) and normalise it.
        Returns it, its metrics, its step count and its held-out scores (one per completion)."""
        cfg, backend, loader = self.cfg, ctx.backend, ctx.components["reward_model"]
        seed = member_seed(ctx.seed, k)
        if k:  # member 0 draws from the stream seeded by run(), as the single reward model does
            seed_everything(seed)
        rm = loader.build(base, head_builder(ctx.components, member_head(cfg.member_heads, k)))
        if hasattr(rm, "set_scale"):  # a reward model trained before may carry a gain: train and normalise unscaled
            rm.set_scale(1.0)
        head = getattr(rm, "head", None)
        if k and cfg.member_init_std > 0:
            if isinstance(head, torch.nn.Module):
                perturb_head(head, cfg.member_init_std, seed)
            elif k == 1:
                ctx.out.warn(f"rm.member_init_std={cfg.member_init_std} does nothing here: {type(rm).__name__} has no "
                             "'head' module to perturb, so members differ by seed and rm.bootstrap only.")
        if cfg.ensemble_size > 1 and not cfg.bootstrap:
            self.check_members_differ(ctx, rm, k)
        self.tok = optional(rm, RewardModel, "tokenizer") or self.sft_tok  # the RM reads text with its own tokenizer
        self.context = reward_model_context(rm) or ctx.data.context
        units = train if cfg.loss == RMLoss.kwise else as_pairs(train)
        if k and cfg.bootstrap:  # member 0 is the single reward model: the comparisons as they are
            units = bootstrap(units, seed)
        steps = cfg.epochs * math.ceil(len(units) / cfg.batch_size)
        optimizer, scheduler = adamw_cosine(rm.parameters(), cfg, steps)
        tracked = TrackingBackend(backend)
        engine = tracked.prepare(rm, optimizer, scheduler, cfg.max_grad_norm, batch_size=cfg.batch_size)
        batches = Batches(len(units), cfg.batch_size, seed)
        loss_fn = {RMLoss.kwise: self.kwise, RMLoss.pairwise: self.pairwise}[cfg.loss]

        def step(_: int) -> StepResult:
            batch = backend.shard([units[i] for i in next(batches)])
            with backend.autocast():
                loss, acc = loss_fn(ctx, engine, batch)
            engine.backward(loss)
            grad_norm = engine.step()
            return StepResult({"loss/rm": loss.item(), "rm/train_accuracy": acc.item(), "lr": scheduler.get_last_lr()[0],
                               "grad_norm": grad_norm})

        ctx.train(steps, cfg.log_every, step, tracked, {"batches": batches}, part=f"member-{k}" if k else "")
        rm.eval()
        heldout = self.scores(ctx, rm, [c.prompt for c in test for _ in c.responses],
                              [r for c in test for r in c.responses]) if test else torch.zeros(0)
        metrics = {"rm/accuracy": accuracy_of(heldout, test)}
        if cfg.normalize:
            demos = ctx.components["data"].sft_examples("train")[: ctx.eval.num_prompts]
            bias = float(self.scores(ctx, rm, [d.prompt for d in demos], [d.response for d in demos]).mean() + rm.bias)
            rm.set_bias(bias)
            metrics["rm/bias"] = bias
        if cfg.scale and heldout.numel() > 1 and hasattr(rm, "set_scale"):
            std = float(heldout.std())
            gain = 1.0 / std if std > 1e-6 else 1.0
            rm.set_scale(gain)
            metrics["rm/gain"] = gain
            heldout = heldout * gain
        return rm, metrics, steps, heldout

    def check_members_differ(self, ctx: StageContext, rm: RewardModel, k: int) -> None:
        """Warn when members 0 and 1 start from the same head and train on the same data: they
        then differ only in batch order and score much alike (measured: no gain over one
        reward model on two of the three built-in suites, README "Reward-model ensembles")."""
        head = getattr(rm, "head", None)
        if k > 1 or not isinstance(head, torch.nn.Module) or getattr(getattr(rm, "lora", None), "enabled", False):
            return  # members 0 and 1 tell; no head to compare, or LoRA adapters (those start at random per seed)
        start = [p.detach().clone() for p in head.parameters()] or None
        # the head's class and plain settings (a logprob head's pool and linear): heads of two kinds may start alike
        kind = (type(head), {n: v for n, v in vars(head).items()
                             if not n.startswith("_") and n != "training" and isinstance(v, (str, int, float, bool))})
        if k == 0:
            self.head_start, self.head_kind = start, kind
        elif start is not None and self.head_start is not None and kind == self.head_kind \
                and len(start) == len(self.head_start) and all(map(torch.equal, start, self.head_start)):
            ctx.out.warn("the ensemble's members start from the same reward head and train on the same "
                         "comparisons: they differ only in batch order and will score much alike. Make them "
                         "differ with rm.bootstrap=true or rm.member_init_std>0 (the defaults).")

    def member_settings(self) -> dict[str, Any]:
        """What makes members 1..K-1 differ, recorded while they train and with the ensemble."""
        return {"bootstrap": self.cfg.bootstrap, "member_init_std": self.cfg.member_init_std,
                "member_heads": list(self.cfg.member_heads)}

    def check_member_settings(self, ctx: StageContext, root: str) -> None:
        """Members already trained or under way (a resumed run) were trained with the settings
        recorded in ``root``: a resume with others would mix two ensembles. Records them on
        the first run."""
        path, now = os.path.join(root, MEMBERS_SETTINGS_FILE), self.member_settings()
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    record = json.load(f)
                saved = {name: ({"member_heads": []} | record)[name] for name in now}  # recorded before member_heads: none
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(f"{path} is unreadable: delete {root} to train the ensemble again.") from None
            if saved != now:
                raise CheckpointError(f"The ensemble's members in {root} were trained with "
                                      + " ".join(f"rm.{n}={show(v)}" for n, v in saved.items())
                                      + ": resume with those settings, or delete that directory to train them again.")
            return
        if ctx.out.main:
            os.makedirs(root, exist_ok=True)
            atomic_write_text(path, json.dumps(now))

    def ensemble(self, ctx: StageContext, base: str, train: list[Comparison], test: list[Comparison]) -> None:
        """Train the members one at a time, each written when done (a resumed run takes the
        finished ones as they are), then assemble the product and report each member's
        held-out accuracy and the ensemble's (of the members' mean score)."""
        K, root = self.cfg.ensemble_size, os.path.join(ctx.run_dir, "checkpoints", ctx.name)
        self.check_member_settings(ctx, root)
        records, trained = [], []
        for k in range(K):
            done = os.path.join(root, f"member-{k}", "trained")
            if os.path.isdir(done) and verify(done) is None:
                with open(os.path.join(done, MEMBER_FILE)) as f:
                    record = json.load(f)
                ctx.out.say(f"[{ctx.name}] member {k} already trained in {done}: taking it")
            else:
                rm, metrics, steps, heldout = self.train_member(ctx, base, train, test, k)
                record = {"steps": steps, "accuracy": metrics["rm/accuracy"], "bias": metrics.get("rm/bias", 0.0),
                          "heldout_scores": heldout.tolist()}
                ctx.write(Member(rm, record), done)
                del rm
            ctx.out.log(f"{ctx.name}/member-{k}", record["steps"],
                        {"rm/accuracy": record["accuracy"], "rm/bias": record["bias"]})
            records.append(record)
            trained.append(done)
        heldout = torch.tensor([r["heldout_scores"] for r in records])  # (K, completions)
        accuracy = accuracy_of(heldout.mean(0), test) if test else float("nan")
        # how much the members disagree on held-out completions, against how much the
        # completions differ: members that all score alike make an ensemble of one
        spread = float(heldout.std(0, unbiased=False).mean()) if test else float("nan")
        scale = float(heldout.mean(0).std()) if test else float("nan")
        metrics = {"rm/accuracy": accuracy, "rm/ensemble_size": float(K),
                   "rm/member_accuracy_mean": sum(r["accuracy"] for r in records) / K,
                   "rm/heldout_disagreement": spread, "rm/heldout_score_std": scale}
        for k, r in enumerate(records):
            metrics[f"rm/member/{k}/accuracy"] = r["accuracy"]
            metrics[f"rm/member/{k}/bias"] = r["bias"]
        ctx.out.log(ctx.name, records[0]["steps"], metrics)
        info = {**self.member_settings(), "accuracy": accuracy, "heldout_disagreement": spread,
                "heldout_score_std": scale,
                "member_accuracy": [r["accuracy"] for r in records], "member_bias": [r["bias"] for r in records]}
        ctx.save(EnsembleProduct(trained, info))
        if ctx.out.main:  # the product holds them now (hard links: no copy was made)
            with contextlib.suppress(OSError):
                os.remove(os.path.join(root, MEMBERS_SETTINGS_FILE))
            for done in trained:
                shutil.rmtree(done, ignore_errors=True)
                with contextlib.suppress(OSError):  # and the member's directory, unless it holds checkpoints
                    os.rmdir(os.path.dirname(done))

    # The losses over this rank's share of a batch, normalised so that the average over
    # ranks is the loss over the whole batch.

    def kwise(self, ctx: StageContext, model: Any, batch: list[Comparison]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [c.prompt for c in batch for _ in c.responses]
        e = encode_pairs(self.tok, prompts, [r for c in batch for r in c.responses], ctx.device, max_length=self.context)
        rewards = score(model, e.input_ids, e.attention_mask, e.loss_mask)  # (sum K,) each completion once
        win, lose, group = comparison_pairs([c.scores for c in batch])
        denom = dp_denominator(float(len(set(group.tolist()))), ctx.backend.all_reduce_sum, ctx.backend.world_size)
        return kwise_loss(rewards, win, lose, group, len(batch), denom=denom)  # InstructGPT eq. 1

    def pairwise(self, ctx: StageContext, model: Any, batch: list[tuple[str, str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        prompts = [p for p, _, _ in batch] * 2
        e = encode_pairs(self.tok, prompts, [c for _, c, _ in batch] + [r for _, _, r in batch], ctx.device,
                         max_length=self.context)
        rewards = score(model, e.input_ids, e.attention_mask, e.loss_mask)  # (2B,) chosen then rejected
        denom = dp_denominator(float(len(batch)), ctx.backend.all_reduce_sum, ctx.backend.world_size)
        return pairwise_loss(rewards[: len(batch)], rewards[len(batch) :], denom=denom)

    @torch.no_grad()
    def scores(self, ctx: StageContext, rm: RewardModel, prompts: Sequence[str], responses: Sequence[str]) -> torch.Tensor:
        out, bs = [], ctx.eval.batch_size
        for i in range(0, len(prompts), bs):
            e = encode_pairs(self.tok, prompts[i : i + bs], responses[i : i + bs], ctx.device, max_length=self.context)
            with ctx.backend.autocast():
                out.append(score(rm, e.input_ids, e.attention_mask, e.loss_mask).float())
        return torch.cat(out)


@hookimpl
def rlhfkit_register_stages(register):
    register("rm", RM, RMConfig)
