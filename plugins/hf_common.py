"""Hugging Face model plumbing shared by the policy and reward-model plugins: loading by
hub name (from the local cache under ``HF_HUB_OFFLINE=1``) or path in a dtype, LoRA/QLoRA
through PEFT, and saving either the adapter alone or the model with the adapter merged in.
Not a plugin itself.

An adapter-only checkpoint is an ordinary PEFT directory (``adapter_config.json`` and
``adapter_model.safetensors``). Its ``base_model_name_or_path`` is a hub name, or a path
relative to the adapter directory (``../sft``, or ``base_model`` when the base was built
from config and is saved alongside). Loading one loads its base (recursively: an RL adapter
on an SFT adapter on a hub model) and merges the adapter in.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch

from rlhfkit.errors import CheckpointError, ConfigError
from rlhfkit.settings import bounded, check_values, one_of

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ADAPTER_CONFIG = "adapter_config.json"
BASE_DIR = "base_model"


@dataclass
class LoraSettings:
    """LoRA (Hu et al. 2021) through PEFT. Off by default."""

    enabled: bool = False
    r: int = bounded(16, ge=1)
    """Rank of the update."""
    alpha: int = bounded(32, gt=0)
    """Scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = bounded(0.0, ge=0, lt=1)
    """Dropout on the adapter's input (RL turns every dropout off)."""
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    """Module names to adapt; all-linear: every linear layer but the output head."""
    quantize: str = one_of("none", "4bit", "8bit")
    """QLoRA: load the frozen base in 4bit (NF4) or 8bit with bitsandbytes (CUDA only)."""
    save: str = one_of("merged", "adapter")
    """merged: save the model with the adapter merged in (an ordinary checkpoint);
    adapter: save the adapter alone (a PEFT directory that names its base)."""

    def check(self, owner: str) -> None:
        check_values(self, f"{owner}.lora", None)  # the declared choices, also through the Python API
        if self.quantize != "none" and not self.enabled:
            raise ConfigError(f"{owner}.lora.quantize={self.quantize} quantizes the frozen base for QLoRA: "
                              f"set {owner}.lora.enabled=true too.")


def check_settings(owner: str, dtype: str, lora: LoraSettings) -> None:
    """Fail early on a bad ``<owner>.dtype`` or ``<owner>.lora`` setting."""
    if dtype not in DTYPES:
        raise ConfigError(f"{owner}.dtype={dtype!r}: choose one of {sorted(DTYPES)}.")
    lora.check(owner)


def has_tokenizer(path: str) -> bool:
    """A hub name (it may have one), or a directory with a saved tokenizer."""
    return not os.path.isdir(path) or os.path.isfile(os.path.join(path, "tokenizer_config.json"))


