"""The probe's steps: the labelled set, features of every encoder, the fitted and scored
probes (``fit_all``), and ``run_probe``, all of it in one call."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from medcap.probing.classifiers import (
    evaluate,
    few_shot,
    fit_logreg,
    knn,
    scores,
    summarise_few_shot,
)
from medcap.probing.encoders import EncoderSpec, encoder_specs
from medcap.probing.features import Features, extract_features
from medcap.probing.labels import LabelledSet, read_labels
from medcap.probing.report import write_report
from medcap.probing.settings import ProbeSettings


def read_labelled_set(labels: str | Path | LabelledSet, settings: ProbeSettings) -> LabelledSet:
    """``read_labels`` with the settings' column names, label kind, test fraction and seed."""
    if isinstance(labels, LabelledSet):
        return labels
    return read_labels(
        labels,
        settings.label_kind,
        label_question=settings.label_question,
        label_column=settings.label_column,
        image_column=settings.image_column,
        split_column=settings.split_column,
        group_column=settings.group_column,
        test_fraction=settings.test_fraction,
        seed=settings.seed,
        unseen_test_classes=settings.unseen_test_classes,
    )


def extract_all(
    specs: Iterable[EncoderSpec], lset: LabelledSet, settings: ProbeSettings, output_dir: str | Path
) -> dict[str, Features]:
    """Features of every encoder, pooled or patch tokens (cached under ``cache_dir``)."""
    cache_dir = None
    if settings.cache:
        cache_dir = Path(settings.cache_dir) if settings.cache_dir else Path(output_dir) / "feature_cache"
    out = {}
    for spec in specs:
        f = extract_features(
            spec,
            lset.images,
            cache_dir=cache_dir,
            batch_size=settings.batch_size,
            device=settings.device,
            dtype=settings.dtype,
            seed=settings.seed,
            num_workers=settings.num_workers,
            progress=settings.progress,
            features=settings.features,
        )
        if not np.isfinite(f.values).all():
            raise ValueError(f"encoder {spec.name}: non-finite features (dtype={settings.dtype} overflow?)")
        out[spec.name] = f
    return out


def fit_all(features: Mapping[str, Features], lset: LabelledSet, settings: ProbeSettings) -> dict[str, Any]:
    """Fit the probes on the training split, score on the test split: the result ``probe.json`` holds.
    BLAS threads are limited because probe-sized fits only lose time to thread start-up and spinning."""
    y, n = lset.y, len(lset.classes)
    train, test = lset.split_mask("train"), lset.split_mask("test")
    majority = np.eye(n)[np.full(int(test.sum()), np.bincount(y[train], minlength=n).argmax())]
    result: dict[str, Any] = {
        "labels": lset.summary(),
        "settings": asdict(settings),
        "majority_class": scores(y[test], majority),
        "test_labels": y[test].tolist(),  # class indices, in the order of the predictions
        "encoders": {},
        "results": {},
        "fewshot": {},
        "fewshot_draws": {},
    }
    limit = threadpool_limits(settings.blas_threads) if settings.blas_threads else contextlib.nullcontext()
    with limit:
        for name, f in tqdm(features.items(), desc="probes", unit="encoder", disable=not settings.progress):
            result["encoders"][name] = {
                "kind": f.spec.kind,
                "vision": f.spec.vision,
                "path": str(f.spec.path) if f.spec.path else None,
                "dim": int(f.values.shape[1]),
                "computed": f.computed,
                "cached": f.cached,
                "cache_file": str(f.cache_file) if f.cache_file else None,
            }
            result["results"][name], result["fewshot_draws"][name] = probe_one(f.values, lset, settings)
            result["fewshot"][name] = summarise_few_shot(result["fewshot_draws"][name])
    return result


def probe_one(x: np.ndarray, lset: LabelledSet, settings: ProbeSettings) -> tuple[dict[str, Any], list[dict]]:
    """One encoder's features: both probes scored with intervals, and the few-shot draws."""
    s = settings
    y, groups, n = lset.y, lset.groups, len(lset.classes)
    train, test = lset.split_mask("train"), lset.split_mask("test")
    boot = {"n_resamples": s.bootstrap_resamples, "seed": s.seed, "level": s.confidence}
    model, info = fit_logreg(
        x[train], y[train], groups[train], s.logreg_Cs, s.cv_folds, s.seed, s.logreg_max_iter
    )
    k = min(s.knn_k, int(train.sum()))
    results = {
        "logreg": {**evaluate(model, x[test], y[test], n, **boot), **info},
        "knn": {**evaluate(knn(k).fit(x[train], y[train]), x[test], y[test], n, **boot), "k": k},
    }
    draws = few_shot(
        x[train],
        y[train],
        x[test],
        y[test],
        n,
        s.fewshot_sizes,
        s.fewshot_draws,
        s.seed,
        s.fewshot_C,
        s.knn_k,
        s.logreg_max_iter,
    )
    return results, draws


def run_probe(
    encoders: Iterable[Any],
    labels: str | Path | LabelledSet,
    output_dir: str | Path,
    settings: ProbeSettings | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Probe ``encoders`` (checkpoint files or globs, open_clip folders, encoder names, dicts or
    ``EncoderSpec``; random initialisation and the pixel baseline are always added) on ``labels``
    (CSV, class folders, SLAKE or VQA-RAD root); write ``output_dir/probe.{json,csv,png}``;
    return what ``probe.json`` holds. ``overrides`` are ``ProbeSettings`` fields."""
    settings = (settings or ProbeSettings()).replace(**overrides)
    lset = read_labelled_set(labels, settings)
    specs = encoder_specs(encoders, settings.vision, settings.pixel_size)
    features = extract_all(specs, lset, settings, output_dir)
    result = fit_all(features, lset, settings)
    write_report(result, output_dir, figure=settings.figure)
    return result
