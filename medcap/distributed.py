"""Devices and process groups for every multi-process entry point (training under FSDP2,
evaluation sharded across ranks, the tensor-parallel judge), on torchtune's own helpers."""

from __future__ import annotations

import faulthandler
import os
import socket
import time
import uuid
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torchtune import training
from torchtune.utils import get_device, get_world_size_and_rank

from medcap.errors import ConfigError


def launched_by_torchrun() -> bool:
    """True under ``torchrun`` / ``medcap run --nproc_per_node N`` (even with N = 1)."""
    return dist.is_torchelastic_launched() or "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_world_size() -> int:
    """The number of ranks torchrun started (1 outside it), readable before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


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


def several_nodes() -> bool:
    """True when this run's ranks span more than one launcher (``medcap run --nnodes 2``):
    torchrun's WORLD_SIZE counts every rank, LOCAL_WORLD_SIZE this node's."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > int(os.environ.get("LOCAL_WORLD_SIZE", world))


def require_shared_folder(folder: str | Path, key: str, wait_s: float = 10.0) -> None:
    """On several nodes, prove that every rank sees ``folder`` as rank 0 does: rank 0 writes a
    file of a new name there, every rank looks for it (for up to ``wait_s``: a network
    filesystem may show a new file late), and every rank raises the same one-line error naming
    the hosts that do not see it. Rank 0 writes the checkpoints and merges the evaluation's
    per-rank files, and every rank reads the recipe state on resume: all of that needs one
    folder every node mounts. One node, or no process group: nothing to check."""
    if not (dist.is_available() and dist.is_initialized() and several_nodes()):
        return
    folder = Path(str(folder))
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    if dist.get_rank() == 0:  # a new name: no node can have cached its absence
        (folder / f".medcap-shared-{token[0]}").write_text(token[0])
    dist.broadcast_object_list(token, src=0)
    probe = folder / f".medcap-shared-{token[0]}"
    deadline = time.monotonic() + wait_s
    while not (seen := probe.is_file() and probe.read_text() == token[0]) and time.monotonic() < deadline:
        time.sleep(0.5)
    views: list[tuple[bool, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(views, (seen, socket.gethostname()))
    if dist.get_rank() == 0:
        probe.unlink(missing_ok=True)
    blind = [f"rank {r} on {host}" for r, (ok, host) in enumerate(views) if not ok]  # type: ignore[misc]
    if blind:
        raise ConfigError(
            f"{key}={folder} is not one folder shared by every node: {', '.join(blind)} cannot see "
            f"the file rank 0 wrote there; on several machines {key} must be on a filesystem every "
            "node mounts at the same path (NFS, Lustre, ...): rank 0 writes there what every rank reads"
        )


def fully_shard_model(model: torch.nn.Module, mesh) -> torch.nn.Module:
    """FSDP2 as medcap shards: every decoder layer (the frozen LLM's too), the vision encoder,
    the connector, then the root (embedding, final norm, output head). The training recipe and
    ``medcap estimate nproc=N`` both call this, so the estimate traces what training runs."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.decoder.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model.visual, mesh=mesh)
    fully_shard(model.projector, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model
