"""Settings -> model: the one path that training, evaluation, serving and the demo take
(``build_model``; ``load_for_inference`` adds the device, precision and decode step).

``vision_pretrained`` (default True) starts an encoder that has pretrained weights (BiomedCLIP)
from them, as the original did, unless ``vision_path`` or ``vision_checkpoint`` decides.

The LLM is whatever ``model`` builds, with the weights ``checkpointer`` reads (torchtune's Meta
or HF checkpointers); the vision side comes from the original command line's top-level keys
(``vision``, ``vision_path``, ``vision_checkpoint``) plus medcap's (``connector``,
``num_image_tokens``, ``freeze_vision_encoder``): ``medcap.settings.ModelSettings``.
"""

from __future__ import annotations

import logging
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torchtune import config, training
from torchtune.modules import TransformerDecoder

from medcap.data.dataset import image_token_id
from medcap.decoding import DecodeStep, compile_decoding
from medcap.errors import ConfigError
from medcap.models.checkpoints import (
    CorruptCheckpointError,
    llm_checkpoint_files,
    load_checked,
    refuse_unsafe,
)
from medcap.models.embeddings_only import build_token_embeddings
from medcap.models.fusion import MedcapModel, build_medcap_model
from medcap.models.llms import decoder_from_state
from medcap.models.lora import LoraSpec
from medcap.settings import ModelSettings, parse_dtype

log = logging.getLogger("medcap")
_FROM_SETTINGS = object()


def resolve_precision(device: torch.device, dtype_name: str) -> torch.dtype:
    """The frozen LLM's dtype, the same policy on every device so that a CPU runs the GPU's code:
    ``bf16``: the LLM in bf16, the vision encoder and connector (and their optimizer state) in
    fp32, forwards under bf16 autocast (``autocast``), the loss in fp32; ``fp32``: fp32
    throughout. fp16 is refused (``medcap.settings.parse_dtype``)."""
    dtype = parse_dtype(dtype_name)
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"dtype={dtype_name}: this GPU has no bf16 support; use dtype=fp32")
    if dtype == torch.bfloat16 and device.type == "cpu" and not cpu_has_fast_bf16():
        log.warning(
            "dtype=%s on a CPU where oneDNN has no bf16 kernels (no AVX-512 or AMX): PyTorch computes some bf16 matrix products here "
            "(the input gradients of training's backward) with a single-threaded reference kernel, about 100x "
            "slower than fp32 (docs/training.md); dtype=fp32 is much faster where the model fits in memory",
            dtype_name,
        )
    return dtype


def cpu_has_fast_bf16() -> bool:
    """Whether oneDNN has bf16 kernels for this CPU (AVX-512 or AMX); without them, a bf16
    ``x @ W`` with ``W`` not transposed (every frozen layer's input gradient) takes a naive path."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def autocast(device: torch.device, llm_dtype: torch.dtype):
    """Forwards under autocast to the LLM's dtype when it is not fp32 (fp32 weights, bf16 math)."""
    return torch.autocast(device.type, dtype=llm_dtype, enabled=llm_dtype != torch.float32)


_UNLOADABLE = re.compile(r"Unable to load checkpoint from (?P<file>.+?)\.\s*$")


class LLMCheckpointer:
    """torchtune's Meta or Hugging Face checkpointer, chosen by what ``checkpoint_dir`` holds,
    so one config reads Meta's download (``params.json`` + ``consolidated.00.pth``) and the
    Hugging Face one (``config.json`` + ``model-0000N-of-0000M.safetensors``) alike, as the
    original's command lines use both. ``checkpoint_files`` that the folder holds are used as
    given; otherwise the folder's own files are."""

    def __init__(self, checkpoint_dir: str, model_type: str, output_dir: str,
                 checkpoint_files: list[str] | None = None, **kwargs: Any):  # fmt: skip
        from torchtune.training import FullModelHFCheckpointer, FullModelMetaCheckpointer

        folder, files = llm_checkpoint_files(checkpoint_dir, checkpoint_files)
        given = [str(f) for f in checkpoint_files or []]
        if given and files != given:
            log.info("checkpointer: %s holds %s, not %s: using the folder's files", folder, files, given)
        kind = FullModelHFCheckpointer if files[0].endswith(".safetensors") else FullModelMetaCheckpointer
        self.inner = kind(checkpoint_dir=str(folder), checkpoint_files=files, model_type=model_type,
                          output_dir=output_dir, **kwargs)  # fmt: skip
        self._checkpoint_dir = folder

    def load_checkpoint(self) -> dict[str, Any]:
        return self.inner.load_checkpoint()


