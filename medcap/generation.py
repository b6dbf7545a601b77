"""Batched decoding with images and a KV cache (torchtune's ``generate`` cannot pass images).

Prompts are left-padded; the prefill runs the images through the fused model once, then one
token per step. Greedy when ``temperature == 0``; otherwise temperature / top-k sampling from a
seeded generator. Each row stops at its own stop token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask, sample
from torchtune.modules import TransformerDecoder
from torchtune.modules.common_utils import delete_kv_caches

from medcap.models.fusion import MedcapModel


def _pick(
    logits: torch.Tensor, temperature: float, top_k: int | None, rng: torch.Generator | None
) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    q = torch.empty(logits.shape, device=logits.device).exponential_(1, generator=rng)
    return sample(logits.float(), temperature=temperature, top_k=top_k, q=q).squeeze(-1).long()


@torch.no_grad()
def generate(
    model: MedcapModel | TransformerDecoder,
    prompts: Sequence[Sequence[int]],
    images: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    stop_tokens: Sequence[int],
    pad_id: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: torch.Generator | None = None,
    use_cache: bool = True,
) -> list[list[int]]:
    """New tokens for each prompt (stop token excluded). ``images`` [M, 3, H, W] belong, in
    order, to the prompts that hold image placeholders; ``model`` may also be a plain torchtune
    decoder (text only, e.g. the judge)."""
    device = model.tok_embeddings.weight.device
    batch, prompt_len = len(prompts), max(len(p) for p in prompts)
    total = prompt_len + max_new_tokens
    tokens = torch.full((batch, prompt_len), pad_id, dtype=torch.long, device=device)
    padding = torch.zeros(batch, total, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_len - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        padding[row, prompt_len - len(prompt) :] = True
    masks = get_causal_mask_from_padding_mask(padding, target_seq_len=total)  # [B, total, total]
    positions = get_position_ids_from_padding_mask(padding)  # [B, total]
    stop = torch.tensor(list(stop_tokens), device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    out = torch.full((batch, max_new_tokens), pad_id, dtype=torch.long, device=device)
    with_images = {} if images is None else {"images": images.to(device)}

    if use_cache:
        model.setup_caches(batch, model.tok_embeddings.weight.dtype, decoder_max_seq_len=total)
    try:
        if use_cache:
            logits = model(
                tokens, **with_images, mask=masks[:, :prompt_len], input_pos=positions[:, :prompt_len]
            )
        else:
            logits = model(
                tokens,
                **with_images,
                mask=masks[:, :prompt_len, :prompt_len],
                input_pos=positions[:, :prompt_len],
            )
        for step in range(max_new_tokens):
            if hasattr(logits, "full_tensor"):  # tensor-parallel output
                logits = logits.full_tensor()
            nxt = _pick(logits[:, -1], temperature, top_k, rng)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            done |= torch.isin(nxt, stop)
            out[:, step] = nxt
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            pos = prompt_len + step
            if use_cache:
                logits = model(
                    nxt[:, None], mask=masks[:, pos : pos + 1], input_pos=positions[:, pos : pos + 1]
                )
            else:
                seq = torch.cat([tokens, out[:, : step + 1]], dim=1)
                logits = model(
                    seq, **with_images, mask=masks[:, : pos + 1, : pos + 1], input_pos=positions[:, : pos + 1]
                )
    finally:
        if use_cache:
            delete_kv_caches(model)

    results = []
    for row in out.tolist():
        ids = []
        for tok in row:
            if tok in stop_tokens:
                break
            ids.append(tok)
        results.append(ids)
    return results
