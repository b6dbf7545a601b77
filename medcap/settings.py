"""Every recipe's settings, parsed once from its config into a frozen dataclass: the defaults live
here and nowhere else, a value of the wrong kind is an error naming the key, and the keys a
recipe accepts are its fields (an override no recipe reads, such as ``vision_chekpoint=...``, is
an error naming the closest key: torchtune's ``config.parse`` would add it to the config and
every recipe would silently ignore it).

``RecipeSettings`` (device, dtype, seed) <- ``ModelSettings`` (the LLM's components and the
vision side) <- ``TrainSettings``, ``GenerateSettings`` (<- ``serving.settings.ServeSettings``);
``probing.ProbeSettings`` is a ``RecipeSettings`` too. torchtune components (``model``,
``tokenizer``, ``checkpointer``, ``dataset``, ``optimizer``, ...) stay config nodes, instantiated
where they are used.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Annotated, Any, TypeVar

import torch

from medcap.errors import ConfigError, MedcapError

if typing.TYPE_CHECKING:
    from medcap.models.lora import LoraSpec

log = logging.getLogger("medcap")
S = TypeVar("S", bound="RecipeSettings")
# a torchtune config node (``_component_`` plus arguments), kept as the config's node and
# instantiated where it is used; other settings become plain Python values
Component = Annotated[Any, "component"]

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}
ENGINES = ("medcap", "vllm")  # GenerateSettings.engine
REFUSED_DTYPES = {
    "fp16": "fp16 overflows in the frozen LLM's activations without loss scaling; use bf16 (or fp32)",
    "float16": "fp16 overflows in the frozen LLM's activations without loss scaling; use bf16 (or fp32)",
}
# Keys of torchtune's own recipe configs and of the original medcap's: accepted, not used.
ACCEPTED_UNUSED = {
    "loss", "log_peak_memory_stats", "profiler", "enable_activation_offloading", "memory_efficient_fsdp_wrap",
    "fsdp_cpu_offload", "custom_sharded_layers", "instruct_template", "chat_format", "enable_kv_cache", "quantizer",
    "trainonly",
}  # fmt: skip


def parse_dtype(name: Any) -> torch.dtype:
    """The one reading of a ``dtype`` setting (``bf16`` / ``fp32``)."""
    key = str(name).lower()
    if key in REFUSED_DTYPES:
        raise ConfigError(f"dtype={name}: {REFUSED_DTYPES[key]}")
    if key not in DTYPES:
        raise ConfigError(f"dtype={name}: expected bf16 or fp32")
    return DTYPES[key]


class UnknownConfigKeyError(MedcapError, ValueError):
    """A top-level config key that the recipe does not read."""


def check_keys(cfg: Mapping, known: Iterable[str], recipe: str) -> None:
    known = set(known)
    unknown = [k for k in cfg if k not in known and k not in ACCEPTED_UNUSED]
    if unknown:
        lines = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
            lines.append(f"{key}" + (f" (did you mean {close[0]}?)" if close else ""))
        raise UnknownConfigKeyError(
            f"the {recipe} recipe reads no config key named " + ", ".join(lines)
            + f"; its keys are: {', '.join(sorted(known))}"
        )
    ignored = sorted(k for k in cfg if k in ACCEPTED_UNUSED)
    if ignored:
        log.warning("%s: ignoring %s (torchtune / original medcap keys that medcap does not use)", recipe, ignored)


def _plain(value: Any) -> Any:
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """``value`` as the field's type (command-line text included), or a ConfigError naming ``key``."""
    if hint is Any or value is None and _optional(hint):
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{key}={value!r}: expected {_describe(hint)}")
    if origin is tuple:
        items = _plain(value)
        if not isinstance(items, (list, tuple)):
            items = [items]
        return tuple(_coerce(key, v, args[0]) for v in items)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in ("true", "1", "yes"):
                return True
            if text in ("false", "0", "no"):
                return False
            raise ValueError
        if hint is int:
            if isinstance(value, bool) or isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if hint is str:
            if isinstance(value, (dict, list)) or hasattr(value, "keys"):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: expected {_describe(hint)}") from None
    return value


def _optional(hint: Any) -> bool:
    return type(None) in typing.get_args(hint)


