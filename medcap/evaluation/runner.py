"""Evaluate vision checkpoints: caption a ShareGPT file (``test_metrics``), answer SLAKE or
VQA-RAD test questions (``test_slake`` / ``test_vqarad``), write the original CSVs (appended as
they go, so a rerun resumes) and score them. The LLM is loaded once for all checkpoints.
"""

from __future__ import annotations

import glob
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig
from torchtune import config, training
from torchtune.data import Message
from tqdm import tqdm

from medcap.data.dataset import tokenize_chat
from medcap.data.images import load_image
from medcap.data.sharegpt import read_records, record_to_chat
from medcap.data.sources import read_slake, read_vqarad
from medcap.evaluation.captioning import SPICE_SKIPPED, caption_metrics, require_java
from medcap.evaluation.vqa import score_item, summarize
from medcap.generation import generate
from medcap.io import ResumableCSV, atomic_write, atomic_write_json
from medcap.models.checkpoints import load_vision_checkpoint
from medcap.training import build_llm, fuse_from_config, resolve_precision

CSV_COLUMNS = ["image", "instruction", "output", "generated"]  # the original's, in its order
EXTRA_COLUMNS = ["index", "answer_type", "content_type", "qid", "description", "score"]
VQA_MODES = ("direct", "describe_then_answer")
DESCRIBE = "Describe the image in a detailed and informative manner."


@dataclass
class EvalItem:
    index: int
    image: Path | None
    messages: list[Message]  # the conversation up to the turn to answer
    reference: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def instruction(self) -> str:
        user = [m for m in self.messages if m.role == "user"]
        return user[-1].text_content if user else ""


def expand_checkpoints(spec: Any) -> list[Path | None]:
    """A file, a glob (``meta_model_*.pt``, in epoch order) or a list; None = untrained."""
    if spec is None:
        return [None]
    specs = list(spec) if isinstance(spec, (list, tuple, ListConfig)) else [spec]
    paths: list[Path] = []
    for s in specs:
        s = str(s)
        if any(ch in s for ch in "*?["):
            matches = glob.glob(s)
            if not matches:
                raise FileNotFoundError(f"vision_checkpoint={s}: no file matches")
            key = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)]  # noqa: E731
            paths += [Path(p) for p in sorted(matches, key=key)]
        else:
            paths.append(Path(s))
    return paths


def checkpoint_tag(path: Path | None) -> str:
    return "untrained" if path is None else path.stem


def _user(image: Path | None, text: str) -> Message:
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


def vqa_items(kind: str, root: str | Path, answer_types: list[str], split: str = "test") -> list[EvalItem]:
    """``split`` "val" answers the validation questions: tune there, report on test."""
    reader = {"slake": read_slake, "vqarad": read_vqarad}[kind]
    wanted = {t.strip().upper() for t in answer_types}
    out = []
    for i, it in enumerate(reader(root, split)):
        if it.extra["answer_type"] in wanted:
            out.append(EvalItem(i, it.image, [_user(it.image, it.prompt)], it.answer, it.extra))
    return out


