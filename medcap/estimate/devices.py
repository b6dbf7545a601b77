"""The machines an estimate is made for: memory, matmul throughput and memory bandwidth.

GPU figures are datasheet values (dense, no sparsity): bf16 tensor-core and fp32 (non-tensor-
core) TFLOP/s, DRAM GB/s, and the total memory the card reports to ``torch.cuda`` (a little
under the marketing figure). ``cpu`` is measured on this machine when asked for (a bf16 and an
fp32 matmul and a copy, about two seconds), so CPU estimates compare with CPU runs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from medcap.errors import ConfigError

GIB = 2**30


@dataclass(frozen=True)
class Device:
    name: str
    memory_bytes: int
    bf16_flops: float  # FLOP/s, dense
    fp32_flops: float
    bandwidth: float  # bytes/s
    # share of peak FLOP/s and bandwidth eager kernels reach (PyTorch's own roofline uses 0.75);
    # 1.0 for a measured CPU, whose figures are already achieved throughput
    efficiency: float = 0.75
    op_overhead_s: float = 5e-6  # per operator: kernel launch (GPU) or dispatch (CPU)
    # memory held outside tensors: the CUDA context and cuBLAS workspaces, or a CPU process's
    # Python and libraries (measured for ``cpu``)
    reserve_bytes: int = int(1.0 * GIB)
    # the caching allocator's rounding and fragmentation, as a share of the tensors' peak
    fragmentation: float = 0.05
    measured: bool = False

    def required(self, peak_bytes: int) -> int:
        """Memory a run whose tensors peak at ``peak_bytes`` takes on this device."""
        return int(peak_bytes * (1 + self.fragmentation)) + self.reserve_bytes

    def flops(self, dtype: torch.dtype) -> float:
        return self.bf16_flops if dtype in (torch.bfloat16, torch.float16) else self.fp32_flops


def _gpu(name: str, mem_gib: float, bf16_tf: float, fp32_tf: float, gbs: float) -> Device:
    return Device(name, int(mem_gib * GIB), bf16_tf * 1e12, fp32_tf * 1e12, gbs * 1e9)


DEVICES: dict[str, Device] = {
    "h200": _gpu("NVIDIA H200 141 GB", 139.8, 989, 67, 4800),
    "h100": _gpu("NVIDIA H100 80 GB (SXM)", 79.2, 989, 67, 3350),
    "a100-80": _gpu("NVIDIA A100 80 GB", 79.2, 312, 19.5, 2039),
    "a100-40": _gpu("NVIDIA A100 40 GB", 39.4, 312, 19.5, 1555),
    "l40s": _gpu("NVIDIA L40S 48 GB", 44.4, 362, 91.6, 864),
    "4090": _gpu("NVIDIA GeForce RTX 4090 24 GB", 23.6, 165, 82.6, 1008),
    "cpu": Device(
        "this machine's CPU (measured)",
        0,
        0.0,
        0.0,
        0.0,
        efficiency=1.0,
        op_overhead_s=2e-5,
        reserve_bytes=0,
        fragmentation=0.0,
        measured=True,
    ),  # fmt: skip
}


def _rate(fn, work: float, repeats: int = 3) -> float:
    fn()  # warm-up (first-call allocation, oneDNN kernel choice)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return work / best


def measure_cpu() -> Device:
    """This machine: bf16 and fp32 ``F.linear`` FLOP/s (what the models run; a CPU without
    AVX512-BF16/AMX emulates bf16 at a fraction of fp32's rate), copy bandwidth, total RAM, and
    this process's resident memory (Python + libraries) as the reserve."""
    import psutil
    import torch.nn.functional as F

    n = 512
    x16, w16 = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
    x32, w32 = x16.float(), w16.float()
    src = torch.empty(32 * 2**20, dtype=torch.uint8)
    dst = torch.empty_like(src)
    bf16 = _rate(lambda: F.linear(x16, w16), 2 * n**3)
    fp32 = _rate(lambda: F.linear(x32, w32), 2 * n**3)
    bandwidth = _rate(lambda: dst.copy_(src), 2 * src.numel())
    rss = psutil.Process().memory_info().rss
    base = DEVICES["cpu"]
    return replace(base, name=f"this machine's CPU ({torch.get_num_threads()} threads, measured)",
                   memory_bytes=psutil.virtual_memory().total, bf16_flops=bf16, fp32_flops=fp32,
                   bandwidth=bandwidth, reserve_bytes=rss)  # fmt: skip


def resolve_device(
    gpu: str | None,
    *,
    memory_gib: float | None = None,
    tflops: float | None = None,
    bandwidth_gbs: float | None = None,
) -> Device:
    """A named device (``DEVICES``; ``cpu`` measured here), with any figure given explicitly
    replacing the table's; without a name, all three figures make a device of their own."""
    if gpu is None:
        if None in (memory_gib, tflops, bandwidth_gbs):
            raise ConfigError(
                f"no device: give gpu=NAME ({', '.join(DEVICES)}) or all of gpu_memory_gib=, gpu_tflops=, "
                "gpu_bandwidth_gbs="
            )
        device = Device("custom", 0, 0.0, 0.0, 0.0)
    else:
        key = gpu.lower()
        if key not in DEVICES:
            raise ConfigError(f"gpu={gpu}: expected one of {', '.join(DEVICES)} (or gpu_memory_gib= etc.)")
        device = measure_cpu() if DEVICES[key].measured else DEVICES[key]
    changes: dict = {}
    if memory_gib is not None:
        changes["memory_bytes"] = int(memory_gib * GIB)
    if tflops is not None:  # one figure for bf16; fp32 keeps the table's ratio (or 1/8 for a custom one)
        ratio = device.fp32_flops / device.bf16_flops if device.bf16_flops else 1 / 8
        changes.update(bf16_flops=tflops * 1e12, fp32_flops=tflops * 1e12 * ratio)
    if bandwidth_gbs is not None:
        changes["bandwidth"] = bandwidth_gbs * 1e9
    return replace(device, **changes)