def load_tokenizer(path: str, trust_remote_code: bool) -> Any:
    """``AutoTokenizer.from_pretrained(path)``, with EOS as padding if it has none."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"Could not load the tokenizer of {path!r}: {exc}") from exc
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def quantization_config(lora: LoraSettings, dtype: torch.dtype) -> Any:
    """The bitsandbytes config QLoRA loads the base with (None without quantization)."""
    if not lora.enabled or lora.quantize == "none":
        return None
    if not torch.cuda.is_available():
        raise ConfigError(f"lora.quantize={lora.quantize} (QLoRA) needs a CUDA GPU and bitsandbytes; "
                          "on CPU use lora.quantize=none.")
    from transformers import BitsAndBytesConfig

    if lora.quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16)
    return BitsAndBytesConfig(load_in_8bit=True)


def is_adapter_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG))


def resolve_base(adapter_dir: str, base: str) -> str:
    """An adapter's base: a path relative to the adapter directory if one exists there,
    otherwise the name as written (an absolute path or a hub name)."""
    local = os.path.normpath(os.path.join(adapter_dir, base))
    return local if not os.path.isabs(base) and os.path.isdir(local) else base


_TASK_CLASSES = {"CAUSAL_LM": "AutoModelForCausalLM", "FEATURE_EXTRACTION": "AutoModel", "SEQ_CLS": "AutoModelForSequenceClassification"}


def without_dropout(config: Any) -> Any:
    """Zero every dropout probability of a transformers config (and of its sub-configs),
    before a model is built from it. OPT, Llama/Qwen2 and GPT-NeoX read some of these
    into plain floats rather than ``nn.Dropout`` modules, out of reach of
    :func:`rlhfkit.rlhf.dropout.disable_dropout`."""
    from transformers import PretrainedConfig

    for name, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            without_dropout(value)
        elif isinstance(value, float) and any(word in name for word in ("dropout", "pdrop", "layerdrop")):
            setattr(config, name, 0.0)
    return config


def load_model(path: str, auto_class: str, dtype: str, trust_remote_code: bool, quantization: Any = None,
               dropout: bool = False, **kwargs: Any) -> Any:
    """``transformers.<auto_class>.from_pretrained(path)`` in ``dtype``; an adapter-only
    directory loads its base and merges the adapter in. ``auto_class="AutoModel"`` of a
    causal-LM adapter returns the merged model's backbone. Built with every dropout
    probability zeroed (RL needs identical forward passes) unless ``dropout``."""
    import transformers

    if not os.path.isdir(path):
        check_hub_name(path)
    kw = dict(dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    if quantization is not None:
        kw["quantization_config"] = quantization
    if os.path.isdir(path) and is_adapter_dir(path):
        _need_peft(f"{path} is a LoRA adapter directory; loading it")
        from peft import PeftModel

        with open(os.path.join(path, ADAPTER_CONFIG)) as f:
            adapter = json.load(f)
        task = adapter.get("task_type") or "CAUSAL_LM"
        base_class = _TASK_CLASSES.get(task)
        if base_class is None:
            raise CheckpointError(f"{path}: adapter task_type {task!r} is not one rlhfkit loads ({sorted(_TASK_CLASSES)}).")
        base = resolve_base(path, adapter.get("base_model_name_or_path") or "")
        model = load_model(base, base_class, dtype, trust_remote_code, quantization, dropout, **kwargs)
        with refusing_pickles(path):
            model = PeftModel.from_pretrained(model, path).merge_and_unload()
        if auto_class == "AutoModel" and base_class != "AutoModel":
            model = model.base_model  # the backbone of a causal LM (or classifier)
        elif auto_class != base_class and auto_class != "AutoModel":
            raise CheckpointError(f"{path} is a {task} adapter; it cannot be loaded as {auto_class}.")
        return model
    try:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **kwargs)
        with refusing_pickles(path):
            return getattr(transformers, auto_class).from_pretrained(path, config=config if dropout else without_dropout(config), **kw)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"Could not load {auto_class} from {path!r}: {exc}") from exc


@contextlib.contextmanager
def refusing_pickles(path: str) -> Iterator[None]:
    """transformers and PEFT read ``.bin`` weights with ``torch.load(weights_only=True)``: a
    file that holds Python objects (a pickle that could run code) is a bad checkpoint."""
    import pickle

    try:
        yield
    except pickle.UnpicklingError as exc:
        lines = [x for x in str(exc).splitlines() if "GLOBAL" in x] or str(exc).splitlines()[:1]
        raise CheckpointError(
            f"{path}: its .bin weights hold more than tensors, so rlhfkit will not load them (loading them could "
            f"run arbitrary code): {lines[0].strip()} Use a safetensors copy of the model, converted where you trust its source."
        ) from None


def is_hub_name(name: str) -> bool:
    """``name`` or ``org/name`` as the hub spells a model, not a path (``./x``, ``/x``, ``~/x``, ``a/b/c``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_hub_name(name: str) -> None:
    """A model that is not a local directory is a hub name, found in the Hugging Face cache
    when offline (``HF_HUB_OFFLINE=1``); anything else is a clear error before loading."""
    if not is_hub_name(name):
        raise CheckpointError(f"No model directory at {name!r}. Check the path, or use a hub name (org/name).")
    from huggingface_hub import constants, try_to_load_from_cache

    if not constants.HF_HUB_OFFLINE:
        return  # from_pretrained finds it in the cache or downloads it
    if not any(isinstance(try_to_load_from_cache(name, f), str) for f in ("config.json", ADAPTER_CONFIG)):
        raise CheckpointError(
            f"{name!r} is neither a local directory nor a model in the Hugging Face cache ({constants.HF_HUB_CACHE}), "
            f"and HF_HUB_OFFLINE=1 forbids downloading it. Download it where there is network access "
            f"(hf download {name}, with HF_HOME pointing at the same cache), or give the path of a local copy."
        )


def apply_lora(model: Any, lora: LoraSettings, task_type: str) -> Any:
    """Wrap ``model`` with a fresh LoRA adapter (trainable), the base frozen."""
    _need_peft("lora.enabled=true")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if lora.quantize != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets: Any = lora.target_modules
    if list(targets) == ["all-linear"]:
        targets = "all-linear"
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets,
                        task_type=task_type, bias="none")
    return get_peft_model(model, config)


