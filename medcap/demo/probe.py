"""The demo's answer to the original README's claim that an encoder trained against a frozen
LLM gives better image features: linear probes (``medcap.probing``) of the trained encoder,
random initialisation of the same architecture and a pixel baseline, for the mini SLAKE's
modality, plane and body part of every image, fitted on training images and scored on the
held-out test images. The verdict compares the trained encoder with each baseline on the same
test images (paired bootstrap of the accuracy difference, 95%)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from medcap.demo.stats import paired_interval, verdict
from medcap.probing import run_probe

LABEL_KINDS = {"Modality": "modality", "Plane": "plane", "Organ": "body part"}
TRAINED, INITIAL = "trained", "step 0"
FEATURE_WORDS = {"pooled": "pooled features", "patches": "patch tokens (what the connector reads)"}
NAMES = {TRAINED: "trained", INITIAL: "step 0 (training's own initialisation)", "random": "untrained (another random init)",
         "pixels": "pixel baseline"}  # fmt: skip


def paired_difference(result: dict[str, Any], a: str, b: str, seed: int = 0) -> dict[str, float]:
    """Accuracy of ``a`` minus that of ``b`` on the same test images, with its 95% interval."""
    y = np.asarray(result["test_labels"])
    right = {n: np.asarray(result["results"][n]["logreg"]["predictions"]) == y for n in (a, b)}
    return paired_interval(right[a], right[b], seed)


def connector_features(checkpoint: Path) -> str:
    """The features the trained connector reads, so the probe asks what the LLM was given: patch
    tokens for the per-patch connectors (whose pooled head gets no gradient), else the pooled
    embedding."""
    from medcap.models.checkpoints import read_vision_checkpoint
    from medcap.models.connectors import PER_PATCH

    return "patches" if read_vision_checkpoint(checkpoint).meta.get("connector") in PER_PATCH else "pooled"


def probe_demo(slake: Path, checkpoint: Path, output_dir: Path, vision: str = "vit_tiny",
               initial: Path | None = None) -> dict[str, Any]:
    """Per label kind: each encoder's logistic-regression accuracy and balanced accuracy with
    intervals, and the trained encoder against each baseline (paired). ``initial`` (training's
    ``initial_vision.pt``) is the exact initialisation the trained encoder started from."""
    features = connector_features(checkpoint)
    encoders: list[Any] = [{"name": TRAINED, "vision_checkpoint": str(checkpoint), "vision": vision}]
    if initial is not None:
        encoders.append({"name": INITIAL, "vision_checkpoint": str(initial), "vision": vision})
    out: dict[str, Any] = {}
    for kind, words in LABEL_KINDS.items():
        # a body part seen only in test images (one study) cannot be learnt: left out, and counted
        result = run_probe(encoders, slake, output_dir / kind.lower(), label_kind=kind, vision=vision,
                           unseen_test_classes="drop", progress=False, figure=True, features=features)  # fmt: skip
        names = {n: NAMES.get(n, NAMES.get(e["kind"], n)) for n, e in result["encoders"].items()}
        trained = TRAINED
        section = {
            "label": words,
            "features": features,
            "classes": result["labels"]["classes"],
            "n_train": result["labels"]["n_train"],
            "n_test": result["labels"]["n_test"],
            "dropped_unseen_classes": result["labels"]["dropped_unseen_classes"],
            "majority_accuracy": result["majority_class"]["accuracy"],
            "encoders": {
                names[n]: {m: r["logreg"][m] for m in ("accuracy", "balanced_accuracy")}
                for n, r in result["results"].items()
            },
            "trained_minus": {},
        }
        for n in result["encoders"]:
            if n != trained:
                diff = paired_difference(result, trained, n)
                section["trained_minus"][names[n]] = {**diff, "verdict": verdict(diff)}
        out[kind] = section
    return out


def _ci(m: dict[str, float]) -> str:
    return f"{m['value']:.2f} [{m['ci_low']:.2f}, {m['ci_high']:.2f}]"


def probe_lines(probe: dict[str, Any]) -> list[str]:
    """The console table: accuracy [95% interval] per label kind and encoder, then the verdicts."""
    what = FEATURE_WORDS[next(iter(probe.values())).get("features", "pooled")] if probe else ""
    lines = ["", f"Linear probes of the encoders' {what} (held-out test images; accuracy [95% CI]):"]
    for section in probe.values():
        cells = "  ".join(f"{name} {_ci(m['accuracy'])}" for name, m in section["encoders"].items())
        lines.append(f"  {section['label']:<10} (n={section['n_test']}): {cells}")
        for name, d in section["trained_minus"].items():
            lines.append(f"  {'':<10} trained - {name}: {d['value']:+.2f} [{d['ci_low']:+.2f}, {d['ci_high']:+.2f}] "
                         f"-> {d['verdict']}")  # fmt: skip
    return lines


def probe_html(probe: dict[str, Any]) -> str:
    rows = []
    for section in probe.values():
        encoders = section["encoders"]
        dropped = section["dropped_unseen_classes"]
        note = f" ({', '.join(dropped)} left out: no training image)" if dropped else ""
        diffs = "<br>".join(f"trained &minus; {html.escape(n)}: {d['value']:+.2f} [{d['ci_low']:+.2f}, "
                            f"{d['ci_high']:+.2f}], <b>{d['verdict']}</b>" for n, d in section["trained_minus"].items())  # fmt: skip
        cells = "".join(f"<td>{_ci(m['accuracy'])}<br><span class=\"muted\">balanced {_ci(m['balanced_accuracy'])}"
                        "</span></td>" for m in encoders.values())  # fmt: skip
        rows.append(f"<tr><td>{html.escape(section['label'])}{html.escape(note)}<br><span class=\"muted\">"
                    f"{section['n_train']} train / {section['n_test']} test images</span></td>{cells}<td>{diffs}</td></tr>")  # fmt: skip
    first = next(iter(probe.values()))
    head = "".join(f"<th>{html.escape(n)}</th>" for n in first["encoders"])
    return (f"<table><tr><th>label</th>{head}<th>trained against each (paired)</th></tr>{''.join(rows)}</table>"
            f'<p class="muted">Logistic regression on each encoder\'s {FEATURE_WORDS[first.get("features", "pooled")]} (C chosen by grouped '
            "cross-validation on the training images), scored on the held-out test images; 95% bootstrap "
            "intervals over test images; the differences are paired (the same test images for both encoders). "
            "Step 0 is the exact initialisation training started from (initial_vision.pt); the other "
            "untrained encoder a seeded random initialisation of the same architecture.</p>")  # fmt: skip
