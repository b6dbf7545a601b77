"""What a probe writes: ``probe.json`` (everything), ``probe.csv`` (one row per encoder and
classifier, every metric with its interval), ``probe_fewshot.csv`` (one row per draw) and
``probe.png`` (bars with intervals, few-shot curves)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from medcap.io import atomic_write, atomic_write_json
from medcap.probing.classifiers import CLASSIFIERS, METRICS

TITLES = {
    "accuracy": "accuracy",
    "balanced_accuracy": "balanced accuracy",
    "macro_f1": "macro F1",
    "macro_auroc": "macro AUROC (one-vs-rest)",
}


def _json_safe(obj: Any) -> Any:
    """NaN (an undefined AUROC) as null, numpy scalars as Python numbers."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name, per_classifier in result["results"].items():
        enc = result["encoders"][name]
        for clf, res in per_classifier.items():
            row = {
                "encoder": name,
                "kind": enc["kind"],
                "classifier": clf,
                "dim": enc["dim"],
                "n_train": result["labels"]["n_train"],
                "n_test": result["labels"]["n_test"],
            }
            for m in METRICS:
                row.update(
                    {m: res[m]["value"], f"{m}_ci_low": res[m]["ci_low"], f"{m}_ci_high": res[m]["ci_high"]}
                )
            row["C"] = res.get("C")
            rows.append(row)
    return rows


def plot(result: dict[str, Any], path: Path) -> Path:
    """Top: each metric per encoder (one bar per classifier, 95% interval). Bottom: few-shot
    balanced accuracy against training images per class (mean and spread over draws)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    names = list(result["results"])
    fig = plt.figure(figsize=(max(12, 1.1 * len(names) * len(METRICS)), 8.5), layout="constrained")
    grid = fig.add_gridspec(2, len(METRICS) * len(CLASSIFIERS))
    width = 0.8 / len(CLASSIFIERS)
    chance = result.get("majority_class", {})
    for j, m in enumerate(METRICS):
        ax = fig.add_subplot(grid[0, j * len(CLASSIFIERS) : (j + 1) * len(CLASSIFIERS)])
        for i, clf in enumerate(CLASSIFIERS):
            res = [result["results"][n][clf][m] for n in names]
            value = np.array([r["value"] for r in res], dtype=float)
            low = np.array([r["ci_low"] for r in res], dtype=float)
            high = np.array([r["ci_high"] for r in res], dtype=float)
            err = np.nan_to_num(np.vstack([value - low, high - value]).clip(min=0))
            ax.bar(
                np.arange(len(names)) + (i - (len(CLASSIFIERS) - 1) / 2) * width,
                value,
                width,
                yerr=err,
                capsize=3,
                label=clf,
            )
        if m in chance and chance[m] == chance[m]:
            ax.axhline(chance[m], color="grey", linestyle="--", linewidth=1, label="majority class")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_title(TITLES[m], fontsize=10)
        if j == 0:
            ax.legend(fontsize=8)
    half = len(METRICS)  # grid columns per few-shot panel
    for i, clf in enumerate(CLASSIFIERS):
        ax = fig.add_subplot(grid[1, i * half : (i + 1) * half])
        for name in names:
            points = [p for p in result["fewshot"].get(name, {}).get(clf, []) if p["balanced_accuracy"]]
            if not points:
                continue
            shots = [p["shots"] for p in points]
            mean = np.array([p["balanced_accuracy"]["mean"] for p in points])
            std = np.array([p["balanced_accuracy"]["std"] for p in points])
            ax.plot(shots, mean, marker="o", label=name)
            ax.fill_between(shots, mean - std, mean + std, alpha=0.15)
        if "balanced_accuracy" in chance:
            ax.axhline(chance["balanced_accuracy"], color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set_xlabel("training images per class")
        ax.set_ylabel("balanced accuracy")
        ax.set_ylim(0, 1.05)
        ax.set_title(f"few-shot, {clf} (mean ± sd over draws)", fontsize=10)
        ax.legend(fontsize=8)
    labels = result["labels"]
    fig.suptitle(
        f"Linear and kNN probes: {len(labels['classes'])} classes, {labels['n_train']} training and "
        f"{labels['n_test']} test images ({labels['source']})",
        fontsize=10,
    )
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
    return path


def write_report(result: dict[str, Any], output_dir: str | Path, figure: bool = True) -> dict[str, Path]:
    """Write the files and record their paths in ``result["files"]``."""
    import pandas as pd

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "csv": output_dir / "probe.csv",
        "fewshot_csv": output_dir / "probe_fewshot.csv",
        "json": output_dir / "probe.json",
    }
    pd.DataFrame(table_rows(result)).to_csv(files["csv"], index=False)
    shots = [{"encoder": n, **r} for n, rows in result.get("fewshot_draws", {}).items() for r in rows]
    pd.DataFrame(shots).to_csv(files["fewshot_csv"], index=False)
    if figure:
        files["figure"] = plot(result, output_dir / "probe.png")
    result["files"] = {k: str(v) for k, v in files.items()}
    atomic_write_json(
        files["json"], _json_safe({k: v for k, v in result.items() if k != "fewshot_draws"}), indent=1
    )
    return files
