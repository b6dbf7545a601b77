#!/usr/bin/env python
"""Vision-only training step at full size on a GPU: a Llama-3-8B-shaped decoder with random
weights (no download: speed does not depend on the values), frozen in bf16; the BiomedCLIP
encoder + cls_mlp connector (N = 32) trainable in fp32 under bf16 autocast; batch 16, sequence 400
with 30 answer tokens; activation checkpointing; fused AdamW. Prints samples/s, peak memory and
model FLOPs utilisation against the bf16 matmul rate measured in the same run; last line JSON.

    bash bench/gpu_train.sh            # or: python bench/gpu_train.py --steps 10
    python bench/gpu_train.py --tiny --device cpu   # a check of the script itself, on a CPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torchtune import modules, training


def decoder_flops(
    batch: int, seq: int, answer: int, dim: int, layers: int, heads: int, kv_heads: int, ffn: int, vocab: int
) -> float:
    """Forward + input-gradient backward of the frozen decoder, head at label positions only."""
    hd = dim // heads
    linear = 2 * batch * seq * layers * (dim * (heads + 2 * kv_heads) * hd + heads * hd * dim + 3 * dim * ffn)
    attention = 2 * batch * layers * heads * hd * seq * seq  # QK^T and AV, causal half of 2x
    return 2 * linear + 3 * attention + 4 * batch * answer * dim * vocab


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=400)
    parser.add_argument("--answer", type=int, default=30)
    parser.add_argument("--num_image_tokens", type=int, default=32)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--no_checkpointing", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="tiny dims, to check the script on a CPU")
    args = parser.parse_args()
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    llm_dtype = torch.bfloat16 if on_gpu else torch.float32

    from torchtune.models.llama3 import llama3

    from medcap.models.fusion import build_medcap_model

    dims = dict(
        vocab_size=128256,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        embed_dim=4096,
        max_seq_len=2048,
        intermediate_dim=14336,
    )
    vision = "biomedclip"
    if args.tiny:
        dims = dict(
            vocab_size=1024,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            embed_dim=64,
            max_seq_len=512,
            intermediate_dim=128,
        )
        vision = "vit_tiny"
    with training.set_default_dtype(llm_dtype), device:
        decoder = llama3(**dims)
    model = build_medcap_model(
        decoder, image_token_id=dims["vocab_size"], vision=vision, num_image_tokens=args.num_image_tokens
    )
    model.visual.float().to(device)
    model.projector.float().to(device)
    if not args.no_checkpointing:
        training.set_activation_checkpointing(
            model.decoder, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
        )
    if args.compile:
        for layer in model.decoder.layers:
            layer.compile()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-5, fused=on_gpu)
    trainable = sum(p.numel() for p in params)

    size = model.visual.preprocess.size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, dims["vocab_size"], (args.batch, args.seq), generator=g)
    tokens[:, 1 : 1 + args.num_image_tokens] = dims["vocab_size"]
    labels = torch.full_like(tokens, -100)
    labels[:, -args.answer - 1 : -1] = tokens[:, -args.answer :]
    images = torch.randn(args.batch, 3, size, size, generator=g)
    tokens, labels, images = tokens.to(device), labels.to(device), images.to(device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
            logits, targets = model(tokens, images=images, labels=labels)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    def sync():
        if on_gpu:
            torch.cuda.synchronize()

    step()
    step()  # warm-up (allocator, compilation)
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    elapsed = time.perf_counter() - start

    n = 8192 if on_gpu else 512
    a = torch.randn(n, n, device=device, dtype=llm_dtype)
    a @ a
    sync()
    t0 = time.perf_counter()
    for _ in range(20):
        a @ a
    sync()
    matmul = 2 * n**3 * 20 / (time.perf_counter() - t0)

    flops = decoder_flops(
        args.batch,
        args.seq,
        args.answer,
        dims["embed_dim"],
        dims["num_layers"],
        dims["num_heads"],
        dims["num_kv_heads"],
        dims["intermediate_dim"],
        dims["vocab_size"],
    )
    samples = args.batch * args.steps / elapsed
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None
    name = torch.cuda.get_device_name(device) if on_gpu else "cpu"
    print(
        f"{name}: {samples:.2f} samples/s, {args.steps} steps of batch {args.batch} x {args.seq} tokens, "
        f"peak {peak:.1f} GiB, trainable {trainable / 1e6:.0f}M"
    )
    print(
        f"model FLOPs/step {flops / 1e12:.2f} T (decoder fwd + input-grad bwd + head at labels; vision excluded); "
        f"measured matmul {matmul / 1e12:.0f} TFLOP/s"
    )
    print(
        json.dumps(
            {
                "device": name,
                "samples_per_s": round(samples, 3),
                "peak_gib": None if peak is None else round(peak, 2),
                "mfu": round(flops * samples / args.batch / matmul, 3),
                "matmul_tflops": round(matmul / 1e12, 1),
                "batch": args.batch,
                "seq": args.seq,
                "activation_checkpointing": not args.no_checkpointing,
                "compile": args.compile,
            }
        )
    )


if __name__ == "__main__":
    main()
