"""Continuous batching: requests join a running batch and leave it at step boundaries, each with
its own sampling (seeded generator, temperature, top-k, top-p).

torchtune 0.6.1's ``KVCache`` writes every row at one shared position, so rows cannot keep
their own write positions. Here the cache is a window of *slots* that all rows advance through
together: a row's tokens fill a run of slots that ends at the shared position, and its mask and
RoPE positions (``batch.runs``, indexed by slot, which is what the decode step reads) see only
that run, counted from its own start. So a row decodes exactly as it would alone (the left
padding of ``generate``, moved into the cache).

A newcomer is prefilled with its images on a temporary cache (left-padded with the other
newcomers), and its keys and values are copied into the slots just before the shared position;
rows that finished are dropped at the next rebuild. A rebuild sizes the window to what the rows
still need (their prompts plus their remaining ``max_new_tokens``), so attention never runs over
slots nobody uses. The model runs only through ``decoding.step``, so speedups made there apply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torchtune.modules.kv_cache import KVCache

from medcap.decoding.batch import Batch, left_pad, runs
from medcap.decoding.cache import KVCaches
from medcap.decoding.sampling import Sampling, pick_rows
from medcap.decoding.step import DecodeStep, prefill


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

    def __init__(self, model: Any, pad_id: int, step: DecodeStep | None = None):
        self.model = model
        self.pad_id = int(pad_id)
        self.caches = KVCaches(model)
        self.step_fn = step or DecodeStep(model)
        self.device = self.caches.device
        visual = getattr(model, "visual", None)  # a plain decoder (text only) has none
        self.pixel_dtype = next(visual.parameters()).dtype if visual is not None else self.caches.dtype
        # the image placeholder is no token to generate: fed back, it would ask for an image
        self.placeholder = getattr(model, "image_token_id", None)
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
        return 0 if self.batch is None else self.batch.slots

    def reset(self) -> None:
        """Forget every row and free the cache (after an error, or when the batch empties)."""
        self.caches.install(None)
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
        for r in rows:
            r.sampling = r.sampling.banning(self.placeholder)
        images = [r.images for r in rows if r.images is not None]
        pixels = torch.cat(images).to(self.device, self.pixel_dtype) if images else None
        newcomers = left_pad([r.prompt for r in rows], 0, self.pad_id, self.device)
        running = self.caches.current()
        self.caches.install(self.caches.new(len(rows), newcomers.prompt_len))
        try:
            logits = prefill(self.model, newcomers, pixels)
            fresh = self.caches.current()
        finally:
            self.caches.install(running)
        firsts = pick_rows(logits, [r.sampling for r in rows])
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
        caches = self.caches.new(len(kept) + len(newcomers), slots, write_at=new_cur)
        if kept:
            kept_lo = min(r.start for r in kept)
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            self.caches.copy_rows(caches, slice(0, len(kept)), slice(kept_lo - lo, new_cur),
                                  self.caches.current(), index, slice(kept_lo, cur))  # fmt: skip
        if newcomers:
            self.caches.copy_rows(caches, slice(len(kept), None), slice(new_cur - prompt_len, new_cur),
                                  fresh, slice(None), slice(0, prompt_len))  # fmt: skip
        for row, start in zip(kept, starts):
            row.start = start - lo
        for row in newcomers:
            row.start, row.fed = new_cur - len(row.prompt), 0
        self.rows = [*kept, *newcomers]
        self.cur = new_cur
        self.caches.install(caches)
        self.batch = runs([r.start for r in self.rows], slots, self.device)

    # ------------------------------------------------------------------ decoding
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
        logits = self.step_fn(self.batch, token, self.cur)
        self.cur += 1
        index = [i for i, _ in live]
        picks = pick_rows(logits[index], [r.sampling for _, r in live])
        for (_, row), tok in zip(live, picks):
            row.fed += 1
            row.last = tok
        return [(row, tok) for (_, row), tok in zip(live, picks)]
