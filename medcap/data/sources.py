"""Readers for the public medical sets, and the ShareGPT records medcap trains and evaluates on.

One reader per dataset, shared by the converters in ``tools/`` and by evaluation, so the splits
and filters are decided in one place. Schemas: SLAKE (``train.json``, ``validate.json`` or
``validation.json``, ``test.json``; images under ``imgs/``), SLAKE-text (``{split}_text.json``:
img_name, text), VQA-RAD (``VQA_RAD Dataset Public.json`` + ``VQA_RAD Image Folder/``; test =
phrase_type test_freeform or test_para), VQA-RAD-text (``{train,test}_text.json``: image_name,
text), ROCOv2 (CSV ``ID``, ``Caption``; images ``images/{split}/{ID}.jpg``),
ROCOv2-VQARAD-SLAKE-text (``train.json``: id = the image's file name, caption), PMC-OA
(``{split}.jsonl``: image, caption).
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medcap.data.sharegpt import ORIGINAL_PLACEHOLDER, read_records
from medcap.errors import MedcapError, cli_errors, debug_requested
from medcap.io import atomic_write_json

# Captioning instructions. Train records draw one at random (seed 0); validation and test use the
# first, as the original medcap did, so its prompts are reproduced exactly.
GENERIC_INSTRUCTIONS = [
    "Describe the image in a detailed and informative manner.",
    "Describe this image.",
    "What do you see in this image?",
    "Give a detailed description of the image.",
    "Explain what the image shows.",
    "Provide a thorough description of this picture.",
    "Write a caption for this image.",
    "Summarize the visual content of the image.",
    "What is shown here? Describe it in detail.",
    "Describe the contents of this image as completely as you can.",
    "Tell me about this image.",
    "Write a detailed caption for the picture.",
    "Analyze the image and describe what it contains.",
    "Describe the key elements of this image.",
    "Give a concise but complete description of this image.",
    "What does this picture depict?",
    "Please describe the image.",
    "Offer a clear description of what is visible in the image.",
    "Interpret the image and describe it.",
    "Describe everything notable in this image.",
    "Caption this image in a few informative sentences.",
    "Walk me through what this image shows.",
    "Describe the scene captured in this image.",
    "What can be observed in this image?",
    "Provide a descriptive caption for this image.",
    "Describe the main features of the image.",
    "Give an informative account of the image content.",
]
MEDICAL_INSTRUCTIONS = [
    "Please write a radiology report for this image.",
    "Describe the findings in this medical image.",
    "What are the radiological findings?",
    "Write the findings section of a report for this scan.",
    "Describe this medical image as a radiologist would.",
    "What imaging modality is this, and what does it show?",
    "Summarize the clinically relevant findings in this image.",
    "Describe the anatomy and any abnormality visible in this image.",
    "Provide a brief radiology impression for this image.",
    "Interpret this medical image.",
    "What abnormalities, if any, are visible in this scan?",
    "Describe the organs visible in this image and their appearance.",
    "Write a figure caption for this medical image.",
    "Report on this examination.",
    "Describe the imaging findings, including location and size where visible.",
    "What does this scan demonstrate?",
    "Give a structured description of this medical image.",
    "Describe the modality, plane and body region of this image.",
    "Write a short diagnostic description of this image.",
    "As a radiologist, describe what you see.",
]
CAPTION_INSTRUCTIONS = GENERIC_INSTRUCTIONS + MEDICAL_INSTRUCTIONS
VQARAD_FILE = "VQA_RAD Dataset Public.json"
VQARAD_IMAGES = "VQA_RAD Image Folder"
VQARAD_TEST_PHRASES = {"test_freeform", "test_para"}
SPLIT_OUT = {
    "train": "train",
    "val": "val",
    "validation": "val",
    "validate": "val",
    "valid": "val",
    "test": "test",
}


class SourceError(MedcapError, ValueError):
    """An input file of a public dataset that is missing or not in its documented schema."""


@dataclass
class Item:
    """One image with one question/instruction and its answer/caption, plus metadata."""

    image: Path
    prompt: str
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)


def _require(path: Path, what: str) -> Path:
    if not path.exists():
        raise SourceError(f"{path}: {what} not found")
    return path


def _check_fields(rows: list[dict], path: Path, fields: tuple[str, ...]) -> None:
    for i, row in enumerate(rows):
        missing = [f for f in fields if f not in row]
        if missing:
            raise SourceError(f"{path}, record {i}: missing field(s) {missing}; expected {list(fields)}")


def _load_json_list(path: Path, fields: tuple[str, ...]) -> list[dict]:
    rows = read_records(_require(path, "file"))
    _check_fields(rows, path, fields)
    return rows


def clean_caption(text: Any) -> str:
    """Captions keep "①" free for the original's image placeholder, as its converters did."""
    return str(text).replace(ORIGINAL_PLACEHOLDER, "(1)").strip()


