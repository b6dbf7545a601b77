"""VQA scoring: closed questions by exact match, open ones by token recall, F1 and exact match.

How medcap differs from LLaVA-Med's scripts, on purpose:
- a closed answer is right when the normalised prediction equals the normalised answer, and a
  yes/no answer is read from the prediction's first word; LLaVA-Med tested ``gt in pred`` as a
  substring, which finds "no" inside "normal" and "not";
- every question stays in its denominator (an older LLaVA-Med script dropped some wrong ones).
Open-question recall is LLaVA-Med's measure (share of the answer's tokens found in the
prediction); token F1 and exact match are MedGemma's.
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: Any) -> str:
    """VQAv2-style: lowercase, punctuation to spaces (a decimal point survives), articles
    dropped, number words to digits, whitespace collapsed."""
    text = str(text).lower().strip()
    text = re.sub(r"(?<=\d)\.(?=\d)", "\x01", text)  # keep decimal points through the next line
    text = _PUNCT.sub(" ", text).replace("\x01", ".")
    words = [NUMBER_WORDS.get(w, w) for w in text.split() if w not in ARTICLES]
    return " ".join(words)


def first_word(text: Any) -> str:
    words = normalize_answer(text).split()
    return words[0] if words else ""


def is_yes_no(answer: Any) -> bool:
    """A yes/no question's gold answer (the other closed kind names an option)."""
    return normalize_answer(answer) in ("yes", "no")


def closed_correct(prediction: Any, answer: Any) -> bool:
    gold = normalize_answer(answer)
    if is_yes_no(gold):
        return first_word(prediction) == gold
    return normalize_answer(prediction) == gold


def token_recall(prediction: Any, answer: Any) -> float:
    gold = normalize_answer(answer).split()
    if not gold:
        return 0.0
    pred = set(normalize_answer(prediction).split())
    return sum(tok in pred for tok in gold) / len(gold)


def token_f1(prediction: Any, answer: Any) -> float:
    pred, gold = normalize_answer(prediction).split(), normalize_answer(answer).split()
    common = sum((Counter(pred) & Counter(gold)).values())
    if not pred or not gold or not common:
        return float(pred == gold)
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def score_item(prediction: Any, answer: Any, answer_type: str) -> dict[str, float]:
    if str(answer_type).strip().upper() == "CLOSED":
        return {"correct": float(closed_correct(prediction, answer))}
    return {
        "recall": token_recall(prediction, answer),
        "f1": token_f1(prediction, answer),
        "exact_match": float(normalize_answer(prediction) == normalize_answer(answer)),
    }


def _cell(rows: list[dict[str, Any]]) -> dict[str, Any]:
    closed = [r for r in rows if r["answer_type"] == "CLOSED"]
    open_ = [r for r in rows if r["answer_type"] != "CLOSED"]
    out: dict[str, Any] = {"n": len(rows), "closed_n": len(closed), "open_n": len(open_)}
    out["closed_accuracy"] = sum(r["correct"] for r in closed) / len(closed) if closed else None
    for key in ("recall", "f1", "exact_match"):
        out[f"open_{key}"] = sum(r[key] for r in open_) / len(open_) if open_ else None
    return out


def summarize_scores(items: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """``items``: dicts with prediction, answer, answer_type and optionally content_type.
    Returns overall figures, and the same by content type, with counts in every cell."""
    rows = []
    for it in items:
        answer_type = str(it["answer_type"]).strip().upper()
        rows.append({**score_item(it["prediction"], it["answer"], answer_type), "answer_type": answer_type,
                     "content_type": it.get("content_type")})  # fmt: skip
    summary = _cell(rows)
    by_content: dict[str, list] = defaultdict(list)
    for r in rows:
        if r["content_type"]:
            by_content[str(r["content_type"])].append(r)
    if by_content:
        summary["by_content_type"] = {k: _cell(v) for k, v in sorted(by_content.items())}
    return summary
