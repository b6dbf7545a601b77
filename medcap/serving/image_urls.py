"""Image URLs of chat requests -> the 8-bit RGB images ``medcap.data.images.load_image`` makes.

``data:`` URLs (base64) carry PNG, JPEG, DICOM (``application/dicom``) or NIfTI
(``application/x-nifti``, gzipped or not); a generic type (``application/octet-stream``, what a
browser gives a ``.dcm`` file) is recognised by the bytes. A NIfTI slice is chosen with the data
path's selector after a ``#`` (``data:application/x-nifti;base64,...#plane=coronal&index=40``).
``file://`` URLs are read only under ``image_root`` (resolved, so neither ``..`` nor a symlink
leads out of it); network URLs are refused: the server fetches nothing.

Sizes are checked from the headers before any pixel is decoded (``max_image_pixels``; volumes
by their voxel count), so a small file that would decompress to gigabytes is refused early.
Error messages name the reason but never a DICOM tag value: for DICOM only the exception type is
kept.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import tempfile
import warnings
from pathlib import Path
from urllib.parse import unquote, urlsplit

from PIL import Image

from medcap.data.images import SELECT_KEYS, ImageLoadError, load_image, split_selector
from medcap.serving.errors import APIError

DATA_URL = re.compile(r"^data:(?P<mime>[^;,]*)(?P<params>(?:;[^;,]*)*?)(?P<base64>;base64)?,", re.IGNORECASE)
SUFFIXES = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/jpg": ".jpg",
    "image/bmp": ".bmp",
    "image/gif": ".gif",
    "image/tiff": ".tif",
    "image/webp": ".webp",
    "application/dicom": ".dcm",
    "application/dicom+file": ".dcm",
    "image/dicom": ".dcm",
    "application/x-nifti": ".nii",
    "application/nifti": ".nii",
    "image/nifti": ".nii",
    "image/x-nifti": ".nii",
    "application/gzip": ".nii.gz",  # the only gzipped format medcap reads
    "application/x-gzip": ".nii.gz",
}
GZIP_MAGIC = b"\x1f\x8b"


def _sniff(data: bytes) -> str:
    """A suffix from the bytes alone: DICOM's ``DICM`` at 128, gzip (NIfTI), NIfTI-1/2 magic;
    anything else is left to Pillow, which reads its own signatures."""
    if data[128:132] == b"DICM":
        return ".dcm"
    if data[:2] == GZIP_MAGIC:
        return ".nii.gz"
    if data[344:348] in (b"n+1\x00", b"ni1\x00") or data[4:8] in (b"n+2\x00", b"ni2\x00"):
        return ".nii"
    return ".img"


def _suffix(mime: str, data: bytes) -> str:
    suffix = SUFFIXES.get(mime.lower())
    if suffix == ".nii" and data[:2] == GZIP_MAGIC:
        return ".nii.gz"
    if suffix in (".dcm", ".nii", ".nii.gz"):
        return suffix
    sniffed = _sniff(data)
    return sniffed if sniffed != ".img" or suffix is None else suffix


def _selector(fragment: str, param: str) -> str:
    """A ``#`` selector (``plane=coronal&index=40``), checked against the data path's keys."""
    if not fragment:
        return ""
    keys = [part.partition("=")[0] for part in fragment.split("&")]
    if not all("=" in part for part in fragment.split("&")) or not set(keys) <= SELECT_KEYS:
        raise APIError(
            400, f"image selector #{fragment}: expected key=value pairs of {sorted(SELECT_KEYS)} joined by &",
            param=param, code="invalid_image",
        )  # fmt: skip
    return "#" + fragment


def _head(path: Path, size: int = 400) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)


def check_size(path: Path, max_pixels: int, param: str) -> None:
    """Refuse an image whose header announces more than ``max_pixels`` (a volume: voxels)."""
    name = path.name.lower()
    try:
        if name.endswith((".nii", ".nii.gz")):
            import nibabel as nib

            shape = tuple(int(n) for n in nib.load(str(path)).header.get_data_shape())
            count = 1
            for n in shape[:4]:
                count *= max(n, 1)
            what = "x".join(map(str, shape)) + " voxels"
        elif name.endswith(".dcm") or _sniff(_head(path)) == ".dcm":
            import pydicom

            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
            count, what = rows * cols, f"{rows}x{cols} pixels"
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as img:
                    count, what = img.width * img.height, f"{img.width}x{img.height} pixels"
    except Image.DecompressionBombError as e:  # Pillow's own refusal, beyond twice its default limit
        raise APIError(400, f"image is over the pixel limit ({e})", param=param, code="image_too_large") from None
    except Exception:  # noqa: BLE001 - unreadable headers: load_image names the reason below
        return
    if count > max_pixels:
        raise APIError(
            400, f"image is {what}, over the limit of {max_pixels} pixels", param=param, code="image_too_large"
        )


