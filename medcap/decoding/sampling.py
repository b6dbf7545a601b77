"""The one sampler of evaluation, serving and the judge: greedy at temperature 0, otherwise a
sample at ``temperature`` from the ``top_k`` most likely tokens and the nucleus (``top_p``), drawn
from a seeded generator; ``banned`` ids are never picked (the image placeholder, which asks for
an image when fed back)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torchtune.generation import sample


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    rng: torch.Generator | None = None
    banned: tuple[int, ...] = ()

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def banning(self, *ids: int | None) -> Sampling:
        extra = tuple(int(i) for i in ids if i is not None and int(i) not in self.banned)
        return replace(self, banned=self.banned + extra) if extra else self


def without_banned(logits: torch.Tensor, banned: Sequence[int]) -> torch.Tensor:
    """``logits`` with the banned ids that lie in the vocabulary ruled out (real tokenizers put
    the image placeholder beyond the model's vocabulary, where there is nothing to rule out)."""
    inside = [i for i in banned if 0 <= i < logits.shape[-1]]
    if not inside:
        return logits
    logits = logits.clone()
    logits[..., inside] = float("-inf")
    return logits


def nucleus_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """True where a token lies outside the smallest set whose probability reaches ``top_p``
    (Holtzman et al. 2020); the most likely token is always kept."""
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    return torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, mass_before >= top_p)


def pick(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """The next token of every row [B] from logits [B, V], all rows drawing from one generator."""
    logits = without_banned(logits, sampling.banned)
    if sampling.greedy:
        return logits.argmax(dim=-1)
    scaled = logits.float() / sampling.temperature
    top_k = None if sampling.top_k is None else min(int(sampling.top_k), logits.shape[-1])  # beyond V: all
    if sampling.top_p < 1.0:  # top-k, then top-p, on the tempered distribution
        if top_k is not None:
            kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
            top_k = None
        scaled = scaled.masked_fill(nucleus_mask(scaled, sampling.top_p), float("-inf"))
    q = torch.empty(logits.shape, device=logits.device).exponential_(1, generator=sampling.rng)
    return sample(scaled, temperature=1.0, top_k=top_k, q=q).squeeze(-1).long()


def pick_rows(logits: torch.Tensor, samplings: Sequence[Sampling]) -> list[int]:
    """One token per row, each row with its own sampling (serving: every request its own seed):
    greedy rows together, sampled rows each from its own generator."""
    out = [0] * len(samplings)
    greedy = [i for i, s in enumerate(samplings) if s.greedy]
    if greedy:
        banned = sorted({b for i in greedy for b in samplings[i].banned})
        for i, tok in zip(greedy, pick(logits[greedy], Sampling(banned=tuple(banned))).tolist()):
            out[i] = int(tok)
    for i, s in enumerate(samplings):
        if not s.greedy:
            out[i] = int(pick(logits[i : i + 1], s).reshape(-1)[0])
    return out
