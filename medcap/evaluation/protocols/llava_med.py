"""LLaVA-Med's scoring (``llava/eval/run_eval_batch.py`` with ``eval_metrics/``, the version that
keeps every question in its denominator). Both texts are lowercased and cleaned
(``legacy_clean``). The dataset's ``answer_type`` decides the group. A closed answer is right when
the cleaned gold answer is a *substring* of the cleaned prediction: "no" is found in "normal",
"not" and "unknown", and "yes, no" is right for both. An open answer earns its recall from
``calculate_f1score``: each shared word counts as often as the prediction repeats it, each missing
gold word as often as the gold repeats it, and any answer sharing no word scores 0. The script
also reports open "accuracy" (the gold text found in the prediction) and token F1.
"""

from __future__ import annotations

from collections import Counter

from medcap.evaluation.protocols.base import Protocol, Row, Verdict
from medcap.evaluation.protocols.legacy_clean import legacy_clean


def f1_precision_recall(prediction: str, reference: str) -> tuple[float, float, float]:
    """``calculate_f1score``'s counting (on texts it cleans once more)."""
    pred = Counter(legacy_clean(prediction).split())
    ref = Counter(legacy_clean(reference).split())
    if not pred or not ref:
        return 0.0, 0.0, 0.0
    tp = sum(n for w, n in pred.items() if w in ref)
    fp = sum(n for w, n in pred.items() if w not in ref)
    fn = sum(n for w, n in ref.items() if w not in pred)
    if not tp:
        return 0.0, 0.0, 0.0
    precision, recall = tp / (tp + fp), tp / (tp + fn)
    return 2 * precision * recall / (precision + recall), precision, recall


def verdict(row: Row, dataset: str) -> Verdict:
    gold, pred = legacy_clean(row.answer.lower()), legacy_clean(row.prediction.lower())
    if row.answer_type == "CLOSED":
        return Verdict("closed", float(gold in pred))
    if row.answer_type != "OPEN":
        return Verdict("", 0.0)
    f1, _, recall = f1_precision_recall(pred, gold)
    return Verdict("open", recall, {"open_f1": f1, "open_substring": float(gold in pred)})


PROTOCOL = Protocol(
    name="llava_med",
    source="LLaVA-Med (GitHub microsoft/LLaVA-Med), llava/eval/run_eval_batch.py and eval_metrics/",
    open_metric="token recall (calculate_f1score)",
    closed_metric="accuracy (gold is a substring of the prediction)",
    overall_metric=None,
    verdict=verdict,
)
