"""The demo's mini SLAKE from shipped images: SLAKE's own format, read by the real converters and
readers, balanced closed questions, and no source shared between train and test."""

from __future__ import annotations

import importlib.util
import json
import os
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
slow = pytest.mark.slow
SLAKE_FIELDS = {"img_id", "img_name", "question", "answer", "q_lang", "location", "modality", "answer_type",
                "base_type", "content_type", "triple", "qid"}  # fmt: skip


@pytest.fixture
def demo(demo_slake):
    return demo_slake


@slow
def test_slake_format_and_real_readers(demo, tmp_path):
    from medcap.data.sources import read_slake, read_slake_text

    root, counts = demo
    rows = json.loads((root / "test.json").read_text())
    assert rows and all(set(r) == SLAKE_FIELDS for r in rows)
    assert all((root / "imgs" / r["img_name"]).is_file() for r in rows)
    assert len(read_slake(root, "test")) == counts["test_questions"] > 20
    assert len(read_slake(root, "val")) == counts["validate_questions"]
    assert len(read_slake_text(root, root, "train")) == counts["train_images"]
    assert len(counts["modalities"]) >= 4  # CT, MRI, X-ray, ultrasound, nuclear medicine
    spec = importlib.util.spec_from_file_location("c", ROOT / "tools" / "convert_slake_to_sharegpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--data_dir", str(root), "--output_dir", str(tmp_path), "--strict"])
    assert len(json.loads((tmp_path / "slake_vqa_test.json").read_text())) == counts["test_questions"]


@slow
def test_closed_answers_are_balanced_and_sources_not_shared(demo):
    from medcap.demo.slake import sources_and_split

    root, _ = demo
    for part in ("train", "test"):
        closed = Counter(
            r["answer"]
            for r in json.loads((root / f"{part}.json").read_text())
            if r["answer_type"] == "CLOSED"
        )
        assert closed["Yes"] == closed["No"] > 0  # a constant yes/no answer scores 50%
        assert len(closed) > 4  # choice questions: the answer is one of the options
    sources, split = sources_and_split(seed=0)
    assert {"train", "test"} <= set(split.values())
    assert {s.group for s in sources} <= set(split)  # each group has one split, so no image leaks
    assert sources_and_split(seed=0)[1] == split  # deterministic
    # one image stored in several encodings (RG1 as JPEG 2000 lossy, lossless and raw) counts once
    assert sum("RG1_" in s.path for s in sources) == 1


@slow
def test_a_blind_answerer_stays_near_chance(demo):
    """Fitted on train, answering each closed test question by its text alone."""
    from medcap.data.sources import read_slake
    from medcap.demo.report import majority_rate, question_prior_rate

    root, _ = demo
    closed = {
        split: [(it.prompt, it.answer) for it in read_slake(root, split) if it.extra["answer_type"] == "CLOSED"]
        for split in ("train", "test")
    }
    assert question_prior_rate(closed["train"], closed["test"]) < 0.65
    assert majority_rate([a for _, a in closed["test"]]) < 0.4
    choices = [q for q, _ in closed["test"] if " or " in q]
    assert choices and all(a.lower() in q.lower() for q, a in closed["test"] if " or " in q)


@slow
def test_blind_rates():
    from medcap.demo.report import majority_rate, question_prior_rate

    assert majority_rate(["Yes", "No", "yes", "MRI"]) == 0.5
    train = [("Is this an MRI?", "Yes"), ("Is this an MRI?", "Yes"), ("Is this a CT?", "No"), ("Is this a CT?", "Yes")]
    test = [("Is this an MRI?", "No"), ("Is this a CT?", "Yes"), ("Unseen?", "Yes")]
    # MRI -> "yes" (wrong); CT tie -> half; unseen -> the overall majority "yes" (right)
    assert question_prior_rate(train, test) == (0 + 0.5 + 1) / 3


