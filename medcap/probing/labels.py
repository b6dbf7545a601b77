"""Labelled image sets for probing, split into train and test with no source on both sides.

Sources: a CSV (``image,label[,split][,group]``), a folder per class (torchvision's ImageFolder
layout, optionally under ``train/`` and ``test/``), or a VQA set where a label is the answer to
one kind of OPEN question about the image (SLAKE by ``content_type``, VQA-RAD by
``question_type``). A test image that shares a source (a study, a volume, a patient) with a
training image would flatter every encoder, so the split is grouped by source.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medcap.data.images import DICOM_SUFFIXES, NIFTI_SUFFIXES, split_selector
from medcap.data.sources import VQARAD_FILE, Item, SourceError, read_slake, read_vqarad, slake_split_file

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp", *DICOM_SUFFIXES}
SPLIT_NAMES = {
    "train": "train",
    "val": "train",
    "valid": "train",
    "validate": "train",
    "validation": "train",
    "test": "test",
}
SLAKE_FILES = {"train.json": "train", "validate.json": "val", "validation.json": "val", "test.json": "test"}


@dataclass
class LabelledImage:
    image: str  # a path, with an optional '#plane=..&index=..' selector
    label: str
    group: str  # its source (study, volume, patient): never on both sides of the split
    split: str | None  # 'train' / 'test'; None until a split is drawn
    where: str  # 'FILE, record N': what error messages name


@dataclass
class LabelledSet:
    source: str
    kind: str  # csv / folders / slake / vqarad
    images: list[LabelledImage]
    split_how: str = "given"
    classes: list[str] = field(init=False)
    dropped: dict[str, int] = field(default_factory=dict)  # unseen class -> test images left out

    def __post_init__(self) -> None:
        self.classes = sorted({im.label for im in self.images})

    @property
    def y(self) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.classes)}
        return np.array([index[im.label] for im in self.images], dtype=np.int64)

    @property
    def groups(self) -> np.ndarray:
        return np.array([im.group for im in self.images])

    def split_mask(self, split: str) -> np.ndarray:
        return np.array([im.split == split for im in self.images])

    def summary(self) -> dict[str, Any]:
        count = {s: Counter(im.label for im in self.images if im.split == s) for s in ("train", "test")}
        return {
            "source": self.source,
            "kind": self.kind,
            "split": self.split_how,
            "classes": self.classes,
            "n_train": sum(count["train"].values()),
            "n_test": sum(count["test"].values()),
            "per_class": {c: {s: count[s][c] for s in count} for c in self.classes},
            "groups": len(set(im.group for im in self.images)),
            "dropped_unseen_classes": dict(self.dropped),
        }


def _is_image(path: Path) -> bool:
    return path.is_file() and (
        path.suffix.lower() in IMAGE_SUFFIXES or path.name.lower().endswith(NIFTI_SUFFIXES)
    )


def read_csv_labels(
    path: str | Path,
    label_column: str = "label",
    image_column: str = "image",
    split_column: str = "split",
    group_column: str = "group",
) -> LabelledSet:
    """Image paths are relative to the CSV's folder (or absolute); without a group column an image's
    file is its source, so slices of one volume stay together."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"labels file not found: {path}")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    for what, col in (("image_column", image_column), ("label_column", label_column)):
        if col not in frame.columns:
            raise ValueError(f"{path}: no column {col!r} ({what}); its columns are {list(frame.columns)}")
    images = []
    for i, row in enumerate(frame.to_dict("records"), start=1):
        where = f"{path}, record {i} (line {i + 1})"
        spec, label = str(row[image_column]).strip(), str(row[label_column]).strip()
        if not spec or not label:
            raise ValueError(f"{where}: empty {'image' if not spec else 'label'}")
        file, select = split_selector(spec)
        file = file if file.is_absolute() else path.parent / file
        if not file.is_file():
            raise ValueError(f"{where}: image {file} not found")
        image = str(file) + ("#" + spec.rpartition("#")[2] if select else "")
        split = None
        if split_column in frame.columns:
            split = SPLIT_NAMES.get(str(row[split_column]).strip().lower())
            if split is None:
                raise ValueError(f"{where}: split {row[split_column]!r}; expected train, val or test")
        group = str(row.get(group_column, "")).strip() or str(file)
        images.append(LabelledImage(image, label, group, split, where))
    return LabelledSet(str(path), "csv", images)


