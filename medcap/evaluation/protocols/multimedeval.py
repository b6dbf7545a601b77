"""MultiMedEval 1.0.0's VQA scoring (``multimedeval/task_families.py``, ``VQA.evaluate``; the same
for VQA-RAD, SLAKE and Path-VQA). Both texts are cleaned (``legacy_clean``: lowercase, punctuation,
articles, number words) and turned into sets of words. A question is *closed when its cleaned gold
answer is "yes" or "no"*, whatever the dataset's ``answer_type`` says (SLAKE's "X or Y?" questions
count as open). A closed answer is right when it holds the gold word ("no" also accepts "not"):
recall >= 0.4 against {yes} or {no, not}. An open answer earns its recall (the share of the gold
answer's distinct words it holds); "open accuracy" counts recall >= 0.75. Over all questions:
recall, token F1 and BLEU-1 (torchmetrics' ``BLEUScore(n_gram=1)`` on the cleaned texts).
"""

from __future__ import annotations

import math

from medcap.evaluation.protocols.base import Protocol, Row, Verdict
from medcap.evaluation.protocols.legacy_clean import legacy_clean

CLOSED_THRESHOLD = 0.4
OPEN_THRESHOLD = 0.75


def bleu1(prediction: str, reference: str) -> float:
    """Sentence BLEU-1 with one reference, unsmoothed: clipped unigram precision times the
    brevity penalty (torchmetrics' BLEUScore(n_gram=1) on whitespace tokens)."""
    pred, ref = prediction.split(), reference.split()
    if not pred:
        return 0.0
    counts = {w: min(pred.count(w), ref.count(w)) for w in set(pred)}
    matches = sum(counts.values())
    if not matches:
        return 0.0
    penalty = 1.0 if len(pred) > len(ref) else math.exp(1 - len(ref) / len(pred))
    return matches / len(pred) * penalty


def verdict(row: Row, dataset: str) -> Verdict:
    gold, pred = legacy_clean(row.answer.lower().strip()), legacy_clean(row.prediction)
    gold_words, pred_words = set(gold.split()), set(pred.split())
    common = len(gold_words & pred_words)
    precision = common / len(pred_words) if pred_words else 0.0
    recall = common / len(gold_words) if gold_words else 0.0
    extra = {
        "f1": 2 * precision * recall / (precision + recall + 1e-8),
        "bleu1": bleu1(pred, gold),
    }
    if gold in ("yes", "no"):
        accepted = {gold, "not"} if gold == "no" else {gold}
        right = len(pred_words & accepted) / len(accepted) >= CLOSED_THRESHOLD
        return Verdict("closed", float(right), extra, overall=recall)
    extra["open_accuracy"] = float(recall >= OPEN_THRESHOLD)
    return Verdict("open", recall, extra, overall=recall)


PROTOCOL = Protocol(
    name="multimedeval",
    source="MultiMedEval 1.0.0, multimedeval/task_families.py (VQA.evaluate) and utils.py (clean_str)",
    open_metric="token recall of questions whose gold is not yes/no",
    closed_metric="accuracy of yes/no questions (recall >= 0.4, 'not' accepted for 'no')",
    overall_metric="token recall over all questions",
    verdict=verdict,
)
