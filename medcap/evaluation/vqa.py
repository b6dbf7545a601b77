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
import unicodedata
from collections import Counter, defaultdict
from collections.abc import Iterable
from typing import Any

NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = {"a", "an", "the"}
# The contractions table of the VQAv2 evaluation script (vqaEval.py, `contractions`), keys lowercased as
# the text is: a word written without its apostrophe takes the apostrophe spelling.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "id've": "i'd've", "i'dve": "i'd've", "im": "i'm",
    "ive": "i've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
_CONTRACTED = set(CONTRACTIONS.values())
_APOSTROPHES = str.maketrans("\u2019\u02bc", "''")  # typographic apostrophes (NFKC keeps them)
_THOUSANDS = re.compile(r"(?<![\d.,])\d{1,3}(?:,\d{3})+(?!,?\d)")  # 1,000 and 12,345,678, not 3,5 or 2,50
_BARE_DECIMAL = re.compile(r"(?<![\w.])\.(?=\d)")  # .5 is 0.5


def _separates(text: str, i: int) -> bool:
    """Unicode punctuation (P*), symbols (S*: $ + = ° × …) and control or format characters (C*)
    separate words, except a decimal point between digits and an apostrophe inside a word."""
    ch, before, after = text[i], text[i - 1 : i], text[i + 1 : i + 2]
    if ch == "." and before.isdigit() and after.isdigit():
        return False
    if ch == "'" and before.isalnum() and after.isalnum():
        return False
    return unicodedata.category(ch)[0] in "PSC"


def normalize_answer(text: Any) -> str:
    """VQAv2-style, so that model output written differently from the answer still matches: NFKC
    folding (full-width letters), lowercase, thousands separators dropped, ``.5`` read as ``0.5``,
    punctuation to spaces (a decimal point survives), VQA's contractions, articles dropped, number
    words to digits, whitespace collapsed."""
    text = unicodedata.normalize("NFKC", str(text)).lower().translate(_APOSTROPHES)
    text = _THOUSANDS.sub(lambda m: m.group().replace(",", ""), text)
    text = _BARE_DECIMAL.sub("0.", text)
    text = "".join(" " if _separates(text, i) else ch for i, ch in enumerate(text))
    words = []
    for word in text.split():
        word = CONTRACTIONS.get(word, word)
        parts = [word] if word in _CONTRACTED else word.split("'")  # a possessive's 's splits off
        words += [NUMBER_WORDS.get(w, w) for w in parts if w not in ARTICLES]
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
