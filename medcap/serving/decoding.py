"""Continuous batching on medcap's KV-cache decoding: requests join a running batch and leave it
at step boundaries, each with its own sampling (seeded generator, temperature, top-k, top-p).

torchtune 0.6.1's ``KVCache`` writes every row at one shared position, so rows cannot keep
their own write positions. Here the cache is a window of *slots* that all rows advance through
together: a row's tokens fill a run of slots that ends at the shared position, and its mask and
RoPE positions (``Batch.masks`` / ``Batch.positions``, indexed by slot, which is what
``decode_step`` reads) see only that run, counted from its own start. So a row decodes exactly
as it would alone (the left padding of ``generate``, moved into the cache).

A newcomer is prefilled with its images on a temporary cache (``prefill``, left-padded with the
other newcomers), and its keys and values are copied into the slots just before the shared
position; rows that finished are dropped at the next rebuild. A rebuild sizes the window to what
the rows still need (their prompts plus their remaining ``max_new_tokens``), so attention never
runs over slots nobody uses. The model is called only through ``medcap.generation``'s
``prefill`` and ``decode_step``, so speedups made there apply here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torchtune.modules import MultiHeadAttention
from torchtune.modules.kv_cache import KVCache

from medcap.generation import Batch, decode_step, left_pad, pick, prefill


@dataclass
class Sampling:
    """How one row picks its tokens: greedy at temperature 0, else a sample from its own
    generator (so a seeded request answers the same whatever else is in the batch)."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    rng: torch.Generator | None = None


def nucleus_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """True where a token lies outside the smallest set whose probability reaches ``top_p``
    (Holtzman et al. 2020); the most likely token is always kept."""
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)


def pick_one(logits: torch.Tensor, sampling: Sampling) -> int:
    """The next token from one row's logits [1, V]: ``medcap.generation.pick`` (temperature,
    top-k), with the nucleus (top-p) filter applied first when ``top_p < 1``."""
    s = sampling
    if s.temperature <= 0 or s.top_p >= 1.0:
        return int(pick(logits, s.temperature, s.top_k, s.rng).reshape(-1)[0])
    scaled = logits.float() / s.temperature  # top-k, then top-p, on the tempered distribution
    if s.top_k is not None:
        kth = torch.topk(scaled, min(int(s.top_k), scaled.shape[-1]), dim=-1).values[..., -1:]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    scaled = scaled.masked_fill(nucleus_mask(scaled, s.top_p), float("-inf"))
    return int(pick(scaled, 1.0, None, s.rng).reshape(-1)[0])


def pick_rows(logits: torch.Tensor, samplings: Sequence[Sampling]) -> list[int]:
    """One token per row: greedy rows together, sampled rows each from its own generator."""
    out = [0] * len(samplings)
    greedy = [i for i, s in enumerate(samplings) if s.temperature <= 0]
    if greedy:
        for i, tok in zip(greedy, pick(logits[greedy], 0.0, None, None).tolist()):
            out[i] = int(tok)
    for i, s in enumerate(samplings):
        if s.temperature > 0:
            out[i] = pick_one(logits[i : i + 1], s)
    return out


@dataclass(eq=False)
class Row:
    """One request's place in the batch. ``images`` [M, 3, H, W] go with the prompt's
    placeholders; ``owner`` is whatever the caller tracks the row by."""

    prompt: list[int]
    images: torch.Tensor | None
    max_new_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    owner: Any = None
    start: int = 0  # first slot of the row's run in the cache
    fed: int = 0  # tokens fed back after the prompt
    last: int | None = None  # the token picked last (fed at the next step)

    @property
    def feeds_left(self) -> int:
        """Tokens still to feed: the last of ``max_new_tokens`` is picked, never fed."""
        return self.max_new_tokens - 1 - self.fed


