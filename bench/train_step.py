#!/usr/bin/env python
"""One vision-only training step: medcap against an equivalent transformers model, same run.

Both sides: a SmolLM2-135M-shaped decoder with the same random weights (frozen), the same small
ViT + cls_mlp connector (trainable), batch 4, sequence 400 holding 32 image tokens and 30 answer
tokens. The baseline injects the image tokens through ``inputs_embeds`` and uses the standard
full-sequence loss (``LlamaForCausalLM(..., labels=...)``). Each variant runs in its own process
so its peak RSS is its own. Prints a table and, last, one JSON line.

    .venv/bin/python bench/train_step.py [--steps 3] [--batch 4] [--seq 400]

``mfu``: model FLOPs actually needed per step (decoder forward, input-gradient backward through
the frozen decoder, the head at label positions) per second, over the fp32 rate of the step's
own matmul shapes measured in the same run (best of several repeats, same threads).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

IMAGE_TOKENS, ANSWER_TOKENS = 32, 30
VOCAB, DIM, LAYERS, HEADS, KV_HEADS, FFN = 49152, 576, 30, 9, 3, 1536


def make_inputs(batch: int, seq: int):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (batch, seq), generator=g)
    tokens[:, 1 : 1 + IMAGE_TOKENS] = VOCAB  # placeholder id, outside the vocabulary
    labels = torch.full_like(tokens, -100)
    labels[:, seq - ANSWER_TOKENS - 1 : seq - 1] = tokens[:, seq - ANSWER_TOKENS :]  # shifted targets
    images = torch.randn(batch, 3, 64, 64, generator=g)
    return tokens, labels, images


def build_medcap(checkpointing: bool, compile_layers: bool = False):
    from torchtune import modules, training

    from medcap.models.fusion import build_medcap_model
    from medcap.models.llms import smollm2_135m

    torch.manual_seed(0)
    decoder = smollm2_135m(max_seq_len=2048)
    model = build_medcap_model(
        decoder, image_token_id=VOCAB, vision="vit_tiny", num_image_tokens=IMAGE_TOKENS
    )
    if checkpointing:
        training.set_activation_checkpointing(
            model.decoder, auto_wrap_policy={modules.TransformerSelfAttentionLayer}
        )
    if compile_layers:  # the recipe's compile=True
        for layer in model.decoder.layers:
            layer.compile()
    return model


def medcap_step_fn(checkpointing: bool, compile_layers: bool = False):
    model = build_medcap(checkpointing, compile_layers)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step(tokens, labels, images):
        logits, targets = model(tokens, images=images, labels=labels)
        loss = torch.nn.functional.cross_entropy(logits, targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def baseline_step_fn(head_at_labels: bool = False, checkpointing: bool = False):
    from torchtune.models.convert_weights import tune_to_hf
    from transformers import LlamaConfig, LlamaForCausalLM

    medcap = build_medcap(False)  # same weights, same vision side
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=DIM,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    llm = LlamaForCausalLM(config)
    state = {
        "tok_embeddings.weight": medcap.tok_embeddings.weight,
        **{k: v for k, v in medcap.decoder.state_dict().items() if not k.startswith("tok_embeddings")},
    }
    hf_state = tune_to_hf(state, num_heads=HEADS, num_kv_heads=KV_HEADS, dim=DIM)
    hf_state.pop("lm_head.weight", None)
    llm.load_state_dict(hf_state, strict=False)
    llm.requires_grad_(False)
    if checkpointing:
        llm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        llm.train()
    visual, projector = medcap.visual, medcap.projector
    params = [p for m in (visual, projector) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5)
    embed = llm.get_input_embeddings()

    def step(tokens, labels, images):
        is_image = tokens == VOCAB
        h = embed(tokens.masked_fill(is_image, 0))
        h = h.masked_scatter(is_image.unsqueeze(-1), projector(visual(images)).to(h.dtype))
        if head_at_labels:  # the calibration variant: hidden states, then the head where labels are
            hidden = llm.model(inputs_embeds=h).last_hidden_state
            keep = labels != -100
            loss = torch.nn.functional.cross_entropy(llm.lm_head(hidden[keep]).float(), labels[keep])
        else:  # HF shifts labels itself: give it unshifted ones
            hf_labels = torch.cat([torch.full_like(labels[:, :1], -100), labels[:, :-1]], dim=1)
            loss = llm(inputs_embeds=h, labels=hf_labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def step_flops(batch: int, seq: int) -> float:
    """Matmul FLOPs a frozen-LLM, vision-only step needs (the vision encoder left out)."""
    head_dim = DIM // HEADS
    linear = (
        2
        * batch
        * seq
        * LAYERS
        * (DIM * (HEADS + 2 * KV_HEADS) * head_dim + HEADS * head_dim * DIM + 3 * DIM * FFN)
    )
    attention = 2 * 2 * batch * LAYERS * HEADS * head_dim * seq * seq / 2  # QK^T and AV, causal half
    forward = linear + attention
    backward_input = linear + 2 * attention  # dX through frozen linears; dQ, dK, dV in attention
    head = 2 * 2 * batch * ANSWER_TOKENS * DIM * VOCAB  # logits and their input gradient
    return forward + backward_input + head


def model_matmul_rate(batch: int, seq: int, repeats: int = 5) -> float:
    """The fp32 rate of the step's own matrix multiplies: every linear layer's forward (x W^T)
    and input-gradient (g W) shape at batch x seq tokens, and the head's at the label positions,
    each timed best of ``repeats`` and weighted by its FLOPs. A square 2048 GEMM overstates what
    these skinny shapes reach on a CPU (an MFU above 1 once); this keeps MFU a true fraction."""
    head_dim = DIM // HEADS
    tokens = batch * seq
    linears = [(DIM, HEADS * head_dim), (DIM, KV_HEADS * head_dim), (DIM, KV_HEADS * head_dim),
               (HEADS * head_dim, DIM), (DIM, FFN), (DIM, FFN), (FFN, DIM)]  # fmt: skip
    shapes = []
    for k, n in linears:
        shapes += [(tokens, k, n, LAYERS), (tokens, n, k, LAYERS)]  # forward, input gradient
    shapes += [(batch * ANSWER_TOKENS, DIM, VOCAB, 1), (batch * ANSWER_TOKENS, VOCAB, DIM, 1)]
    flops = seconds = 0.0
    for m, k, n, count in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        flops += 2 * m * k * n * count
        seconds += best * count
    return flops / seconds


def run_variant(name: str, steps: int, batch: int, seq: int) -> dict:
    torch.manual_seed(0)
    step = {
        "baseline": baseline_step_fn,
        "hf_head_at_labels": lambda: baseline_step_fn(head_at_labels=True),
        "hf_head_at_labels_ac": lambda: baseline_step_fn(head_at_labels=True, checkpointing=True),
        "medcap": lambda: medcap_step_fn(False),
        "medcap_compiled": lambda: medcap_step_fn(False, compile_layers=True),
        "medcap_ac": lambda: medcap_step_fn(True),
    }[name]()
    tokens, labels, images = make_inputs(batch, seq)
    step(tokens, labels, images)  # warm-up (and compilation)
    start = time.perf_counter()
    losses = [step(tokens, labels, images) for _ in range(steps)]
    elapsed = time.perf_counter() - start
    return {
        "variant": name,
        "samples_per_s": batch * steps / elapsed,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_loss": losses[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.steps, args.batch, args.seq)))
        return

    rate = model_matmul_rate(args.batch, args.seq)
    rows = {}
    for name in (
        "baseline",
        "hf_head_at_labels",
        "hf_head_at_labels_ac",
        "medcap",
        "medcap_compiled",
        "medcap_ac",
    ):
        cmd = [
            sys.executable,
            __file__,
            "--variant",
            name,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--threads",
            str(args.threads),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[name] = json.loads(out)
    flops = step_flops(args.batch, args.seq)
    print(
        f"fp32 rate at the model's matmul shapes: {rate / 1e9:.0f} GFLOP/s ({args.threads} threads); model FLOPs per step: {flops / 1e9:.0f} G"
    )
    print(f"{'variant':22s} {'samples/s':>10s} {'peak RSS MB':>12s} {'first loss':>11s}")
    for name, row in rows.items():
        print(f"{name:22s} {row['samples_per_s']:10.3f} {row['peak_mb']:12.0f} {row['first_loss']:11.4f}")
    best = rows["medcap_compiled"]  # compile=True: the fastest and leanest medcap configuration here
    base = rows["baseline"]
    result = {
        "medcap_samples_per_s": round(best["samples_per_s"], 3),
        "baseline_samples_per_s": round(base["samples_per_s"], 3),
        "speedup": round(best["samples_per_s"] / base["samples_per_s"], 3),
        "medcap_peak_mb": round(best["peak_mb"]),
        "baseline_peak_mb": round(base["peak_mb"]),
        "memory_ratio": round(best["peak_mb"] / base["peak_mb"], 3),
        "mfu": round(flops * best["samples_per_s"] / args.batch / rate, 3),
        "medcap_eager_samples_per_s": round(rows["medcap"]["samples_per_s"], 3),
        "medcap_eager_peak_mb": round(rows["medcap"]["peak_mb"]),
        "medcap_ac_samples_per_s": round(rows["medcap_ac"]["samples_per_s"], 3),
        "medcap_ac_peak_mb": round(rows["medcap_ac"]["peak_mb"]),
        "hf_head_at_labels_samples_per_s": round(rows["hf_head_at_labels"]["samples_per_s"], 3),
        "hf_head_at_labels_peak_mb": round(rows["hf_head_at_labels"]["peak_mb"]),
        "hf_head_at_labels_ac_samples_per_s": round(rows["hf_head_at_labels_ac"]["samples_per_s"], 3),
        "hf_head_at_labels_ac_peak_mb": round(rows["hf_head_at_labels_ac"]["peak_mb"]),
        "matmul_gflops": round(rate / 1e9),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
