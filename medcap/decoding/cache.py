"""The KV caches of a model's attention layers: the only code that reads or writes torchtune's
``KVCache`` internals (``k_cache``, ``v_cache``, ``cache_pos``).

torchtune 0.6.1's ``KVCache`` writes every row at one shared position (``cache_pos``); medcap's
loops keep rows apart with masks and RoPE positions (``decoding.batch``) and need a few cache
operations torchtune does not have: filler rows, growing the window for a second turn, caches
moved aside while a compiled step runs, and rows copied between caches (continuous batching).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torchtune.modules import MultiHeadAttention, TransformerDecoder
from torchtune.modules.common_utils import delete_kv_caches
from torchtune.modules.kv_cache import KVCache


def decoder_of(model: torch.nn.Module) -> TransformerDecoder:
    """The LLM of a fused model, or the model itself (a plain decoder: the judge, text only)."""
    return getattr(model, "decoder", model)


class KVCaches:
    """The caches of ``model``'s torchtune attention layers, in layer order."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.attention = [m for m in decoder_of(model).modules() if isinstance(m, MultiHeadAttention)]
        if not self.attention:
            raise TypeError(f"{type(model).__name__}: no torchtune attention layers to hold a KV cache")
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype

    # ------------------------------------------------------------------ one batch at a time
    def setup(self, batch_size: int, slots: int) -> None:
        """torchtune's own caches for ``batch_size`` rows and ``slots`` positions."""
        self.model.setup_caches(batch_size, self.dtype, decoder_max_seq_len=slots)

    def delete(self) -> None:
        delete_kv_caches(self.model)

    def tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(keys, values) [B, KV heads, slots, head dim] per layer."""
        return [(a.kv_cache.k_cache, a.kv_cache.v_cache) for a in self.attention]

    def advance(self) -> None:
        """Move torchtune's write position on by one, as its forward would have."""
        for a in self.attention:
            a.kv_cache.cache_pos.add_(1)

    @contextlib.contextmanager
    def detached(self) -> Iterator[None]:
        """The caches out of the model for a while: a compiled graph with frozen weights treats a
        module's buffers as constants (and a new one would recompile it)."""
        held = [a.kv_cache for a in self.attention]
        for a in self.attention:
            a.kv_cache = None
        try:
            yield
        finally:
            for a, c in zip(self.attention, held):
                a.kv_cache = c

    def pad_rows(self, rows: int) -> None:
        """Grow every cache to ``rows`` rows (zeros below the ones there)."""
        for a in self.attention:
            c = a.kv_cache
            extra = rows - c.k_cache.shape[0]
            if extra > 0:
                c.k_cache = torch.cat([c.k_cache, c.k_cache.new_zeros(extra, *c.k_cache.shape[1:])])
                c.v_cache = torch.cat([c.v_cache, c.v_cache.new_zeros(extra, *c.v_cache.shape[1:])])

    def grow(self, used: int, total: int) -> None:
        """Caches of ``total`` slots holding the first ``used`` ones, writing next at ``used``."""
        for a in self.attention:
            c = a.kv_cache
            for name in ("k_cache", "v_cache"):
                old = getattr(c, name)
                new = old.new_zeros(*old.shape[:2], total, old.shape[3])
                new[:, :, :used] = old[:, :, :used]
                setattr(c, name, new)
            c.cache_pos = torch.arange(used, used + total, device=c.k_cache.device)

    # ------------------------------------------------------------------ caches swapped in and out
    def current(self) -> list[KVCache | None]:
        return [a.kv_cache for a in self.attention]

    def install(self, caches: Sequence[KVCache | None] | None) -> None:
        caches = caches if caches is not None else [None] * len(self.attention)
        for attn, cache in zip(self.attention, caches):
            attn.kv_cache = cache
            attn.cache_enabled = cache is not None

    def new(self, batch_size: int, slots: int, write_at: int = 0) -> list[KVCache]:
        """Empty caches (not installed) whose next write goes to slot ``write_at``."""
        with self.device:
            caches = [KVCache(batch_size, slots, a.num_kv_heads, a.head_dim, self.dtype) for a in self.attention]
        for c in caches:
            c.cache_pos.add_(write_at)
        return caches

    @staticmethod
    def copy_rows(
        into: Sequence[KVCache], rows: slice, slots: slice,
        source: Sequence[KVCache], source_rows: torch.Tensor | slice, source_slots: slice,
    ) -> None:  # fmt: skip
        """Keys and values of ``source_rows`` x ``source_slots`` into ``rows`` x ``slots``."""
        for dst, src in zip(into, source):
            for name in ("k_cache", "v_cache"):
                held = getattr(src, name)[:, :, source_slots]
                held = held[source_rows] if isinstance(source_rows, slice) else held.index_select(0, source_rows)
                getattr(dst, name)[rows, :, slots] = held
