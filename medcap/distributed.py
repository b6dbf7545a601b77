"""Devices and process groups for every multi-process entry point (training under FSDP2,
evaluation sharded across ranks, the tensor-parallel judge), on torchtune's own helpers."""

from __future__ import annotations

import faulthandler
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torchtune import training
from torchtune.utils import get_device, get_world_size_and_rank


def launched_by_torchrun() -> bool:
    """True under ``torchrun`` / ``medcap run --nproc_per_node N`` (even with N = 1)."""
    return dist.is_torchelastic_launched() or "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup_device(device: str | None, distributed: bool = False, timeout: timedelta | None = None) -> torch.device:
    """The device for this process (``cuda`` becomes ``cuda:LOCAL_RANK``), and, when
    ``distributed``, the process group on the backend torchtune picks for it (nccl or gloo);
    ``timeout`` bounds how long a rank waits for the others at a collective."""
    torch_device = get_device(device)
    if distributed and not dist.is_initialized():
        # a rank killed by a signal prints its Python stacks instead of only an exit code
        faulthandler.enable()
        dist.init_process_group(backend=training.get_distributed_backend(torch_device.type), timeout=timeout)
    return torch_device


def world_size_and_rank() -> tuple[int, int]:
    return get_world_size_and_rank()


def end_distributed() -> None:
    """Tear the process group down on every rank together. A rank that destroys (or, worse,
    exits without destroying) its gloo group while a peer is still writing checkpoints can
    abort at exit with "terminate called without an active exception"."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