@slow
def test_yes_no_implied_by_the_models_own_open_answer():
    from medcap.demo.report import implied_yes_no

    def row(image, question, gold, said, answer_type="CLOSED", content_type="Modality"):
        return {"image": image, "instruction": question, "output": gold, "generated": said,
                "answer_type": answer_type, "content_type": content_type}  # fmt: skip

    rows = dict(enumerate([
        row("a.jpg", "What modality is used to take this image?", "MRI", "mri.", answer_type="OPEN"),
        row("a.jpg", "Is this an MRI?", "Yes", "No"),  # implied Yes: right (the model itself said No)
        row("a.jpg", "Is this a CT scan?", "No", "No"),  # implied No: right
        row("b.jpg", "What modality is used to take this image?", "CT", "MRI", answer_type="OPEN"),
        row("b.jpg", "Is this a CT scan?", "Yes", "Yes"),  # implied No: wrong
        row("b.jpg", "In which plane is this image taken?", "Coronal", "an apple", "OPEN", "Plane"),
        row("b.jpg", "Is this a coronal slice?", "Yes", "Yes", content_type="Plane"),  # names no plane -> No: wrong
        row("b.jpg", "Is this a sagittal slice?", "No", "Yes", content_type="Plane"),  # -> No: right
        row("c.jpg", "Is this an MRI?", "Yes", "Yes"),  # no open answer for c: not counted
        row("a.jpg", "Is this a CT scan or an MRI?", "MRI", "MRI"),  # choice: not counted
    ]))  # fmt: skip
    out = implied_yes_no(rows)
    assert out["yes_no_implied_accuracy"] == 3 / 5 and out["yes_no_implied_n"] == 5
    # implied yes, no, no, no, no; answered no, no, yes, yes, yes: they agree once, below chance
    assert out["yes_no_agreement"] == 1 / 5
    chance = 1 / 5 * 3 / 5 + 4 / 5 * 2 / 5
    assert out["yes_no_agreement_kappa"] == pytest.approx((1 / 5 - chance) / (1 - chance))
    consistent = {0: rows[0], 1: {**rows[1], "generated": "Yes"}, 2: rows[2]}
    assert implied_yes_no(consistent)["yes_no_agreement_kappa"] == 1.0
    assert implied_yes_no({})["yes_no_implied_n"] == 0


# ---- the scan volumes: readers, orientation, slices, the split (fast: tiny files written here)


def _write_nrrd(path, data, space, directions, origin=(0.0, 0.0, 0.0)):
    nrrd = pytest.importorskip("nrrd")
    nrrd.write(str(path), data, {"space": space, "space directions": directions, "space origin": list(origin),
                                 "encoding": "gzip"})  # fmt: skip


def test_an_lps_nrrd_becomes_ras_so_planes_and_sides_are_right(tmp_path):
    """A voxel at the NRRD's first index along x (LPS: the patient's right-most) ends at the last
    RAS index; the sagittal slice through it is bright; the 2 mm axis stays 2 mm."""
    import nibabel as nib
    import numpy as np

    from medcap.data.images import load_image
    from medcap.demo.assets import nrrd_to_nifti

    data = np.zeros((4, 5, 6), dtype=np.int16)
    data[0, 4, 5] = 1000  # LPS: right-most, posterior-most, superior-most
    _write_nrrd(tmp_path / "v.nrrd", data, "left-posterior-superior", np.diag([1.0, 1.0, 2.0]))
    with open(tmp_path / "v.nrrd", "rb") as f:
        image = nib.as_closest_canonical(nrrd_to_nifti(f))
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
    ras = np.asanyarray(image.dataobj)
    assert ras.shape == (4, 5, 6) and ras[3, 0, 5] == 1000  # right-most, posterior-most, superior-most
    assert image.header.get_zooms() == (1.0, 1.0, 2.0)
    nib.save(image, str(tmp_path / "v.nii.gz"))
    bright = np.asarray(load_image(f"{tmp_path / 'v.nii.gz'}#plane=sagittal&index=3"))
    dark = np.asarray(load_image(f"{tmp_path / 'v.nii.gz'}#plane=sagittal&index=0"))
    assert bright.max() == 255 and dark.max() == 0
    # shown with superior at the top and anterior to the right: the voxel is top left, 2 mm tall
    assert bright.shape[:2] == (12, 5) and bright[0, 0].max() == 255 and bright[-1, -1].max() < 64


def test_a_ras_nrrd_keeps_its_orientation_and_other_spaces_are_refused(tmp_path):
    import nibabel as nib
    import numpy as np

    from medcap.demo.assets import AssetError, nrrd_to_nifti

    data = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    _write_nrrd(tmp_path / "ras.nrrd", data, "right-anterior-superior", np.eye(3), origin=(5, 6, 7))
    with open(tmp_path / "ras.nrrd", "rb") as f:
        image = nrrd_to_nifti(f)
    assert nib.aff2axcodes(image.affine) == ("R", "A", "S") and list(image.affine[:3, 3]) == [5, 6, 7]
    _write_nrrd(tmp_path / "sa.nrrd", data, "scanner-xyz", np.eye(3))
    with open(tmp_path / "sa.nrrd", "rb") as f, pytest.raises(AssetError, match="LPS or RAS"):
        nrrd_to_nifti(f)