def pick_instructions(n: int, split: str, seed: int = 0) -> list[str]:
    if split != "train":
        return [CAPTION_INSTRUCTIONS[0]] * n
    rng = random.Random(seed)
    return [rng.choice(CAPTION_INSTRUCTIONS) for _ in range(n)]


# Question wordings for VQA training (``--question_styles``): evaluation harnesses wrap the
# question (lmms-eval's SLAKE and VQA-RAD tasks append the first suffix); a model trained on the
# bare question only learns that one form, and answers "Is this an MRI?" with "MRI" when a suffix
# asks for "a single word or phrase". Half of the training questions keep their own wording.
HARNESS_SUFFIX = "\nAnswer the question using a single word or phrase."
QUESTION_STYLES = [
    "{q}" + HARNESS_SUFFIX,
    "{q} Answer the question using a single word or phrase.",
    "{q}\nAnswer briefly.",
    "{q} Please answer in one word or a short phrase.",
    "Question: {q}\nAnswer:",
    "Look at the image and answer: {q}",
    "{q}\nGive a short answer.",
]


def vary_questions(items: list[Item], seed: int = 0, share: float = 0.5) -> list[Item]:
    """``share`` of the items with their question in one of ``QUESTION_STYLES`` (seeded: the
    same file on every run); the others unchanged. For training splits only: evaluation asks
    the dataset's own wording, or the harness's (``question_suffix``)."""
    rng = random.Random(seed)
    out = []
    for it in items:
        if rng.random() < share:
            it = Item(it.image, rng.choice(QUESTION_STYLES).format(q=it.prompt), it.answer, it.extra)
        out.append(it)
    return out


# ---------------------------------------------------------------- SLAKE
SLAKE_FIELDS = ("img_name", "question", "answer", "q_lang", "answer_type")
SLAKE_SPLIT_FILES = {
    "train": ("train.json",),
    "val": ("validate.json", "validation.json"),
    "test": ("test.json",),
}


def slake_split_file(root: Path, split: str) -> Path:
    names = SLAKE_SPLIT_FILES[SPLIT_OUT[split]]
    for name in names:
        if (root / name).exists():
            return root / name
    raise SourceError(f"{root}: none of {list(names)} found (SLAKE {split} split)")


def read_slake(root: str | Path, split: str, lang: str | None = "en") -> list[Item]:
    """SLAKE VQA rows of one split; ``lang`` 'en' or 'zh' (None keeps both)."""
    root = Path(root)
    path = slake_split_file(root, split)
    items = []
    for row in _load_json_list(path, SLAKE_FIELDS):
        if lang and row["q_lang"] != lang:
            continue
        extra = {
            k: row[k]
            for k in ("qid", "img_id", "content_type", "modality", "location", "base_type")
            if k in row
        }
        extra["answer_type"] = str(row["answer_type"]).strip().upper()
        extra["q_lang"] = row["q_lang"]
        items.append(
            Item(
                root / "imgs" / row["img_name"],
                str(row["question"]).strip(),
                str(row["answer"]).strip(),
                extra,
            )
        )
    return items


SLAKE_TEXT_FILES = {"train": "train_text.json", "val": "validation_text.json", "test": "test_text.json"}


def read_slake_text(image_root: str | Path, text_dir: str | Path, split: str, seed: int = 0) -> list[Item]:
    """SLAKE-text descriptions (one per image) as captioning items."""
    path = Path(text_dir) / SLAKE_TEXT_FILES[SPLIT_OUT[split]]
    rows = _load_json_list(path, ("img_name", "text"))
    prompts = pick_instructions(len(rows), SPLIT_OUT[split], seed)
    return [
        Item(
            Path(image_root) / "imgs" / row["img_name"],
            prompt,
            clean_caption(row["text"]),
            {"img_name": row["img_name"]},
        )
        for row, prompt in zip(rows, prompts)
    ]


