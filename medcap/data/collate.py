"""Batches for the fused model, and the DataLoader that makes them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX


def collate_image_chat(
    batch: list[dict[str, Any] | None], pad_id: int, ignore_idx: int = CROSS_ENTROPY_IGNORE_IDX
) -> dict[str, Any]:
    """Right-pad tokens with ``pad_id`` and labels with ``ignore_idx``; images of the rows that
    have them are concatenated in row order (the fused model's contract). Records the dataset
    could not fit (``None``) are dropped and counted in ``num_skipped``."""
    samples = [s for s in batch if s is not None]
    num_skipped = len(batch) - len(samples)
    if not samples:
        return {"tokens": None, "labels": None, "images": None, "indices": [], "num_skipped": num_skipped}
    length = max(len(s["tokens"]) for s in samples)
    tokens = torch.full((len(samples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), length), ignore_idx, dtype=torch.long)
    for row, s in enumerate(samples):
        tokens[row, : len(s["tokens"])] = torch.tensor(s["tokens"], dtype=torch.long)
        labels[row, : len(s["labels"])] = torch.tensor(s["labels"], dtype=torch.long)
    pixels = [s["images"] for s in samples if s["images"] is not None]
    return {
        "tokens": tokens,
        "labels": labels,
        "images": torch.cat(pixels) if pixels else None,
        "indices": [s["index"] for s in samples],
        "num_skipped": num_skipped,
    }


class ImageChatCollate:
    """``collate_image_chat`` with its pad id bound, picklable for DataLoader workers."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch):
        return collate_image_chat(batch, self.pad_id)


def balance_weights(classes: Sequence[Any], power: float = 1.0) -> torch.Tensor:
    """A sampling weight per record so that each class's share of the draws is proportional to
    ``count ** (1 - power)``: 1 gives every class the same share, 0 the natural frequencies, 0.5
    the square roots (rare classes drawn more often without repeating a two-image class as often
    as a hundred-image one)."""
    counts = Counter(classes)
    return torch.tensor([counts[c] ** -power for c in classes], dtype=torch.float64)


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start an epoch part-way (``start_index``, reset after one
    pass), so a resumed run sees exactly the batches an uninterrupted one would. It yields
    (index, epoch) keys: the dataset seeds each sample's augmentation from them.

    With ``weights`` (one per record; ``balance_weights``) an epoch is as many draws with
    replacement, from a generator seeded by (seed, epoch): the same on every rank, and a resumed
    epoch draws the same sequence."""

    def __init__(self, *args: Any, weights: torch.Tensor | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.start_index = 0
        if weights is not None and len(weights) != len(self.dataset):
            raise ValueError(f"{len(weights)} sampling weights for {len(self.dataset)} records")
        self.weights = weights

    def _weighted(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        drawn = torch.multinomial(self.weights, self.total_size, replacement=True, generator=generator)
        return drawn[self.rank : self.total_size : self.num_replicas].tolist()

    def __iter__(self):
        indices = self._weighted() if self.weights is not None else list(super().__iter__())
        start, self.start_index = self.start_index, 0
        return iter([(index, self.epoch) for index in indices[start:]])


def build_dataloader(
    dataset: Dataset,
    *,
    batch_size: int,
    pad_id: int,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    world_size: int = 1,
    rank: int = 0,
    drop_last: bool = False,
    pin_memory: bool | None = None,
    weights: torch.Tensor | None = None,
) -> tuple[DataLoader, ResumableSampler]:
    """The sampler's order depends on ``seed`` and the epoch (``sampler.set_epoch``) only, so a
    resumed run and every rank see the same sequence. The loader draws its workers' base seed
    from its own generator, not the global one: starting an epoch (or a resumed one) leaves the
    global RNG where the last step left it. ``weights``: draw records by weight (with
    replacement) instead of a permutation."""
    sampler = ResumableSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=drop_last,
        weights=weights,
    )  # fmt: skip
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        collate_fn=ImageChatCollate(pad_id),
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
    )
    return loader, sampler
