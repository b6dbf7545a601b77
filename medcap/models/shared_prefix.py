"""One pass over the prompt text every training row begins with.

A training row starts with the same tokens in every row of a batch (the system prompt and the
user's turn header, up to the first image placeholder: about 24 of the ~62 tokens of a demo
sample). No image comes before them, so with the LLM frozen they depend on nothing that trains:
their keys and values are computed once, for one row, and every row's remaining tokens attend to
them. The loss and the gradients are those of the full pass (tested against it; with LoRA
adapters in the LLM the shared pass trains too, and its gradient sums over the rows as the full
pass's does); the work saved is the shared columns' forward and backward in every row but one.

The sharing happens inside torchtune's own attention: each layer's ``MultiHeadAttention`` is
given, for one forward, an object in the place of its KV cache whose ``update`` returns the shared
keys and values followed by the row's own.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import ActivationWrapper
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX

# Below this many shared columns the second pass's bookkeeping is not worth it.
MIN_SHARED = 4


class PrefixKV:
    """Stands in for torchtune's ``KVCache`` in one attention layer for one forward: first it
    records the shared prefix's keys and values (``recording``), then it puts them in front of
    each row's own."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.recording = True

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.recording:
            self.k, self.v = k, v
            return k, v
        assert self.k is not None and self.v is not None
        rows = k.shape[0]
        return (
            torch.cat([self.k.expand(rows, -1, -1, -1), k], dim=2),
            torch.cat([self.v.expand(rows, -1, -1, -1), v], dim=2),
        )


def shared_prefix_length(tokens: torch.Tensor, labels: torch.Tensor, image_token_id: int) -> int:
    """Leading columns equal in every row, before any image placeholder and before the first
    labelled position (``labels`` shifted: a label at t is predicted from position t)."""
    same = (tokens == tokens[:1]).all(dim=0)
    stops = same.logical_not() | (tokens == image_token_id).any(dim=0) | (labels != CROSS_ENTROPY_IGNORE_IDX).any(dim=0)
    found = stops.nonzero()
    return int(found[0]) if len(found) else tokens.shape[1]


def can_share(layers: Sequence[nn.Module]) -> bool:
    """Not under activation checkpointing: its recomputation in backward would run a layer
    after the shared keys and values have been taken away again."""
    return not any(isinstance(layer, ActivationWrapper) for layer in layers)


def run_layers_with_shared_prefix(layers: Sequence[nn.Module], h: torch.Tensor, shared: int) -> torch.Tensor:
    """The hidden states after ``layers`` of columns ``shared:`` of ``h`` [B, S, D], whose first
    ``shared`` columns are equal in every row (their row 0 is used)."""
    rows, length, _ = h.shape
    rest = length - shared
    device = h.device
    attentions = [layer.attn for layer in layers]
    kept = [(a.kv_cache, a.cache_enabled) for a in attentions]
    caches = [PrefixKV() for _ in attentions]
    try:
        for attention, cache in zip(attentions, caches):
            attention.kv_cache, attention.cache_enabled = cache, True
        x = h[:1, :shared]
        positions = torch.arange(shared, device=device).unsqueeze(0)
        causal = torch.ones(shared, shared, dtype=torch.bool, device=device).tril().unsqueeze(0)
        for layer in layers:
            x = layer(x, mask=causal, input_pos=positions)
        for cache in caches:
            cache.recording = False
        y = h[:, shared:]
        positions = (shared + torch.arange(rest, device=device)).unsqueeze(0).expand(rows, -1)
        mask = torch.cat(
            [
                torch.ones(rest, shared, dtype=torch.bool, device=device),
                torch.ones(rest, rest, dtype=torch.bool, device=device).tril(),
            ],
            dim=1,
        ).expand(rows, -1, -1)
        for layer in layers:
            y = layer(y, mask=mask, input_pos=positions)
    finally:
        for attention, (cache, enabled) in zip(attentions, kept):
            attention.kv_cache, attention.cache_enabled = cache, enabled
    return y