# ---------------------------------------------------------------- VQA-RAD
VQARAD_FIELDS = ("qid", "image_name", "question", "answer", "answer_type", "phrase_type")


def read_vqarad(root: str | Path, split: str) -> list[Item]:
    """VQA-RAD's official split: test = phrase_type in {test_freeform, test_para} (451 items)."""
    root = Path(root)
    path = root / VQARAD_FILE
    rows = _load_json_list(path, VQARAD_FIELDS)
    want_test = SPLIT_OUT[split] == "test"
    items = []
    for row in rows:
        if (str(row["phrase_type"]).strip() in VQARAD_TEST_PHRASES) != want_test:
            continue
        extra = {"qid": row["qid"], "answer_type": str(row["answer_type"]).strip().upper()}
        extra.update({k: row[k] for k in ("question_type", "image_organ", "phrase_type") if k in row})
        items.append(
            Item(
                root / VQARAD_IMAGES / row["image_name"],
                str(row["question"]).strip(),
                str(row["answer"]).strip(),
                extra,
            )
        )
    return items


VQARAD_TEXT_FILES = {"train": "train_text.json", "test": "test_text.json"}


def read_vqarad_text(root: str | Path, split: str, seed: int = 0) -> list[Item]:
    """VQA-RAD-text descriptions (one per image) as captioning items; images in VQA-RAD's folder."""
    root = Path(root)
    name = SPLIT_OUT[split]
    if name not in VQARAD_TEXT_FILES:
        raise SourceError(f"{root}: VQA-RAD-text has train and test splits only, not {split}")
    rows = _load_json_list(root / VQARAD_TEXT_FILES[name], ("image_name", "text"))
    prompts = pick_instructions(len(rows), name, seed)
    return [
        Item(root / VQARAD_IMAGES / row["image_name"], prompt, clean_caption(row["text"]),
             {"image_name": row["image_name"]})
        for row, prompt in zip(rows, prompts)
    ]  # fmt: skip


# ---------------------------------------------------------------- ROCOv2 and PMC-OA
ROCO_SPLITS = {"train": "train", "val": "valid", "test": "test"}


def read_rocov2(root: str | Path, split: str, seed: int = 0) -> list[Item]:
    import pandas as pd

    root = Path(root)
    name = ROCO_SPLITS[SPLIT_OUT[split]]
    candidates = [root / f"{name}_captions.csv", root / f"{name}.csv"]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise SourceError(f"{root}: none of {[p.name for p in candidates]} found (ROCOv2 {split} split)")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if not {"ID", "Caption"} <= set(frame.columns):
        raise SourceError(f"{path}: expected columns ID and Caption, found {list(frame.columns)}")
    prompts = pick_instructions(len(frame), SPLIT_OUT[split], seed)
    return [
        Item(root / "images" / name / f"{row.ID}.jpg", prompt, clean_caption(row.Caption), {"id": row.ID})
        for row, prompt in zip(frame.itertuples(index=False), prompts)
    ]


def read_rocov2_vqarad_slake_text(root: str | Path, image_dir: str = "images_preprocess", seed: int = 0) -> list[Item]:
    """The combined ROCOv2 + VQA-RAD-text + SLAKE-text captions (training only): ``train.json``,
    a list of ``{id, caption}`` where ``id`` is the image's path under ``image_dir``."""
    root = Path(root)
    rows = _load_json_list(root / "train.json", ("id", "caption"))
    prompts = pick_instructions(len(rows), "train", seed)
    return [
        Item(root / image_dir / str(row["id"]), prompt, clean_caption(row["caption"]), {"id": row["id"]})
        for row, prompt in zip(rows, prompts)
    ]


PMCOA_SPLITS = {"train": "train", "val": "valid", "test": "test"}
# The original's PMC-OA layout: the subfigure images of the release, in their own folder.
PMCOA_IMAGE_DIR = "caption_T060_filtered_top4_sep_v0_subfigures"


