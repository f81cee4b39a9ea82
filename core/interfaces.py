"""What each kind of component must implement: typed Protocols.

Plugins return these from the factories they register (see :mod:`rlhfkit.hookspecs`). The
pipeline and the stages only ever talk to components through these Protocols.

A Protocol's ``OPTIONAL`` members may be left out: the Protocol's own definition of each is
its default behaviour, and :func:`optional` reads a member through it. A plugin class may
also subclass the Protocol to inherit those defaults.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional, Protocol, Sequence, runtime_checkable

import torch

from rlhfkit.settings import bounded

if TYPE_CHECKING:
    from rlhfkit.context import StageContext
    from rlhfkit.rlhf.sampling import Rollout


def optional(component: Any, protocol: type, name: str) -> Any:
    """``component``'s optional member ``name``, as declared in ``protocol.OPTIONAL``; the
    protocol's default (a method bound to ``component``, or a value) when it has none."""
    if name not in protocol.OPTIONAL:
        raise AttributeError(f"{name!r} is not an optional member of {protocol.__name__}: declare it in OPTIONAL.")
    try:
        return getattr(component, name)
    except AttributeError:
        default = protocol.__dict__[name]
        return default.__get__(component) if callable(default) else default

# --- data ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """A demonstration for SFT: the labeller's (or a human's) response to a prompt."""

    prompt: str
    response: str
    source: str = field(default="", compare=False)
    """Where the record came from (``file:line``), for error messages."""


@dataclass(frozen=True)
class Comparison:
    """K ranked completions of one prompt (InstructGPT collects K = 4..9).

    ``scores`` are higher-is-better; equal scores are ties and give no training pair.
    """

    prompt: str
    responses: tuple[str, ...]
    scores: tuple[float, ...]
    source: str = field(default="", compare=False)
    """Where the record came from (``file:line``), for error messages."""


@dataclass(frozen=True)
class Check:
    """What a prompt's response is checked against by a verifiable reward
    (``reward=python_exec``): a reference ``answer`` and/or ``tests``, Python statements
    (usually asserts) run after the response, as code-RL datasets ship them."""

    answer: str | None = None
    tests: tuple[str, ...] = ()


DATA_PARTS = ("demonstrations", "comparisons", "prompts")
"""What a dataset may hold: SFT demonstrations, ranked comparisons, RL/evaluation prompts."""

# sample(prompts, n) -> for each prompt, n completions of the current (SFT) policy
Sampler = Callable[[Sequence[str], int], list[list[str]]]


@runtime_checkable
class Labeller(Protocol):
    """Gold scores for (prompt, response) pairs: stands in for the human labellers."""

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]: ...


