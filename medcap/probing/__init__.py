"""Does an encoder trained against a frozen LLM give better image features? Linear and kNN probes
of frozen pooled features on a labelled image set, against random initialisation of the same
architecture and a pixel baseline.

    from medcap.probing import run_probe
    result = run_probe(["run/checkpoint/meta_model_*.pt"], "SLAKE", "probe_out",
                       label_kind="Modality", vision="vit_tiny")
    result["results"]["meta_model_4"]["logreg"]["balanced_accuracy"]  # {"value", "ci_low", "ci_high"}

The stages (``read_labels``, ``encoder_specs``, ``extract_all``, ``fit_all``, ``write_report``)
are public so ``recipes/probe.py`` reads as they run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

from medcap.probing.classifiers import (
    METRICS,
    evaluate,
    few_shot,
    fit_logreg,
    knn,
    scores,
    summarise_few_shot,
)
from medcap.probing.encoders import EncoderSpec, encoder_specs, load_encoder
from medcap.probing.features import Features, extract_features
from medcap.probing.labels import LabelledImage, LabelledSet, read_labels
from medcap.probing.report import write_report

__all__ = [
    "METRICS",
    "EncoderSpec",
    "Features",
    "LabelledImage",
    "LabelledSet",
    "ProbeSettings",
    "encoder_specs",
    "extract_all",
    "extract_features",
    "fit_all",
    "load_encoder",
    "read_labelled_set",
    "read_labels",
    "run_probe",
    "write_report",
]


@dataclass
class ProbeSettings:
    """Every knob of a probe; the names are the keys of ``recipes/configs/probe.yaml``."""

    label_kind: str | None = None  # SLAKE content_type / VQA-RAD question_type
    label_question: str | None = None  # regex picking the question whose answer is the label
    image_column: str = "image"
    label_column: str = "label"
    split_column: str = "split"
    group_column: str = "group"
    test_fraction: float = 0.25
    unseen_test_classes: str = "refuse"  # a test class with no training image: refuse, or drop its images
    vision: str = "biomedclip"  # architecture of checkpoints that do not name theirs
    device: str = "cpu"
    dtype: str = "fp32"
    batch_size: int = 32
    num_workers: int = 0
    cache: bool = True
    cache_dir: str | None = None  # None: OUTPUT_DIR/feature_cache
    seed: int = 0
    cv_folds: int = 5
    logreg_Cs: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
    logreg_max_iter: int = 1000
    knn_k: int = 5
    fewshot_sizes: tuple[int, ...] = (1, 2, 4, 8, 16)
    fewshot_draws: int = 5
    fewshot_C: float = 1.0
    blas_threads: int | None = 1  # BLAS/OpenMP threads for the fits (None: the libraries' default)
    bootstrap_resamples: int = 1000
    confidence: float = 0.95
    pixel_size: int = 16
    figure: bool = True
    progress: bool = True

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ProbeSettings:
        """The keys of a recipe config that are settings (lists become tuples)."""
        from omegaconf import DictConfig, OmegaConf

        plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
        values = {f.name: plain[f.name] for f in fields(cls) if f.name in plain}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


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
    """Pooled features of every encoder (cached under ``cache_dir``)."""
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
    settings = replace(settings or ProbeSettings(), **overrides)
    lset = read_labelled_set(labels, settings)
    specs = encoder_specs(encoders, settings.vision, settings.pixel_size)
    features = extract_all(specs, lset, settings, output_dir)
    result = fit_all(features, lset, settings)
    write_report(result, output_dir, figure=settings.figure)
    return result
