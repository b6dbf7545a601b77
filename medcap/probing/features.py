"""Image features of one encoder over a labelled set (the pooled embedding, or the final-layer
patch tokens that per-patch connectors read): batched, without gradients, and cached on disk by
encoder, feature kind and image content, so a rerun is instant and a changed checkpoint (or
image) is never served stale features."""

from __future__ import annotations

import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from medcap.data.images import ImageLoadError, load_image, split_selector
from medcap.errors import ConfigError
from medcap.io import atomic_write
from medcap.probing.encoders import EncoderSpec, encoder_key, file_digest, load_encoder
from medcap.probing.labels import LabelledImage
from medcap.settings import parse_dtype

# pooled: the tower's image embedding (what cls_mlp and the question connectors read); patches:
# the final-layer patch tokens flattened in order (what the per-patch connectors read: position kept)
FEATURE_KINDS = ("pooled", "patches")


def check_feature_kind(features: str) -> str:
    if features not in FEATURE_KINDS:
        raise ConfigError(f"features={features!r}: expected one of {FEATURE_KINDS}")
    return features


@dataclass
class Features:
    spec: EncoderSpec
    values: np.ndarray  # [N, D] float32, in the labelled set's order
    computed: int  # images run through the encoder this time
    cached: int  # images read from the cache
    cache_file: Path | None


def pixel_transform(size: int) -> Callable[[Image.Image], torch.Tensor]:
    """The floor: grey levels of the centre square, downsampled to ``size`` x ``size``."""

    def transform(img: Image.Image) -> torch.Tensor:
        grey = ImageOps.fit(img.convert("L"), (size, size), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(grey, dtype=np.float32).reshape(-1) / 255.0)

    return transform


class _Images(Dataset):
    def __init__(self, images: Sequence[LabelledImage], transform: Callable) -> None:
        self.images, self.transform = images, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        im = self.images[i]
        try:
            return self.transform(load_image(im.image))
        except ImageLoadError as e:
            raise ValueError(f"{im.where}: {e}") from e


def image_keys(images: Sequence[LabelledImage]) -> list[str]:
    """File content plus selector: the same slice of the same volume has the same key anywhere."""
    digests: dict[Path, str] = {}
    keys = []
    for im in images:
        file, select = split_selector(im.image)
        if file not in digests:
            if not file.is_file():
                raise ValueError(f"{im.where}: image {file} not found")
            digests[file] = file_digest(file).hexdigest()
        keys.append(digests[file] + "#" + "&".join(f"{k}={v}" for k, v in sorted(select.items())))
    return keys


def _read_cache(path: Path | None) -> dict[str, np.ndarray]:
    if path is None or not path.is_file():
        return {}
    try:
        with np.load(path, allow_pickle=False) as data:
            return dict(zip(data["keys"].tolist(), data["values"]))
    except (OSError, ValueError, KeyError) as e:
        warnings.warn(f"{path}: unreadable feature cache ({e}); recomputing", stacklevel=2)
        return {}


def _write_cache(path: Path, stored: dict[str, np.ndarray]) -> None:
    keys, values = np.array(list(stored)), np.stack(list(stored.values()))
    atomic_write(path, lambda f: np.savez(f, keys=keys, values=values))


def _compute(
    spec: EncoderSpec,
    images: Sequence[LabelledImage],
    batch_size: int,
    device: str,
    dtype: str,
    seed: int,
    num_workers: int,
    progress: bool,
    features: str = "pooled",
) -> np.ndarray:
    encoder = None
    if spec.kind == "pixels":
        transform = pixel_transform(spec.pixel_size)
    else:
        encoder = load_encoder(spec, seed).to(device=device, dtype=parse_dtype(dtype)).eval()
        transform = encoder.preprocess.transform()
    loader = DataLoader(_Images(images, transform), batch_size=batch_size, num_workers=num_workers)
    out = []
    with torch.inference_mode():
        for batch in tqdm(
            loader, desc=f"features {spec.name}", unit="batch", disable=not progress, dynamic_ncols=True
        ):
            if encoder is None:
                out.append(batch.numpy())
            else:
                f = encoder(batch.to(device=device, dtype=parse_dtype(dtype)))
                x = f.pooled if features == "pooled" else f.patches.flatten(1)
                out.append(x.float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


def extract_features(
    spec: EncoderSpec,
    images: Sequence[LabelledImage],
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    device: str = "cpu",
    dtype: str = "fp32",
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
    features: str = "pooled",
) -> Features:
    """Features for ``images``; only images missing from the cache are run (the encoder is not
    even built when none is). The pixel baseline is the same whatever ``features`` says."""
    parse_dtype(dtype)  # a wrong name fails before any encoder is built
    check_feature_kind(features)
    if spec.kind == "pixels":
        features = "pooled"
    keys = image_keys(images)
    cache_file = None
    if cache_dir is not None:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", spec.name)[:40]
        cache_file = Path(cache_dir) / f"{slug}-{encoder_key(spec, seed, dtype, features)[:24]}.npz"
    stored = _read_cache(cache_file)
    todo = {k: i for i, k in enumerate(keys) if k not in stored}  # one run per distinct image
    if todo:
        new = _compute(
            spec, [images[i] for i in todo.values()], batch_size, device, dtype, seed, num_workers, progress, features
        )
        stored.update(zip(todo, new))
        if cache_file is not None:
            _write_cache(cache_file, stored)
    values = np.stack([stored[k] for k in keys]).astype(np.float32)
    return Features(
        spec, values, computed=len(todo), cached=sum(k not in todo for k in keys), cache_file=cache_file
    )
