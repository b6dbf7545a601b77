"""Medical image files -> 8-bit RGB PIL images, ready for an encoder's transform.

JPEG/PNG through Pillow (16-bit and palette images included), DICOM through pydicom (modality
rescale, VOI window from the tags or from percentiles, MONOCHROME1 inverted, one frame of a
multi-frame file). Only pixels are read from a DICOM file: no tag value is ever logged.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image

# Decompression-bomb guard (about 13k x 13k; Pillow itself refuses twice its own 89M default).
# Larger files are refused, not resized.
MAX_PIXELS = 150_000_000
DICOM_SUFFIXES = {".dcm", ".dicom", ".dic"}


class ImageLoadError(ValueError):
    """An image that cannot be read; the message names the file (and record, when known)."""


def _where(path: Path, record: int | None) -> str:
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


def load_dicom(path: Path, frame: int = 0, record: int | None = None) -> Image.Image:
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
    if arr.ndim == 3 and arr.shape[-1] == 3:  # colour (RGB, or YBR already converted by pydicom)
        return Image.fromarray(to_uint8(arr, 0, 255) if arr.dtype != np.uint8 else arr, "RGB")
    values = apply_modality_lut(arr, ds)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        values = apply_voi_lut(values, ds, index=0)
    gray = to_uint8(values)
    if photometric == "MONOCHROME1":
        gray = 255 - gray
    return Image.fromarray(gray, "L").convert("RGB")


def load_raster(path: Path, record: int | None = None) -> Image.Image:
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
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise ImageLoadError(f"{where}: cannot read image ({type(e).__name__}: {e})") from e


def load_image(path: str | Path, *, record: int | None = None, frame: int = 0) -> Image.Image:
    """Any supported medical image file as an 8-bit RGB PIL image."""
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"{_where(path, record)}: image file not found")
    if _is_dicom(path):
        return load_dicom(path, frame=frame, record=record)
    return load_raster(path, record=record)
