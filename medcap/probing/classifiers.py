"""Probes on frozen features (logistic regression, cosine k-nearest neighbours, few-shot draws)
and their scores, each with a bootstrap interval over test images.

The metrics are computed here from a confusion matrix and ranks rather than by calling
scikit-learn's metric functions a thousand times per bootstrap; they give the same numbers
(tests/test_probe.py checks them against ``accuracy_score``, ``balanced_accuracy_score``,
``f1_score(average="macro")`` and ``roc_auc_score``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import rankdata
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

METRICS = ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc")
CLASSIFIERS = ("logreg", "knn")


def _auroc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC area in its Mann-Whitney form (ties count half), as ``roc_auc_score`` computes it."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def scores(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    """The four metrics from class probabilities ``[n, K]`` (a column per class). Balanced accuracy
    and one-vs-rest macro AUROC average over the classes present in ``y``; macro F1 over the
    classes in ``y`` or predicted, as scikit-learn does. With two classes the AUROC is the binary one."""
    k = proba.shape[1]
    cm = np.bincount(y * k + proba.argmax(1), minlength=k * k).reshape(k, k)
    support, predicted, hits = cm.sum(1), cm.sum(0), np.diag(cm)
    present, used = support > 0, (support > 0) | (predicted > 0)
    aurocs = [_auroc(y == c, proba[:, c]) for c in np.flatnonzero(present)]
    aurocs = [a for a in aurocs if a == a]
    return {
        "accuracy": float(hits.sum() / len(y)),
        "balanced_accuracy": float((hits[present] / support[present]).mean()),
        "macro_f1": float((2 * hits[used] / (support[used] + predicted[used])).mean()),
        "macro_auroc": float(np.mean(aurocs)) if aurocs else float("nan"),
    }


def bootstrap_intervals(
    y: np.ndarray, proba: np.ndarray, n_resamples: int = 1000, seed: int = 0, level: float = 0.95
) -> dict[str, tuple[float, float]]:
    """Percentile intervals over test images resampled with replacement. A resample that lost a
    class of the test set has no AUROC comparable to the point estimate, so it is skipped for AUROC."""
    rng = np.random.default_rng(seed)
    n_present = len(np.unique(y))
    draws: dict[str, list[float]] = {m: [] for m in METRICS}
    for _ in range(n_resamples):
        idx = rng.integers(0, len(y), len(y))
        s = scores(y[idx], proba[idx])
        if len(np.unique(y[idx])) < n_present:
            s["macro_auroc"] = float("nan")
        for m in METRICS:
            draws[m].append(s[m])
    tail = 100 * (1 - level) / 2
    out = {}
    for m, values in draws.items():
        v = np.asarray(values)
        v = v[~np.isnan(v)]
        out[m] = (
            (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail)))
            if len(v)
            else (np.nan, np.nan)
        )
    return out


def full_proba(model: Pipeline, x: np.ndarray, n_classes: int) -> np.ndarray:
    """Probabilities with a column for every class, also those the model never saw."""
    proba = np.zeros((len(x), n_classes))
    proba[:, model.classes_] = model.predict_proba(x)
    return proba


def logreg(c: float = 1.0, max_iter: int = 1000) -> Pipeline:
    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter))


def knn(k: int) -> Pipeline:
    return make_pipeline(KNeighborsClassifier(n_neighbors=k, metric="cosine"))


def fit_logreg(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    cs: Sequence[float],
    cv_folds: int = 5,
    seed: int = 0,
    max_iter: int = 1000,
) -> tuple[Pipeline, dict[str, Any]]:
    """Standardised logistic regression, C chosen by cross-validation on the training split only,
    folds grouped by source. Too few images (or sources) per class for 2 folds: C = 1."""
    smallest = int(np.bincount(y)[np.unique(y)].min())
    n_splits = min(cv_folds, smallest, len(np.unique(groups)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        warnings.simplefilter("ignore", UserWarning)  # folds without some class: scored anyway
        if n_splits < 2 or len(cs) < 2:
            c = float(cs[0]) if len(cs) == 1 else 1.0
            return logreg(c, max_iter).fit(x, y), {"C": c, "cv_folds": 0}
        search = GridSearchCV(
            logreg(1.0, max_iter),
            {"logisticregression__C": [float(c) for c in cs]},
            scoring="balanced_accuracy",
            cv=StratifiedGroupKFold(n_splits, shuffle=True, random_state=seed),
            error_score=np.nan,
        )
        search.fit(x, y, groups=groups)
    c = search.best_params_["logisticregression__C"]
    return search.best_estimator_, {
        "C": c,
        "cv_folds": n_splits,
        "cv_balanced_accuracy": float(search.best_score_),
    }


def evaluate(
    model: Pipeline,
    x: np.ndarray,
    y: np.ndarray,
    n_classes: int,
    n_resamples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    proba = full_proba(model, x, n_classes)
    point, ci = scores(y, proba), bootstrap_intervals(y, proba, n_resamples, seed, level)
    out: dict[str, Any] = {m: {"value": point[m], "ci_low": ci[m][0], "ci_high": ci[m][1]} for m in METRICS}
    # per test image, so that two encoders can be compared on the same images (paired)
    out["predictions"] = proba.argmax(axis=1).tolist()
    return out


def few_shot(
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    n_classes: int,
    sizes: Sequence[int] = (1, 2, 4, 8, 16),
    draws: int = 5,
    seed: int = 0,
    c: float = 1.0,
    knn_k: int = 5,
    max_iter: int = 1000,
) -> list[dict[str, Any]]:
    """Both probes on ``shots`` training images per class (as many as a class has), several seeded
    draws; sizes stop at the first one that takes every training image (then one draw)."""
    counts = np.bincount(y_train, minlength=n_classes)
    rows = []
    for shots in sorted({int(s) for s in sizes if int(s) > 0}):
        complete = shots >= counts.max()
        for draw in range(1 if complete else draws):
            rng = np.random.default_rng([seed, shots, draw])
            idx = np.concatenate(
                [
                    rng.choice(np.flatnonzero(y_train == k), min(shots, counts[k]), replace=False)
                    for k in range(n_classes)
                ]
            )
            for name, model in (("logreg", logreg(c, max_iter)), ("knn", knn(min(knn_k, shots, len(idx))))):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    model.fit(x_train[idx], y_train[idx])
                s = scores(y_test, full_proba(model, x_test, n_classes))
                rows.append({"classifier": name, "shots": shots, "draw": draw, "n_train": len(idx), **s})
        if complete:
            break
    return rows


def summarise_few_shot(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Mean and standard deviation over draws, per classifier and size."""
    out: dict[str, list[dict[str, Any]]] = {}
    for name in dict.fromkeys(r["classifier"] for r in rows):
        for shots in dict.fromkeys(r["shots"] for r in rows if r["classifier"] == name):
            same = [r for r in rows if r["classifier"] == name and r["shots"] == shots]
            point = {"shots": shots, "n_train": same[0]["n_train"], "draws": len(same)}
            for m in METRICS:
                v = np.array([r[m] for r in same], dtype=float)
                point[m] = (
                    {"mean": float(np.nanmean(v)), "std": float(np.nanstd(v))} if (v == v).any() else None
                )
            out.setdefault(name, []).append(point)
    return out