def _need_peft(what: str) -> None:
    import importlib.util

    if importlib.util.find_spec("peft") is None:
        raise ConfigError(f"{what} needs PEFT: pip install 'rlhfkit[peft]'.") from None


def is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def merged_state_dict(peft_model: Any) -> dict[str, torch.Tensor]:
    """The base model's state dict with the adapter merged in, under the base model's own
    key names, without copying the model: merge, read, unmerge."""
    peft_model.merge_adapter()
    try:
        return _clean(peft_model.get_base_model().state_dict(), merged=True)
    finally:
        peft_model.unmerge_adapter()


def _clean(state: dict[str, torch.Tensor], merged: bool) -> dict[str, torch.Tensor]:
    """PEFT's key names back to the base model's: drop the LoRA factors, unwrap
    ``base_layer``, and of a fully trained module (``modules_to_save``, like a classifier's
    score head) keep the trained copy when merged, the original otherwise."""
    keep, drop = (".modules_to_save.default.", ".original_module.") if merged else (".original_module.", ".modules_to_save.")
    out = {}
    for k, v in state.items():
        if "lora_" in k or drop in k:
            continue
        out[k.replace(".base_layer.", ".").replace(keep, ".")] = v.detach().clone() if merged else v
    return out


def save_with_tokenizer(model: Any, tokenizer: Any, path: str, lora: LoraSettings, base: Optional[str]) -> None:
    """:func:`save_model`, then the tokenizer (if any) beside it."""
    save_model(model, path, lora, base)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)


def save_model(model: Any, path: str, lora: LoraSettings, base: Optional[str]) -> None:
    """Write ``model`` at ``path``: an ordinary checkpoint, or for a PEFT model with
    ``lora.save=adapter`` the adapter alone, naming ``base`` (a path or hub name; None: the
    base was built from config and is saved under ``path/base_model``)."""
    if not is_peft(model):
        model.save_pretrained(path, safe_serialization=True)
        return
    base_model = model.get_base_model()
    if lora.save == "merged":
        base_model.save_pretrained(path, state_dict=merged_state_dict(model), safe_serialization=True)
        return
    model.save_pretrained(path, safe_serialization=True)
    if base is None:  # nothing on disk to name: save the (unadapted) base beside the adapter
        base_model.save_pretrained(os.path.join(path, BASE_DIR), state_dict=_clean(base_model.state_dict(), merged=False),
                                   safe_serialization=True)
        ref = BASE_DIR
    elif os.path.isdir(base):
        ref = os.path.relpath(os.path.abspath(base), os.path.abspath(path))
    else:
        ref = base
    cfg_path = os.path.join(path, ADAPTER_CONFIG)
    with open(cfg_path) as f:
        cfg = json.load(f)
    cfg["base_model_name_or_path"] = ref
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2)


class AdapterDisabled(torch.nn.Module):
    """The frozen reference policy of a LoRA run at no memory cost: the policy's own
    model, called with its adapter disabled. The PEFT model is held, not registered, so
    freezing or moving this module never touches the policy's trainable weights."""

    def __init__(self, peft_model: Any):
        super().__init__()
        self.__dict__["_peft"] = peft_model

    @property
    def config(self) -> Any:
        return self._peft.config

    def get_output_embeddings(self) -> Any:
        return self._peft.get_output_embeddings()

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.no_grad(), self._peft.disable_adapter():
            return self._peft(*args, **kwargs)
