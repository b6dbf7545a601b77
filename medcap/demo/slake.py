"""A mini SLAKE built from real medical images that ship inside Python packages, written in
SLAKE's own on-disk format so the demo runs the real-data path (converters, ``test_slake=True``).

Sources (all offline): pydicom's test files and the ``pydicom-data`` package (CT, MR, CR, US, NM
studies), nibabel's EPI brain volume and nilearn's MNI152 T1 template (sliced in three planes).
Only pixels and the Modality / BodyPartExamined tags are read; nothing else from a DICOM file is
written anywhere. Every image belongs to a source group (a file or a volume) and a group never
spans two splits, so test images never share a source with training images.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from medcap.data.images import ImageLoadError, load_image
from medcap.io import atomic_write_json

MODALITY = {
    "CT": "CT",
    "MR": "MRI",
    "CR": "X-Ray",
    "DX": "X-Ray",
    "US": "Ultrasound",
    "NM": "Nuclear medicine",
}
MODALITY_WORDS = {"CT": "a CT scan", "MRI": "an MRI", "X-Ray": "an X-ray", "Ultrasound": "an ultrasound image",
                  "Nuclear medicine": "a nuclear medicine scan"}  # fmt: skip
BODY_PART = {"HEAD": "Head", "BRAIN": "Head", "CHEST": "Chest", "ABDOMEN": "Abdomen", "PANCREAS": "Abdomen",
             "LIVER": "Abdomen", "NECK": "Neck", "EXTREMITY": "Extremity", "WHOLE BODY": "Whole body"}  # fmt: skip
PLANE_NAMES = {"axial": "Transverse", "coronal": "Coronal", "sagittal": "Sagittal"}
MAX_SIDE = 512


@dataclass
class Source:
    group: str  # a file or a volume: never split across train and test
    path: str  # with an optional "#frame=" / "#plane=...&index=..." selector
    modality: str  # SLAKE's spelling: CT, MRI, X-Ray, Ultrasound, Nuclear medicine
    body_part: str | None = None
    plane: str | None = None  # axial / coronal / sagittal, for volume slices


def dicom_sources() -> list[Source]:
    """2-D images from pydicom's test files and pydicom-data, by their Modality tag."""
    import pydicom
    from pydicom.data import get_testdata_files

    out, seen = [], set()
    for path in tqdm(sorted(set(get_testdata_files("*.dcm"))), desc="shipped DICOM files", unit="file", dynamic_ncols=True):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - deliberately broken test files are skipped
            continue
        modality = MODALITY.get(str(getattr(ds, "Modality", "")))
        rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
        # the same image stored in several transfer syntaxes is one image; a study is one group
        # (UIDs are used for grouping only, never written)
        instance = str(getattr(ds, "SOPInstanceUID", path))
        if modality is None or min(rows, cols) < 64 or instance in seen:
            continue
        body = BODY_PART.get(str(getattr(ds, "BodyPartExamined", "")).upper())
        try:
            load_image(path)  # decodable here (some need codecs we lack)
        except ImageLoadError:
            continue
        seen.add(instance)
        out.append(Source(str(getattr(ds, "StudyInstanceUID", path)), path, modality, body))
    return out


def volume_sources(per_plane: int = 3) -> list[Source]:
    """Brain MRI volumes shipped with nibabel and nilearn, sliced in each plane around the middle."""
    import nibabel as nib

    volumes = []
    try:
        from nilearn import datasets

        volumes.append(
            Path(datasets.__file__).parent / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
        )
    except ImportError:
        pass
    nib_data = Path(nib.__file__).parent / "tests" / "data"
    volumes += [nib_data / "example4d.nii.gz", nib_data / "anatomical.nii"]
    out = []
    for vol in volumes:
        if not vol.is_file():
            continue
        shape = nib.as_closest_canonical(nib.load(str(vol))).shape
        for axis, plane in enumerate(("sagittal", "coronal", "axial")):
            size = shape[axis]
            for k in range(per_plane):
                index = int(size * (0.35 + 0.3 * k / max(per_plane - 1, 1)))
                out.append(Source(vol.name, f"{vol}#plane={plane}&index={index}", "MRI", "Head", plane))
    return out


