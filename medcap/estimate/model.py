"""The model a config describes, on fake tensors: built on the meta device (no weight is read,
no memory is taken), then given fake CPU storage, so that a step runs shapes only.

A real step has a few shapes that depend on values (how many placeholders a row holds, how
many positions carry a label); traced on fake tensors they are fixed instead: every row holds
one image, and the last ``answer_tokens`` positions of every row carry a label.
"""

from __future__ import annotations

import types

import torch
from omegaconf import DictConfig
from torch._subclasses.fake_tensor import FakeTensorMode
from torchtune import config, modules, training
from torchtune.training import set_default_dtype

from medcap.models.connectors import build_connector
from medcap.models.fusion import MedcapModel, set_trainable
from medcap.models.vision import build_vision_encoder
from medcap.settings import ModelSettings


def llm_on_meta(cfg_model: DictConfig, dtype: torch.dtype) -> torch.nn.Module:
    with set_default_dtype(dtype), torch.device("meta"):
        return config.instantiate(cfg_model)


def model_on_meta(
    settings: ModelSettings, llm_dtype: torch.dtype, *, checkpointing: bool = False
) -> MedcapModel:
    """The LLM ``settings.model`` builds and the vision side the settings name (architecture
    from the encoder's config; connector kind and image-token count from the settings, the
    original's ``cls_mlp`` where null, and the connector's own token count where null: 32, or
    one per patch)."""
    decoder = llm_on_meta(settings.model, llm_dtype)
    with torch.device("meta"):
        visual = build_vision_encoder(settings.vision, settings.vision_path, weights=False)
        projector = build_connector(
            settings.connector or "cls_mlp",
            pooled_dim=visual.pooled_dim,
            patch_dim=visual.patch_dim,
            num_patches=visual.num_patches,
            llm_dim=decoder.tok_embeddings.embedding_dim,
            num_image_tokens=settings.num_image_tokens,
        )
    model = MedcapModel(decoder, visual, projector, image_token_id=decoder.tok_embeddings.num_embeddings)
    set_trainable(model, settings.freeze_vision_encoder)
    if checkpointing:  # as the training recipe does it
        training.set_activation_checkpointing(
            model.decoder, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
        )
    return model


def fixed_shapes(model: MedcapModel, answer_tokens: int) -> None:
    """Replace the value-dependent steps of ``model`` (this instance only) with fixed shapes."""
    image_id = model.image_token_id

    def placeholders(self, tokens: torch.Tensor, num_images: int) -> torch.Tensor:
        return tokens == image_id

    def questions(self, h, is_image, labels, tokens=None) -> torch.Tensor:
        return h.new_zeros(h.shape[0], h.shape[-1])  # one image per row; the mean's memory is negligible

    def labelled(self, h: torch.Tensor, labels: torch.Tensor):
        k = min(answer_tokens, h.shape[1])
        return h[:, -k:].reshape(-1, h.shape[-1]), labels[:, -k:].reshape(-1)

    model.check_placeholders = types.MethodType(placeholders, model)
    model.questions = types.MethodType(questions, model)
    model.labelled = types.MethodType(labelled, model)


def fixed_cache_writes(model: torch.nn.Module) -> None:
    """torchtune's ``KVCache.update`` checks its write position's value; on fake tensors the
    prefill writes the first positions instead (the same in-place copy, no value read)."""
    from torchtune.modules.kv_cache import KVCache

    def update(self, k_val: torch.Tensor, v_val: torch.Tensor):
        n = k_val.shape[2]
        self.k_cache[:, :, :n] = k_val
        self.v_cache[:, :, :n] = v_val
        return self.k_cache, self.v_cache

    for module in model.modules():
        if isinstance(module, KVCache):
            module.update = types.MethodType(update, module)


def fake_mode() -> FakeTensorMode:
    # modules built on meta keep a few real CPU tensors (timm's drop-path schedule): allowed in
    return FakeTensorMode(allow_non_fake_inputs=True)


def to_fake(model: torch.nn.Module, mode: FakeTensorMode) -> torch.nn.Module:
    """Fake CPU storage for every parameter and buffer (requires_grad kept). Scaled RoPE (Llama
    3.1/3.2) builds no table on the meta device and its ``rope_init`` reads values: it gets a
    fake table of the right shape."""
    with mode:
        model = model.to_empty(device="cpu")
        for module in model.modules():
            if getattr(module, "is_cache_built", True) is False:
                table = torch.empty(module.max_seq_len, module.dim // 2, 2)
                module.register_buffer("cache", table, persistent=False)
                module.is_cache_built = True
    return model


def parameter_bytes(model: torch.nn.Module, trainable: bool) -> int:
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or p.requires_grad != trainable:
            continue
        seen.add(id(p))
        total += p.numel() * p.element_size()
    return total
