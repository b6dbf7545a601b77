#!/usr/bin/env python
"""Batched generation with images: medcap's KV-cache loop against transformers' ``generate`` on
the same weights and prompts (SmolLM2-135M-sized decoder, random weights, fp32, CPU), greedy,
64 new tokens (no early stop), batch 8, prompts of 96 tokens holding 32 image tokens. Then the
wall time of answering 200 questions (8 new tokens each) batched vs one at a time. medcap runs
eager and with its decode step compiled (``compile_decoding``); the compile time is reported
apart, and in a second "including compile" figure. Last line JSON.

    .venv/bin/python bench/generate.py [--threads 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--questions", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from medcap.decoding import compile_decoding, generate

    model = build()
    llm = hf_model(model)
    batch = prompts(8, 96)
    images = torch.randn(8, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    kwargs = dict(max_new_tokens=64, stop_tokens=[-1], pad_id=0)
    generate(model, batch[:2], images[:2], **{**kwargs, "max_new_tokens": 4})  # warm-up
    hf_generate(llm, model, batch[:2], images[:2], 4)
    tokens = 8 * 64
    eager_s, hf_s = [], []
    for _ in range(args.repeats):  # interleaved, so a busy moment hits both
        ours, seconds = timed(lambda: generate(model, batch, images, **kwargs))
        eager_s.append(seconds)
        theirs, seconds = timed(lambda: hf_generate(llm, model, batch, images, 64))
        hf_s.append(seconds)
    step = compile_decoding(model)
    compiled_out, first = timed(lambda: generate(model, batch, images, **kwargs, step=step))  # includes the compile
    compiled_s = [timed(lambda: generate(model, batch, images, **kwargs, step=step))[1] for _ in range(args.repeats)]
    med = statistics.median
    eager_rate, hf_rate, compiled_rate = tokens / med(eager_s), tokens / med(hf_s), tokens / med(compiled_s)
    compile_s = first - med(compiled_s)
    theirs = theirs.tolist()
    agree = sum(a == b for x, y in zip(ours, theirs) for a, b in zip(x, y)) / tokens
    same = ours == compiled_out
    print(f"batch 8, 96-token prompts, 64 new tokens (median of {args.repeats}): medcap eager {eager_rate:.1f} tokens/s, "
          f"medcap compiled {compiled_rate:.1f} tokens/s (compile {compile_s:.1f} s once), transformers {hf_rate:.1f} "
          f"tokens/s; greedy tokens agreeing with transformers {agree:.0%}, compiled == eager: {same}")  # fmt: skip
    print(f"speedup over transformers: eager {eager_rate / hf_rate:.2f}x, compiled {compiled_rate / hf_rate:.2f}x, "
          f"compiled including its compile in this one run {tokens / first / hf_rate:.2f}x")  # fmt: skip

    questions = prompts(args.questions, 96, seed=2, vary=True)
    q_images = torch.randn(args.questions, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    short = dict(max_new_tokens=8, stop_tokens=[-1], pad_id=0)

    def answer_all(size: int) -> float:
        return timed(lambda: [generate(model, questions[i : i + size], q_images[i : i + size], **short)
                              for i in range(0, args.questions, size)])[1]  # fmt: skip

    answer_all(1)  # compile the batch-1 graph outside the timing
    batched, single = answer_all(8), answer_all(1)
    print(f"{args.questions} questions, 8 new tokens each (compiled): batched (8) {batched:.1f} s, one at a time "
          f"{single:.1f} s ({single / batched:.2f}x)")  # fmt: skip
    print(json.dumps({
        "medcap_tokens_per_s": round(compiled_rate, 1), "medcap_eager_tokens_per_s": round(eager_rate, 1),
        "baseline_tokens_per_s": round(hf_rate, 1), "speedup": round(compiled_rate / hf_rate, 3),
        "speedup_eager": round(eager_rate / hf_rate, 3), "speedup_incl_compile": round(tokens / first / hf_rate, 3),
        "compile_s": round(compile_s, 1), "greedy_agreement": round(agree, 3), "compiled_equals_eager": same,
        "questions": args.questions, "batched_s": round(batched, 1), "one_at_a_time_s": round(single, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