class ContinuousBatch:
    """The rows decoding together and the KV cache they share. Not thread-safe: one worker
    thread owns it (and the model)."""

    def __init__(self, model: Any, pad_id: int):
        self.model = model
        self.pad_id = int(pad_id)
        weight = model.tok_embeddings.weight
        self.device, self.dtype = weight.device, weight.dtype
        visual = getattr(model, "visual", None)  # a plain decoder (text only) has none
        self.pixel_dtype = next(visual.parameters()).dtype if visual is not None else self.dtype
        # the image placeholder is no token to generate: fed back, it would ask for an image
        self.placeholder = getattr(model, "image_token_id", None)
        self.attention = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
        if not self.attention:
            raise TypeError(f"{type(model).__name__}: no torchtune attention layers to hold a KV cache")
        self.rows: list[Row | None] = []  # None: finished, its slots dropped at the next rebuild
        self.cur = 0  # the slot the next decode step writes
        self.batch: Batch | None = None

    @property
    def live(self) -> list[Row]:
        return [r for r in self.rows if r is not None]

    @property
    def dead(self) -> int:
        return sum(r is None for r in self.rows)

    @property
    def slots(self) -> int:
        return 0 if self.batch is None else int(self.batch.positions.shape[1])

    # ------------------------------------------------------------------ cache plumbing
    def _caches(self) -> list[KVCache | None]:
        return [a.kv_cache for a in self.attention]

    def _install(self, caches: Sequence[KVCache | None] | None) -> None:
        caches = caches if caches is not None else [None] * len(self.attention)
        for attn, cache in zip(self.attention, caches):
            attn.kv_cache = cache
            attn.cache_enabled = cache is not None

    def _new_caches(self, batch_size: int, slots: int) -> list[KVCache]:
        with self.device:
            return [KVCache(batch_size, slots, a.num_kv_heads, a.head_dim, self.dtype) for a in self.attention]

    def reset(self) -> None:
        """Forget every row and free the cache (after an error, or when the batch empties)."""
        self._install(None)
        self.rows, self.cur, self.batch = [], 0, None

    # ------------------------------------------------------------------ membership
    @torch.no_grad()
    def admit(self, rows: Sequence[Row]) -> list[int]:
        """Prefill ``rows`` (with their images) and join them to the running rows; the first
        token each picks is returned (and kept as ``row.last``). On an error the running rows
        are left as they were."""
        if not rows:
            return []
        if any(r.max_new_tokens < 1 for r in rows):
            raise ValueError("max_new_tokens must be at least 1")
        images = [r.images for r in rows if r.images is not None]
        pixels = torch.cat(images).to(self.device, self.pixel_dtype) if images else None
        newcomers = left_pad([r.prompt for r in rows], 0, self.pad_id, self.device)
        running = self._caches()
        self._install(self._new_caches(len(rows), newcomers.prompt_len))
        try:
            logits = prefill(self.model, newcomers, pixels)
            fresh = self._caches()
        finally:
            self._install(running)
        firsts = pick_rows(self._allowed(logits), [r.sampling for r in rows])
        self._rebuild(rows, fresh, newcomers.prompt_len)
        for row, tok in zip(rows, firsts):
            row.last = tok
        return firsts

    def release(self, row: Row) -> None:
        """The row is finished (or cancelled): it no longer counts; its slots go at the next rebuild."""
        for i, r in enumerate(self.rows):
            if r is row:
                self.rows[i] = None
        if not self.live:
            self.reset()

    def compact(self) -> None:
        """Drop finished rows from the cache now (fewer rows make every later step cheaper)."""
        if self.dead:
            self._rebuild([], [], 0)

    @torch.no_grad()
    def _rebuild(self, newcomers: Sequence[Row], fresh: Sequence[KVCache], prompt_len: int) -> None:
        """A new cache holding the live rows' runs and the newcomers' prompts, shifted so the
        earliest run starts at slot 0 and sized to what the rows still need."""
        keep = [i for i, r in enumerate(self.rows) if r is not None]
        kept = [self.rows[i] for i in keep]
        cur = self.cur
        starts = [r.start for r in kept] + [cur - len(r.prompt) for r in newcomers]
        if not starts:
            self.reset()
            return
        ends = [cur + r.feeds_left for r in kept] + [cur + r.max_new_tokens - 1 for r in newcomers]
        lo = min(starts)
        new_cur = cur - lo
        slots = max(max(ends) - lo, new_cur + 1)
        caches = self._new_caches(len(kept) + len(newcomers), slots)
        old = self._caches()
        kept_lo = min((r.start for r in kept), default=cur)
        index = torch.tensor(keep, dtype=torch.long, device=self.device)
        for cache, before, new in zip(caches, old, list(fresh) or [None] * len(caches)):
            if kept:
                span = slice(kept_lo - lo, new_cur)
                cache.k_cache[: len(kept), :, span] = before.k_cache[:, :, kept_lo:cur].index_select(0, index)
                cache.v_cache[: len(kept), :, span] = before.v_cache[:, :, kept_lo:cur].index_select(0, index)
            if newcomers:
                span = slice(new_cur - prompt_len, new_cur)
                cache.k_cache[len(kept) :, :, span] = new.k_cache[:, :, :prompt_len]
                cache.v_cache[len(kept) :, :, span] = new.v_cache[:, :, :prompt_len]
            cache.cache_pos.add_(new_cur)  # torchtune's write position: the next slot
        for row, start in zip(kept, starts):
            row.start = start - lo
        for row in newcomers:
            row.start, row.fed = new_cur - len(row.prompt), 0
        self.rows = [*kept, *newcomers]
        self.cur = new_cur
        self._install(caches)
        self.batch = self._masks(slots)

    def _masks(self, slots: int) -> Batch:
        """Per row and slot: attend to the row's own run up to the slot; RoPE position = slot
        minus the row's start (as ``left_pad`` builds them for a left-padded prompt)."""
        at = torch.arange(slots, device=self.device)
        start = torch.tensor([r.start for r in self.rows], device=self.device)
        masks = (at[None, None, :] <= at[None, :, None]) & (at[None, None, :] >= start[:, None, None])
        positions = (at[None, :] - start[:, None]).clamp(min=0)
        tokens = torch.empty(len(self.rows), 0, dtype=torch.long, device=self.device)
        return Batch(tokens, masks, positions)

    # ------------------------------------------------------------------ decoding
    def _allowed(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits with the image placeholder ruled out where the vocabulary holds its id (a
        tokenizer smaller than the model's vocabulary; real ones put it outside)."""
        if self.placeholder is not None and 0 <= self.placeholder < logits.shape[-1]:
            logits = logits.clone()
            logits[:, self.placeholder] = float("-inf")
        return logits

    @torch.no_grad()
    def step(self) -> list[tuple[Row, int]]:
        """Feed every live row its last token; (row, next token) for each."""
        live = [(i, r) for i, r in enumerate(self.rows) if r is not None]
        if not live:
            return []
        if self.cur >= self.slots:
            raise RuntimeError(f"KV cache window full ({self.slots} slots): a row outlived its max_new_tokens")
        token = torch.tensor(
            [r.last if r is not None else self.pad_id for r in self.rows], dtype=torch.long, device=self.device
        )
        logits = decode_step(self.model, self.batch, token, self.cur)
        self.cur += 1
        index = [i for i, _ in live]
        picks = pick_rows(self._allowed(logits[index]), [r.sampling for _, r in live])
        for (_, row), tok in zip(live, picks):
            row.fed += 1
            row.last = tok
        return [(row, tok) for (_, row), tok in zip(live, picks)]