def read_llm_state(checkpointer: Any) -> tuple[dict[str, torch.Tensor], str]:
    """The LLM's state dict in torchtune names, and where it came from (for error messages)."""
    where = getattr(checkpointer, "_checkpoint_dir", "the LLM checkpoint")
    try:
        state = checkpointer.load_checkpoint()[training.MODEL_KEY]
    except (pickle.UnpicklingError, ValueError) as e:
        # torchtune's loader wraps torch.load's refusal as "Unable to load checkpoint from FILE";
        # with several shards, the file (not the folder) tells the user which one to replace
        cause = e if isinstance(e, pickle.UnpicklingError) else e.__cause__
        named = _UNLOADABLE.search(str(e))
        what = f"LLM checkpoint file {named['file']}" if named else f"LLM checkpoint in {where}"
        if isinstance(cause, pickle.UnpicklingError):
            raise refuse_unsafe(what, cause) from e
        if named:
            raise CorruptCheckpointError(f"{what}: not a readable checkpoint (truncated or corrupt?) ({cause})") from e
        raise
    return state, f"LLM checkpoint in {where}"


def load_llm_weights(decoder: torch.nn.Module, checkpointer: Any) -> None:
    """Load the LLM into an already built decoder, naming any key or shape that does not fit."""
    load_checked(decoder, *read_llm_state(checkpointer))


def build_llm(cfg_model: DictConfig, checkpointer: Any, dtype: torch.dtype) -> TransformerDecoder:
    """``cfg.model`` built on the meta device, taking the weights ``checkpointer`` reads."""
    state, what = read_llm_state(checkpointer)
    return decoder_from_state(lambda: config.instantiate(cfg_model), state, dtype, what)


def fuse_vision_side(
    settings: ModelSettings,
    decoder: TransformerDecoder,
    tokenizer: Any,
    vision_checkpoint: str | Path | None = None,
    llm_lora: LoraSpec | None = None,
) -> MedcapModel:
    """The vision side the settings name, joined to ``decoder`` (adapted with ``llm_lora``, or
    as a checkpoint holding LoRA weights was)."""
    return build_medcap_model(
        decoder,
        image_token_id=image_token_id(tokenizer),
        vision=settings.vision,
        vision_path=settings.vision_path,
        connector=settings.connector,
        num_image_tokens=settings.num_image_tokens,
        vision_checkpoint=vision_checkpoint,
        vision_pretrained=settings.vision_pretrained,
        freeze_vision_encoder=settings.freeze_vision_encoder,
        turn_end_ids=getattr(tokenizer, "stop_tokens", ()),
        llm_lora=llm_lora,
    )


def build_model(
    settings: ModelSettings,
    tokenizer: Any,
    llm_dtype: torch.dtype,
    *,
    vision_dtype: torch.dtype = torch.float32,
    vision_checkpoint: Any = _FROM_SETTINGS,
    checkpointer: Any = None,
    llm_lora: LoraSpec | None = None,
    embeddings_only: bool = False,
) -> MedcapModel:
    """The LLM (``model`` + ``checkpointer``) in ``llm_dtype``, then the vision side in
    ``vision_dtype``: fp32 for training (pure-bf16 AdamW rounds small updates away).
    ``vision_checkpoint`` defaults to the settings' (one file); ``llm_lora`` adds LoRA adapters
    (fp32, as the vision side) to the LLM for training. ``embeddings_only`` (another engine runs
    the LLM: ``engine=vllm``) reads only the LLM's token embedding table from ``checkpointer``'s
    files (``medcap.models.embeddings_only``): no decoder layer is built or read."""
    if vision_checkpoint is _FROM_SETTINGS:
        vision_checkpoint = settings.vision_checkpoint
    if embeddings_only:
        llm = build_token_embeddings(settings.model, settings.checkpointer, llm_dtype)
    else:
        checkpointer = checkpointer if checkpointer is not None else config.instantiate(settings.checkpointer)
        llm = build_llm(settings.model, checkpointer, llm_dtype)
    model = fuse_vision_side(settings, llm, tokenizer, vision_checkpoint, llm_lora)
    model.visual.to(vision_dtype)
    model.projector.to(vision_dtype)
    return model


@dataclass
class Loaded:
    """A model ready to answer: what evaluation, serving and single-image answers share."""

    model: MedcapModel
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype  # the LLM's; forwards run under ``autocast(device, dtype)``
    step: DecodeStep | None  # compiled or eager; None without the LLM's layers (embeddings_only)
    checkpoint: Path | None


def load_for_inference(
    settings: ModelSettings,
    vision_checkpoint: Path | None,
    *,
    device: torch.device | None = None,
    compile: bool = False,
    tokenizer: Any = None,
    embeddings_only: bool = False,
) -> Loaded:
    """The tokenizer, the LLM in the settings' precision (the vision side fp32, run under
    autocast as in training), the vision checkpoint, eval mode, and the decode step (compiled
    with ``compile``). An untrained encoder (no checkpoint) is drawn from the settings' seed.
    ``embeddings_only``: of the LLM, only its token embedding table (``engine=vllm``)."""
    device = device or torch.device(settings.device)
    dtype = resolve_precision(device, settings.dtype)
    training.set_seed(seed=settings.seed)
    tokenizer = tokenizer if tokenizer is not None else config.instantiate(settings.tokenizer)
    model = build_model(settings, tokenizer, dtype, vision_checkpoint=vision_checkpoint,
                        embeddings_only=embeddings_only)  # fmt: skip
    model.to(device).eval()
    step = None if embeddings_only else compile_decoding(model) if compile else DecodeStep(model)
    return Loaded(model, tokenizer, device, dtype, step, vision_checkpoint)
