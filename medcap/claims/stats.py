"""Paired differences (a) - (b) on the same items with a bootstrap interval, and the plain
verdict the claims table gives for each."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from medcap.demo.stats import paired_interval as interval

FROZEN_BETTER, NO_CLEAR_DIFFERENCE, FROZEN_WORSE = "frozen better", "no clear difference", "frozen worse"
TOO_FEW_ITEMS = "too few items"
# below this many paired items a percentile bootstrap of 0/1 scores is too coarse to lean on
# (six items, one differing, can already give an interval that excludes zero)
MIN_ITEMS = 10


def paired_interval(
    frozen: Sequence[float], adapted: Sequence[float], *, confidence: float = 0.95, seed: int = 0,
    n_resamples: int = 2000,
) -> dict[str, float]:
    """Mean of ``frozen`` minus mean of ``adapted`` (one score per item, the same items in the
    same order) with a paired percentile-bootstrap interval (``medcap.demo.stats``)."""
    a, b = np.asarray(frozen, dtype=float), np.asarray(adapted, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired scores need the same items: {a.shape} vs {b.shape}")
    if a.size == 0:
        raise ValueError("no items to compare")
    d = interval(a, b, seed=seed, confidence=confidence, n_resamples=n_resamples)
    return {"n": int(a.size), "frozen": float(a.mean()), "adapted": float(b.mean()), "difference": d["value"],
            "ci_low": d["ci_low"], "ci_high": d["ci_high"], "confidence": confidence}  # fmt: skip


def verdict(interval: dict[str, float], min_items: int = MIN_ITEMS) -> str:
    """"frozen better" when the whole interval is above zero, "frozen worse" when below, else
    "no clear difference" (an interval touching zero included); "too few items" under
    ``min_items``, whatever the interval says."""
    if interval["n"] < min_items:
        return TOO_FEW_ITEMS
    if interval["ci_low"] > 0:
        return FROZEN_BETTER
    if interval["ci_high"] < 0:
        return FROZEN_WORSE
    return NO_CLEAR_DIFFERENCE
