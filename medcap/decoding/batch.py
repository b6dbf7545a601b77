"""Which cache slots each row sees, and at which RoPE position: every loop builds its masks here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchtune.generation import get_causal_mask_from_padding_mask, get_position_ids_from_padding_mask


@dataclass
class Batch:
    """Left-padded prompts and, for every cache slot up to ``total``, the causal mask and the
    RoPE positions (pads do not count)."""

    tokens: torch.Tensor  # [B, prompt_len]
    masks: torch.Tensor  # [B, total, total]
    positions: torch.Tensor  # [B, total]

    @property
    def prompt_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def slots(self) -> int:
        return int(self.positions.shape[1])

    def rows(self, n: int) -> Batch:
        return Batch(self.tokens[:n], self.masks[:n], self.positions[:n])


def from_seen(tokens: torch.Tensor, seen: torch.Tensor) -> Batch:
    """``seen`` [B, slots]: True where a slot holds one of the row's tokens (a pad does not);
    each row attends causally to its own tokens and counts positions over them."""
    return Batch(tokens, get_causal_mask_from_padding_mask(seen, target_seq_len=seen.shape[1]),
                 get_position_ids_from_padding_mask(seen))  # fmt: skip


def left_pad(
    prompts: Sequence[Sequence[int]], max_new_tokens: int, pad_id: int, device: torch.device, rows: int | None = None
) -> Batch:
    """``rows`` > len(prompts) adds filler rows (pads that attend only to themselves), for a
    compiled step whose batch size is fixed."""
    n = len(prompts)
    rows = n if rows is None else max(rows, n)
    prompt_len = max(len(p) for p in prompts)
    total = prompt_len + max_new_tokens
    tokens = torch.full((rows, prompt_len), pad_id, dtype=torch.long, device=device)
    seen = torch.zeros(rows, total, dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_len - len(prompt) :] = torch.tensor(list(prompt), dtype=torch.long)
        seen[row, prompt_len - len(prompt) :] = True
    return from_seen(tokens, seen)


def runs(starts: Sequence[int], slots: int, device: torch.device) -> Batch:
    """Each row's tokens fill a run of slots from its start on (continuous batching): per row
    and slot, attend to the row's own run up to the slot; RoPE position = slot minus the row's
    start (what ``left_pad`` gives a left-padded prompt)."""
    at = torch.arange(slots, device=device)
    start = torch.tensor(list(starts), device=device)
    masks = (at[None, None, :] <= at[None, :, None]) & (at[None, None, :] >= start[:, None, None])
    positions = (at[None, :] - start[:, None]).clamp(min=0)
    tokens = torch.empty(len(starts), 0, dtype=torch.long, device=device)
    return Batch(tokens, masks, positions)
