"""The judge's memory (``chat_llama3.py``): arithmetic, not a trace. Parameters are counted on the
meta device from torchtune's builder; weights are bf16 (2 bytes), or NF4 for the decoder layers'
linear weights (4 bits plus the block scales torchao keeps: about 0.52 bytes) with the
embedding, head and norms in bf16; tensor parallelism over N GPUs divides weights by N and the
KV cache by min(N, KV heads). The KV cache holds ``batch_size x max_seq_len`` positions;
activations of a judge prompt are small next to both and counted as one layer's worth.
The fake-tensor trace is not used here: NF4 tensors and DTensors are subclasses MemTracker
does not see through.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import OmegaConf

from medcap.estimate.devices import GIB, Device
from medcap.estimate.model import llm_on_meta

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit values, int8 scale per 64, fp32 scale per 256 scales


@dataclass(frozen=True)
class JudgeOptions:
    model: str = "torchtune.models.llama3_1.llama3_1_70b"
    gpus: int = 1  # tensor-parallel ranks
    nf4: bool = False
    batch_size: int = 8
    max_seq_len: int = 200  # chat_llama3.py's --max_seq_len


def judge_memory(options: JudgeOptions, device: Device) -> dict:
    """Per-GPU bytes by part, the total, and whether it fits."""
    decoder = llm_on_meta(OmegaConf.create({"_component_": options.model}), torch.bfloat16)
    layer_linear = sum(
        m.weight.numel()
        for layer in decoder.layers
        for m in layer.modules()
        if isinstance(m, torch.nn.Linear)
    )
    total = sum(p.numel() for p in decoder.parameters())
    other = total - layer_linear  # embedding, output head, norms
    per_value = NF4_BYTES if options.nf4 else 2.0
    tp = max(1, options.gpus)
    attn = decoder.layers[0].attn
    kv_heads, head_dim = attn.num_kv_heads, attn.head_dim
    kv = 2 * len(decoder.layers) * kv_heads * head_dim * 2 * options.batch_size * options.max_seq_len
    dim = decoder.tok_embeddings.embedding_dim
    ffn = decoder.layers[0].mlp.w1.out_features
    activations = options.batch_size * options.max_seq_len * (4 * dim + 3 * ffn) * 2
    logits = options.batch_size * decoder.tok_embeddings.num_embeddings * 4
    parts = {
        "weights": int((layer_linear * per_value + other * 2) / tp),
        "KV cache": int(kv / min(tp, kv_heads)),
        "activations": int(activations / tp) + logits,
    }
    peak = sum(parts.values())
    return {
        "parameters": total,
        "breakdown": parts,
        "peak_bytes": peak,
        "required_bytes": device.required(peak),
        "fits": device.required(peak) <= device.memory_bytes,
        "method": "arithmetic",
    }


def judge_report(options: JudgeOptions, device: Device, result: dict) -> str:
    how = f"{'NF4' if options.nf4 else 'bf16'}, " + (
        f"tensor parallel over {options.gpus} GPUs" if options.gpus > 1 else "one GPU"
    )
    lines = [f"judge {options.model.rsplit('.', 1)[-1]} ({result['parameters'] / 1e9:.1f}B parameters), {how}, "
             f"batch {options.batch_size} x {options.max_seq_len} tokens, on {device.name} "
             f"({device.memory_bytes / GIB:.1f} GiB per GPU)", "", "memory per GPU (arithmetic, not traced)"]  # fmt: skip
    for name, value in result["breakdown"].items():
        lines.append(f"  {name:<20s}{value / GIB:7.2f} GiB")
    lines.append(f"  {'with reserve':<20s}{result['required_bytes'] / GIB:7.2f} GiB")
    lines.append(f"  {'fits' if result['fits'] else 'does NOT fit'} in {device.memory_bytes / GIB:.1f} GiB")
    return "\n".join(lines)
