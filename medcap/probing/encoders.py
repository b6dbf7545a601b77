"""Which encoders a probe compares, from every source users have, and how each is built.

An entry is a medcap vision checkpoint (a file or a glob: one encoder per file, named by its
stem), an exported open_clip folder, an encoder name (``build_vision_encoder(name)``), random
initialisation of an architecture, or the pixel baseline. Random initialisation of every
architecture in the list and the pixel baseline are always added, so "better" has a floor.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medcap.models import vision as vision_module
from medcap.models.checkpoints import expand_checkpoints, load_checked, read_vision_checkpoint, safe_load
from medcap.models.vision import (
    ARCH_DIR,
    OPEN_CLIP_CONFIG,
    VisionEncoder,
    build_vision_encoder,
    find_weights_file,
    hub_repo,
    hub_snapshot,
)

FEATURES_VERSION = 1  # bump when extraction changes, so cached features are recomputed
KINDS = ("checkpoint", "open_clip", "random", "pixels")


@dataclass(frozen=True)
class EncoderSpec:
    name: str  # what reports call it
    kind: str  # one of KINDS
    vision: str | None = None  # architecture (encoder name); None for pixels
    path: Path | None = None  # checkpoint file or open_clip folder
    pixel_size: int = 16  # pixels only


def checkpoint_encoder(path: Path, default: str) -> str:
    """The architecture a checkpoint was trained with (its ``medcap.encoder``), read lazily."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - not mmap-able (old format): read it whole, errors named
        obj = safe_load(path)
    meta = obj.get("medcap") if isinstance(obj, dict) else None
    return str((meta or {}).get("encoder") or default)


def folder_encoder(folder: Path, default: str) -> str:
    """The architecture of an exported folder (medcap writes its name into the config)."""
    try:
        cfg = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    except (OSError, json.JSONDecodeError):
        return default
    return str((cfg.get("medcap") or {}).get("encoder") or default)


def parse_entry(entry: Any, vision: str = "biomedclip", pixel_size: int = 16) -> list[EncoderSpec]:
    """A string (checkpoint file or glob, open_clip folder, 'pixels', 'random:NAME' or an encoder
    name) or a dict (``vision``, ``vision_path``, ``vision_checkpoint``, ``random``, ``name``)."""
    if isinstance(entry, EncoderSpec):
        return [entry]
    if isinstance(entry, (str, Path)):
        text = str(entry)
        if text == "pixels":
            return [EncoderSpec(f"pixels_{pixel_size}", "pixels", pixel_size=pixel_size)]
        if text == "random" or text.startswith("random:"):
            arch = text.partition(":")[2] or vision
            return [EncoderSpec(f"random_{arch}", "random", arch)]
        if Path(text).is_dir():
            return [EncoderSpec(Path(text).name, "open_clip", folder_encoder(Path(text), vision), Path(text))]
        if (
            any(ch in text for ch in "*?[")
            or Path(text).suffix in (".pt", ".pth", ".bin")
            or Path(text).is_file()
        ):
            return parse_entry({"vision_checkpoint": text, "vision": vision}, vision, pixel_size)
        return [EncoderSpec(text, "open_clip", text)]
    entry = dict(entry)
    unknown = set(entry) - {"name", "vision", "vision_path", "vision_checkpoint", "random", "pixels"}
    if unknown:
        raise ValueError(f"encoder entry {entry}: unknown keys {sorted(unknown)}")
    arch = str(entry.get("vision") or vision)
    if entry.get("pixels"):
        return [EncoderSpec(entry.get("name") or f"pixels_{pixel_size}", "pixels", pixel_size=pixel_size)]
    if entry.get("random"):
        return [EncoderSpec(entry.get("name") or f"random_{arch}", "random", arch)]
    if entry.get("vision_checkpoint"):
        files = expand_checkpoints(str(entry["vision_checkpoint"]))
        specs = []
        for f in files:
            name = entry.get("name") if len(files) == 1 and entry.get("name") else f.stem
            specs.append(EncoderSpec(name, "checkpoint", checkpoint_encoder(f, arch), f))
        return specs
    if entry.get("vision_path"):
        folder = Path(entry["vision_path"])
        return [
            EncoderSpec(entry.get("name") or folder.name, "open_clip", folder_encoder(folder, arch), folder)
        ]
    return [EncoderSpec(entry.get("name") or arch, "open_clip", arch)]


