"""One rank's training step under FSDP2, traced on fake tensors with FSDP2's own memory tracker.

The distributed recipe (``recipes/full_finetune.py``, ``VisionFinetuneRecipe._place``) calls
``fully_shard`` on every decoder layer (the frozen LLM's layers too, so each rank keeps 1/N of
the LLM and all-gathers one layer at a time), on the vision encoder, on the connector, and last
on the whole model (the root: the LLM's embedding, final norm and output head). ``fsdp_wrap``
does the same on the meta-device model, in one process, on a fake process group of the world
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
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType

from medcap.models.fusion import MedcapModel

TOTAL = "Total"


class FSDPStepTracker(FSDPMemTracker):
    """``FSDPMemTracker`` keeping only the global peak (one device)."""

    def _update_peak_stats(self, peak_state: Any) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[TOTAL]:
                self._peak_mem[dev] = snap[TOTAL]
                self._peak_mem_snap[dev] = dict(snap)

    def peak(self) -> dict[str, int]:
        """Bytes by ``_FSDPRefType`` value at the moment of the peak, and ``Total``."""
        snaps = list(self._peak_mem_snap.values())
        if len(snaps) != 1:
            raise RuntimeError(f"expected one traced device, found {list(self._peak_mem_snap)}")
        return {(k.value if isinstance(k, _FSDPRefType) else k): int(v) for k, v in snaps[0].items()}


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


def fsdp_wrap(model: MedcapModel, mesh) -> MedcapModel:
    """``fully_shard`` as the distributed recipe applies it (keep the two in step)."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.decoder.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model.visual, mesh=mesh)
    fully_shard(model.projector, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


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
