"""Does the model read the image? The demo's test answers beside what needs no image: a blind
answerer (the answer most often right for the same question text in training), the most common
test answer of each content type, and the image-swap check (the same question on two images
with different gold answers: only reading the image can get both right; a blind answerer, which
gives one answer per question text, cannot). Differences are paired on the same test items,
with 95% bootstrap intervals."""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np

from medcap.data.sources import read_slake
from medcap.demo.probe import INITIAL, NAMES
from medcap.demo.stats import paired_interval
from medcap.evaluation.vqa import closed_correct, normalize_answer, token_recall

Row = dict[str, str]
STEP0 = NAMES[INITIAL]  # the probe's name for initial_vision.pt


def item_score(prediction: str, gold: str, answer_type: str) -> float:
    """Closed: exact match (first word for yes/no); open: token recall, as the task scores them."""
    if answer_type == "CLOSED":
        return float(closed_correct(prediction, gold))
    return token_recall(prediction, gold)


def right(prediction: str, gold: str, answer_type: str) -> bool:
    return item_score(prediction, gold, answer_type) == 1.0


class BlindAnswerer:
    """Answers from the question text alone: for each question seen in training, its answers
    that were most often right (a tie keeps them all, each counting equally); an unseen question
    gets the most common training answer of its answer type."""

    def __init__(self, train: list[tuple[str, str, str]]):  # (question, answer, answer_type)
        self.seen: dict[str, Counter] = defaultdict(Counter)
        self.by_type: dict[str, Counter] = defaultdict(Counter)
        for q, a, t in train:
            self.seen[q.strip()][normalize_answer(a)] += 1
            self.by_type[t][normalize_answer(a)] += 1

    def answers(self, question: str, answer_type: str) -> list[str]:
        counts = self.seen.get(question.strip()) or self.by_type.get(answer_type) or Counter({"": 1})
        top = max(counts.values())
        return sorted(a for a, c in counts.items() if c == top)

    def score(self, row: Row) -> float:
        """Expected score over the tied answers."""
        best = self.answers(row["instruction"], row["answer_type"])
        return sum(item_score(a, row["output"], row["answer_type"]) for a in best) / len(best)

    def both_right(self, r1: Row, r2: Row) -> float:
        """Same question, so the same answer for both images (expected over ties)."""
        best = self.answers(r1["instruction"], r1["answer_type"])
        return sum(right(a, r1["output"], r1["answer_type"]) and right(a, r2["output"], r2["answer_type"])
                   for a in best) / len(best)  # fmt: skip

    @classmethod
    def from_slake(cls, root: Path) -> BlindAnswerer:
        return cls([(it.prompt, it.answer, it.extra["answer_type"]) for it in read_slake(root, "train")])


def most_common_scores(rows: list[Row]) -> tuple[dict[tuple[str, str], str], list[float]]:
    """The most common gold answer of each (answer type, content type) on the test set itself
    (the best constant answer in hindsight, so a generous baseline), and each row's score with it."""
    golds: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for r in rows:
        golds[r["answer_type"], r.get("content_type", "")][normalize_answer(r["output"])] += 1
    best = {k: sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0] for k, c in golds.items()}
    return best, [item_score(best[r["answer_type"], r.get("content_type", "")], r["output"], r["answer_type"])
                  for r in rows]  # fmt: skip


def swap_pairs(rows: list[Row]) -> list[tuple[Row, Row]]:
    """Pairs of test items asking the same question of different images with different gold answers."""
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    for r in rows:
        groups[r["instruction"].strip(), r["answer_type"]].append(r)
    return [(a, b) for group in groups.values() for a, b in combinations(group, 2)
            if a["image"] != b["image"] and normalize_answer(a["output"]) != normalize_answer(b["output"])]  # fmt: skip


def comparison(model: list[float], baseline: list[float]) -> dict[str, Any]:
    return {"n": len(model), "model": float(np.mean(model)) if model else None,
            "baseline": float(np.mean(baseline)) if baseline else None,
            "difference": paired_interval(model, baseline) if model else None}  # fmt: skip


def image_reading(rows: list[Row], blind: BlindAnswerer) -> dict[str, Any]:
    """The trained model's test answers against the blind answerer and the most common answer:
    closed questions overall, each content type's closed and open questions, and the swap pairs."""
    model = [item_score(r["generated"], r["output"], r["answer_type"]) for r in rows]
    blind_scores = [blind.score(r) for r in rows]
    constant, common_scores = most_common_scores(rows)
    closed = [k for k, r in enumerate(rows) if r["answer_type"] == "CLOSED"]
    out: dict[str, Any] = {
        "closed_vs_blind": comparison([model[k] for k in closed], [blind_scores[k] for k in closed]),
        "by_content_type": {},
    }
    cells: dict[tuple[str, str], list[int]] = defaultdict(list)
    for k, r in enumerate(rows):
        cells[r.get("content_type", ""), r["answer_type"]].append(k)
    for (content, answer_type), ks in sorted(cells.items()):
        out["by_content_type"].setdefault(content or "other", {})[answer_type.lower()] = {
            "n": len(ks),
            "model": float(np.mean([model[k] for k in ks])),
            "blind": float(np.mean([blind_scores[k] for k in ks])),
            "most_common_answer": constant[answer_type, content],
            "most_common": float(np.mean([common_scores[k] for k in ks])),
            "model_minus_blind": paired_interval([model[k] for k in ks], [blind_scores[k] for k in ks]),
            "model_minus_most_common": paired_interval([model[k] for k in ks], [common_scores[k] for k in ks]),
        }
    pairs = swap_pairs(rows)
    both = [float(right(a["generated"], a["output"], a["answer_type"]) and right(b["generated"], b["output"], b["answer_type"]))
            for a, b in pairs]  # fmt: skip
    out["image_swap"] = {**comparison(both, [blind.both_right(a, b) for a, b in pairs]),
                         "questions": len({a["instruction"].strip() for a, _ in pairs})}  # fmt: skip
    return out