def _describe(hint: Any) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "text"}
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return " or ".join(names.get(a, getattr(a, "__name__", str(a))) for a in args)


@dataclass(frozen=True)
class RecipeSettings:
    """What every recipe reads."""

    device: str = "cuda"
    dtype: str = "bf16"  # the frozen LLM's; trainable weights and optimizer state stay fp32
    seed: int | None = None

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_config(cls: type[S], cfg: Mapping[str, Any], recipe: str | None = None, **known: Any) -> S:
        """The settings of ``cfg``; ``recipe`` checks its keys first (an unknown key is an
        error naming the closest). ``known`` fills fields the caller already has."""
        if recipe is not None:
            check_keys(cfg, cls.keys(), recipe)
        hints = typing.get_type_hints(cls, include_extras=True)
        values = dict(known)
        for f in fields(cls):
            if f.name in values or f.name not in cfg:
                continue
            raw, hint = cfg[f.name], hints[f.name]
            values[f.name] = raw if hint == Component else _coerce(f.name, _plain(raw), hint)
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Errors for values that cannot work, before anything is loaded."""
        parse_dtype(self.dtype)

    def replace(self: S, **changes: Any) -> S:
        return dataclasses.replace(self, **changes)

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(self.dtype)


@dataclass(frozen=True)
class ModelSettings(RecipeSettings):
    """The frozen LLM (torchtune components) and the vision side that learns to talk to it."""

    model: Component = None
    tokenizer: Component = None
    checkpointer: Component = None
    output_dir: str | None = None
    vision: str = "biomedclip"  # an encoder name (see medcap.models.vision)
    vision_path: str | None = None  # an open_clip folder (or hf-hub:) for the encoder
    vision_pretrained: bool = True  # without vision_path / vision_checkpoint: BiomedCLIP's pretrained tower
    vision_checkpoint: Any = None  # a file, a glob (meta_model_*.pt) or a list; None: untrained
    connector: str | None = None  # None: the original's linear connector
    num_image_tokens: int | None = None  # None: read from the checkpoint (the original's 32 by default)
    freeze_vision_encoder: bool = False


@dataclass(frozen=True)
class TrainSettings(ModelSettings):
    """``recipes/full_finetune.py``."""

    dataset: Component = None
    batch_size: int = 1
    epochs: int = 1
    shuffle: bool = True
    # draw training records balanced by a record field (the demo: "modality"; records without it,
    # captions say, are one class): each class's share ~ count ** (1 - balance_power)
    balance_by: str | None = None
    balance_power: float = 1.0
    num_workers: int = 0
    optimizer: Component = None
    # one optimizer per trainable tensor, stepped as soon as its gradient is ready: gradients
    # never all exist at once (needs clip_grad_norm=null and gradient_accumulation_steps=1)
    optimizer_in_bwd: bool = False
    lr_scheduler: Component = None
    clip_grad_norm: float | None = None
    gradient_accumulation_steps: int = 1
    max_steps_per_epoch: int | None = None
    save_every_n_steps: int | None = None
    stop_after_steps: int | None = None
    resume_from_checkpoint: bool = False
    compile: bool = False
    enable_activation_checkpointing: bool = False  # recompute the frozen LLM's layers in backward
    # the leading tokens every row of a batch shares (the system prompt) run once per batch, not once per row:
    # the same loss and gradients (medcap.models.shared_prefix); one process, without compile or checkpointing
    share_prompt_prefix: bool = True
    preflight: bool = True  # on CUDA: refuse before loading when the estimate does not fit (medcap.estimate)
    image_augment: Component = None  # open_clip's AugmentationCfg fields
    verify_frozen_llm: bool = False
    save_initial_checkpoint: bool = False  # initial_vision.pt: the vision side at step 0
    metric_logger: Component = None
    log_every_n_steps: int = 1
    # The usual recipe, for comparison (``make claims``): the LLM adapted with torchtune's LoRA at
    # this rank as well; None (medcap): the LLM stays frozen. Only the adapters and the vision side
    # learn; the adapters are saved in the vision checkpoint (``llm_lora``), the LLM file is untouched.
    llm_lora_rank: int | None = None
    llm_lora_alpha: float = 16.0  # the adapters' output is scaled by alpha / rank
    llm_lora_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "output_proj", "w1", "w2", "w3")

    def check(self) -> None:
        super().check()
        for name in ("batch_size", "epochs", "gradient_accumulation_steps", "log_every_n_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)}: expected at least 1")
        if self.optimizer_in_bwd and (self.clip_grad_norm is not None or self.gradient_accumulation_steps != 1):
            raise ConfigError(
                f"optimizer_in_bwd=True steps each tensor as soon as its gradient exists: it needs clip_grad_norm=null "
                f"(is {self.clip_grad_norm}) and gradient_accumulation_steps=1 (is {self.gradient_accumulation_steps})"
            )
        if not 0 <= self.balance_power <= 1:
            raise ConfigError(f"balance_power={self.balance_power}: expected 0 (natural frequencies) to 1 (equal shares)")
        _ = self.llm_lora  # checks the rank and the module names

    @property
    def llm_lora(self) -> LoraSpec | None:
        """The LoRA spec (``medcap.models.lora.LoraSpec``), or None: the LLM stays frozen."""
        from medcap.models.lora import LoraSpec

        if self.llm_lora_rank is None:
            return None
        return LoraSpec(self.llm_lora_rank, self.llm_lora_alpha, tuple(self.llm_lora_modules))


@dataclass(frozen=True)
class GenerateSettings(ModelSettings):
    """``recipes/generate.py``: evaluation of vision checkpoints, or one image."""

    batch_size: int = 8
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    test_metrics: bool = False  # captions
    test_slake: bool = False
    test_vqarad: bool = False
    dataset_source: str | None = None
    dataset_conversation_style: str | None = None
    dataset_chat_format: str | None = None
    dataset_max_seq_len: int | None = None  # longer prompts are skipped and counted
    vqa_mode: str = "describe_then_answer"
    answer_types: Any = None  # VQA answer types to keep (OPEN / CLOSED); None: all
    question_suffix: str | None = None  # appended to every VQA question, as harnesses do ("\nAnswer ... phrase.")
    eval_split: str | None = None
    eval_vqa: bool = False  # the original's in-process judge
    limit: int | None = None
    image: str | None = None  # answer one image (with prompt)
    prompt: str | None = None
    compile: bool = False
    two_turn_cache: bool = True
    # VQA scoring protocols reported beside medcap's own (medcap, lmms_eval, multimedeval, medevalkit,
    # llava_med; docs/protocols.md): a list or comma-separated names; None: every rule-based one
    protocols: Any = None
    engine: str = "medcap"  # who runs the frozen LLM: medcap (its own decoding) or vllm (a vLLM server at vllm_url)
    vllm_url: str | None = None  # engine=vllm: the server's address, http://HOST:PORT (or its OpenAI base_url, .../v1)
    vllm_model: str | None = None  # engine=vllm: the served model's id, when the server serves several
    vllm_timeout_s: float = 600.0  # engine=vllm: how long one request may take
    preflight: bool = True  # on CUDA: refuse before loading when the estimate does not fit (medcap.estimate)

    def check(self) -> None:
        super().check()
        from medcap.evaluation import protocols  # imported here: settings stay below the rooms

        protocols.resolve(self.protocols)
        if self.engine not in ENGINES:
            raise ConfigError(f"engine={self.engine}: expected one of {', '.join(ENGINES)}")
        if self.engine == "vllm" and not self.vllm_url:
            raise ConfigError("engine=vllm needs vllm_url=http://HOST:PORT (a vLLM server started with "
                              "--enable-prompt-embeds; `make vllm` starts one on the demo's LLM)")  # fmt: skip
        if self.engine != "vllm" and (self.vllm_url or self.vllm_model):
            raise ConfigError(f"vllm_url / vllm_model are read only with engine=vllm (engine={self.engine})")
        if self.vllm_url and not str(self.vllm_url).startswith(("http://", "https://")):
            raise ConfigError(f"vllm_url={self.vllm_url}: expected http://HOST:PORT")
        if self.vllm_timeout_s <= 0:
            raise ConfigError(f"vllm_timeout_s={self.vllm_timeout_s}: expected a number > 0")
        if self.batch_size < 1 or self.max_new_tokens < 1:
            raise ConfigError(f"batch_size={self.batch_size}, max_new_tokens={self.max_new_tokens}: expected at least 1")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature}: expected a number >= 0")
