"""Paired comparisons on the demo's small test sets: every difference comes with its interval."""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import bootstrap


def paired_interval(a: Any, b: Any, seed: int = 0, confidence: float = 0.95, n_resamples: int = 2000) -> dict[str, float]:
    """mean(a) - mean(b) over paired items, with its percentile-bootstrap interval (95% by default)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - b.mean()) if len(a) else 0.0
    if len(a) < 2 or np.all(a - b == (a - b)[0]):  # no spread: the interval is the value
        return {"value": diff, "ci_low": diff, "ci_high": diff}
    ci = bootstrap((a, b), lambda p, q: p.mean() - q.mean(), paired=True, vectorized=False, n_resamples=n_resamples,
                   confidence_level=confidence, method="percentile", random_state=seed).confidence_interval  # fmt: skip
    return {"value": diff, "ci_low": float(ci.low), "ci_high": float(ci.high)}


def verdict(diff: dict[str, float]) -> str:
    if diff["ci_low"] > 0:
        return "better"
    if diff["ci_high"] < 0:
        return "worse"
    return "no clear difference"