def harness_prompt(own: list[Row], harness: list[Row], suffix: str) -> dict[str, Any]:
    """The same questions asked with a harness's suffix: accuracy both ways, paired."""
    by_index = {r["index"]: r for r in harness}
    pairs = [(r, by_index[r["index"]]) for r in own if r["index"] in by_index]
    closed = [(a, b) for a, b in pairs if a["answer_type"] == "CLOSED"]
    score = lambda r: item_score(r["generated"], r["output"], r["answer_type"])  # noqa: E731
    return {
        "suffix": suffix,
        "closed": comparison([score(b) for _, b in closed], [score(a) for a, _ in closed]),
        "changed_answers": sum(normalize_answer(a["generated"]) != normalize_answer(b["generated"]) for a, b in pairs),
        "n": len(pairs),
    }


def verdicts(reading: dict[str, Any], harness: dict[str, Any] | None, probe: dict[str, Any] | None) -> dict[str, Any]:
    """Issue 24's targets, each True / False (None: not measured)."""
    closed = reading["closed_vs_blind"]["difference"]
    out: dict[str, Any] = {
        "closed_beats_blind_by_0.15": closed is not None and closed["value"] >= 0.15 and closed["ci_low"] > 0,
    }
    for content in ("Modality", "Plane"):
        cell = reading["by_content_type"].get(content, {}).get("open")
        out[f"open_{content.lower()}_beats_most_common"] = (
            None if cell is None else cell["model_minus_most_common"]["ci_low"] > 0
        )
    swap = reading["image_swap"]["difference"]
    out["image_swap_above_blind"] = swap is not None and swap["ci_low"] > 0
    if harness is not None:
        d = harness["closed"]["difference"]
        out["harness_prompt_within_0.05"] = d is not None and abs(d["value"]) <= 0.05
    if probe:
        step0 = [probe[k]["trained_minus"].get(STEP0) for k in ("Modality", "Plane") if k in probe]
        step0 = [d for d in step0 if d]
        if step0:
            out["probe_at_or_above_step0"] = all(d["value"] >= 0 for d in step0)
            out["probe_above_step0_somewhere"] = any(d["ci_low"] > 0 for d in step0)
    return out


def _d(d: dict[str, float] | None) -> str:
    return "n/a" if d is None else f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"


def _f(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def reading_table(summary: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(what, n, model, what needs no image, difference [95% CI]) rows, for console and HTML."""
    reading = summary["image_reading"]
    c = reading["closed_vs_blind"]
    rows = [("closed questions vs blind answerer", str(c["n"]), _f(c["model"]), _f(c["baseline"]), _d(c["difference"]))]
    for content, cell in reading["by_content_type"].items():
        if "closed" in cell:
            x = cell["closed"]
            rows.append((f"  {content} closed vs blind", str(x["n"]), _f(x["model"]), _f(x["blind"]), _d(x["model_minus_blind"])))
        if "open" in cell:
            x = cell["open"]
            rows.append((f"  {content} open vs most common ({x['most_common_answer']})", str(x["n"]), _f(x["model"]),
                         _f(x["most_common"]), _d(x["model_minus_most_common"])))  # fmt: skip
    s = reading["image_swap"]
    rows.append((f"image swap: both right ({s['questions']} questions)", str(s["n"]), _f(s["model"]), _f(s["baseline"]),
                 _d(s["difference"])))  # fmt: skip
    h = summary.get("harness_prompt")
    if h:
        x = h["closed"]
        rows.append(("closed with lmms-eval's suffix vs own", str(x["n"]), _f(x["model"]), _f(x["baseline"]), _d(x["difference"])))
    return rows


def reading_lines(summary: dict[str, Any]) -> list[str]:
    lines = ["", "Does it read the image? (held-out test; model vs what needs no image, paired 95% CI)"]
    lines += [f"  {w:<48} n={n:<4} {m:>6} vs {b:>6}  {d}" for w, n, m, b, d in reading_table(summary)]
    h = summary.get("harness_prompt")
    if h:
        lines.append(f"  with the harness suffix {h['changed_answers']} of {h['n']} answers change")
    lines.append("  targets: " + ", ".join(f"{k} {'yes' if v else 'no' if v is not None else 'n/a'}"
                                           for k, v in summary["targets"].items()))  # fmt: skip
    return lines


def reading_html(summary: dict[str, Any]) -> str:
    import html

    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in reading_table(summary))
    targets = "".join(f"<li>{html.escape(k)}: <b>{'met' if v else 'not met' if v is not None else 'not measured'}</b></li>"
                      for k, v in summary["targets"].items())  # fmt: skip
    return (
        "<h2>Does the model read the image?</h2><table><tr><th>measure</th><th>n</th><th>trained</th>"
        f"<th>needs no image</th><th>difference [95% CI]</th></tr>{rows}</table><ul>{targets}</ul>"
        '<p class="muted">Blind answerer: for each question text the answer most often right in training (ties '
        "count equally). Most common: the most common gold answer of that content type on the test set itself. "
        "Image swap: pairs of test items asking the same question of different images with different gold "
        "answers; both right is what only reading the image can earn (a blind answerer gives one answer per "
        "question). Intervals: paired bootstrap over items (over pairs for the swap, which share items).</p>"
    )
