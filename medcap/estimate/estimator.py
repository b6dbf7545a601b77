"""A config's memory and time on a device: the traced step at the config's batch size, the
largest batch that fits, what each memory switch changes, and time per epoch.

The largest batch: peaks traced at batch 1 and 2 give the memory one more row takes; the batch
that line predicts is traced once more to check it, and stepped down while it does not fit.
8-bit AdamW (bitsandbytes) cannot run on fake tensors: its state is counted (two uint8 moments
and one fp32 scale per 256 values for tensors of 4096 values or more, fp32 moments below that)
in place of AdamW's traced fp32 moments.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from medcap.errors import ConfigError
from medcap.estimate.devices import Device
from medcap.estimate.steps import Traced, trace_generate_batch, trace_train_step
from medcap.settings import GenerateSettings, TrainSettings

BNB_MIN_8BIT_SIZE = 4096  # bitsandbytes keeps smaller tensors' state in fp32
BNB_BLOCK = 256
MAX_BATCH_LIMIT = 4096


@dataclass(frozen=True)
class Options:
    """The estimate's own keys (everything else on the command line is the recipe's)."""

    gpu: str | None = None  # h200, h100, a100-80, a100-40, l40s, 4090, cpu
    gpu_memory_gib: float | None = None
    gpu_tflops: float | None = None  # bf16, dense
    gpu_bandwidth_gbs: float | None = None
    dataset_size: int | None = None  # records per epoch: time per epoch
    answer_tokens: int = 32  # positions per row that carry a label (the output head runs there)
    prompt_tokens: int | None = (
        None  # generation: prompt length (default dataset_max_seq_len, else image tokens + 64)
    )
    switches: bool = True  # trace each memory switch too (one traced step each)
    max_batch: bool = True  # search the largest batch that fits
    # ranks of the distributed recipe (torchrun's nnodes x nproc_per_node): above 1, one rank's
    # step under FSDP2 (batch_size is per rank); generation: each rank holds the whole model
    nproc: int = 1


@dataclass
class Estimate:
    recipe: str  # full_finetune or generate
    device: Device
    batch_size: int
    seq_len: int
    breakdown: dict[str, int]  # sums to peak_bytes
    peak_bytes: int
    required_bytes: int  # peak with the device's reserve and fragmentation
    fits: bool
    step_s: float
    tflop_per_step: float
    max_batch_size: int | None = None
    epoch_s: float | None = None
    switches: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    nproc: int = 1  # ranks; above 1 the memory figures are one rank's

    def summary(self) -> dict[str, Any]:
        """The JSON line's fields."""
        out = {k: v for k, v in asdict(self).items() if k not in ("device", "notes")}
        out.update(device=self.device.name, memory_bytes=self.device.memory_bytes, torch=torch.__version__)
        return out


def bnb_state_bytes(numels: list[int]) -> int:
    """bitsandbytes 8-bit Adam state for tensors of these sizes."""
    total = 0
    for n in numels:
        if n >= BNB_MIN_8BIT_SIZE:
            total += 2 * (n + 4 * math.ceil(n / BNB_BLOCK))
        else:
            total += 2 * 4 * n
    return total


def _is_bnb(settings: TrainSettings) -> bool:
    opt = getattr(settings, "optimizer", None)
    return opt is not None and str(opt._component_).startswith("bitsandbytes.")


def breakdown(traced: Traced, optimizer_bytes: int | None = None) -> dict[str, int]:
    """MemTracker's kinds at the peak in the categories a user turns switches on. Parameters
    split into frozen and trainable; buffers into the KV cache and the rest (RoPE tables);
    the step's inputs (``Other``) count with temporaries. Under FSDP2 (``fsdp.as_step_kinds``)
    weights and optimizer state are this rank's shards, and the weights all-gathered for the
    layers being computed count apart. ``optimizer_bytes`` replaces the traced optimizer state
    (8-bit AdamW)."""
    p = traced.peak
    params = p.get("Parameter", 0)
    trainable = min(traced.trainable_bytes, params)
    kv = min(traced.kv_cache_bytes, p.get("Buffer", 0))
    parts = {
        "frozen weights": params - trainable,
        "trainable weights": trainable,
        "all-gathered weights": p.get("Gathered", 0),  # FSDP2: unsharded layers in flight
        "gradients": p.get("Gradient", 0) + p.get("Reduce", 0),  # FSDP2: and reduce-scatter input
        "optimizer state": p.get("Optstate", 0) if optimizer_bytes is None else optimizer_bytes,
        "activations": p.get("Activation", 0),
        "KV cache": kv,
        "buffers": p.get("Buffer", 0) - kv,
        "temporaries": p.get("Temp", 0) + p.get("Other", 0),
    }
    return parts