def read_folder_labels(root: str | Path) -> LabelledSet:
    """``root/CLASS/*`` or ``root/{train,test}/CLASS/*``; a file nested one folder deeper
    (``CLASS/SOURCE/x.png``) belongs to source group SOURCE, any other file is its own source."""
    root = Path(root)
    subdirs = {p.name.lower(): p for p in root.iterdir() if p.is_dir()}
    if "train" in subdirs and "test" in subdirs:
        parts = [(SPLIT_NAMES[n], p) for n, p in sorted(subdirs.items()) if n in SPLIT_NAMES]
    else:
        parts = [(None, root)]
    images = []
    for split, folder in parts:
        for class_dir in sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")):
            for file in sorted(f for f in class_dir.rglob("*") if _is_image(f)):
                rel = file.relative_to(class_dir)
                group = rel.parts[0] if len(rel.parts) > 1 else str(file)
                images.append(LabelledImage(str(file), class_dir.name, group, split, str(file)))
    if not images:
        raise ValueError(f"{root}: no image files in class folders (expected {root}/CLASS/image.png)")
    return LabelledSet(str(root), "folders", images)


def _merge_case(labels: list[str]) -> dict[str, str]:
    """'CT' and 'ct' are one class, spelt as most records spell it."""
    spelling: dict[str, Counter] = {}
    for label in labels:
        spelling.setdefault(label.casefold(), Counter())[label] += 1
    return {label: spelling[label.casefold()].most_common(1)[0][0] for label in labels}


def _vqa_labels(
    rows: list[tuple[Item, str, str | None, str]],
    source: str,
    kind: str,
    label_kind: str,
    question: str | None,
    available: set[str],
) -> LabelledSet:
    """One label per image: the answer to the question of that kind asked most often in the set."""
    if question:
        rows = [r for r in rows if re.search(question, r[0].prompt, re.IGNORECASE)]
    if not rows:
        raise ValueError(
            f"{source}: no OPEN question of kind {label_kind!r}"
            + (f" matching {question!r}" if question else "")
            + f"; kinds present: {sorted(available)}"
        )
    asked = Counter(item.prompt for item, *_ in rows)
    best: dict[str, tuple[Item, str, str | None, str]] = {}
    for row in rows:
        key = str(row[0].image)
        if key not in best or asked[row[0].prompt] > asked[best[key][0].prompt]:
            best[key] = row
    for item, _, _, where in best.values():
        if not item.image.is_file():
            raise ValueError(f"{where}: image {item.image} not found")
    spelt = _merge_case([item.answer for item, *_ in best.values()])
    images = [
        LabelledImage(str(item.image), spelt[item.answer], group, split, where)
        for item, group, split, where in best.values()
    ]
    return LabelledSet(source, kind, images)


def read_slake_labels(path: str | Path, label_kind: str, question: str | None = None) -> LabelledSet:
    """SLAKE root (train + validate for training, test for testing) or one of its JSON files (then
    split here). Label: the OPEN answer of ``content_type == label_kind``; group: the image folder."""
    path = Path(path)
    if path.is_file() and path.name not in SLAKE_FILES:
        raise ValueError(f"{path}: a SLAKE file is one of {sorted(SLAKE_FILES)}")
    root = path.parent if path.is_file() else path
    splits = [SLAKE_FILES[path.name]] if path.is_file() else ["train", "val", "test"]
    rows, kinds = [], set()
    for split in splits:
        try:
            file = slake_split_file(root, split)
        except SourceError:
            continue
        for it in read_slake(root, split):
            kinds.add(str(it.extra.get("content_type")))
            if (
                it.extra["answer_type"] == "OPEN"
                and str(it.extra.get("content_type", "")).lower() == label_kind.lower()
            ):
                where = f"{file}, qid {it.extra.get('qid')}"
                rows.append((it, it.image.parent.name, SPLIT_NAMES[split] if path.is_dir() else None, where))
    return _vqa_labels(rows, str(path), "slake", label_kind, question, kinds)


def read_vqarad_labels(root: str | Path, label_kind: str, question: str | None = None) -> LabelledSet:
    """VQA-RAD's official split is by question, and an image has questions on both sides, so
    images are split here (each image its own source). Label: OPEN answers of that question_type."""
    root = Path(root)
    rows, kinds = [], set()
    for split in ("train", "test"):
        for it in read_vqarad(root, split):
            types = {t.strip().upper() for t in str(it.extra.get("question_type", "")).split(",")}
            kinds |= types
            if it.extra["answer_type"] == "OPEN" and label_kind.upper() in types:
                rows.append((it, it.image.name, None, f"{root / VQARAD_FILE}, qid {it.extra['qid']}"))
    return _vqa_labels(rows, str(root), "vqarad", label_kind, question, kinds)


