"""Training augmentation for medical images: open_clip's (random resized crop, colour jitter...)
plus what suits scans, each a setting of the config's ``image_augment``:

- ``hflip``: probability of a left-right flip. Off by default: it changes the answer to any
  question about laterality (SLAKE asks "Which lung is abnormal?"); a flip never turns one plane
  into another, and no vertical flip or rotation is offered (they make anatomy upside down).
- ``window_width`` [low, high], ``window_level`` (a fraction of the range): the display window
  is narrowed or widened by a factor in [low, high] and its centre moved by up to
  ±``window_level``, as CT is read in different windows and MRI intensities have no fixed scale.
- ``gamma`` [low, high]: a gamma curve on the windowed intensities.
- ``by_modality``: settings that replace the ones above for records whose ``modality`` field
  (SLAKE's spelling: CT, MRI, X-Ray, Ultrasound, Nuclear medicine) names that modality; records
  without one (captions) get the base settings.

The intensity changes act on every channel alike (grey stays grey, colour keeps its hue). Every
random draw comes from torch's global generator, which the dataset seeds per sample (see
``ImageChatDataset``): a sample is augmented the same way whatever the order or a resume.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from PIL import Image

MEDICAL_KEYS = ("hflip", "window_width", "window_level", "gamma")
BY_MODALITY = "by_modality"


@dataclass(frozen=True)
class ScanAugment:
    hflip: float = 0.0
    window_width: tuple[float, float] | None = None
    window_level: float = 0.0
    gamma: tuple[float, float] | None = None

    def __post_init__(self):
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"image_augment.hflip={self.hflip}: a probability in [0, 1]")
        for name in ("window_width", "gamma"):
            value = getattr(self, name)
            if value is not None and (len(value) != 2 or not 0 < value[0] <= value[1]):
                raise ValueError(f"image_augment.{name}={value}: expected [low, high] with 0 < low <= high")
        if not 0.0 <= self.window_level < 0.5:
            raise ValueError(f"image_augment.window_level={self.window_level}: expected 0 <= level < 0.5")

    @property
    def intensity(self) -> bool:
        return self.window_width is not None or self.window_level > 0 or self.gamma is not None

    def __call__(self, image: Image.Image) -> Image.Image:
        if self.hflip and float(torch.rand(())) < self.hflip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if not self.intensity:
            return image
        width = _uniform(self.window_width) if self.window_width else 1.0
        centre = 0.5 + (2 * float(torch.rand(())) - 1) * self.window_level
        gamma = _uniform(self.gamma) if self.gamma else 1.0
        x = np.asarray(image, dtype=np.float32) / 255.0
        y = np.clip((x - centre) / width + 0.5, 0.0, 1.0) ** gamma
        return Image.fromarray((y * 255.0 + 0.5).astype(np.uint8), image.mode)


def _uniform(bounds: tuple[float, float]) -> float:
    low, high = bounds
    return low + (high - low) * float(torch.rand(()))


def split_settings(augment: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Any]]]:
    """``image_augment`` -> (open_clip's AugmentationCfg fields, ScanAugment's, by modality)."""
    augment = dict(augment)
    by_modality = {str(k): dict(v or {}) for k, v in (augment.pop(BY_MODALITY, None) or {}).items()}
    scan = {k: augment.pop(k) for k in MEDICAL_KEYS if k in augment}
    return augment, scan, by_modality


def _scan(settings: dict[str, Any]) -> ScanAugment:
    known = {f.name for f in fields(ScanAugment)}
    values = {k: (tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in settings.items() if k in known}
    return ScanAugment(**{k: v for k, v in values.items() if v is not None or k in ("window_width", "gamma")})


class ModalityAugment:
    """Callable as ``transform(image)`` or ``transform(image, modality=...)``: the scan
    augmentation for that modality, then open_clip's training transform (crop, jitter, tensor)."""

    takes_modality = True

    def __init__(self, augment: Mapping[str, Any], build_open_clip: Callable[[dict[str, Any]], Callable]):
        open_clip_cfg, scan, by_modality = split_settings(augment)
        self.base = (_scan(scan), build_open_clip(open_clip_cfg))
        self.by_modality = {}
        for modality, override in by_modality.items():
            unknown = set(override) - set(MEDICAL_KEYS) - set(open_clip_cfg) - {"scale", "ratio", "color_jitter",
                                                                                 "color_jitter_prob", "gray_scale_prob"}  # fmt: skip
            if unknown:
                raise ValueError(f"image_augment.by_modality.{modality}: unknown settings {sorted(unknown)}")
            own_open_clip = {**open_clip_cfg, **{k: v for k, v in override.items() if k not in MEDICAL_KEYS}}
            own_scan = {**scan, **{k: v for k, v in override.items() if k in MEDICAL_KEYS}}
            pixels = build_open_clip(own_open_clip) if own_open_clip != open_clip_cfg else self.base[1]
            self.by_modality[modality] = (_scan(own_scan), pixels)

    def __call__(self, image: Image.Image, modality: str | None = None) -> torch.Tensor:
        scan, pixels = self.by_modality.get(modality, self.base) if modality else self.base
        return pixels(scan(image))