@runtime_checkable
class Dataset(Protocol):
    """Data for all three stages. ``split`` is ``"train"`` or ``"test"``."""

    labeller: Labeller | None

    def vocabulary(self) -> list[str] | None:
        """Symbols for a tokenizer built from scratch (None: use the model's own)."""

    def sft_examples(self, split: str) -> list[Example]: ...

    def comparisons(self, split: str, sample: Sampler) -> list[Comparison]:
        """Ranked completions for the reward model. A task suite samples them from the
        SFT policy with ``sample`` and ranks them with its labeller; a file dataset reads
        them and ignores ``sample``."""

    def prompts(self, split: str) -> list[str]:
        """Prompts for RL (``train``) and evaluation (``test``)."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"bind_tokenizer", "skipped", "sources", "provides", "checks"})

    def bind_tokenizer(self, tokenizer: Any) -> None:
        """Called with the policy's tokenizer before a stage reads data (to render chat
        templates). Default: nothing."""

    skipped: Mapping[str, int] = MappingProxyType({})
    """Bad records skipped so far, by reason (``bad_data=skip``). Default: none."""
    sources: Mapping[str, str] = MappingProxyType({})
    """prompt -> where it came from (``file:line``), for messages. Default: none."""
    def checks(self, prompt: str) -> Check | None:
        """The check data of a prompt (reference answer, tests), for verifiable rewards.
        Default: None (the dataset has none)."""
        return None

    provides: frozenset[str] = frozenset(DATA_PARTS)
    """Which of :data:`DATA_PARTS` this dataset has, so that a stage list needing what it
    lacks (``stages=[sft,dpo]`` without comparisons) fails before any work. Default: all."""


# --- models ----------------------------------------------------------------------------


@runtime_checkable
class Policy(Protocol):
    """A causal LM and its tokenizer. ``model(input_ids, attention_mask=, position_ids=)``
    returns an object with ``.logits`` of shape (B, T, V)."""

    model: torch.nn.Module
    tokenizer: Any

    def save(self, path: str) -> None:
        """Write a Hugging Face directory (model + tokenizer, safetensors) at ``path``."""


@runtime_checkable
class PolicyLoader(Protocol):
    def build(self, dataset: Dataset) -> Policy:
        """The policy SFT starts from: a pretrained model, or one built from config."""

    def load(self, path: str) -> Policy:
        """A policy saved by a previous stage."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"adapt", "shared_reference"})

    def adapt(self, policy: Policy) -> Policy:
        """Make a loaded policy trainable the configured way (a fresh LoRA adapter).
        Default: the policy as it is."""
        return policy

    def shared_reference(self, policy: Policy) -> Policy | None:
        """The frozen reference as a view of ``policy`` (under LoRA: the adapter disabled),
        or None for a separate copy loaded from the SFT product. Default: None."""
        return None


@runtime_checkable
class RewardHead(Protocol):
    """Maps backbone hidden states to rewards. A ``torch.nn.Module``."""

    def token_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, H) -> (B, T): a score at every position (the critic uses these)."""

    def pool(self, token_scores: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T), (B, T) -> (B,): one reward per sequence."""

    # A head with ``reads_tokens = True`` gets ``token_scores(hidden, input_ids)`` and pools
    # over the response's positions; one with ``bind(lm_head_weight)`` is given the
    # language model's head when built (``reward_head=logprob``).


# hidden_size -> a fresh head module
HeadBuilder = Callable[[int], torch.nn.Module]


