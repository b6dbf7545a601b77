"""``medcap estimate``: a config's peak memory and step time on a device, before anything is
loaded, from one step traced on fake tensors (``steps``) with PyTorch's memory tracker and a
roofline (``tracing``); the largest batch and each memory switch (``estimator``); the
preflight the recipes run on CUDA (``preflight``); the judge's arithmetic (``judge``).

    medcap estimate --config llama3/8B_full_single_device gpu=a100-40 dataset_size=9835
    medcap estimate --config custom_generation_config gpu=4090 batch_size=16
    medcap estimate --config llama3/8B_full nproc=8 gpu=h100      (one rank of 8 under FSDP2)
"""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from medcap.estimate.devices import DEVICES, GIB, Device, resolve_device
from medcap.estimate.estimator import Estimate, Estimator, Options
from medcap.recipe_files import resolve_config
from medcap.settings import GenerateSettings, TrainSettings, _coerce, check_keys

__all__ = ["DEVICES", "Device", "Estimate", "Options", "estimate", "report", "run_cli", "settings_for"]


def is_training_config(cfg: DictConfig) -> bool:
    """A training config names an optimizer; a generate config does not."""
    return "optimizer" in cfg


def settings_for(cfg: DictConfig) -> TrainSettings | GenerateSettings:
    """The recipe's own settings of ``cfg`` (a key neither the recipe nor the estimate reads is
    an error naming the closest key)."""
    kind, recipe = (
        (TrainSettings, "full_finetune") if is_training_config(cfg) else (GenerateSettings, "generate")
    )
    own = {f.name for f in dataclasses.fields(Options)}
    check_keys(cfg, kind.keys() | own, f"estimate ({recipe})")
    return kind.from_config({k: v for k, v in cfg.items() if k not in own})


def split_options(cfg: DictConfig) -> Options:
    hints = typing.get_type_hints(Options)
    values = {
        f.name: _coerce(f.name, cfg[f.name], hints[f.name])
        for f in dataclasses.fields(Options)
        if f.name in cfg
    }
    return Options(**values)


def estimate(cfg: DictConfig, options: Options | None = None, device: Device | None = None) -> Estimate:
    """The estimate for ``cfg`` (a recipe config with overrides merged; may hold ``Options`` keys)."""
    options = options or split_options(cfg)
    settings = settings_for(cfg)
    device = device or resolve_device(options.gpu, memory_gib=options.gpu_memory_gib, tflops=options.gpu_tflops,
                                      bandwidth_gbs=options.gpu_bandwidth_gbs)  # fmt: skip
    return Estimator(settings, device, options).run()


def _gib(n: int) -> str:
    return f"{n / GIB:7.2f} GiB"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def report(est: Estimate) -> str:
    """The human table; the JSON summary is printed after it by ``run_cli``."""
    d = est.device
    what = "training step" if est.recipe == "full_finetune" else "generate batch"
    length = "sequence" if est.recipe == "full_finetune" else "prompt"
    ranks = f" per rank, {est.nproc} ranks (FSDP2)" if est.nproc > 1 and est.recipe == "full_finetune" else ""
    ranks = ranks or (f" per rank, {est.nproc} ranks" if est.nproc > 1 else "")
    lines = [
        f"{what} at batch {est.batch_size}{ranks}, {length} {est.seq_len} tokens, on {d.name} "
        f"({d.memory_bytes / GIB:.1f} GiB, {d.bf16_flops / 1e12:.1f} bf16 TFLOP/s, {d.bandwidth / 1e9:.0f} GB/s)",
        "",
        "peak memory (at the moment of the peak)" + (", one rank" if est.nproc > 1 else ""),
    ]
    for name, value in est.breakdown.items():
        if value:
            lines.append(f"  {name:<20s}{_gib(value)}")
    lines.append(f"  {'total (tensors)':<20s}{_gib(est.peak_bytes)}")
    lines.append(
        f"  {'with reserve':<20s}{_gib(est.required_bytes)}   (+{d.reserve_bytes / GIB:.2f} GiB "
        f"{'process / CUDA context' if d.reserve_bytes else ''}, +{d.fragmentation:.0%} allocator)"
    )
    verdict = "fits" if est.fits else "does NOT fit"
    lines.append(f"  {verdict} in {d.memory_bytes / GIB:.1f} GiB")
    if est.max_batch_size is not None:
        lines.append(f"  largest batch that fits: {est.max_batch_size}")
    lines.append("")
    lines.append(f"time (roofline): {_duration(est.step_s)} per {what}, {est.tflop_per_step:.2f} TFLOP")
    if est.epoch_s is not None:
        lines.append(f"  one epoch: {_duration(est.epoch_s)}")
    if est.switches:
        lines += ["", "what each switch changes (one change at a time)"]
        lines.append(f"  {'change':<54s}{'peak':>12s}{'change':>12s}  {'fits':<5s}{'time':>10s}")
        for row in est.switches:
            lines.append(
                f"  {row['change']:<54s}{_gib(row['peak_bytes']):>12s}{row['delta_bytes'] / GIB:+10.2f} G  "
                f"{'yes' if row['fits'] else 'no':<5s}{_duration(row['step_s']):>10s}"
            )
    lines += ["", *est.notes]
    return "\n".join(lines)


def load_config(config: str, overrides: Sequence[str]) -> DictConfig:
    return OmegaConf.merge(OmegaConf.load(resolve_config(config)), OmegaConf.from_dotlist(list(overrides)))


def run_cli(argv: Sequence[str]) -> Estimate:
    """``medcap estimate --config CONFIG [key=value ...] gpu=NAME``: the table, then one JSON line."""
    argv = list(argv)
    if "--judge" in argv:
        return run_judge_cli([a for a in argv if a != "--judge"])
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        raise SystemExit(
            "medcap estimate --config CONFIG [key=value ...] gpu=NAME   (gpu: " + ", ".join(DEVICES) + ")"
        )
    i = argv.index("--config")
    config, overrides = argv[i + 1], argv[:i] + argv[i + 2 :]
    est = estimate(load_config(config, overrides))
    print(report(est))
    print(json.dumps(est.summary()))
    return est


def run_judge_cli(argv: Sequence[str]) -> dict:
    """``medcap estimate --judge [gpus=N] [nf4=True] [batch_size=B] [max_seq_len=L] gpu=NAME``."""
    from medcap.estimate.judge import JudgeOptions, judge_memory, judge_report

    cfg = OmegaConf.from_dotlist(list(argv))
    own = {f.name for f in dataclasses.fields(JudgeOptions)}
    device_keys = {"gpu", "gpu_memory_gib", "gpu_tflops", "gpu_bandwidth_gbs"}
    check_keys(cfg, own | device_keys, "estimate --judge")
    hints = typing.get_type_hints(JudgeOptions)
    options = JudgeOptions(**{k: _coerce(k, cfg[k], hints[k]) for k in own if k in cfg})
    dev = split_options(OmegaConf.create({k: cfg[k] for k in device_keys if k in cfg}))
    device = resolve_device(dev.gpu, memory_gib=dev.gpu_memory_gib, tflops=dev.gpu_tflops,
                            bandwidth_gbs=dev.gpu_bandwidth_gbs)  # fmt: skip
    result = judge_memory(options, device)
    print(judge_report(options, device, result))
    print(
        json.dumps(
            {**result, "device": device.name, "memory_bytes": device.memory_bytes, "torch": torch.__version__}
        )
    )
    return result
