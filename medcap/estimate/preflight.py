"""The recipes' preflight: before any weight is read on a GPU, the estimate against the memory
free there; when it does not fit, one line that says so and names a switch that would make it
fit (``preflight=False`` skips the check). One traced step (a minute for an 8B model on a
slow CPU); switches are traced only when the first estimate does not fit.

Under the distributed recipe each rank checks one rank's FSDP2 step (``world_size``) against its
own GPU, before the process group exists (the estimate's fake group needs the process to itself);
a rank that refuses ends the run, as torchrun stops the others when one fails.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import torch

from medcap.errors import ConfigError
from medcap.estimate.devices import DEVICES, GIB
from medcap.estimate.estimator import Estimator, Options
from medcap.settings import GenerateSettings, TrainSettings

log = logging.getLogger("medcap")


class PreflightError(ConfigError):
    """The run would not fit in the device's free memory."""


def preflight(
    settings: TrainSettings | GenerateSettings,
    device: torch.device,
    *,
    world_size: int = 1,
    mem_get_info: Callable[[], tuple[int, int]] | None = None,
) -> None:
    """Raise ``PreflightError`` when the estimate does not fit in ``device``'s free memory. Runs on
    CUDA only (``mem_get_info``, torch.cuda's by default, can be given to check elsewhere).
    ``world_size`` above 1: one rank of the distributed recipe (FSDP2, ``batch_size`` per rank)."""
    if not settings.preflight or (mem_get_info is None and device.type != "cuda"):
        return
    if mem_get_info is None:
        free, _ = torch.cuda.mem_get_info(device)
        name = torch.cuda.get_device_name(device)
    else:
        free, _ = mem_get_info()
        name = f"{device} (a given budget)"
    # free memory already leaves out the CUDA context; throughput figures do not matter here
    budget = replace(DEVICES["h100"], name=name, memory_bytes=int(free), reserve_bytes=0)
    estimator = Estimator(settings, budget, Options(switches=False, max_batch=False, nproc=world_size))
    est = estimator.run()
    if est.fits:
        log.info(
            "preflight: estimated peak %.1f GiB of %.1f GiB free on %s",
            est.required_bytes / GIB,
            free / GIB,
            name,
        )
        return
    per_rank = f" per rank of {world_size}" if world_size > 1 else ""
    raise PreflightError(
        f"preflight: the estimated peak{per_rank}, {est.required_bytes / GIB:.1f} GiB, does not fit in the "
        f"{free / GIB:.1f} GiB free on {name}; {suggestion(estimator, est.peak_bytes)} "
        "(`medcap estimate` shows the breakdown; preflight=False skips this check)"
    )


def suggestion(estimator: Estimator, peak: int) -> str:
    """The first switch that fits, in order of what it costs the run (none in results for
    checkpointing and 8-bit state; a smaller batch with gradient accumulation keeps the
    effective batch), or what is left."""
    rows = [row for row in estimator.switch_rows(peak, estimator.trace()[0]) if row["fits"]]
    order = ["enable_activation_checkpointing=True", "optimizer_in_bwd=True", "optimizer._component_"]
    for prefix in order:
        for row in rows:
            if row["change"].startswith(prefix):
                extra = (
                    " clip_grad_norm=null gradient_accumulation_steps=1"
                    if prefix == "optimizer_in_bwd=True"
                    else ""
                )
                return f"set {row['change']}{extra} (estimated {row['peak_bytes'] / GIB:.1f} GiB)"
    settings = estimator.settings
    best = estimator.max_batch_size({})
    if best:
        if isinstance(settings, TrainSettings):
            accumulate = -(-settings.batch_size * settings.gradient_accumulation_steps // best)
            return (
                f"set batch_size={best} gradient_accumulation_steps={accumulate} (the same effective batch)"
            )
        return f"set batch_size={best}"
    if rows:
        return f"set {rows[0]['change']} (estimated {rows[0]['peak_bytes'] / GIB:.1f} GiB)"
    return "even one row does not fit: a GPU with more memory, or dtype=bf16 for the frozen LLM"