def test_a_siemens_mosaic_becomes_a_ras_volume_with_no_tag_written(tmp_path):
    """nibabel's own Siemens mosaic test file (a DWI b0), read as the demo reads heudiconv's."""
    import gzip
    import io

    import nibabel as nib
    import numpy as np
    import pydicom
    from nibabel.nicom import dicomwrappers

    from medcap.demo.assets import LPS_TO_RAS, dicom_mosaic_to_nifti

    raw = gzip.decompress((Path(nib.__file__).parent / "nicom" / "tests" / "data" / "siemens_dwi_0.dcm.gz").read_bytes())
    image = dicom_mosaic_to_nifti(io.BytesIO(raw))
    wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(io.BytesIO(raw)))
    assert image.shape == wrapper.get_data().shape and len(image.shape) == 3
    assert np.allclose(image.affine, LPS_TO_RAS @ wrapper.affine)  # DICOM patient space is LPS
    nib.save(image, str(tmp_path / "m.nii.gz"))
    written = gzip.decompress((tmp_path / "m.nii.gz").read_bytes())
    header = nib.Nifti1Header.from_fileobj(io.BytesIO(written))
    assert not header["descrip"].tobytes().strip(b"\x00") and not header["db_name"].tobytes().strip(b"\x00")


def test_slices_spread_over_the_anatomy_and_skip_empty_ones(tmp_path):
    import nibabel as nib
    import numpy as np

    from medcap.demo.slake import Volume, slice_indices, volume_sources

    data = np.zeros((40, 50, 30), dtype=np.float32)
    data[10:30, 5:45, 8:22] = 100 + np.random.default_rng(0).random((20, 40, 14))  # the "anatomy"
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / "v.nii.gz"))
    picks = slice_indices(tmp_path / "v.nii.gz", per_plane=6)
    assert set(picks) == {"sagittal", "coronal", "axial"}
    for plane, (low, high) in {"sagittal": (10, 29), "coronal": (5, 44), "axial": (8, 21)}.items():
        assert len(picks[plane]) == 6 and low < min(picks[plane]) and max(picks[plane]) < high
        assert picks[plane] == sorted(set(picks[plane]))
    assert len(slice_indices(tmp_path / "v.nii.gz", per_plane=40)["axial"]) < 14  # never beyond the anatomy
    vol = Volume("g", tmp_path / "v.nii.gz", "CT", "Chest", "v")
    sources = volume_sources([vol], {"train": 4, "test": 2}, {"g": "test"})
    assert len(sources) == 6 and {s.plane for s in sources} == {"sagittal", "coronal", "axial"}
    assert all(s.group == "g" and s.modality == "CT" for s in sources)


def test_dicom_plane_from_the_orientation_tag():
    from types import SimpleNamespace

    from medcap.demo.slake import dicom_plane

    def plane(orientation):
        return dicom_plane(SimpleNamespace(ImageOrientationPatient=orientation))

    assert plane([1, 0, 0, 0, 1, 0]) == "axial"
    assert plane([1, 0, 0, 0, 0, -1]) == "coronal"
    assert plane([0, 1, 0, 0, 0, -1]) == "sagittal"
    assert plane([1, 0, 0, 0, 0.7071, 0.7071]) is None  # 45 degrees: oblique, no plane
    assert dicom_plane(SimpleNamespace()) is None


def test_the_split_gives_both_held_out_splits_ct_and_mri_volumes():
    from medcap.demo.slake import split_groups

    strata = {f"ct{i}": "CT volume" for i in range(3)}
    strata.update({f"mr{i}": "MRI volume" for i in range(6)})
    strata.update({f"us{i}": "Ultrasound" for i in range(5)})
    for seed in range(5):
        split = split_groups(strata, seed)
        assert set(split) == set(strata)
        for part in ("validate", "test"):
            assert {strata[g] for g, p in split.items() if p == part} == {"CT volume", "MRI volume", "Ultrasound"}
        assert sum(p == "train" for g, p in split.items() if strata[g] == "MRI volume") == 3
    assert split_groups(strata, 0) == split_groups(dict(reversed(list(strata.items()))), 0)  # order-free