def read_pmcoa(root: str | Path, split: str, image_dir: str = PMCOA_IMAGE_DIR, seed: int = 0) -> list[Item]:
    root = Path(root)
    path = root / f"{PMCOA_SPLITS[SPLIT_OUT[split]]}.jsonl"
    rows = _load_json_list(path, ("image", "caption"))
    prompts = pick_instructions(len(rows), SPLIT_OUT[split], seed)
    return [
        Item(
            root / image_dir / row["image"],
            prompt,
            clean_caption(row["caption"]),
            {k: row[k] for k in ("pmcid",) if k in row},
        )
        for row, prompt in zip(rows, prompts)
    ]


# ---------------------------------------------------------------- writing ShareGPT files
@dataclass
class ConvertReport:
    written: int
    missing: list[Path]
    output: Path

    def summary(self) -> str:
        line = f"{self.output}: {self.written} records"
        if self.missing:
            line += f"; {len(self.missing)} dropped for missing images (first: {[str(p) for p in self.missing[:3]]})"
        return line


def to_sharegpt(item: Item, output_dir: Path) -> dict[str, Any]:
    """The original medcap record shape; ``dir`` is relative to the output file's folder so the
    pair of folders can move together."""
    folder = item.image.parent
    rel_dir = os.path.relpath(folder.resolve(), output_dir.resolve())
    return {
        "conversations": [{"from": "human", "value": item.prompt}, {"from": "gpt", "value": item.answer}],
        "image": item.image.name,
        "meta": f"dir={rel_dir}",
        **item.extra,
    }


def _check_images(items: list[Item], name: str, strict: bool) -> list[Path]:
    missing = [it.image for it in items if not it.image.is_file()]
    if missing and strict:
        raise SourceError(
            f"{len(missing)} of {len(items)} images missing for {name} (first: {[str(p) for p in missing[:3]]})"
        )
    return missing


def write_sharegpt(items: list[Item], output: str | Path, strict: bool = False) -> ConvertReport:
    """Write ``items`` whose image exists; a missing image drops the record, or stops the run
    with ``strict``. The file is written whole or not at all."""
    output = Path(output)
    missing = _check_images(items, output.name, strict)
    lost = set(missing)
    records = [to_sharegpt(it, output.parent) for it in items if it.image not in lost]
    atomic_write_json(output, records)
    return ConvertReport(len(records), missing, output)


def convert_splits(
    prefix: str,
    read: Callable[[str], list[Item]],
    output_dir: str | Path,
    strict: bool = False,
    splits: tuple[str, ...] = ("train", "val", "test"),
) -> list[ConvertReport]:
    """``read(split)`` for each split -> ``{prefix}_{split}.json``. Every split is read and
    checked before any is written, so a failed run (bad schema, or a missing image with
    ``strict``) leaves no partial output."""
    output_dir = Path(output_dir)
    loaded = {f"{prefix}_{split}.json": read(split) for split in splits}
    for name, items in loaded.items():
        _check_images(items, name, strict)
    reports = [write_sharegpt(items, output_dir / name) for name, items in loaded.items()]
    for report in reports:
        print(report.summary())
    return reports


def exit_on_source_error():
    """Command-line tools: a bad input ends the run with its message, not a traceback (medcap's
    one error boundary; ``--debug`` or ``MEDCAP_DEBUG=1`` shows the traceback)."""
    debug_requested(sys.argv)
    return cli_errors()


def converter_args(description: str, data_dir: str, output_dir: str = "./datasets/medcap"):
    """The arguments every converter in tools/ shares."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data_dir", default=data_dir, help=f"dataset root (default {data_dir})")
    parser.add_argument(
        "--output_dir", default=output_dir, help=f"where the JSON files go (default {output_dir})"
    )
    parser.add_argument(
        "--strict", action="store_true", help="stop on a missing image instead of dropping it"
    )
    return parser


def add_question_styles_arg(parser: Any) -> None:
    """VQA converters: ``--question_styles`` words half of the training questions as evaluation
    harnesses do (validation and test keep the dataset's wording)."""
    parser.add_argument(
        "--question_styles", action="store_true",
        help="train split: half of the questions in harness wordings (e.g. + 'Answer the question using a "
             "single word or phrase.'), seeded; val/test unchanged",
    )  # fmt: skip


def styled(read: Callable[[str], list[Item]], question_styles: bool) -> Callable[[str], list[Item]]:
    """``read(split)`` with the training split's questions varied when ``question_styles``."""
    if not question_styles:
        return read
    return lambda split: vary_questions(read(split)) if SPLIT_OUT[split] == "train" else read(split)