class Balancer:
    """Picks the wrong option a closed question names so that, within a split, a blind answerer
    that learns the best answer per question text (not only a constant answer) stays near chance.

    Yes/no questions: each "Is this X?" is answered Yes about as often as No; it is seeded with
    every Yes question of the split, so the No questions go where they are missing. Choice
    questions ("Is this X or Y?"): for each pair of options, each option is the answer about as
    often as the other, and each stands first about as often."""

    def __init__(self, sources: list[Source], rng: random.Random):
        self.rng = rng
        self.balance: Counter = Counter()  # yes/no question text -> (#Yes - #No)
        self.answers: Counter = Counter()  # (frozenset of two options, answer) -> count
        self.first: Counter = Counter()  # option -> times named first
        for src in sources:
            self.balance[modality_question(src.modality)] += 1
            if src.plane:
                self.balance[plane_question(PLANE_NAMES[src.plane])] += 1

    def no(self, options: list[str], text_of) -> str:
        best = max(self.balance[text_of(o)] for o in options)
        choice = self.rng.choice([o for o in options if self.balance[text_of(o)] == best])
        self.balance[text_of(choice)] -= 1
        return choice

    def distractor(self, answer: str, options: list[str]) -> str:
        def need(o: str) -> int:  # how far the pair {answer, o} leans towards o
            pair = frozenset((answer, o))
            return self.answers[pair, o] - self.answers[pair, answer]

        best = max(need(o) for o in options)
        return self.rng.choice([o for o in options if need(o) == best])

    def order(self, answer: str, other: str) -> tuple[str, str]:
        self.answers[frozenset((answer, other)), answer] += 1
        if self.first[answer] == self.first[other]:
            pair = (answer, other) if self.rng.random() < 0.5 else (other, answer)
        else:
            pair = (answer, other) if self.first[answer] < self.first[other] else (other, answer)
        self.first[pair[0]] += 1
        return pair


def modality_question(modality: str) -> str:
    return f"Is this {MODALITY_WORDS[modality]}?"


def plane_question(plane_name: str) -> str:
    return f"Is this a {plane_name.lower()} slice?"


def modality_choice(first: str, second: str) -> str:
    return f"Is this {MODALITY_WORDS[first]} or {MODALITY_WORDS[second]}?"


def plane_choice(first: str, second: str) -> str:
    return f"Is this a {first.lower()} or a {second.lower()} slice?"


def questions(src: Source, balancer: Balancer, exhaustive: bool = False) -> list[dict]:
    """SLAKE-style questions the image's facts support: open ones, and closed ones of SLAKE's
    two kinds, yes/no ("Is this a CT scan?", in Yes/No pairs so a constant answer scores 50%) and
    choice ("Is this a CT scan or an MRI?", the answer is one of the two). ``exhaustive`` (the
    training split) asks the choice question with every other option, not one."""
    qs = [
        ("What modality is used to take this image?", src.modality, "OPEN", "Modality"),
        (modality_question(src.modality), "Yes", "CLOSED", "Modality"),
    ]
    others = [m for m in MODALITY_WORDS if m != src.modality]
    qs.append((modality_question(balancer.no(others, modality_question)), "No", "CLOSED", "Modality"))
    for other in others if exhaustive else [balancer.distractor(src.modality, others)]:
        qs.append((modality_choice(*balancer.order(src.modality, other)), src.modality, "CLOSED", "Modality"))
    if src.plane:
        plane = PLANE_NAMES[src.plane]
        others = [p for p in PLANE_NAMES.values() if p != plane]
        qs.append(("In which plane is this image taken?", plane, "OPEN", "Plane"))
        qs.append((plane_question(plane), "Yes", "CLOSED", "Plane"))
        qs.append((plane_question(balancer.no(others, plane_question)), "No", "CLOSED", "Plane"))
        for other in others if exhaustive else [balancer.distractor(plane, others)]:
            qs.append((plane_choice(*balancer.order(plane, other)), plane, "CLOSED", "Plane"))
    if src.body_part:
        qs.append(("Which part of the body does this image show?", src.body_part, "OPEN", "Organ"))
    return [{"question": q, "answer": a, "answer_type": t, "content_type": c} for q, a, t, c in qs]


