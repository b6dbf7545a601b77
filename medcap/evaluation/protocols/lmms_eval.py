"""lmms-eval 0.7.3's ``slake`` task (``lmms_eval/tasks/slake/utils.py``): an answer is right when
its normalised text equals the gold answer's; the figures are accuracy over the open questions,
the closed ones (the dataset's ``answer_type``) and all of them.

Normalisation: strip, lowercase, drop anything in round brackets, punctuation (ASCII
``string.punctuation``) to spaces, whitespace collapsed, "x ray" to "xray", and a whole answer that
is a yes/no synonym ("yeah", "yep", "true" / "nope", "false") to yes / no. No articles or number
words are touched: "the liver" is not "liver", "two" is not "2", and "Yes, it is." is wrong for "Yes".
Prompt: the question + "\\nAnswer the question using a single word or phrase.", greedy, 32 new
tokens. lmms-eval has no VQA-RAD task; the same rule is applied to VQA-RAD here. (Its Chinese
synonyms and full-width punctuation serve SLAKE's Chinese questions, which medcap does not score.)
"""

from __future__ import annotations

import re
import string

from medcap.evaluation.protocols.base import Protocol, Row, Verdict

YES = {"yes", "yeah", "yep", "true"}
NO = {"no", "nope", "false"}
_PUNCTUATION = str.maketrans({c: " " for c in string.punctuation})
_BRACKETED = re.compile(r"\([^)]*\)")


def normalize(text: str) -> str:
    text = _BRACKETED.sub(" ", str(text).strip().lower()).translate(_PUNCTUATION)
    text = " ".join(text.split())
    if text in ("x ray", "xray"):
        return "xray"
    return "yes" if text in YES else "no" if text in NO else text


def verdict(row: Row, dataset: str) -> Verdict:
    group = {"OPEN": "open", "CLOSED": "closed"}.get(row.answer_type, "")
    return Verdict(group, float(normalize(row.prediction) == normalize(row.answer)))


PROTOCOL = Protocol(
    name="lmms_eval",
    source="lmms-eval 0.7.3, lmms_eval/tasks/slake/utils.py (slake_process_results)",
    open_metric="accuracy (normalised exact match)",
    closed_metric="accuracy (normalised exact match)",
    overall_metric="accuracy over all questions",
    verdict=verdict,
)