@runtime_checkable
class RewardModel(Protocol):
    """Scores whole sequences: ``forward(input_ids, attention_mask) -> (B,)``.

    Also a ``torch.nn.Module``. Rewards are shifted by ``bias`` so that the SFT
    demonstrations score mean 0.
    """

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, per_token: bool = False) -> torch.Tensor:
        """(B,) rewards; with ``per_token``, the (B, T) scores of :meth:`token_values`
        minus ``bias``: a critic's values on the rewards' scale. A ``forward`` may also
        take ``response_mask`` (B, T), the response's positions, which callers then pass
        (:func:`rlhfkit.rlhf.retokenize.score`)."""

    def token_values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) per-position scores: used when the model serves as a critic."""

    def set_bias(self, bias: float) -> None: ...

    def save(self, path: str) -> None: ...

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"tokenizer", "backbone", "set_scale"})

    def set_scale(self, gain: float) -> None:
        """Multiply rewards (and values) by ``gain`` after the bias (``rm.scale``). Default:
        a reward model that cannot be scaled keeps its own scale."""

    tokenizer: Any = None
    """The reward model's own tokenizer, when it reads text another way than the policy
    (it is then fed re-tokenized text). Default: None (the policy's)."""
    backbone: torch.nn.Module | None = None
    """The transformer under the head (for its context length and gradient checkpointing).
    Default: None (the reward model itself)."""


@runtime_checkable
class RewardModelLoader(Protocol):
    def build(self, backbone_path: str, head: HeadBuilder) -> RewardModel:
        """A fresh reward model: the backbone at ``backbone_path`` plus a new head."""

    def load(self, path: str, head: HeadBuilder) -> RewardModel:
        """A reward model saved by :meth:`RewardModel.save`."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"adapt", "base_model", "pretrained_path"})

    def adapt(self, rm: RewardModel) -> RewardModel:
        """Make a loaded reward model trainable the configured way (a LoRA adapter; PPO's
        critic). Default: as it is."""
        return rm

    base_model: str | None = None
    """What the RM stage builds on instead of the SFT product. Default: None (the SFT one)."""
    pretrained_path: str | None = None
    """A trained reward model that stands for the ``rm`` product when no stage of the run
    makes one. Default: None."""


# --- execution -----------------------------------------------------------------------


@runtime_checkable
class Engine(Protocol):
    """A model being trained, as prepared by a backend (DDP- or ZeRO-wrapped, say)."""

    module: torch.nn.Module  # the unwrapped model
    skipped_steps: int
    """Optimizer steps skipped because the loss or the gradient norm was not finite."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def backward(self, loss: torch.Tensor, boundary: bool = True) -> None:
        """Accumulate ``loss``'s gradients. When several micro-batches make up one
        optimizer step, pass ``boundary=False`` for all but the last."""

    def step(self) -> float:
        """Clip gradients, step the optimizer and scheduler, zero the gradients; return
        the gradient norm before clipping. If the loss or the gradient norm is not finite
        (on any rank), skip the update instead and count it in ``skipped_steps``."""

    def scale_lr(self, factor: float) -> None:
        """Multiply the learning rate by ``factor``, now and for the rest of the schedule
        (the divergence guard's rollback)."""

    def state_dict(self) -> dict[str, Any]:
        """Optimizer and scheduler state (the weights are saved as a model)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def save_state(self, path: str) -> None:
        """Write the resumable training state (weights, optimizer, scheduler; sharded
        where the backend shards it) under the directory ``path``, as safetensors or as
        tensors that ``torch.load(weights_only=True)`` reads. Called on every rank."""

    def load_state(self, path: str) -> None:
        """Restore what :meth:`save_state` wrote, in place, never unpickling code."""


@runtime_checkable
class Backend(Protocol):
    device: torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...

    def prepare(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
        max_grad_norm: float | None = None,
        batch_size: int | None = None,
    ) -> Engine:
        """Wrap a model for training. ``batch_size`` is the global batch of one optimizer
        step (backends that need it, like DeepSpeed, derive their batch settings)."""

    def prepare_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """An inference-only model (reference policy, reward model): no grads, eval mode."""

    def autocast(self) -> AbstractContextManager[Any]: ...

    def barrier(self) -> None: ...

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor: ...

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor: ...

    def shard(self, items: Sequence[Any]) -> list[Any]:
        """This rank's contiguous share of a global batch (rank r of w gets items
        [r*n//w, (r+1)*n//w))."""

    def gather_objects(self, items: list[Any]) -> list[Any]:
        """Every rank's ``items``, concatenated in rank order, on every rank."""

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is true on any rank."""

    def gathered(self, module: torch.nn.Module) -> AbstractContextManager[Any]:
        """A context in which ``module``'s full parameters are readable (ZeRO-3 gathers
        its shards; elsewhere a no-op). Enter it on every rank."""


class Logger(Protocol):
    """Any subset of the lifecycle hooks in :mod:`rlhfkit.hookspecs`, as methods marked
    with ``@rlhfkit.hookimpl``."""


# --- RL --------------------------------------------------------------------------------


@dataclass
class RolloutConfig:
    """How responses are sampled. The same temperature is used for the logprobs."""

    max_new_tokens: int = bounded(16, ge=1)
    """Longest response; a response that reaches it without EOS is penalised."""
    temperature: float = bounded(1.0, gt=0)
    """Sampling temperature (> 0); the logprobs are computed at the same temperature."""
    top_k: int = bounded(0, ge=0)
    """Sample from the k most likely tokens (0: off)."""
    top_p: float = bounded(1.0, gt=0, le=1)
    """Nucleus sampling mass (1.0: off)."""


@dataclass
class ScoringConfig:
    """How the inference passes (reference logprobs, values, rewards) and the training
    passes are batched. Rows are sorted by length and cut into micro-batches, and each
    micro-batch is trimmed to its own longest row: short responses pay no padding."""

    score_micro_batch_size: int = bounded(0, ge=0)
    """Rows per inference micro-batch (0: the whole rollout in one pass)."""
    train_micro_batch_size: int = bounded(0, ge=0)
    """Rows per training micro-batch; gradients accumulate over a minibatch's
    micro-batches before one optimizer step (0: the whole minibatch at once)."""
    recompute_logprobs: Optional[bool] = None
    """Recompute the policy's logprobs with a training-style forward pass instead of using
    the sampling pass's (costs a forward pass; first PPO ratio exactly 1). null: recompute
    under reduced precision (bf16/fp16 autocast or weights), where the sampler's decode
    kernels round differently from a training pass, and not in fp32 (see docs/precision.md)."""
    logprob_gap_rows: int = bounded(4, ge=0)
    """Rows per rollout whose sampler logprobs are checked against a training-style pass,
    logged as ``rollout/logprob_gap_max`` and ``_mean`` (0: off; every row, at no cost,
    when the logprobs are recomputed anyway)."""


@runtime_checkable
class Generator(Protocol):
    """A rollout engine (group ``generator``): samples one response per prompt."""

    def __call__(
        self, model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], cfg: RolloutConfig, device: torch.device, *,
        greedy: bool = False, uniforms: torch.Tensor | None = None, any_alive: Callable[[bool], bool] | None = None,
    ) -> Any:
        """A :class:`rlhfkit.rlhf.sampling.Rollout`: left-padded prompts, then responses
        right-padded after EOS, with the sampled tokens' logprobs at ``cfg.temperature``
        (before top-k/top-p) from the same forward pass, its LM head in fp32 (see
        :func:`rlhfkit.rlhf.logprobs.fp32_lm_head`). ``uniforms`` (B, max_new_tokens)
        are the global RNG's draws for these rows, for world-size-invariant engines;
        ``any_alive`` keeps sharded (ZeRO-3) ranks decoding in step."""


@dataclass
class StepResult:
    """What one optimizer step (or RL iteration) reports to the training loop."""

    metrics: dict[str, float]
    """This rank's metrics under stable names (``loss/policy``); the loop averages them over ranks."""
    kl: float | None = None
    """The KL to the reference, nats per response, the same on every rank: the divergence
    guard's ``guard.kl_bound`` checks it. None: the step has no KL."""


@runtime_checkable
class RewardSource(Protocol):
    """What scores RL rollouts (group ``reward``): the trained reward model
    (``reward=model``), a programmatic function, a verifier, an ensemble, a remote scorer."""

    needs: tuple[str, ...]
    """Stage products it reads (``("rm",)``): the stage list must make them or take them
    from ``from_run``, which the run checks before any work."""

    def setup(self, ctx: StageContext, tokenizer: Any) -> None:
        """Called once by the stage that uses it, before scoring, with the policy's
        tokenizer (the rollouts' token ids are in its vocabulary)."""

    def __call__(self, rollout: Rollout) -> torch.Tensor:
        """(B,) float rewards for the rollout's rows (on the rollout's device). The rows
        hold token ids (``input_ids``, ``attention_mask``) and their text (``prompts``,
        ``responses``)."""

    OPTIONAL: ClassVar[frozenset[str]] = frozenset({"critic_init", "metrics", "check_data"})
    critic_init: str | None = None
    """A reward model (a directory) whose weights a value model may start from, as
    InstructGPT's does; None: a fresh value head on the SFT policy. Default: None."""

    def metrics(self) -> dict[str, float]:
        """What the source measured since the last call (a verifier's failures by reason,
        an ensemble's disagreement), logged with the RL step's metrics under these names
        (``reward/...``). The same keys on every call and every rank: they are averaged
        over ranks. Default: none."""
        return {}

    def check_data(self, data: Dataset) -> None:
        """Called by the run with its dataset before any work: raise a
        :class:`rlhfkit.errors.ConfigError` naming the fix if the source cannot score with
        it (``reward=labeller`` on a dataset with no labeller). Default: nothing."""


@dataclass
class RLContext:
    """Everything an RL algorithm gets from the ``rl`` stage."""

    policy: Policy
    """The policy being trained (initialised from SFT)."""
    reference: Policy
    """The frozen SFT policy, for the KL penalty."""
    reward: RewardSource
    """Scores rollouts (``reward=model``: the frozen, normalised reward model)."""
    backend: Backend
    rollout: RolloutConfig
    make_critic: Callable[..., RewardModel]
    """``make_critic(from_reward_model=True)``: a trainable value model. A copy of the
    reward model where there is one that reads the policy's tokens (InstructGPT initialises
    the value model from the RM); else, or with ``from_reward_model=False``, a fresh value
    head (``reward_head=...``) on the SFT policy. Critic-free algorithms never call it."""
    demonstrations: Callable[[], list[Example]]
    """The SFT demonstrations that fit the policy's context whole (PPO-ptx mixes them in)."""
    seed: int = 0
    """The run's seed, for an algorithm's own data streams."""
    generate: Generator | None = None
    """The rollout engine (``generator=...``); None: the built-in KV-cache sampler."""
    scoring: ScoringConfig = field(default_factory=lambda: ScoringConfig())
    """Micro-batching of the scoring and training passes."""
    more_prompts: Callable[[], list[str]] | None = None
    """The next batch of training prompts (as many as a step gets) from the stage's own
    seeded stream, which is checkpointed with the run: for algorithms that draw extra
    prompts within a step (DAPO's dynamic sampling). Every rank gets the same prompts, so
    every rank must call it equally often. None: no extra prompts."""


@runtime_checkable
class PreferenceOptimizer(Protocol):
    """An RL algorithm (group ``algorithm``). The ``rl`` stage calls ``setup`` once, then
    ``step`` once per iteration with a batch of prompts."""

    def setup(self, ctx: RLContext) -> None: ...

    def step(self, prompts: Sequence[str]) -> StepResult:
        """One iteration (for PPO: rollout, scoring, update epochs): its metrics, and the
        rollout's KL for the divergence guard."""

    def state_dict(self) -> dict[str, Any]:
        """The algorithm's own resumable state (KL controller, data positions, private
        RNGs): tensors, numbers, strings and containers of them. The engines it prepared
        through ``ctx.backend.prepare`` (weights, optimizers, schedulers) are checkpointed
        by the training loop, as are the global RNGs."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# --- stages ------------------------------------------------------------------------------


PRODUCTS = ("policy", "reward_model")
"""What a stage may write to ``<run_dir>/<its name>/``."""


@runtime_checkable
class Stage(Protocol):
    """A step of the pipeline (group ``stage``), picked by name in ``stages=[...]``. It
    reads the products of earlier stages (or of ``from_run``), trains through the shared
    loop (:meth:`StageContext.train`), and writes its own product (:meth:`StageContext.save`)."""

    needs: tuple[str, ...]
    """Products of other stages it reads, by stage name (``("sft",)``)."""
    data: tuple[str, ...]
    """Parts of the dataset it reads (of :data:`DATA_PARTS`)."""
    produces: str
    """What it writes to ``<run_dir>/<name>/`` (one of :data:`PRODUCTS`). Every policy a
    run trains is evaluated against the SFT policy at the end."""
    uses_reward: bool
    """Whether it scores with the run's reward source (group ``reward``); the source's
    own ``needs`` then count as the stage's."""

    def run(self, ctx: StageContext) -> None:
        """Train, and save the product. Called once per run (not at all when resuming a
        run whose product of this stage is complete)."""