def caption(src: Source) -> str:
    words = MODALITY_WORDS[src.modality]
    text = words[0].upper() + words[1:]
    if src.plane:
        text += f" in the {PLANE_NAMES[src.plane].lower()} plane"
    if src.body_part:
        text += f" of the {src.body_part.lower()}"
    return text + "."


def split_groups(sources: list[Source], seed: int, fractions=(0.6, 0.15)) -> dict[str, str]:
    """group -> train / validate / test, balanced per modality, never splitting a group."""
    by_modality: dict[str, list[str]] = {}
    for s in sources:
        groups = by_modality.setdefault(s.modality, [])
        if s.group not in groups:
            groups.append(s.group)
    rng = random.Random(seed)
    out = {}
    for groups in by_modality.values():
        rng.shuffle(groups)
        n = len(groups)
        n_test = max(1, round(n * (1 - sum(fractions)))) if n >= 2 else 0
        n_val = max(1, round(n * fractions[1])) if n >= 4 else 0
        for i, g in enumerate(groups):
            out[g] = "test" if i < n_test else "validate" if i < n_test + n_val else "train"
    return out


def build(output_dir: str | Path, seed: int = 0) -> dict[str, int]:
    """Write imgs/xmlab<N>/source.jpg, train.json, validate.json, test.json (every SLAKE field)
    and SLAKE-text's {train,validation,test}_text.json; return counts."""
    output_dir = Path(output_dir)
    sources = dicom_sources() + volume_sources()
    if not sources:
        raise RuntimeError("no shipped medical image found: install pydicom-data and nilearn")
    split = split_groups(sources, seed)
    rows: dict[str, list[dict]] = {"train": [], "validate": [], "test": []}
    texts: dict[str, list[dict]] = {"train": [], "validate": [], "test": []}
    balancers = {
        part: Balancer([s for s in sources if split[s.group] == part], random.Random(f"{seed}-{part}"))
        for part in rows
    }
    qid = 0
    # rarer modalities pick their choice distractors first, so the common one can even them out
    frequency = Counter(s.modality for s in sources)
    order = sorted(range(len(sources)), key=lambda n: (frequency[sources[n].modality], n))
    for n in tqdm(order, desc="mini SLAKE images", unit="image", dynamic_ncols=True):
        src = sources[n]
        img = load_image(src.path)
        img.thumbnail((MAX_SIDE, MAX_SIDE))
        name = f"xmlab{n}/source.jpg"
        (output_dir / "imgs" / f"xmlab{n}").mkdir(parents=True, exist_ok=True)
        img.save(output_dir / "imgs" / name, quality=92)
        part = split[src.group]
        texts[part].append({"img_name": name, "text": caption(src)})
        for q in questions(src, balancers[part], exhaustive=part == "train"):
            qid += 1
            rows[part].append({
                "img_id": n, "img_name": name, "question": q["question"], "answer": q["answer"], "q_lang": "en",
                "location": src.body_part or "", "modality": src.modality, "answer_type": q["answer_type"],
                "base_type": "vqa", "content_type": q["content_type"], "triple": ["vhead", "_", "_"], "qid": qid,
            })  # fmt: skip
    for part in rows:
        rows[part].sort(key=lambda r: (r["img_id"], r["qid"]))
        texts[part].sort(key=lambda t: int(t["img_name"].split("/")[0].removeprefix("xmlab")))
        atomic_write_json(output_dir / f"{part}.json", rows[part])
        text_name = "validation" if part == "validate" else part
        atomic_write_json(output_dir / f"{text_name}_text.json", texts[part])
    counts = {f"{p}_questions": len(r) for p, r in rows.items()}
    counts.update({f"{p}_images": len(t) for p, t in texts.items()})
    counts["groups"] = len(set(s.group for s in sources))
    counts["modalities"] = dict(Counter(s.modality for s in sources))
    atomic_write_json(output_dir / "demo_counts.json", counts, indent=2)
    (output_dir / "README.txt").write_text(
        "Mini SLAKE built by medcap from images shipped in Python packages (pydicom, pydicom-data,\n"
        "nibabel, nilearn). Not a clinical dataset; test images never share a source file or volume\n"
        "with training images.\n" + json.dumps(counts, indent=1) + "\n"
    )
    return counts
