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
    for path in sorted(set(get_testdata_files("*.dcm"))):
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
    volumes.append(Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz")
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


def questions(src: Source, rng: random.Random) -> list[dict]:
    """SLAKE-style questions the image's facts support; closed ones come in yes/no pairs so a
    constant answer scores 50%."""
    qs = [
        ("What modality is used to take this image?", src.modality, "OPEN", "Modality"),
        (f"Is this {MODALITY_WORDS[src.modality]}?", "Yes", "CLOSED", "Modality"),
    ]
    other = rng.choice([m for m in MODALITY_WORDS if m != src.modality])
    qs.append((f"Is this {MODALITY_WORDS[other]}?", "No", "CLOSED", "Modality"))
    if src.plane:
        qs.append(("In which plane is this image taken?", PLANE_NAMES[src.plane], "OPEN", "Plane"))
        qs.append((f"Is this a {PLANE_NAMES[src.plane].lower()} slice?", "Yes", "CLOSED", "Plane"))
        wrong = rng.choice([p for p in PLANE_NAMES.values() if p != PLANE_NAMES[src.plane]])
        qs.append((f"Is this a {wrong.lower()} slice?", "No", "CLOSED", "Plane"))
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
    rng = random.Random(seed)
    sources = dicom_sources() + volume_sources()
    if not sources:
        raise RuntimeError("no shipped medical image found: install pydicom-data and nilearn")
    split = split_groups(sources, seed)
    rows: dict[str, list[dict]] = {"train": [], "validate": [], "test": []}
    texts: dict[str, list[dict]] = {"train": [], "validate": [], "test": []}
    qid = 0
    for n, src in enumerate(sources):
        img = load_image(src.path)
        img.thumbnail((MAX_SIDE, MAX_SIDE))
        name = f"xmlab{n}/source.jpg"
        (output_dir / "imgs" / f"xmlab{n}").mkdir(parents=True, exist_ok=True)
        img.save(output_dir / "imgs" / name, quality=92)
        part = split[src.group]
        texts[part].append({"img_name": name, "text": caption(src)})
        for q in questions(src, rng):
            qid += 1
            rows[part].append({
                "img_id": n, "img_name": name, "question": q["question"], "answer": q["answer"], "q_lang": "en",
                "location": src.body_part or "", "modality": src.modality, "answer_type": q["answer_type"],
                "base_type": "vqa", "content_type": q["content_type"], "triple": ["vhead", "_", "_"], "qid": qid,
            })  # fmt: skip
    for part in rows:
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