def encoder_specs(
    entries: Iterable[Any], vision: str = "biomedclip", pixel_size: int = 16
) -> list[EncoderSpec]:
    """Every entry expanded, plus random initialisation of each architecture and the pixel
    baseline; names made unique (two ``meta_model_0`` of different runs get their folder)."""
    specs = [s for e in entries for s in parse_entry(e, vision, pixel_size)]
    archs = list(dict.fromkeys(s.vision for s in specs if s.kind != "pixels")) or [vision]
    for arch in archs:
        if not any(s.kind == "random" and s.vision == arch for s in specs):
            specs.append(EncoderSpec(f"random_{arch}", "random", arch))
    if not any(s.kind == "pixels" for s in specs):
        specs.append(EncoderSpec(f"pixels_{pixel_size}", "pixels", pixel_size=pixel_size))
    seen: dict[str, int] = {}
    out = []
    for s in specs:
        if s.name in seen and s.path is not None:
            s = EncoderSpec(f"{s.path.parent.name}/{s.name}", s.kind, s.vision, s.path, s.pixel_size)
        seen[s.name] = seen.get(s.name, 0) + 1
        if seen[s.name] > 1:
            s = EncoderSpec(f"{s.name}#{seen[s.name]}", s.kind, s.vision, s.path, s.pixel_size)
        out.append(s)
    return out


def load_encoder(spec: EncoderSpec, seed: int = 0) -> VisionEncoder:
    """Build the encoder a spec names (random ones seeded, without touching the global RNG)."""
    if spec.kind == "checkpoint":
        ckpt = read_vision_checkpoint(spec.path)
        encoder = build_vision_encoder(spec.vision)
        load_checked(encoder.tower, ckpt.visual, f"{spec.path} ['visual']")
        return encoder
    if spec.kind == "open_clip":  # a folder, or a name: its pretrained weights where it has some
        return build_vision_encoder(spec.vision, spec.path, pretrained=True)
    if spec.kind == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return build_vision_encoder(spec.vision)
    raise ValueError(f"encoder {spec.name}: kind {spec.kind!r} has no network")


def file_digest(path: Path, h: Any = None) -> Any:
    h = h or hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h


def encoder_key(spec: EncoderSpec, seed: int, dtype: str, features: str = "pooled") -> str:
    """What the features depend on: weights by content (a rewritten checkpoint gets a new key),
    the architecture file, medcap's builder and library versions for seeded random weights, and
    which features (pooled keys are as before patch features existed, so old caches stay valid)."""
    import open_clip

    h = hashlib.sha256(f"v{FEATURES_VERSION}|{spec.kind}|{spec.vision}|{dtype}|{spec.pixel_size}".encode())
    if features != "pooled":
        h.update(f"|features={features}".encode())
    if spec.kind == "pixels":
        return h.hexdigest()
    arch = ARCH_DIR / f"{spec.vision}.json"
    if arch.is_file():
        file_digest(arch, h)
    if spec.kind == "checkpoint":
        file_digest(spec.path, h)
    elif spec.kind == "open_clip" and (spec.path is not None or hub_repo(spec.vision)):
        folder = spec.path if spec.path is not None else hub_snapshot(*hub_repo(spec.vision))
        file_digest(folder / OPEN_CLIP_CONFIG, h)
        file_digest(find_weights_file(folder), h)
    else:  # weights made by code (random init, or whatever build_vision_encoder(name) loads)
        file_digest(Path(vision_module.__file__), h)
        h.update(f"|{seed}|{torch.__version__}|{open_clip.__version__}".encode())
    return h.hexdigest()