def draw_split(lset: LabelledSet, test_fraction: float = 0.25, seed: int = 0) -> LabelledSet:
    """Stratified by label, grouped by source: the first of ``1/test_fraction`` folds in which every
    class keeps a training image is the test set."""
    from sklearn.model_selection import StratifiedGroupKFold

    groups = lset.groups
    n_groups = len(set(groups))
    if n_groups < 2:
        raise ValueError(f"{lset.source}: every image comes from one source group; cannot split it")
    y = lset.y
    k = min(max(2, round(1 / test_fraction)), n_groups, max(2, int(np.bincount(y).max())))
    with warnings.catch_warnings():  # classes rarer than k folds: sklearn warns, the check below decides
        warnings.simplefilter("ignore", UserWarning)
        folds = list(StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed).split(y, y, groups))
    test = next((t for tr, t in folds if len(set(y[tr])) == len(lset.classes)), folds[0][1])
    test_set = set(test.tolist())
    for i, im in enumerate(lset.images):
        im.split = "test" if i in test_set else "train"
    lset.split_how = f"drawn here: stratified by label, grouped by source, test ~1/{k} (seed {seed})"
    return lset


def check_split(lset: LabelledSet, unseen: str = "refuse") -> LabelledSet:
    """Refuse what would make the scores meaningless: one class, a class never trained on (or,
    with ``unseen="drop"``, leave its test images out and say how many), a source on both sides."""
    train = {im.label for im in lset.images if im.split == "train"}
    if unseen == "drop":
        dropped = {c: sum(im.label == c for im in lset.images) for c in lset.classes if c not in train}
        if dropped:
            lset = LabelledSet(lset.source, lset.kind, [im for im in lset.images if im.label in train],
                               lset.split_how, dropped=dropped)  # fmt: skip
    elif unseen != "refuse":
        raise ValueError(f"unseen_test_classes={unseen!r}: expected refuse or drop")
    if len(lset.classes) < 2:
        raise ValueError(f"{lset.source}: only one class ({lset.classes}); a probe needs two or more")
    for c in lset.classes:
        if c not in train:
            first = next(im for im in lset.images if im.label == c)
            raise ValueError(
                f"{lset.source}: class {c!r} has no training image (e.g. {first.where} is {first.split})"
            )
    sides: dict[str, dict[str, str]] = {}
    for im in lset.images:
        sides.setdefault(im.group, {}).setdefault(im.split, im.where)
    for group, where in sides.items():
        if len(where) > 1:
            raise ValueError(
                f"{lset.source}: source group {group!r} is in both train ({where['train']}) "
                f"and test ({where['test']})"
            )
    if not any(im.split == "test" for im in lset.images):
        raise ValueError(f"{lset.source}: no test image")
    return lset


def read_labels(
    spec: str | Path,
    label_kind: str | None = None,
    *,
    label_question: str | None = None,
    label_column: str = "label",
    image_column: str = "image",
    split_column: str = "split",
    group_column: str = "group",
    test_fraction: float = 0.25,
    seed: int = 0,
    unseen_test_classes: str = "refuse",
) -> LabelledSet:
    """Read any supported labelled set, draw a split where it gives none, and check it."""
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"labels={spec}: no such file or folder")
    vqa = path.suffix == ".json" or (
        path.is_dir() and any((path / n).is_file() for n in (*SLAKE_FILES, VQARAD_FILE))
    )
    if vqa and not label_kind:
        raise ValueError(
            f"labels={spec} is a VQA set: set label_kind (SLAKE content_type or VQA-RAD question_type)"
        )
    if path.suffix.lower() == ".csv":
        lset = read_csv_labels(path, label_column, image_column, split_column, group_column)
    elif path.is_dir() and (path / VQARAD_FILE).is_file():
        lset = read_vqarad_labels(path, label_kind, label_question)
    elif path.name == VQARAD_FILE:
        lset = read_vqarad_labels(path.parent, label_kind, label_question)
    elif vqa:
        lset = read_slake_labels(path, label_kind, label_question)
    elif path.is_dir():
        lset = read_folder_labels(path)
    else:
        raise ValueError(f"labels={spec}: expected a CSV, a folder per class, or a SLAKE/VQA-RAD source")
    if any(im.split is None for im in lset.images):
        if any(im.split is not None for im in lset.images):
            first = next(im for im in lset.images if im.split is None)
            raise ValueError(f"{first.where}: no split, while other records have one")
        draw_split(lset, test_fraction, seed)
    return check_split(lset, unseen_test_classes)
