"""A second turn decoded on the first turn's KV caches (the original's describe-then-answer
protocol): the image, the first prompt and the description are not run again.

After the first turn the caches hold each row's first prompt and the tokens it generated. The
second prompt of a row is built by the tokenizer as usual (the first prompt, the description as
text, the question); whatever of it matches what the caches hold is kept, and only the rest is
run. Where re-encoding the description gives other tokens than the model generated, the cached
ones from there on are masked out and the re-encoded ones run instead, so the answer is the one a
recomputation from the second prompt gives.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask
from torchtune.modules.common_utils import delete_kv_caches

from medcap.generation import (
    Batch,
    _decoder,
    batch_rows,
    decode_loop,
    prefill_rows,
    run_block,
    start_caches,
    strip_at_stop,
)
from medcap.models.fusion import MedcapModel

FollowUp = Callable[[list[list[int]]], list[list[int] | None]]


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _grow_caches(model: MedcapModel, used: int, total: int) -> None:
    """Caches of ``total`` slots holding the first ``used`` ones, writing next at ``used``."""
    for layer in _decoder(model).layers:
        c = layer.attn.kv_cache
        for name in ("k_cache", "v_cache"):
            old = getattr(c, name)
            new = old.new_zeros(*old.shape[:2], total, old.shape[3])
            new[:, :, :used] = old[:, :, :used]
            setattr(c, name, new)
        c.cache_pos = torch.arange(used, used + total, device=c.k_cache.device)


@torch.no_grad()
def generate_two_turns(
    model: MedcapModel,
    prompts: Sequence[Sequence[int]],
    images: torch.Tensor | None,
    follow_up: FollowUp,
    *,
    max_new_tokens: tuple[int, int],
    stop_tokens: Sequence[int],
    pad_id: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: torch.Generator | None = None,
) -> tuple[list[list[int]], list[list[int] | None]]:
    """First answers to ``prompts``; ``follow_up(first answers)`` gives each row's whole second
    prompt (None: no second turn for that row); second answers, decoded on the same caches."""
    n = len(prompts)
    rows = batch_rows(model, n)
    first_new, second_new = max_new_tokens
    padded = start_caches(model, prompts, first_new, pad_id, rows)
    try:
        logits = prefill_rows(model, padded, n, images)
        out1, fed = decode_loop(model, padded, logits, padded.prompt_len, n, max_new_tokens=first_new,
                                stop_tokens=stop_tokens, pad_id=pad_id, temperature=temperature, top_k=top_k,
                                rng=rng)  # fmt: skip
        first = strip_at_stop(out1.tolist(), stop_tokens)
        seconds = follow_up(first)
        device = out1.device
        used = padded.prompt_len + fed
        # which cache slots each row's second turn may see: the part of its second prompt that
        # matches what its slots hold (its prompt, then what it generated up to its stop token,
        # in consecutive slots from its first one)
        valid = padded.masks.new_zeros(rows, used)
        stops = set(stop_tokens)
        rest: list[list[int]] = []
        for r in range(rows):
            second = seconds[r] if r < n else None
            if not second:
                rest.append([])
                continue
            generated = out1[r, :fed].tolist()
            stop_at = next((k for k, t in enumerate(generated) if t in stops), None)
            held = [*prompts[r], *(generated if stop_at is None else generated[: stop_at + 1])]
            keep = min(_common_prefix(held, second), len(second) - 1)  # at least one token to run
            first_slot = padded.prompt_len - len(prompts[r])
            valid[r, first_slot : first_slot + keep] = True
            rest.append(list(second[keep:]))
        width = max(1, max(len(x) for x in rest))
        block = torch.full((rows, width), pad_id, dtype=torch.long, device=device)
        block_valid = padded.masks.new_zeros(rows, width)
        for r, tokens in enumerate(rest):
            if tokens:
                block[r, width - len(tokens) :] = torch.tensor(tokens, dtype=torch.long)
                block_valid[r, width - len(tokens) :] = True
        total = used + width + second_new
        seen = torch.cat([valid, block_valid, block_valid.new_ones(rows, second_new)], dim=1)
        batch = Batch(block, get_causal_mask_from_padding_mask(seen, target_seq_len=total),
                      get_position_ids_from_padding_mask(seen))  # fmt: skip
        _grow_caches(model, used, total)
        logits = run_block(model, block, batch.masks[:, used : used + width], batch.positions[:, used : used + width])
        out2, _ = decode_loop(model, batch, logits, used + width, n, max_new_tokens=second_new,
                              stop_tokens=stop_tokens, pad_id=pad_id, temperature=temperature, top_k=top_k,
                              rng=rng)  # fmt: skip
    finally:
        delete_kv_caches(model)
    answers = strip_at_stop(out2.tolist(), stop_tokens)
    return first, [answers[r] if seconds[r] else None for r in range(n)]
