"""bf16 on a CPU: the one-line warning where PyTorch has no fast bf16 kernels."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from medcap.models import assembly


def test_a_cpu_with_neither_avx512_nor_amx_has_no_fast_bf16():
    """oneDNN's own check against the flags the kernel reports (x86 Linux only): with none of
    the AVX-512 / AMX / AVX-NE-CONVERT flags it must say no (machines with them may say either)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file() or "flags" not in cpuinfo.read_text():
        pytest.skip("no /proc/cpuinfo flags on this machine")
    flags = set(" ".join(line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")).split())
    if {"avx512bw", "avx512_bf16", "amx_bf16", "avx_ne_convert"} & flags:
        pytest.skip("this CPU has AVX-512 / AMX / AVX-NE-CONVERT: oneDNN may have bf16 kernels")
    assert assembly.cpu_has_fast_bf16() is False


@pytest.mark.parametrize("fast", [True, False])
def test_bf16_on_a_cpu_without_native_bf16_warns_once_with_the_way_out(monkeypatch, caplog, fast):
    monkeypatch.setattr(assembly, "cpu_has_fast_bf16", lambda: fast)
    with caplog.at_level(logging.WARNING, logger="medcap"):
        assert assembly.resolve_precision(torch.device("cpu"), "bf16") == torch.bfloat16
        assert assembly.resolve_precision(torch.device("cpu"), "fp32") == torch.float32
    warned = [r.getMessage() for r in caplog.records if "no bf16 kernels" in r.getMessage()]
    assert len(warned) == (0 if fast else 1)
    if warned:
        assert "dtype=bf16" in warned[0] and "dtype=fp32" in warned[0]
