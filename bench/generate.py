#!/usr/bin/env python
"""Batched generation with images: medcap's KV-cache loop against transformers' ``generate`` on
the same weights and prompts (SmolLM2-135M-sized decoder, random weights, fp32, CPU), greedy,
64 new tokens (no early stop), batch 8, prompts of 96 tokens holding 32 image tokens. Then the
wall time of answering 200 questions (8 new tokens each) batched vs one at a time. Last line JSON.

    .venv/bin/python bench/generate.py [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

VOCAB, DIM, LAYERS, HEADS, KV_HEADS, FFN, N_IMG = 49152, 576, 30, 9, 3, 1536, 32


def build():
    from medcap.models.fusion import build_medcap_model
    from medcap.models.llms import smollm2_135m

    torch.manual_seed(0)
    model = build_medcap_model(
        smollm2_135m(max_seq_len=1024), image_token_id=VOCAB, vision="vit_tiny", num_image_tokens=N_IMG
    )
    return model.eval()


def prompts(n: int, length: int, seed: int = 0, vary: bool = False) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        size = int(torch.randint(length - 36, length + 36, (1,), generator=g)) if vary else length
        body = torch.randint(10, VOCAB, (size - N_IMG - 1,), generator=g).tolist()
        out.append([1, *[VOCAB] * N_IMG, *body])
    return out


def hf_model(medcap):
    from torchtune.models.convert_weights import tune_to_hf
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=DIM, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS, max_position_embeddings=1024, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
    )  # fmt: skip
    llm = LlamaForCausalLM(config).eval()
    state = {"tok_embeddings.weight": medcap.tok_embeddings.weight}
    state.update({k: v for k, v in medcap.decoder.state_dict().items() if not k.startswith("tok_embeddings")})
    hf_state = tune_to_hf(state, num_heads=HEADS, num_kv_heads=KV_HEADS, dim=DIM)
    hf_state.pop("lm_head.weight", None)
    llm.load_state_dict(hf_state, strict=False)
    return llm


@torch.no_grad()
def hf_generate(llm, medcap, batch: list[list[int]], images, new_tokens: int) -> torch.Tensor:
    """transformers' generate with the same image tokens given through inputs_embeds (left-padded)."""
    length = max(len(p) for p in batch)
    tokens = torch.zeros(len(batch), length, dtype=torch.long)
    mask = torch.zeros(len(batch), length, dtype=torch.long)
    for i, p in enumerate(batch):
        tokens[i, length - len(p) :] = torch.tensor(p)
        mask[i, length - len(p) :] = 1
    embeds = medcap.embed(tokens, images)
    return llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                        do_sample=False, pad_token_id=0, eos_token_id=None)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--questions", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from medcap.generation import generate

    model = build()
    llm = hf_model(model)
    batch = prompts(8, 96)
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=64, stop_tokens=[-1], pad_id=0)
    generate(model, batch[:2], images[:2], **{**kwargs, "max_new_tokens": 4})  # warm-up
    hf_generate(llm, model, batch[:2], images[:2], 4)

    start = time.perf_counter()
    ours = generate(model, batch, images, **kwargs)
    medcap_rate = 8 * 64 / (time.perf_counter() - start)
    start = time.perf_counter()
    theirs = hf_generate(llm, model, batch, images, 64)
    hf_rate = 8 * 64 / (time.perf_counter() - start)
    agree = sum(a == b for x, y in zip(ours, theirs.tolist()) for a, b in zip(x, y)) / (8 * 64)
    print(f"batch 8, 96-token prompts, 64 new tokens: medcap {medcap_rate:.1f} tokens/s, transformers {hf_rate:.1f} "
          f"tokens/s ({medcap_rate / hf_rate:.2f}x); greedy tokens agreeing: {agree:.0%}")  # fmt: skip

    questions = prompts(args.questions, 96, seed=2, vary=True)
    q_images = torch.randn(args.questions, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    short = dict(max_new_tokens=8, stop_tokens=[-1], pad_id=0)
    start = time.perf_counter()
    for i in range(0, args.questions, 8):
        generate(model, questions[i : i + 8], q_images[i : i + 8], **short)
    batched = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(args.questions):
        generate(model, questions[i : i + 1], q_images[i : i + 1], **short)
    single = time.perf_counter() - start
    print(f"{args.questions} questions, 8 new tokens each: batched (8) {batched:.1f} s, one at a time {single:.1f} s "
          f"({single / batched:.2f}x)")  # fmt: skip
    print(json.dumps({
        "medcap_tokens_per_s": round(medcap_rate, 1), "baseline_tokens_per_s": round(hf_rate, 1),
        "speedup": round(medcap_rate / hf_rate, 3), "greedy_agreement": round(agree, 3),
        "questions": args.questions, "batched_s": round(batched, 1), "one_at_a_time_s": round(single, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
