#!/usr/bin/env python
"""Data pipeline throughput: decode + transform + tokenise, samples/s with 0 and 2 workers.

Images are 512x512 (a real CT slice from pydicom, upsampled, with noise so each file differs),
written as JPEG and as DICOM; prompts go through the real Llama-3 tokenizer (llama-models wheel)
and BiomedCLIP's 224-px preprocessing. Prints a table and, last, one JSON line.

    .venv/bin/python bench/data_throughput.py [--samples 512]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def make_images(folder: Path, n: int) -> tuple[list[str], list[str]]:
    import pydicom
    from pydicom.data import get_testdata_file

    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    base = np.asarray(Image.fromarray(ds.pixel_array.astype(np.float32)).resize((512, 512), Image.BICUBIC))
    dtype = ds.pixel_array.dtype
    rng = np.random.default_rng(0)
    jpegs, dicoms = [], []
    for i in range(n):
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 4095).astype(np.uint16)
        gray8 = (pixels / max(pixels.max(), 1) * 255).astype(np.uint8)
        Image.fromarray(gray8).convert("RGB").save(folder / f"{i}.jpg", quality=90)
        out = ds.copy()
        out.Rows, out.Columns = 512, 512
        out.PixelData = pixels.astype(dtype).tobytes()
        out.save_as(folder / f"{i}.dcm")
        jpegs.append(f"{i}.jpg")
        dicoms.append(f"{i}.dcm")
    return jpegs, dicoms


def write_records(folder: Path, names: list[str], tag: str) -> Path:
    records = [
        {
            "conversations": [
                {
                    "from": "human",
                    "value": "What modality is used to take this image? Describe the findings.",
                },
                {
                    "from": "gpt",
                    "value": "This is an axial CT slice of the chest showing the lungs and heart.",
                },
            ],
            "image": name,
        }
        for name in names
    ]
    path = folder / f"{tag}.json"
    path.write_text(json.dumps(records))
    return path


def measure(dataset, workers: int, batch_size: int, pad_id: int) -> float:
    from medcap.data.collate import build_dataloader

    loader, _ = build_dataloader(
        dataset, batch_size=batch_size, pad_id=pad_id, num_workers=workers, shuffle=False
    )
    it = iter(loader)
    next(it)  # worker start-up and first batch are not counted
    count, start = 0, time.perf_counter()
    for batch in it:
        count += batch["tokens"].shape[0]
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)  # each worker is one process; the main process only collates

    import llama_models
    from torchtune.models.llama3 import llama3_tokenizer

    from medcap.data.dataset import ImageChatDataset
    from medcap.models.vision import build_vision_encoder

    tokenizer = llama3_tokenizer(str(Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"))
    transform = build_vision_encoder("biomedclip").preprocess.transform()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        jpegs, dicoms = make_images(folder, args.samples)
        for kind, names in (("jpeg", jpegs), ("dicom", dicoms)):
            ds = ImageChatDataset(
                tokenizer, write_records(folder, names, kind), num_image_tokens=32, image_transform=transform
            )
            for workers in (0, 2):
                rate = measure(ds, workers, args.batch_size, tokenizer.pad_id)
                results[f"{kind}_workers{workers}_samples_per_s"] = round(rate, 1)
                print(f"{kind:6s} 512x512  workers={workers}  {rate:8.1f} samples/s")
    results["cores"] = os.cpu_count()
    results["target_jpeg_workers2"] = 200
    print(json.dumps(results))


if __name__ == "__main__":
    main()
