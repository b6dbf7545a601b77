"""Medical image files -> 8-bit RGB PIL images, ready for an encoder's transform.

JPEG/PNG through Pillow (16-bit and palette images included), DICOM through pydicom (modality
rescale, VOI window from the tags or from percentiles, MONOCHROME1 inverted, palette colour,
one frame of a multi-frame file; JPEG, JPEG-LS and JPEG 2000 transfer syntaxes through the
pylibjpeg decoders), and NIfTI volumes sliced by plane and index. Only pixels are read from a
DICOM file: no tag value is ever logged.

A record may select part of a file with a fragment after ``#``:
``scan.dcm#frame=3``, ``brain.nii.gz#plane=coronal&index=90`` (default: the middle axial slice),
``fmri.nii.gz#plane=axial&index=20&volume=5``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

from medcap.errors import MedcapError

# Decompression-bomb guard (about 13k x 13k; Pillow itself refuses twice its own 89M default).
# Larger files are refused, not resized.
MAX_PIXELS = 150_000_000
MAX_VOXEL_ANISOTROPY = 50  # slice thickness over in-plane spacing; resampling beyond this would be a pixel bomb
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
PLANES = ("sagittal", "coronal", "axial")  # volume axes 0, 1, 2 after reorientation to RAS
SELECT_KEYS = {"frame", "plane", "index", "volume"}


class ImageLoadError(MedcapError, ValueError):
    """An image that cannot be read; the message names the file (and record, when known)."""


def _where(path: Path, record: int | str | None) -> str:
    return f"{path}" + (f" (record {record})" if record is not None else "")


def to_uint8(pixels: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Linear map of [low, high] (default: 0.5 and 99.5 percentiles) onto 0..255."""
    pixels = pixels.astype(np.float32)
    if low is None or high is None:
        low, high = np.percentile(pixels, [0.5, 99.5])
    if high <= low:
        high = low + 1.0
    return (np.clip((pixels - low) / (high - low), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with open(path, "rb") as f:
        head = f.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _has_usable_window(ds) -> bool:
    """A VOI window in the tags that pydicom can apply: scanners write a width of 0 when no
    window was set (the percentile window is used then, as without the tags)."""
    if "WindowCenter" not in ds or "WindowWidth" not in ds:
        return False
    from pydicom.multival import MultiValue

    width = ds.WindowWidth
    try:
        return float(width[0] if isinstance(width, MultiValue) else width) >= 1
    except (TypeError, ValueError, IndexError):
        return False


def load_dicom(path: Path, frame: int = 0, record: int | str | None = None) -> Image.Image:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    where = _where(path, record)
    try:
        ds = pydicom.dcmread(path)
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if rows * cols > MAX_PIXELS:
            raise ImageLoadError(f"{where}: {rows}x{cols} pixels exceeds the limit of {MAX_PIXELS}")
        if not 0 <= frame < frames:
            raise ImageLoadError(f"{where}: frame {frame} requested but the file has {frames}")
        arr = ds.pixel_array if frames == 1 else ds.pixel_array[frame]
    except ImageLoadError:
        raise
    except Exception as e:  # pydicom raises many types for truncated/unsupported files
        raise ImageLoadError(f"{where}: cannot decode DICOM pixels ({type(e).__name__}: {e})") from e

    photometric = str(getattr(ds, "PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        rgb = apply_color_lut(arr, ds)
        return Image.fromarray(to_uint8(rgb, 0, float(np.iinfo(rgb.dtype).max)), "RGB")
    if arr.ndim == 3 and arr.shape[-1] == 3:  # colour (RGB, or YBR already converted by pydicom)
        return Image.fromarray(to_uint8(arr, 0, 255) if arr.dtype != np.uint8 else arr, "RGB")
    values = apply_modality_lut(arr, ds)
    if _has_usable_window(ds):
        values = apply_voi_lut(values, ds, index=0)
    gray = to_uint8(values)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return Image.fromarray(gray, "L").convert("RGB")


def load_raster(path: Path, record: int | str | None = None) -> Image.Image:
    where = _where(path, record)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS decides
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageLoadError(f"{where}: {img.width}x{img.height} exceeds {MAX_PIXELS} pixels")
                img.load()
                if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
                    return Image.fromarray(to_uint8(np.asarray(img)), "L").convert("RGB")
                if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
                    rgba = img.convert("RGBA")
                    background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
                    return Image.alpha_composite(background, rgba).convert("RGB")
                return img.convert("RGB")
    except ImageLoadError:
        raise
    except Exception as e:  # Pillow raises SyntaxError, EOFError, struct.error... for broken files
        raise ImageLoadError(f"{where}: cannot read image ({type(e).__name__}: {e})") from e


def load_nifti_slice(
    path: Path, plane: str = "axial", index: int | None = None, volume: int = 0, record: int | str | None = None
) -> Image.Image:
    """One slice of a NIfTI volume, reoriented to RAS so planes mean what they say; shown with
    superior (or anterior, for axial) at the top, resampled to square pixels by the voxel sizes."""
    where = _where(path, record)
    if plane not in PLANES:
        raise ImageLoadError(f"{where}: plane={plane!r}; expected one of {PLANES}")
    data, zooms = load_canonical_volume(path, where)
    return volume_slice(data, zooms, plane, index, volume, where)


def load_canonical_volume(path: Path, where: str | None = None) -> tuple[np.ndarray, tuple[float, ...]]:
    """A NIfTI volume's voxels reoriented to RAS, and its voxel sizes."""
    import nibabel as nib

    try:
        img = nib.as_closest_canonical(nib.load(str(path)))
        return np.asanyarray(img.dataobj), tuple(float(z) for z in img.header.get_zooms())
    except Exception as e:
        raise ImageLoadError(f"{where or path}: cannot read NIfTI volume ({type(e).__name__}: {e})") from e


def volume_slice(
    data: np.ndarray, zooms: tuple[float, ...], plane: str, index: int | None = None, volume: int = 0,
    where: str = "volume",
) -> Image.Image:
    """One slice of a RAS volume (see ``load_nifti_slice``)."""
    if plane not in PLANES:
        raise ImageLoadError(f"{where}: plane={plane!r}; expected one of {PLANES}")
    if data.ndim == 4:
        if not 0 <= volume < data.shape[3]:
            raise ImageLoadError(f"{where}: volume {volume} requested but the file has {data.shape[3]}")
        data = data[..., volume]
    if data.ndim != 3:
        raise ImageLoadError(f"{where}: expected a 3-D volume, found shape {data.shape}")
    axis = PLANES.index(plane)
    size = data.shape[axis]
    index = size // 2 if index is None else index
    if not 0 <= index < size:
        raise ImageLoadError(f"{where}: {plane} slice {index} requested but the volume has {size}")
    try:
        slab = np.take(data, index, axis=axis).astype(np.float32)
        out = Image.fromarray(np.ascontiguousarray(np.rot90(to_uint8(slab))), "L")
        # square pixels: a 0.5 x 0.5 x 5 mm series is not squashed tenfold in its coronal slices
        across, down = (float(z) for i, z in enumerate(zooms[:3]) if i != axis)
    except Exception as e:  # voxel types or headers nibabel reads but cannot turn into a slice
        raise ImageLoadError(f"{where}: cannot read NIfTI slice ({type(e).__name__}: {e})") from e
    if min(across, down) > 0 and not np.isclose(across, down, rtol=0.01):
        finest = min(across, down)
        if max(across, down) / finest > MAX_VOXEL_ANISOTROPY:
            raise ImageLoadError(
                f"{where}: voxel sizes {across:g} x {down:g} in the {plane} plane; more than "
                f"{MAX_VOXEL_ANISOTROPY}:1 is not a scan"
            )
        square = (round(out.width * across / finest), round(out.height * down / finest))
        if square[0] * square[1] > MAX_PIXELS:
            raise ImageLoadError(f"{where}: the {plane} slice resampled to square pixels exceeds {MAX_PIXELS} pixels")
        out = out.resize(square, Image.Resampling.BICUBIC)
    return out.convert("RGB")


def split_selector(spec: str | Path) -> tuple[Path, dict[str, str]]:
    """``"a.nii.gz#plane=axial&index=3"`` -> (``a.nii.gz``, {plane: axial, index: 3}). A ``#``
    that is not followed by known keys belongs to the file name."""
    text = str(spec)
    head, sep, fragment = text.rpartition("#")
    if sep:
        pairs = [p.partition("=") for p in fragment.split("&")]
        if pairs and all(eq and key in SELECT_KEYS for key, eq, _ in pairs):
            return Path(head), {key: value for key, _, value in pairs}
    return Path(text), {}


def load_image(path: str | Path, *, record: int | str | None = None, frame: int = 0) -> Image.Image:
    """Any supported medical image file (with an optional ``#`` selector) as 8-bit RGB."""
    path, select = split_selector(path)
    if not path.is_file():
        raise ImageLoadError(f"{_where(path, record)}: image file not found")
    try:
        index = int(select["index"]) if "index" in select else None
        frame = int(select.get("frame", frame))
        volume = int(select.get("volume", 0))
    except ValueError as e:
        raise ImageLoadError(f"{_where(path, record)}: bad selector {select} ({e})") from e
    if path.name.lower().endswith(NIFTI_SUFFIXES):
        return load_nifti_slice(path, select.get("plane", "axial"), index, volume, record)
    if _is_dicom(path):
        return load_dicom(path, frame=frame, record=record)
    return load_raster(path, record=record)
