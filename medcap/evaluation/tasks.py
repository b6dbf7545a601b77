"""What an evaluation asks and how it is scored. Each task brings its items, the CSV row it
writes per answer, its scorer and its one-line report: captions (``test_metrics``) and VQA
(``test_slake`` / ``test_vqarad``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torchtune.data import Message

from medcap.data.sharegpt import read_records, record_to_chat
from medcap.data.sources import read_slake, read_vqarad
from medcap.evaluation.captioning import SPICE_SKIPPED, caption_metrics, require_java
from medcap.evaluation.outputs import EvalOutputs
from medcap.evaluation.protocols import DEFAULT as DEFAULT_PROTOCOLS
from medcap.evaluation.protocols import resolve as resolve_protocols
from medcap.evaluation.protocols import score_protocols
from medcap.evaluation.vqa import score_item, summarize_scores
from medcap.io import atomic_write

VQA_MODES = ("direct", "describe_then_answer")  # image + question; or describe it first (the original's two turns)

VQA_KINDS = ("slake", "vqarad")
PYCOCO_NAMES = {"BLEU-1": "Bleu_1", "BLEU-2": "Bleu_2", "BLEU-3": "Bleu_3", "BLEU-4": "Bleu_4",
                "METEOR": "METEOR", "ROUGE-L": "ROUGE_L", "CIDEr": "CIDEr"}  # fmt: skip
EVAL_SPLITS = ("test", "val", "train")


@dataclass
class EvalItem:
    index: int
    image: Path | None
    messages: list[Message]  # the conversation up to the turn to answer
    reference: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def record(self) -> str | None:
        """How error messages name this item: its index in the task's source, and its qid (none
        for a lone image, index -1)."""
        if self.index < 0:
            return None
        qid = self.extra.get("qid")
        return f"{self.index}" + (f", qid {qid}" if qid not in (None, "") else "")

    @property
    def instruction(self) -> str:
        user = [m for m in self.messages if m.role == "user"]
        return user[-1].text_content if user else ""


def user_message(image: Path | None, text: str) -> Message:
    content = ([{"type": "image", "content": image}] if image else []) + [{"type": "text", "content": text}]
    return Message(role="user", content=content, masked=True)


def caption_items(source: str | Path) -> list[EvalItem]:
    """Every record of a ShareGPT file: the turns before the last answer are the prompt."""
    source = Path(source)
    items = []
    for i, rec in enumerate(read_records(source)):
        chat = record_to_chat(rec, i, source=source)
        last = max(k for k, m in enumerate(chat.messages) if m.role == "assistant")
        image = chat.images[0] if chat.images else None
        items.append(
            EvalItem(i, image, chat.messages[:last], chat.messages[last].text_content, chat.metadata)
        )
    return items


def vqa_items(
    kind: str, root: str | Path, answer_types: list[str], split: str = "test", question_suffix: str | None = None
) -> list[EvalItem]:
    """``split`` "val" answers the validation questions: tune there, report on test.
    ``question_suffix`` asks each question as a harness would (lmms-eval appends "\nAnswer the
    question using a single word or phrase."); the CSV's instruction column shows it."""
    reader = {"slake": read_slake, "vqarad": read_vqarad}[kind]
    wanted = {t.strip().upper() for t in answer_types}
    out = []
    for i, it in enumerate(reader(root, split)):
        if it.extra["answer_type"] in wanted:
            prompt = it.prompt + (question_suffix or "")
            out.append(EvalItem(i, it.image, [user_message(it.image, prompt)], it.answer, it.extra))
    return out


@dataclass
class Task:
    name: str
    items: list[EvalItem]
    two_turn: bool = False

    def row(self, item: EvalItem, description: str, generated: str) -> dict[str, Any]:
        """One CSV row: the original's four columns, then medcap's."""
        return {
            "image": str(item.image or ""), "instruction": item.instruction, "output": item.reference,
            "generated": generated, "index": item.index, "answer_type": item.extra.get("answer_type", ""),
            "content_type": item.extra.get("content_type", ""), "qid": item.extra.get("qid", ""),
            "description": description,
        }  # fmt: skip

    def score(self, rows: list[dict[str, str]], outputs: EvalOutputs) -> dict[str, Any]:
        raise NotImplementedError

    def report(self, tag: str, summary: dict[str, Any]) -> str:
        raise NotImplementedError

    def limit(self, n: int | None) -> Task:
        if n:
            self.items = self.items[: int(n)]
        return self


@dataclass
class CaptionTask(Task):
    """Caption every record; pycocoevalcap scores, also written as ``test_{ckpt}.csv``."""

    name: str = "captions"
    items: list[EvalItem] = field(default_factory=list)

    def score(self, rows: list[dict[str, str]], outputs: EvalOutputs) -> dict[str, Any]:
        if not rows:
            return {"n": 0, "note": "no caption generated: nothing to score"}
        metrics = caption_metrics([r["generated"] for r in rows], [r["output"] for r in rows])
        # the original's file: pycocoevalcap's own metric names, six decimals, no header
        lines = "".join(f"{PYCOCO_NAMES[k]},{v:.6f}\n" for k, v in metrics.items() if k in PYCOCO_NAMES)
        atomic_write(outputs.caption_scores, lambda f: f.write(lines.encode()))
        return {**metrics, "note": SPICE_SKIPPED}

    def report(self, tag: str, s: dict[str, Any]) -> str:
        if not s["n"]:
            return f"{self.name} [{tag}]: {s['note']}"
        return (
            f"{self.name} [{tag}] n={s['n']}: BLEU-4 {s['BLEU-4']:.4f}  METEOR {s['METEOR']:.4f}  "
            f"ROUGE-L {s['ROUGE-L']:.4f}  CIDEr {s['CIDEr']:.4f} (n={s['n']}; {SPICE_SKIPPED})"
        )


@dataclass
class VQATask(Task):
    """Closed questions by exact match, open ones by recall / F1 / exact match (``vqa.py``); the
    summary's ``protocols`` holds the same answers scored under each paper's protocol."""

    protocols: tuple[str, ...] = DEFAULT_PROTOCOLS

    def row(self, item: EvalItem, description: str, generated: str) -> dict[str, Any]:
        row = super().row(item, description, generated)
        if row["answer_type"]:
            row["score"] = json.dumps(score_item(generated, item.reference, row["answer_type"]))
        return row

    def score(self, rows: list[dict[str, str]], outputs: EvalOutputs) -> dict[str, Any]:
        items = [{"prediction": r["generated"], "answer": r["output"], "answer_type": r["answer_type"],
                  "content_type": r.get("content_type")} for r in rows]  # fmt: skip
        summary = summarize_scores(items)
        if self.protocols:
            summary["protocols"] = score_protocols(items, self.protocols, dataset=self.name)
        return summary

    def report(self, tag: str, s: dict[str, Any]) -> str:
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        return (
            f"{self.name} [{tag}] closed accuracy {fmt(s['closed_accuracy'])} (n={s['closed_n']}), open recall "
            f"{fmt(s['open_recall'])} / F1 {fmt(s['open_f1'])} / exact {fmt(s['open_exact_match'])} (n={s['open_n']})"
        ) + "".join(
            f"\n  {name:<13} open {fmt(p['open'])} (n={p['open_n']})  closed {fmt(p['closed'])} (n={p['closed_n']})"
            f"  overall {fmt(p['overall'])}" + ("  [open: judge needed]" if p.get("judge") else "")
            for name, p in s.get("protocols", {}).items()
        )


def question_suffix(text: str | None) -> str | None:
    """A command line cannot carry a line break (OmegaConf strips it): ``\\n`` stands for one."""
    return None if text is None else text.replace("\\n", "\n")


def tasks_from_settings(settings: Any) -> list[Task]:
    """``test_metrics`` (captions of ``dataset_source``), ``test_slake`` / ``test_vqarad`` (the
    dataset root's ``eval_split`` questions of ``answer_types``), each cut to ``limit`` items.
    ``settings``: ``medcap.settings.GenerateSettings``."""
    s = settings
    if s.vqa_mode not in VQA_MODES:
        raise ValueError(f"vqa_mode={s.vqa_mode!r}; expected one of {VQA_MODES}")
    two_turn = s.vqa_mode == "describe_then_answer"
    tasks: list[Task] = []
    if s.test_metrics:
        require_java()
        tasks.append(CaptionTask(items=caption_items(s.dataset_source)))
    answer_types = list(s.answer_types or ["CLOSED", "OPEN"])
    split = str(s.eval_split or "test")
    if split not in EVAL_SPLITS:
        raise ValueError(f"eval_split={split!r}; expected test, val or train")
    if split == "val" and s.test_vqarad:
        raise ValueError("eval_split=val: VQA-RAD has no validation split (hold one out of its training questions)")
    protocols = resolve_protocols(s.protocols)
    for kind in VQA_KINDS:
        if getattr(s, f"test_{kind}"):
            items = vqa_items(kind, s.dataset_source, answer_types, split, question_suffix(s.question_suffix))
            tasks.append(VQATask(kind, items, two_turn, protocols=protocols))
    if not tasks:
        raise ValueError("nothing to evaluate: set test_metrics=True, test_slake=True or test_vqarad=True")
    return [task.limit(s.limit) for task in tasks]
