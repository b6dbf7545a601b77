#!/usr/bin/env python
"""Resize and centre-crop a folder of images the way an encoder's preprocessing does (no tensor,
no normalisation), to the same relative paths under another folder, in several processes: the
training images then decode fast and take little disk. DICOM, NIfTI and 16-bit PNG go through
medcap's image reader (windowed to 8 bits) and are written as PNG; other images keep their format.
As in the original, an image more than ``--pad_ratio`` times longer than wide (or the reverse) is
first padded to a square with black, so a centre crop does not cut most of it away.

    python tools/preprocess_images.py     # ./datasets/ROCOv2-VQARAD-SLAKE-text/images -> .../images_preprocess
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from PIL import Image, ImageOps
from tqdm import tqdm

SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom", ".nii", ".nii.gz")
KEEP_FORMAT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
_resize = None  # each worker process builds the encoder's resize + crop once


def resize_and_crop(vision: str):
    """open_clip's eval transform for ``vision``, up to (not including) the tensor conversion."""
    from torchvision.transforms import ToTensor

    from medcap.models.vision import encoder_preprocess

    steps = []
    for step in encoder_preprocess(vision).transform().transforms:
        if isinstance(step, ToTensor):
            break
        if callable(step) and getattr(step, "__name__", "") != "_convert_to_rgb":
            steps.append(step)

    def apply(img: Image.Image) -> Image.Image:
        for step in steps:
            img = step(img)
        return img

    return apply


def pad_to_square(img: Image.Image, ratio: float) -> Image.Image:
    long, short = max(img.size), min(img.size)
    if ratio <= 0 or long <= ratio * short:
        return img
    dx, dy = long - img.width, long - img.height
    return ImageOps.expand(img, border=(dx // 2, dy // 2, dx - dx // 2, dy - dy // 2), fill=0)


def output_path(source: Path, input_dir: Path, output_dir: Path) -> Path:
    rel = source.relative_to(input_dir)
    name = rel.name.lower()
    if not name.endswith(KEEP_FORMAT):
        rel = rel.with_name(rel.name[: -len(next(s for s in SUFFIXES if name.endswith(s)))] + ".png")
    return output_dir / rel


def _init(vision: str) -> None:
    global _resize
    import torch

    torch.set_num_threads(1)
    _resize = resize_and_crop(vision)


def process_one(job: tuple[Path, Path, float]) -> str | None:
    """None when written, else the reason it was skipped."""
    from medcap.data.images import load_image

    source, target, pad_ratio = job
    try:
        img = _resize(pad_to_square(load_image(source), pad_ratio))
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp{target.suffix}")
        img.save(tmp)
        os.replace(tmp, target)
        return None
    except Exception as e:  # noqa: BLE001 - one bad image is reported, not fatal
        return str(e) if str(source) in str(e) else f"{source}: {e}"


def find_images(input_dir: Path) -> list[Path]:
    return sorted(p for p in input_dir.rglob("*") if p.is_file() and p.name.lower().endswith(SUFFIXES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", default="./datasets/ROCOv2-VQARAD-SLAKE-text/images")
    parser.add_argument("--output_dir", "--result_dir", default=None,
                        help="default: images_preprocess beside --input_dir")  # fmt: skip
    parser.add_argument("--vision", default="biomedclip", help="encoder whose preprocessing to apply")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--pad_ratio", type=float, default=1.8, help="pad to square beyond this aspect ratio (0: never)")
    parser.add_argument("--overwrite", action="store_true", help="redo images already written")
    parser.add_argument("--strict", action="store_true", help="exit with an error if any image was skipped")
    args = parser.parse_args(argv)
    input_dir = Path(args.input_dir)
    output_dir = Path(args.output_dir) if args.output_dir else input_dir.parent / "images_preprocess"
    if not input_dir.is_dir():
        raise SystemExit(f"error: {input_dir}: folder not found")
    images = find_images(input_dir)
    jobs = [(p, output_path(p, input_dir, output_dir), args.pad_ratio) for p in images]
    todo = [j for j in jobs if args.overwrite or not j[1].is_file()]
    print(f"{input_dir}: {len(images)} images, {len(jobs) - len(todo)} already done -> {output_dir}")
    if args.workers <= 1:  # in this process (no pickling: also when imported as a module)
        _init(args.vision)
        reasons = map(process_one, todo)
    else:
        pool = ProcessPoolExecutor(max_workers=args.workers, initializer=_init, initargs=(args.vision,))
        reasons = pool.map(process_one, todo, chunksize=16)
    skipped = [reason for reason in tqdm(reasons, total=len(todo), unit="img") if reason]
    if args.workers > 1:
        pool.shutdown()
    print(f"wrote {len(todo) - len(skipped)} images; skipped {len(skipped)}")
    for reason in skipped[:10]:
        print(f"  skipped {reason}")
    return 1 if skipped and args.strict else 0


if __name__ == "__main__":
    raise SystemExit(main())
