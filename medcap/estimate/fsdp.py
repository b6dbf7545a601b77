"""One rank's training step under FSDP2, traced on fake tensors with FSDP2's own memory tracker.

The distributed recipe (``recipes/full_finetune.py``) shards with
``medcap.distributed.fully_shard_model``: ``fully_shard`` on every decoder layer (the frozen LLM's layers too, so each rank keeps 1/N of
the LLM and all-gathers one layer at a time), on the vision encoder, on the connector, and last
on the whole model (the root: the LLM's embedding, final norm and output head). The estimate
calls the same function on the meta-device model, in one process, on a fake process group of the world
size (``torch.testing._internal.distributed.fake_pg``: collectives that move nothing); the step
then runs on fake tensors under ``FSDPMemTracker``, which sees what one rank holds: its shards,
the all-gathered (unsharded) weights of the layers in flight, gradients before and after the
reduce-scatter, the optimizer state of its shards, activations and temporaries.

``FSDPStepTracker`` changes upstream's tracker in one place only, for speed: the global peak is
kept, not every module's (as ``StepMemTracker`` does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker

from medcap.estimate.tracing import TOTAL, GlobalPeakOnly


class FSDPStepTracker(GlobalPeakOnly, FSDPMemTracker):
    """``FSDPMemTracker`` keeping only the global peak (one device); ``peak()`` gives bytes by
    ``_FSDPRefType`` value ("Sharded Param", "All Gather", ...) and ``Total``."""


def as_step_kinds(peak: dict[str, int]) -> dict[str, int]:
    """FSDP's kinds in ``MemTracker``'s (what ``estimator.breakdown`` reads), the all-gathered
    weights and the reduce-scatter input kept apart."""
    g = peak.get
    return {
        "Parameter": g("Sharded Param", 0),
        "Gathered": g("Unsharded Param", 0) + g("All Gather", 0),
        "Gradient": g("Sharded Grad", 0) + g("Unsharded Grad", 0),
        "Reduce": g("Reduce Scatter", 0),
        "Optstate": g("OptState", 0),
        "Activation": g("Activation", 0),
        "Buffer": g("Buffer", 0),
        "Temp": g("Temp", 0),
        "Other": g("Inputs", 0),
        TOTAL: g(TOTAL, 0),
    }


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[Any]:
    """A device mesh of ``world_size`` ranks on a fake process group in this process (rank 0).
    An already initialised default group is refused: the estimate would replace it."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("the FSDP2 estimate runs in a process without a process group of its own")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield init_device_mesh("cpu", (world_size,))
    finally:
        dist.destroy_process_group()


def shard_bytes(model: torch.nn.Module, trainable: bool) -> int:
    """Bytes of this rank's shards of the (un)trainable parameters."""
    total = 0
    for p in model.parameters():
        if p.requires_grad != trainable:
            continue
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total