class Evaluator:
    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.device = torch.device(cfg.get("device", "cuda"))
        self.dtype = resolve_precision(self.device, cfg.get("dtype", "bf16"))
        training.set_seed(seed=cfg.get("seed"))
        self.rng = torch.Generator(device=self.device).manual_seed(int(cfg.get("seed") or 0))
        self.output_dir = Path(cfg.output_dir)
        self.batch_size = int(cfg.get("batch_size", 8))
        self.max_new_tokens = int(cfg.max_new_tokens)
        self.temperature = float(cfg.get("temperature") or 0.0)
        self.top_k = cfg.get("top_k")
        self.max_seq_len = cfg.get("dataset_max_seq_len")
        self.vqa_mode = cfg.get("vqa_mode", "describe_then_answer")
        if self.vqa_mode not in VQA_MODES:
            raise ValueError(f"vqa_mode={self.vqa_mode!r}; expected one of {VQA_MODES}")
        self.tokenizer = config.instantiate(cfg.tokenizer)
        self.model = None

    # ------------------------------------------------------------ model
    def load(self, ckpt: Path | None) -> None:
        """The LLM once; then only the vision weights change between checkpoints."""
        cfg = self.cfg
        if self.model is None:
            checkpointer = config.instantiate(cfg.checkpointer)
            decoder = build_llm(cfg.model, checkpointer, self.dtype)
            self.model = fuse_from_config(cfg, decoder, self.tokenizer, vision_checkpoint=ckpt)
            self.model.visual.to(self.dtype)
            self.model.projector.to(self.dtype)
            self.model.to(self.device).eval()
            self.transform = self.model.visual.preprocess.transform()
        elif ckpt is not None:
            load_vision_checkpoint(self.model, ckpt)

    # ------------------------------------------------------------ generation
    def _prompt(self, messages: list[Message]) -> list[int]:
        tokens, _ = tokenize_chat(
            self.tokenizer,
            [*messages, Message(role="assistant", content="")],
            self.model.num_image_tokens,
            add_end_tokens=False,
        )
        return tokens

    def _generate(self, batch: list[tuple[list[int], Path | None]], max_new_tokens: int) -> list[str]:
        prompts = [p for p, _ in batch]
        pixels = [self.transform(load_image(img)) for _, img in batch if img is not None]
        images = torch.stack(pixels).to(self.device, self.dtype) if pixels else None
        ids = generate(
            self.model,
            prompts,
            images,
            max_new_tokens=max_new_tokens,
            stop_tokens=self.tokenizer.stop_tokens,
            pad_id=self.tokenizer.pad_id,
            temperature=self.temperature,
            top_k=self.top_k,
            rng=self.rng,
        )
        return [self.tokenizer.decode(x).strip() for x in ids]

    def _fits(self, tokens: list[int]) -> bool:
        return self.max_seq_len is None or len(tokens) <= int(self.max_seq_len)

    def answer(self, items: list[EvalItem], two_turn: bool) -> Iterator[tuple[EvalItem, str, str]]:
        """(item, description or "", answer) per item whose prompt fits ``dataset_max_seq_len``."""
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            descriptions = [""] * len(chunk)
            if two_turn:  # the original procedure: describe first, then ask in a second turn
                first = [[_user(it.image, DESCRIBE)] for it in chunk]
                descriptions = self._generate(
                    [(self._prompt(m), it.image) for m, it in zip(first, chunk)],
                    max(1, self.max_new_tokens // 2),
                )
                messages = [
                    [
                        m[0],
                        Message(role="assistant", content=d),
                        Message(role="user", content=it.instruction, masked=True),
                    ]
                    for m, d, it in zip(first, descriptions, chunk)
                ]
            else:
                messages = [it.messages for it in chunk]
            prompts = [self._prompt(m) for m in messages]
            keep = [k for k, p in enumerate(prompts) if self._fits(p)]
            self.skipped += len(chunk) - len(keep)
            answers = (
                self._generate([(prompts[k], chunk[k].image) for k in keep], self.max_new_tokens)
                if keep
                else []
            )
            for k, ans in zip(keep, answers):
                yield chunk[k], descriptions[k], ans

    def answer_one(self, image: str, prompt: str) -> str:
        """Single-image inference: ``image=scan.dcm prompt="..."`` prints the answer."""
        ckpts = expand_checkpoints(self.cfg.get("vision_checkpoint"))
        if len(ckpts) > 1:
            raise ValueError("image= takes one vision_checkpoint, not a glob or a list")
        self.load(ckpts[0])
        self.skipped = 0
        item = EvalItem(0, Path(image), [_user(Path(image), prompt)], "")
        results = list(self.answer([item], two_turn=False))
        if not results:
            raise ValueError(f"the prompt is longer than dataset_max_seq_len={self.max_seq_len}")
        answer = results[0][2]
        print(answer)
        return answer

    # ------------------------------------------------------------ tasks
    def run_task(
        self, name: str, items: list[EvalItem], csv_path: Path, two_turn: bool
    ) -> list[dict[str, str]]:
        """Generate what the CSV does not hold yet, appending row by row; return all rows."""
        self.skipped = 0
        with ResumableCSV(csv_path, CSV_COLUMNS + EXTRA_COLUMNS) as out:
            todo = [it for it in items if it.index not in out.done]
            bar = tqdm(
                total=len(items), initial=len(items) - len(todo), desc=name, unit="item", dynamic_ncols=True
            )
            for it, description, generated in self.answer(todo, two_turn):
                row = {
                    "image": str(it.image or ""), "instruction": it.instruction, "output": it.reference,
                    "generated": generated, "index": it.index, "answer_type": it.extra.get("answer_type", ""),
                    "content_type": it.extra.get("content_type", ""), "qid": it.extra.get("qid", ""),
                    "description": description,
                }  # fmt: skip
                if row["answer_type"]:
                    row["score"] = json.dumps(score_item(generated, it.reference, row["answer_type"]))
                out.add(row)
                bar.update(1)
            bar.close()
        done = out.done
        if self.skipped:
            tqdm.write(
                f"{name}: {self.skipped} items skipped: prompt longer than dataset_max_seq_len={self.max_seq_len}"
            )
        return [done[it.index] for it in items if it.index in done]

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        if cfg.get("image"):
            return {"answer": self.answer_one(cfg.image, cfg.get("prompt") or DESCRIBE)}
        tasks = []
        if cfg.get("test_metrics"):
            require_java()
            tasks.append(("captions", "test_out_{}.csv", caption_items(cfg.dataset_source), False))
        answer_types = list(cfg.get("answer_types") or ["CLOSED", "OPEN"])
        two_turn = self.vqa_mode == "describe_then_answer"
        split = str(cfg.get("eval_split") or "test")
        if split not in ("test", "val", "train"):
            raise ValueError(f"eval_split={split!r}; expected test, val or train")
        if split == "val" and cfg.get("test_vqarad"):
            raise ValueError("eval_split=val: VQA-RAD has no validation split (hold one out of its training questions)")
        for kind in ("slake", "vqarad"):
            if cfg.get(f"test_{kind}"):
                items = vqa_items(kind, cfg.dataset_source, answer_types, split)
                tasks.append((kind, f"test_out_{kind}_{{}}.csv", items, two_turn))
        if not tasks:
            raise ValueError(
                "nothing to evaluate: set test_metrics=True, test_slake=True or test_vqarad=True"
            )
        if cfg.get("limit"):
            tasks = [(n, p, items[: int(cfg.limit)], t) for n, p, items, t in tasks]
        results: dict[str, Any] = {}
        for ckpt in expand_checkpoints(cfg.get("vision_checkpoint")):
            tag = checkpoint_tag(ckpt)
            self.load(ckpt)
            for name, pattern, items, task_two_turn in tasks:
                start = time.perf_counter()
                csv_path = self.output_dir / pattern.format(tag)
                rows = self.run_task(f"{name} [{tag}]", items, csv_path, task_two_turn)
                summary = self.score(name, rows, csv_path, tag)
                summary.update(checkpoint=str(ckpt) if ckpt else None, seconds=round(time.perf_counter() - start, 1),
                               vqa_mode=self.vqa_mode if name != "captions" else None,
                               skipped_too_long=self.skipped)  # fmt: skip
                results.setdefault(tag, {})[name] = summary
                self.write_metrics(tag, results[tag])
                self.report(name, tag, summary)
        return results

    def write_metrics(self, tag: str, tasks: dict[str, Any]) -> None:
        """``metrics_{tag}.json`` beside the CSVs: every task of this checkpoint so far, merged
        with what an earlier run of other tasks (captions, then SLAKE, say) wrote there."""
        path = self.output_dir / f"metrics_{tag}.json"
        merged = json.loads(path.read_text()) if path.is_file() else {}
        merged.update(tasks)
        atomic_write_json(path, merged, indent=2)

    def score(self, name: str, rows: list[dict[str, str]], csv_path: Path, tag: str) -> dict[str, Any]:
        if name == "captions":
            if not rows:
                return {"n": 0, "note": "no caption generated: nothing to score"}
            metrics = caption_metrics([r["generated"] for r in rows], [r["output"] for r in rows])
            lines = "".join(f"{k},{v}\n" for k, v in metrics.items() if k != "n")
            atomic_write(self.output_dir / f"test_{tag}.csv", lambda f: f.write(lines.encode()))
            return {**metrics, "note": SPICE_SKIPPED}
        return summarize(
            {"prediction": r["generated"], "answer": r["output"], "answer_type": r["answer_type"],
             "content_type": r.get("content_type")} for r in rows
        )  # fmt: skip

    @staticmethod
    def report(name: str, tag: str, s: dict[str, Any]) -> None:
        if name == "captions" and not s["n"]:
            tqdm.write(f"{name} [{tag}]: {s['note']}")
            return
        if name == "captions":
            tqdm.write(
                f"{name} [{tag}] n={s['n']}: BLEU-4 {s['BLEU-4']:.4f}  METEOR {s['METEOR']:.4f}  "
                f"ROUGE-L {s['ROUGE-L']:.4f}  CIDEr {s['CIDEr']:.4f} (n={s['n']}; {SPICE_SKIPPED})"
            )
            return
        fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
        tqdm.write(
            f"{name} [{tag}] closed accuracy {fmt(s['closed_accuracy'])} (n={s['closed_n']}), open recall "
            f"{fmt(s['open_recall'])} / F1 {fmt(s['open_f1'])} / exact {fmt(s['open_exact_match'])} (n={s['open_n']})"
        )
