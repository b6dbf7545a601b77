"""medcap's own scoring (``medcap/evaluation/vqa.py``): closed questions (the dataset's
``answer_type``) by normalised exact match, a yes/no answer read from the first word; open ones by
token recall (LLaVA-Med's measure, on VQAv2-normalised text), with token F1 and exact match."""

from __future__ import annotations

from medcap.evaluation.protocols.base import Protocol, Row, Verdict
from medcap.evaluation.vqa import closed_correct, score_item


def verdict(row: Row, dataset: str) -> Verdict:
    if row.answer_type == "CLOSED":
        return Verdict("closed", float(closed_correct(row.prediction, row.answer)))
    s = score_item(row.prediction, row.answer, "OPEN")
    return Verdict("open", s["recall"], {"open_f1": s["f1"], "open_exact_match": s["exact_match"]})


PROTOCOL = Protocol(
    name="medcap",
    source="medcap/evaluation/vqa.py",
    open_metric="token recall",
    closed_metric="accuracy (normalised exact match; yes/no from the first word)",
    overall_metric=None,
    verdict=verdict,
)
