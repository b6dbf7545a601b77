"""What a traced step measures: PyTorch's ``MemTracker`` for memory, a roofline for time.

``StepMemTracker`` is ``torch.distributed._tools.mem_tracker.MemTracker`` with two changes a
frozen 8B LLM and decoding need: frozen parameters get no gradient hooks (upstream registers one
on every parameter, which raises for a parameter that does not require grad), a module may run
twice outside backward (decoding), and only the global peak is kept (upstream walks every module's statistics on every operator: 20 million calls, about
400 s, for one step of Llama-3-8B).

``Roofline`` times each operator as PyTorch's ``RuntimeEstimator`` does in its cost-model mode
(``max(compute, transfer)``, FLOPs from ``torch.utils.flop_counter``'s formulas), for any
device's figures: ``RuntimeEstimator`` needs a CUDA device to run at all, knows only the
datasheets it ships (no H200, L40S, 4090 or CPU), and counts multiply-adds against the FLOP/s
peak (``flops / 2 / (0.75 * peak)``), i.e. runs faster than the card's datasheet allows.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils._runtime_estimation import _IGNORE_OPS, get_num_bytes
from torch.utils.flop_counter import flop_registry

from medcap.estimate.devices import Device

TOTAL = "Total"


class _NoHook:
    def remove(self) -> None:
        pass


class GlobalPeakOnly:
    """For a ``MemTracker`` (or ``FSDPMemTracker``): keep the global peak's snapshot only;
    upstream keeps every module's, which took minutes for one 8B step."""

    _curr_mem_snap: dict
    _peak_mem: dict
    _peak_mem_snap: dict

    def _update_peak_stats(self, peak_state: Any) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap[TOTAL]:
                self._peak_mem[dev] = snap[TOTAL]
                self._peak_mem_snap[dev] = dict(snap)

    def peak(self) -> dict[str, int]:
        """Bytes by kind (the tracker's reference-type values) at the moment of the peak, and
        ``Total``; one device."""
        snaps = list(self._peak_mem_snap.values())
        if len(snaps) != 1:
            raise RuntimeError(f"expected one traced device, found {list(self._peak_mem_snap)}")
        return {getattr(k, "value", k): int(v) for k, v in snaps[0].items()}


class StepMemTracker(GlobalPeakOnly, MemTracker):
    """``MemTracker`` for a model whose frozen parameters never get gradients."""

    def _track_module_params_and_buffers(self, module: torch.nn.Module, install_grad_hooks: bool = True):
        for p in module.parameters():
            if not p.requires_grad:  # a placeholder handle: upstream then installs no hook on it
                self._param_to_grad_hook_handles.setdefault(p, (_NoHook(), _NoHook()))
        return super()._track_module_params_and_buffers(module, install_grad_hooks)

    def _pre_fw_hook(self, module: torch.nn.Module, inputs: Any) -> None:
        # a module called again in forward (decoding calls RoPE twice from outside its parent,
        # and the decode step after the prefill) starts afresh: only the global peak is kept
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            del self.memory_tracking[module]
        super()._pre_fw_hook(module, inputs)



class Roofline(TorchDispatchMode):
    """Seconds for the operators run inside it on ``device``: per operator the larger of its
    FLOPs over the device's throughput (bf16 or fp32, by the output's dtype) and the bytes it
    reads and writes over the bandwidth, plus a fixed per-operator overhead."""

    def __init__(self, device: Device):
        super().__init__()
        self.device = device
        self.seconds = 0.0
        self.flops = 0
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):  # FSDP2's sharded parameters: count the
            return NotImplemented  # local operators DTensor runs on this rank's shards instead
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in _IGNORE_OPS:
            return out
        flat_in, _ = tree_flatten((args, kwargs))
        flat_out, _ = tree_flatten(out)
        moved = sum(get_num_bytes(t) for t in (*flat_in, *flat_out) if isinstance(t, torch.Tensor))
        d = self.device
        seconds = moved / (d.bandwidth * d.efficiency)
        if packet in flop_registry:
            flops = int(flop_registry[packet](*args, **kwargs, out_val=out))
            dtype = next((t.dtype for t in flat_out if isinstance(t, torch.Tensor)), torch.float32)
            seconds = max(seconds, flops / (d.flops(dtype) * d.efficiency))
            self.flops += flops
        self.seconds += seconds + d.op_overhead_s
        self.ops[str(packet)] += 1
        return out
