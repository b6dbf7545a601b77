"""What every scoring protocol shares: the rows it reads, the verdict it gives per answer and the
three figures it reports (open, closed, overall), each with the name of what it measures.

A protocol is a published way to score SLAKE / VQA-RAD answers. They disagree on what counts as
closed (the dataset's ``answer_type``, or a yes/no gold answer), on how text is normalised and on
what an open answer earns, so the same answers give different numbers under each: medcap reports
them side by side so that a user can put a figure beside a paper's under the paper's own rules.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DATASETS = ("slake", "vqarad")


@dataclass(frozen=True)
class Row:
    """One answered question: the model's text, the gold answer, the dataset's answer type."""

    prediction: str
    answer: str
    answer_type: str  # OPEN / CLOSED, as the dataset writes it

    @classmethod
    def of(cls, row: Mapping[str, Any]) -> Row:
        """``row``: prediction (or generated), answer (or output), answer_type."""
        prediction = row.get("prediction", row.get("generated"))
        answer = row.get("answer", row.get("output"))
        if prediction is None or answer is None:
            raise KeyError(f"a protocol row needs prediction and answer; got keys {sorted(row)}")
        return cls(str(prediction), str(answer), str(row.get("answer_type", "")).strip().upper())


@dataclass(frozen=True)
class Verdict:
    """How one answer fares: in which group the protocol counts it, and its scores there."""

    group: str  # "open" or "closed" as this protocol decides ("" for neither: counted in overall only)
    value: float  # the headline figure's per-answer value (1/0 for a right/wrong answer)
    extra: dict[str, float] = field(default_factory=dict)  # further per-answer figures
    overall: float | None = None  # its value in the all-question figure, where that differs from ``value``


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class Protocol:
    """``judge`` names what a published figure needs beyond rules (an LLM judge); None: rules only."""

    name: str
    source: str  # the peer's code these rules come from
    open_metric: str
    closed_metric: str
    overall_metric: str | None  # None: the protocol reports no all-question figure
    verdict: Callable[[Row, str], Verdict]
    judge: str | None = None

    def score(self, rows: Iterable[Mapping[str, Any]], dataset: str = "slake") -> dict[str, Any]:
        """``rows``: dicts with prediction, answer, answer_type; ``dataset``: slake or vqarad
        (protocols whose rules differ by dataset read it)."""
        if dataset not in DATASETS:
            raise ValueError(f"dataset={dataset!r}: expected one of {DATASETS}")
        verdicts = [self.verdict(Row.of(r), dataset) for r in rows]
        groups = {g: [v for v in verdicts if v.group == g] for g in ("open", "closed")}
        out: dict[str, Any] = {
            "open": mean([v.value for v in groups["open"]]),
            "closed": mean([v.value for v in groups["closed"]]),
            "overall": self.overall(verdicts),
            "n": len(verdicts), "open_n": len(groups["open"]), "closed_n": len(groups["closed"]),
            "open_metric": self.open_metric, "closed_metric": self.closed_metric,
            "overall_metric": self.overall_metric,
        }  # fmt: skip
        for key in sorted({k for v in verdicts for k in v.extra}):
            values = [v.extra[key] for v in verdicts if key in v.extra]
            out[key] = mean(values)
        if self.judge:
            out["judge"] = self.judge
        return out

    def overall(self, verdicts: list[Verdict]) -> float | None:
        if not self.overall_metric:
            return None
        return mean([v.value if v.overall is None else v.overall for v in verdicts])