def _trainable_numels(settings: TrainSettings) -> list[int]:
    from medcap.estimate.model import model_on_meta

    model = model_on_meta(settings, settings.torch_dtype)
    return [p.numel() for p in model.parameters() if p.requires_grad]


class Estimator:
    """Traces for one config on one device; every figure of an ``Estimate``."""

    def __init__(self, settings: TrainSettings | GenerateSettings, device: Device, options: Options):
        self.settings = settings
        self.device = device
        self.options = options
        self.training = isinstance(settings, TrainSettings)
        self.world_size = options.nproc
        if self.world_size < 1:
            raise ConfigError(f"nproc={self.world_size}: the number of ranks is 1 or more")
        if self.training and self.world_size > 1:
            if settings.optimizer_in_bwd:
                raise ConfigError(
                    "optimizer_in_bwd=True runs in one process: leave nproc out or set it False"
                )
            if _is_bnb(settings):
                raise ConfigError(
                    f"nproc={self.world_size}: bitsandbytes optimizers cannot run under FSDP2 (the distributed "
                    "recipe refuses them); use torch.optim.AdamW"
                )
        if self.training:
            seq = settings.dataset.get("max_seq_len") if settings.dataset is not None else None
            if seq is None:
                raise ConfigError(
                    "dataset.max_seq_len is null: the estimate needs a sequence length (dataset.max_seq_len=N)"
                )
            self.seq_len = int(seq)
            self.answer_tokens = (
                self.seq_len
                if settings.dataset.get("train_on_input", False)
                else min(options.answer_tokens, self.seq_len)
            )
        else:
            n = settings.num_image_tokens or 32
            self.seq_len = int(options.prompt_tokens or settings.dataset_max_seq_len or n + 64)

    # ------------------------------------------------------------------ one trace
    def trace(
        self, settings=None, batch_size: int | None = None, optimizer_in_bwd: bool | None = None
    ) -> tuple[Traced, int | None]:
        """(traced step, optimizer bytes to count instead of the traced ones, or None)."""
        s = settings or self.settings
        b = batch_size or s.batch_size
        if not self.training:
            return trace_generate_batch(s, self.device, batch_size=b, prompt_tokens=self.seq_len,
                                        new_tokens=s.max_new_tokens), None  # fmt: skip
        seq = int(s.dataset.max_seq_len)
        in_bwd = s.optimizer_in_bwd if optimizer_in_bwd is None else optimizer_in_bwd
        traced = trace_train_step(s, self.device, batch_size=b, seq_len=seq,
                                  answer_tokens=min(self.answer_tokens, seq), optimizer_in_bwd=in_bwd,
                                  world_size=self.world_size)  # fmt: skip
        return traced, (bnb_state_bytes(_trainable_numels(s)) if _is_bnb(s) else None)

    def peak_of(self, traced: Traced, opt_bytes: int | None) -> int:
        return sum(breakdown(traced, opt_bytes).values())

    def fits(self, peak: int) -> bool:
        return self.device.required(peak) <= self.device.memory_bytes

    # ------------------------------------------------------------------ the estimate
    def run(self) -> Estimate:
        s = self.settings
        traced, opt_bytes = self.trace()
        parts = breakdown(traced, opt_bytes)
        peak = sum(parts.values())
        est = Estimate(
            recipe="full_finetune" if self.training else "generate",
            device=self.device,
            batch_size=s.batch_size,
            seq_len=self.seq_len,
            breakdown=parts,
            peak_bytes=peak,
            required_bytes=self.device.required(peak),
            fits=self.fits(peak),
            step_s=traced.seconds,
            tflop_per_step=traced.flops / 1e12,
            nproc=self.world_size,
        )
        est.notes += [
            f"memory: one step traced on fake tensors with torch {torch.__version__}'s MemTracker (no weight read); "
            + ("sequences padded to max_seq_len (the worst case), " if self.training else "")
            + f"{self.answer_tokens if self.training else 1} labelled positions per row",
            "time: roofline per operator (max of FLOPs / throughput and bytes / bandwidth, "
            f"{self.device.efficiency:.0%} of peak, {self.device.op_overhead_s * 1e6:.0f} us per operator)",
        ]
        if self.training and self.world_size > 1:
            est.notes.insert(0, f"per rank of {self.world_size} under FSDP2 (batch {s.batch_size} per rank), traced "
                             "with FSDPMemTracker on a fake process group: each rank keeps 1/N of every weight "
                             "and of the optimizer state; time leaves out communication")  # fmt: skip
        elif self.world_size > 1:
            est.notes.insert(
                0, f"per rank of {self.world_size}: sharded evaluation holds the whole model on every rank"
            )
        if _is_bnb(s):
            est.notes.append("8-bit AdamW: traced as torch AdamW, its state counted as bitsandbytes keeps it")
        if self.options.max_batch:
            est.max_batch_size = self.max_batch_size({s.batch_size: peak})
        if self.options.dataset_size:
            steps = math.ceil(self.options.dataset_size / (s.batch_size * self.world_size))
            est.epoch_s = steps * traced.seconds
        if self.options.switches:
            est.switches = self.switch_rows(peak, traced)
        return est

    def max_batch_size(self, known: dict[int, int]) -> int:
        """The largest batch whose traced step fits (0: not even one row). The peak grows
        faster than linearly at small batches (there it is the optimizer step's, later the
        backward's), so the search keeps a bracket (``lo`` fits, ``hi`` does not) and proposes
        by interpolating the peaks it has traced."""

        def peak_at(b: int) -> int:
            if b not in known:
                known[b] = self.peak_of(*self.trace(batch_size=b))
            return known[b]

        def batch_for(
            a: int, b: int
        ) -> float:  # where the line through the peaks at a and b meets the budget
            per_row = max((peak_at(b) - peak_at(a)) / (b - a), 1.0)
            usable = (self.device.memory_bytes - self.device.reserve_bytes) / (1 + self.device.fragmentation)
            return a + (usable - peak_at(a)) / per_row

        if not self.fits(peak_at(1)):
            return 0
        lo, hi = 1, None
        for b in sorted(known):  # what is already traced narrows the bracket
            if self.fits(known[b]):
                lo = max(lo, b)
            elif hi is None or b < hi:
                hi = b
        while hi is None:  # grow until a batch does not fit
            prev = max((b for b in known if b < lo), default=None)
            guess = int(batch_for(prev, lo)) if prev is not None else 2 * lo
            b = min(MAX_BATCH_LIMIT, max(guess, lo + 1))
            if self.fits(peak_at(b)):
                lo = b
                if b == MAX_BATCH_LIMIT:
                    return b
            else:
                hi = b
        while hi - lo > 1:
            b = min(hi - 1, max(lo + 1, int(batch_for(lo, hi))))
            if self.fits(peak_at(b)):
                lo = b
            else:
                hi = b
        return lo

    def switch_rows(self, peak: int, base: Traced) -> list[dict[str, Any]]:
        """One row per switch: the setting changed, the peak and step time it gives."""
        s = self.settings
        rows: list[tuple[str, Any, dict[str, Any]]] = []
        if self.training:
            rows.append(("enable_activation_checkpointing", not s.enable_activation_checkpointing,
                         {"enable_activation_checkpointing": not s.enable_activation_checkpointing}))  # fmt: skip
            if self.world_size == 1:  # the distributed recipe steps after backward
                rows.append(
                    ("optimizer_in_bwd", not s.optimizer_in_bwd, {"optimizer_in_bwd": not s.optimizer_in_bwd})
                )
        rows.append(("dtype", "fp32" if s.torch_dtype == torch.bfloat16 else "bf16",
                     {"dtype": "fp32" if s.torch_dtype == torch.bfloat16 else "bf16"}))  # fmt: skip
        n = s.num_image_tokens or 32
        rows.append(("num_image_tokens", max(1, n // 2), {"num_image_tokens": max(1, n // 2)}))
        if self.training:
            half = max(8, self.seq_len // 2)
            dataset = s.dataset.copy()
            dataset.max_seq_len = half
            rows.append(("dataset.max_seq_len", half, {"dataset": dataset}))
        else:
            rows.append(
                (
                    "max_new_tokens",
                    max(1, s.max_new_tokens // 2),
                    {"max_new_tokens": max(1, s.max_new_tokens // 2)},
                )
            )
        out = []
        for key, value, changes in rows:
            traced, opt_bytes = self.trace(s.replace(**changes))
            p = self.peak_of(traced, opt_bytes)
            out.append(self._row(f"{key}={value}", p, traced.seconds, peak))
        # 8-bit AdamW (not under FSDP2): the base trace, its optimizer state counted
        if self.training and not _is_bnb(s) and self.world_size == 1:
            parts = breakdown(base, bnb_state_bytes(_trainable_numels(s)))
            out.append(self._row("optimizer._component_=bitsandbytes.optim.AdamW8bit", sum(parts.values()),
                                 base.seconds, peak))  # fmt: skip
        return out

    def _row(self, change: str, p: int, seconds: float, base_peak: int) -> dict[str, Any]:
        return {"change": change, "peak_bytes": p, "delta_bytes": p - base_peak, "fits": self.fits(p),
                "step_s": seconds}  # fmt: skip
