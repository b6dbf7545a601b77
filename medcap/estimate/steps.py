"""One training step and one batch of generation, traced on fake tensors: peak memory by kind
(``StepMemTracker``) and roofline time (``Roofline``) on a device.

The training step is the recipe's (``recipes/full_finetune.py``): the fused forward under
autocast, the summed cross-entropy over answer positions, backward through the frozen LLM,
gradient clipping when set, the optimizer step, ``zero_grad(set_to_none=True)``. The optimizer
has taken a step before tracing, so its state is there as from the second step on. A batch of
generation is ``medcap.decoding``'s: caches for prompt + new tokens, the prefill, then one decode
step (its time counted ``max_new_tokens`` times).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torchtune import config

from medcap.decoding.cache import KVCaches
from medcap.decoding.step import decode_core, run_block
from medcap.distributed import fully_shard_model
from medcap.estimate.devices import Device
from medcap.estimate.fsdp import FSDPStepTracker, as_step_kinds, fake_process_group, shard_bytes
from medcap.estimate.model import (
    fake_mode,
    fixed_cache_writes,
    fixed_shapes,
    model_on_meta,
    parameter_bytes,
    to_fake,
)
from medcap.estimate.tracing import Roofline, StepMemTracker
from medcap.settings import GenerateSettings, TrainSettings


@dataclass(frozen=True)
class Traced:
    """What one traced step measured."""

    peak: dict[str, int]  # MemTracker's kinds at the peak, and Total
    trainable_bytes: int
    frozen_bytes: int
    kv_cache_bytes: int
    seconds: float  # the step (training) or the whole batch (generation), roofline
    flops: int


def _autocast(llm_dtype: torch.dtype):
    return torch.autocast("cpu", dtype=llm_dtype, enabled=llm_dtype != torch.float32)


def plain_optimizer(cfg_optimizer: DictConfig | None) -> DictConfig:
    """The config's optimizer as a torch one to trace: bitsandbytes' 8-bit kernels cannot run
    on fake tensors, so they are traced as ``torch.optim.AdamW`` and their state counted apart."""
    cfg = (
        OmegaConf.create({"_component_": "torch.optim.AdamW", "lr": 1e-5})
        if cfg_optimizer is None
        else cfg_optimizer.copy()
    )
    if str(cfg._component_).startswith("bitsandbytes."):
        keep = {k: v for k, v in cfg.items() if k in ("lr", "weight_decay", "betas", "eps")}
        cfg = OmegaConf.create({"_component_": "torch.optim.AdamW", **keep})
    return cfg


def trace_train_step(
    settings: TrainSettings,
    device: Device,
    *,
    batch_size: int,
    seq_len: int,
    answer_tokens: int,
    optimizer_in_bwd: bool = False,
    world_size: int = 1,
) -> Traced:
    """One step on one device, or (``world_size`` > 1) one rank's step under FSDP2 as the
    distributed recipe shards the model (``fsdp``); ``batch_size`` is per rank."""
    if world_size > 1:
        if optimizer_in_bwd:
            raise ValueError(
                "optimizer_in_bwd=True runs in one process; the distributed recipe steps after backward"
            )
        with fake_process_group(world_size) as mesh:
            return _trace_train_step(settings, device, batch_size, seq_len, answer_tokens, False, mesh)
    return _trace_train_step(settings, device, batch_size, seq_len, answer_tokens, optimizer_in_bwd, None)


def _trace_train_step(settings, device, batch_size, seq_len, answer_tokens, optimizer_in_bwd, mesh) -> Traced:
    llm_dtype = settings.torch_dtype
    model = model_on_meta(settings, llm_dtype, checkpointing=settings.enable_activation_checkpointing)
    fixed_shapes(model, answer_tokens)
    if mesh is not None:
        model = fully_shard_model(model, mesh)
    mode = fake_mode()
    model = to_fake(model, mode)
    size = model.visual.preprocess.size
    with mode:
        params = [p for p in model.parameters() if p.requires_grad]
        cfg_opt = plain_optimizer(settings.optimizer)
        if optimizer_in_bwd:
            from torchtune.training import register_optim_in_bwd_hooks

            optimizers = {p: config.instantiate(cfg_opt, [p]) for p in params}
            register_optim_in_bwd_hooks(model, optimizers)
        else:
            optimizers = {None: config.instantiate(cfg_opt, params)}
        for p in params:  # one step on zero gradients: the optimizer state, as from step 2 on
            p.grad = torch.zeros_like(p)
        for opt in optimizers.values():
            opt.step()
            opt.zero_grad(set_to_none=True)
        tokens = torch.zeros(batch_size, seq_len, dtype=torch.long)
        labels = torch.zeros(batch_size, seq_len, dtype=torch.long)
        images = torch.empty(batch_size, 3, size, size)
        if mesh is None:
            tracker = StepMemTracker()
            tracker.track_external(model, *optimizers.values(), tokens, labels, images)
        else:
            tracker = FSDPStepTracker(model, optimizers[None])
            tracker.track_inputs((tokens, labels, images))
        roofline = Roofline(device)
        with tracker, roofline:
            with _autocast(llm_dtype):
                logits, targets = model(tokens, images=images, labels=labels)
            loss = F.cross_entropy(logits, targets, reduction="sum")
            loss.backward()
            if not optimizer_in_bwd:
                if settings.clip_grad_norm is not None:
                    norm = torch.nn.utils.clip_grad_norm_(params, max_norm=settings.clip_grad_norm)
                    if hasattr(norm, "full_tensor"):
                        norm.full_tensor()
                optimizers[None].step()
                optimizers[None].zero_grad(set_to_none=True)
    if mesh is None:
        return Traced(tracker.peak(), parameter_bytes(model, True), parameter_bytes(model, False), 0,
                      roofline.seconds, roofline.flops)  # fmt: skip
    return Traced(as_step_kinds(tracker.peak()), shard_bytes(model, True), shard_bytes(model, False), 0,
                  roofline.seconds, roofline.flops)  # fmt: skip


def trace_generate_batch(
    settings: GenerateSettings, device: Device, *, batch_size: int, prompt_tokens: int, new_tokens: int
) -> Traced:
    llm_dtype = settings.torch_dtype
    model = model_on_meta(settings, llm_dtype)
    fixed_shapes(model, answer_tokens=1)
    model.eval()
    mode = fake_mode()
    model = to_fake(model, mode)
    size = model.visual.preprocess.size
    slots = prompt_tokens + new_tokens
    with mode, torch.no_grad():
        model.setup_caches(batch_size, llm_dtype, decoder_max_seq_len=slots)
        fixed_cache_writes(model)
        caches = KVCaches(model).tensors()
        kv_bytes = sum(t.numel() * t.element_size() for pair in caches for t in pair)
        tokens = torch.zeros(batch_size, prompt_tokens, dtype=torch.long)
        positions = torch.zeros(batch_size, slots, dtype=torch.long)
        masks = torch.ones(batch_size, slots, slots, dtype=torch.bool)
        images = torch.empty(batch_size, 3, size, size)
        tracker = StepMemTracker()
        tracker.track_external(model, tokens, positions, masks, images)
        prefill, step = Roofline(device), Roofline(device)
        with tracker, _autocast(llm_dtype):
            with prefill:
                run_block(model, tokens, masks[:, :prompt_tokens], positions[:, :prompt_tokens], images)
            with step:
                token = torch.zeros(batch_size, dtype=torch.long)
                slot = torch.zeros(1, dtype=torch.long)
                decode_core(model, token, positions[:, prompt_tokens], slot, masks[:, prompt_tokens], caches)
    seconds = prefill.seconds + new_tokens * step.seconds
    return Traced(tracker.peak(), 0, parameter_bytes(model, False) + parameter_bytes(model, True), kv_bytes,
                  seconds, prefill.flops + new_tokens * step.flops)  # fmt: skip