def test_assets_are_checked_and_missing_ones_named(tmp_path, monkeypatch):
    """A package file with the wrong sha256 is refused; the demo says how to fetch what is missing."""
    import dataclasses
    import hashlib
    import zipfile

    import nibabel as nib
    import numpy as np

    from medcap.demo import assets

    archive = tmp_path / "pkg-1.0-py3-none-any.whl"

    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4)), str(tmp_path / "t.nii.gz"))
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(tmp_path / "t.nii.gz", "pkg/t.nii.gz")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    volume = assets.Volume("t", "pkg/t.nii.gz", "nifti", "t", "CT", "Head")
    good = assets.Package("pkg", "1.0", archive.name, archive.as_uri(), digest, "MIT", (volume,))
    with pytest.raises(assets.AssetError, match="make demo-assets"):
        assets.check_assets(tmp_path / "out")
    monkeypatch.setattr(assets, "PACKAGES", (dataclasses.replace(good, sha256="0" * 64),))
    with pytest.raises(assets.AssetError, match="sha256"):
        assets.fetch(tmp_path / "out", tmp_path / "downloads")
    monkeypatch.setattr(assets, "PACKAGES", (good,))
    manifest = assets.fetch(tmp_path / "out", tmp_path / "downloads")
    assert [v["name"] for v in manifest["volumes"]] == ["t"] and manifest["volumes"][0]["licence"] == "MIT"
    assert [v["file"] for v in assets.check_assets(tmp_path / "out")] == ["volumes/t.nii.gz"]


@slow
def test_the_fetched_volumes_give_every_held_out_split_ct_and_mri_planes():
    """With `make demo-assets` run: the real volumes, the real split."""
    from medcap.demo.slake import sources_and_split

    assets_dir = ROOT / "demo_output" / "assets"
    if not (assets_dir / "assets.json").is_file():  # `make test` fetches them; a bare pytest may not have
        if os.environ.get("MEDCAP_REQUIRE_DEMO_ASSETS"):
            pytest.fail("MEDCAP_REQUIRE_DEMO_ASSETS is set but demo_output/assets is missing: make demo-assets")
        pytest.skip("run `make demo-assets` first (it downloads the pinned package files)")
    sources, split = sources_and_split(seed=0, assets_dir=assets_dir)
    for part in ("train", "validate", "test"):
        mine = [s for s in sources if split[s.group] == part]
        assert {(s.modality, s.plane) for s in mine if s.plane} >= {
            (m, p) for m in ("CT", "MRI") for p in ("sagittal", "coronal", "axial")
        }


def test_fetched_dicom_images_are_kept_verbatim_and_labelled_by_hand(tmp_path, monkeypatch):
    """An npm tarball's DICOM member is copied out as the package ships it; the mini SLAKE takes
    its body part from the hand label (not the tag) and one image per listed frame."""
    import hashlib
    import io
    import tarfile

    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    from medcap.demo import assets
    from medcap.demo.slake import dicom_sources, fetched_dicom_files

    ds = dcmread(get_testdata_file("CT_small.dcm"))
    ds.BodyPartExamined = "CHEST"  # a wrong tag, as MELANIX's
    raw = io.BytesIO()
    ds.save_as(raw)
    archive = tmp_path / "pkg-1.0.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("package/data/ct.dcm")
        info.size = len(raw.getvalue())
        tar.addfile(info, io.BytesIO(raw.getvalue()))
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    image = assets.DicomImage("pkg_ct", "package/data/ct.dcm", "Head")
    monkeypatch.setattr(assets, "PACKAGES", (assets.Package("pkg", "1.0", archive.name, archive.as_uri(), digest,
                                                             "MIT", images=(image,)),))  # fmt: skip
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "assets.json").write_text('{"volumes": []}')  # fetched before images were added
    with pytest.raises(assets.AssetError, match=r"images missing \(pkg_ct\): run `make demo-assets`"):
        fetched_dicom_files(tmp_path / "out")
    manifest = assets.fetch(tmp_path / "out", tmp_path / "downloads")
    assert manifest["images"][0]["file"] == "images/pkg_ct.dcm" and manifest["images"][0]["body_part"] == "Head"
    assert (tmp_path / "out" / "images" / "pkg_ct.dcm").read_bytes() == raw.getvalue()
    [source] = dicom_sources(fetched_dicom_files(tmp_path / "out"))
    assert (source.modality, source.body_part, source.plane) == ("CT", "Head", "axial")