def load_file(path: Path, selector: str, max_pixels: int, param: str, shown: str = "image") -> Image.Image:
    """``load_image`` with the size check first; errors become 400s naming the reason."""
    check_size(path, max_pixels, param)
    try:
        image = load_image(f"{path}{selector}")
    except ImageLoadError as e:
        message = str(e).replace(str(path), shown)
        if path.suffix.lower() == ".dcm" or "DICOM" in message:
            message = re.sub(r"\((\w+): .*\)$", r"(\1)", message, flags=re.DOTALL)  # no tag values
        raise APIError(400, f"cannot read the image: {message}", param=param, code="invalid_image") from None
    if image.width * image.height > max_pixels:
        raise APIError(400, f"image is {image.width}x{image.height} pixels, over the limit of {max_pixels}",
                       param=param, code="image_too_large")  # fmt: skip
    return image


def decode_data_url(url: str, max_pixels: int, param: str) -> Image.Image:
    match = DATA_URL.match(url)
    if not match:
        raise APIError(400, "malformed data: URL (expected data:<type>;base64,<data>)", param=param,
                       code="invalid_image")  # fmt: skip
    if not match["base64"]:
        raise APIError(400, "data: URLs must be base64-encoded (data:<type>;base64,...)", param=param,
                       code="invalid_image")  # fmt: skip
    payload, _, fragment = url[match.end() :].partition("#")
    selector = _selector(fragment, param)
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"data: URL is not valid base64 ({e})", param=param, code="invalid_image") from None
    if not data:
        raise APIError(400, "data: URL holds no bytes", param=param, code="invalid_image")
    with tempfile.TemporaryDirectory(prefix="medcap-serve-") as folder:
        path = Path(folder) / f"image{_suffix(match['mime'].strip(), data)}"
        path.write_bytes(data)
        return load_file(path, selector, max_pixels, param)


def resolve_file_url(url: str, image_root: str | None, param: str) -> tuple[Path, str]:
    """(path under ``image_root``, selector) for a ``file://`` URL; anything else is refused."""
    if image_root is None:
        raise APIError(403, "file:// image URLs are refused: the server has no image_root; send the image as a "
                       "data: URL (base64)", param=param, code="file_urls_disabled")  # fmt: skip
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise APIError(400, f"file:// URL names a host ({parts.netloc}); only local paths are read", param=param,
                       code="invalid_image")  # fmt: skip
    root = Path(image_root).resolve()
    text = unquote(parts.path)
    if "\x00" in text:
        raise APIError(400, "file:// URL holds a NUL character", param=param, code="invalid_image")
    path, select = split_selector(f"{text}#{parts.fragment}" if parts.fragment else text)
    selector = _selector("&".join(f"{k}={v}" for k, v in select.items()), param)
    candidate = path if path.is_absolute() else root / path
    try:
        resolved = candidate.resolve()  # follows symlinks and ..
        if not resolved.is_relative_to(root):
            raise APIError(403, "image path is outside image_root", param=param, code="path_outside_image_root")
        found = resolved.is_file()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a name too long, ...
        reason = e.strerror if isinstance(e, OSError) and e.strerror else type(e).__name__
        if isinstance(e, RuntimeError) and "loop" in str(e).lower():
            reason = "symlink loop"
        raise APIError(400, f"cannot resolve the image path under image_root ({reason})", param=param,
                       code="invalid_image") from None  # fmt: skip
    if not found:
        raise APIError(400, f"image file not found under image_root: {path}", param=param, code="invalid_image")
    return resolved, selector


def decode_image_url(url: str, *, image_root: str | None, max_pixels: int, param: str) -> Image.Image:
    """Any image URL a request may carry -> RGB image, or an ``APIError`` naming why not."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "data":
        return decode_data_url(url, max_pixels, param)
    if scheme == "file":
        path, selector = resolve_file_url(url, image_root, param)
        return load_file(path, selector, max_pixels, param, shown=path.name)
    if scheme in ("http", "https", "ftp", "ftps"):
        raise APIError(400, f"{scheme}:// image URLs are refused: this server fetches nothing from the network; "
                       "send the image as a data: URL (base64)", param=param, code="network_url_refused")  # fmt: skip
    raise APIError(400, "image URL must be a data: URL (base64) or, with image_root set, a file:// URL",
                   param=param, code="invalid_image")  # fmt: skip


def png_preview(image: Image.Image, max_side: int = 1024) -> bytes:
    """The image as the model's data path made it (windowed, 8-bit RGB), as PNG, at most
    ``max_side`` pixels on its longer side (display only: the model sees the full image)."""
    shown = image.copy()
    shown.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    shown.save(out, format="PNG")
    return out.getvalue()
