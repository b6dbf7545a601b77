"""MedEvalKit's rule-based scoring (``utils/utils.py`` with ``utils/SLAKE/SLAKE.py`` and
``utils/VQA_RAD/VQA_RAD.py``). Its published numbers (Lingshu, Table 6) judge *open* answers with
an LLM (GPT-4.1, ``use_llm_judge=True``): that part is not rules, so medcap applies only the rules
and marks the open figure "judge needed" for comparison with papers.

Rules. An answer inside ``\\boxed{...}`` or ``<answer>...</answer>`` is taken from there; the text is
lowercased and cut after the last of "answer is", "answer:", "final answer" and a few more. Then:

- SLAKE: the dataset's ``answer_type`` decides. A closed question whose gold is literally "yes" or
  "no" (SLAKE writes "Yes"/"No", so in practice none) needs the prediction, full stops and line
  breaks removed, to contain exactly one of "yes"/"no" as substrings and to contain the gold;
  every other closed answer must equal the gold (lowercased) once full stops and line breaks are
  removed: "Yes, it is" is wrong for "Yes". An open answer is right on exact equality (the
  prediction not even stripped).
- VQA-RAD: both texts are lowercased and stripped; a yes/no gold answer makes the question closed
  (the substring rule above), anything else open (exact equality).

Overall: the share right over all questions. MedEvalKit's own code stops on an empty open answer
(its ROUGE raises); here that answer is simply wrong.
"""

from __future__ import annotations

from medcap.evaluation.protocols.base import Protocol, Row, Verdict

ANSWER_CUES = ("**answer**:", "**answer**", "*answer*:", "**answer:**", "answer is", "answer:", "答案:",
               "final answer", "final answer is")  # fmt: skip


def boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 1, start + len("\\boxed{")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None


def tagged(text: str, tag: str) -> str:
    """Every ``<tag>...</tag>`` span joined by spaces; the text itself when there is none."""
    parts, pos = [], text.find(f"<{tag}>")
    while pos >= 0:
        end = text.find(f"</{tag}>", pos + len(tag) + 2)
        if end < 0:
            break
        parts.append(text[pos + len(tag) + 2 : end])
        pos = text.find(f"<{tag}>", end + len(tag) + 3)
    return " ".join(parts).strip() or text


def unwrap(response: str) -> str:
    """What ``cal_metrics`` does before any judge: the boxed or tagged answer."""
    inner = boxed(response)
    if inner is not None:
        return inner
    return tagged(response, "answer") if "<answer>" in response else response


def parse_response(response: str) -> str:
    text = response.lower()
    if "boxed" in text:
        text = boxed(text) or "None"
    elif "<answer>" in text:
        text = tagged(text, "answer")
    for cue in ANSWER_CUES:
        if cue in text:
            text = text.split(cue)[-1]
    return text


def _bare(response: str) -> str:
    return parse_response(response).replace("\n", "").replace(".", "")


def judge_yes_no(answer: str, response: str) -> bool:
    text = _bare(response)
    return ("yes" in text) != ("no" in text) and answer.lower() in text


def judge_closed(answer: str, response: str) -> bool:
    return _bare(response) == answer.lower()


def judge_open(answer: str, response: str) -> bool:
    return parse_response(response) == answer.lower()


def verdict(row: Row, dataset: str) -> Verdict:
    response, answer = unwrap(row.prediction), row.answer
    if dataset == "vqarad":
        answer, response = answer.lower().strip(), response.lower().strip()
        if answer in ("yes", "no"):
            return Verdict("closed", float(judge_yes_no(answer, response)))
        return Verdict("open", float(judge_open(answer, response)))
    if row.answer_type == "OPEN":
        return Verdict("open", float(judge_open(answer, response)))
    right = judge_yes_no(answer, response) if answer in ("yes", "no") else judge_closed(answer, response)
    return Verdict("closed", float(right))


PROTOCOL = Protocol(
    name="medevalkit",
    source="MedEvalKit (GitHub DAMO-NLP-SG/MedEvalKit), utils/utils.py, utils/SLAKE/SLAKE.py, utils/VQA_RAD/VQA_RAD.py",
    open_metric="accuracy by exact match (rules only; published figures use an LLM judge)",
    closed_metric="accuracy (yes/no by substring rules, other closed answers by exact match)",
    overall_metric="accuracy over all questions (open by exact match here)",
    verdict=verdict,
    judge="judge needed: MedEvalKit's published open-question figures come from an LLM judge (GPT-4.1); "
    "the open figure here is its rule-based exact match",
)
