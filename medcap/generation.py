"""Batched decoding with images and a KV cache (torchtune's ``generate`` cannot pass images),
in gpt-fast's three parts: ``prefill`` runs the left-padded prompts (and their images, through
the fused model) once, ``decode_step`` feeds one token per row, and ``generate`` loops.

Greedy when ``temperature == 0``; otherwise temperature / top-k sampling from a seeded
generator. Each row stops at its own stop token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask, sample
from torchtune.modules import TransformerDecoder
from torchtune.modules.common_utils import delete_kv_caches

from medcap.models.fusion import MedcapModel


@dataclass
class Batch:
    """Left-padded prompts and, for every position up to ``total``, the causal mask and the
    RoPE positions (pads do not count)."""

    tokens: torch.Tensor  # [B, prompt_len]
    masks: torch.Tensor  # [B, total, total]
    positions: torch.Tensor  # [B, total]

    @property
    def prompt_len(self) -> int:
        return self.tokens.shape[1]


def left_pad(prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int, device: torch.device) -> Batch:
    batch, prompt_len = len(prompts), max(len(p) for p in prompts)
    total = prompt_len + max_new_tokens
    tokens = torch.full((batch, prompt_len), pad_id, dtype=torch.long, device=device)
    padding = torch.zeros(batch, total, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_len - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        padding[row, prompt_len - len(prompt) :] = True
    masks = get_causal_mask_from_padding_mask(padding, target_seq_len=total)
    return Batch(tokens, masks, get_position_ids_from_padding_mask(padding))


def prefill(model: MedcapModel | TransformerDecoder, batch: Batch, images: torch.Tensor | None) -> torch.Tensor:
    """Logits [B, V] after the last prompt token; fills the KV caches with the prompts."""
    n = batch.prompt_len
    with_images = {} if images is None else {"images": images}
    logits = model(batch.tokens, **with_images, mask=batch.masks[:, :n], input_pos=batch.positions[:, :n])
    return _gathered(logits)[:, -1]


def decode_step(
    model: MedcapModel | TransformerDecoder, batch: Batch, token: torch.Tensor, pos: int
) -> torch.Tensor:
    """Logits [B, V] after feeding ``token`` [B] at sequence position ``pos``."""
    logits = model(token[:, None], mask=batch.masks[:, pos : pos + 1], input_pos=batch.positions[:, pos : pos + 1])
    return _gathered(logits)[:, -1]


def _gathered(logits: torch.Tensor) -> torch.Tensor:
    return logits.full_tensor() if hasattr(logits, "full_tensor") else logits  # tensor-parallel output


def pick(logits: torch.Tensor, temperature: float, top_k: int | None, rng: torch.Generator | None) -> torch.Tensor:
    """Next token per row: argmax, or a seeded temperature / top-k sample."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    q = torch.empty(logits.shape, device=logits.device).exponential_(1, generator=rng)
    return sample(logits.float(), temperature=temperature, top_k=top_k, q=q).squeeze(-1).long()


def strip_at_stop(rows: list[list[int]], stop_tokens: Sequence[int]) -> list[list[int]]:
    stops = set(stop_tokens)
    out = []
    for row in rows:
        ids = []
        for tok in row:
            if tok in stops:
                break
            ids.append(tok)
        out.append(ids)
    return out


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
) -> list[list[int]]:
    """New tokens for each prompt (stop token excluded). ``images`` [M, 3, H, W] belong, in
    order, to the prompts that hold image placeholders; ``model`` may also be a plain torchtune
    decoder (text only, e.g. the judge)."""
    device = model.tok_embeddings.weight.device
    batch = left_pad(prompts, max_new_tokens, pad_id, device)
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device)
    done = torch.zeros(len(prompts), dtype=torch.bool, device=device)
    out = torch.full((len(prompts), max_new_tokens), pad_id, dtype=torch.long, device=device)
    model.setup_caches(len(prompts), model.tok_embeddings.weight.dtype, decoder_max_seq_len=batch.masks.shape[-1])
    try:
        logits = prefill(model, batch, None if images is None else images.to(device))
        for step in range(max_new_tokens):
            token = torch.where(done, pad_id, pick(logits, temperature, top_k, rng))
            done |= torch.isin(token, stop)
            out[:, step] = token
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            logits = decode_step(model, batch, token, batch.prompt_len + step)
    finally:
        delete_kv_caches(model)
    return strip_at_stop(out.tolist(), stop_tokens)
