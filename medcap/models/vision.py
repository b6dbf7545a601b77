"""Image encoders by name, each carrying its own preprocessing.

Architectures are data (open_clip ``model_cfg`` JSON), built through open_clip's own vision-tower
builder so that a medcap encoder and an open_clip model built from the same files are the same
network. Only the image tower is ever built: BiomedCLIP's text tower needs a BERT from the hub.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import open_clip
import torch
from open_clip.factory import load_state_dict as _open_clip_load_state_dict
from open_clip.model import _build_vision_tower
from open_clip.timm_model import TimmModel
from open_clip.transform import AugmentationCfg, PreprocessCfg, image_transform_v2, merge_preprocess_dict
from open_clip.transformer import VisionTransformer
from torch import nn

from medcap.errors import MedcapError

ARCH_DIR = Path(__file__).parent / "arch"
OPEN_CLIP_CONFIG = "open_clip_config.json"
# open_clip's own preference order for the weights file of a local-dir folder.
WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
)


def list_encoders() -> list[str]:
    """Names shipped with medcap; any open_clip model name works too."""
    return sorted(p.stem for p in ARCH_DIR.glob("*.json"))


@dataclass
class Preprocess(PreprocessCfg):
    """open_clip's ``PreprocessCfg`` (how pixels must look before the encoder sees them), plus
    the transforms built from it. medcap's encoders take square inputs."""

    @classmethod
    def from_open_clip(cls, cfg: dict[str, Any]) -> Preprocess:
        merged = merge_preprocess_dict(PreprocessCfg(), cfg)
        size = merged["size"]
        if isinstance(size, (list, tuple)):
            if len(set(size)) != 1:
                raise ValueError(f"only square encoder inputs are supported, got size={size}")
            merged["size"] = size[0]
        merged.update(size=int(merged["size"]), mean=tuple(merged["mean"]), std=tuple(merged["std"]))
        return cls(**merged)

    def transform(self, augment: dict[str, Any] | None = None) -> Callable:
        """PIL image -> normalised [3, size, size] tensor (resize shortest side, centre crop).
        ``augment``: training augmentation, open_clip's (``AugmentationCfg`` fields: ``scale`` of
        the random resized crop, ``color_jitter`` + ``color_jitter_prob``, ...) and the scan
        settings of ``medcap.data.augment`` (left-right flips, off unless asked for, window and
        gamma jitter, settings by modality)."""
        if augment:
            from medcap.data.augment import ModalityAugment

            return ModalityAugment(augment, self._train_transform)
        return image_transform_v2(self, is_train=False)

    def _train_transform(self, augment: dict[str, Any]) -> Callable:
        with warnings.catch_warnings():  # open_clip warns about the colour items it does use
            warnings.filterwarnings("ignore", message="Unused augmentation cfg items")
            return image_transform_v2(self, is_train=True, aug_cfg=AugmentationCfg(**dict(augment)))

    def to_open_clip(self) -> dict[str, Any]:
        """The ``preprocess_cfg`` entry of an open_clip config."""
        cfg = asdict(self)
        return {**cfg, "mean": list(cfg["mean"]), "std": list(cfg["std"])}


class VisionFeatures(NamedTuple):
    pooled: torch.Tensor  # [B, pooled_dim]: the tower's image embedding (not L2-normalised)
    patches: torch.Tensor  # [B, num_patches, patch_dim]: final-layer patch tokens


class VisionEncoder(nn.Module):
    """An open_clip image tower plus the facts the data pipeline and connectors ask for.

    ``self.tower`` is exactly open_clip's module, so its state dict has open_clip's key names
    (``trunk.*``/``head.proj.weight`` for timm towers), which is the original medcap layout.
    """

    def __init__(self, name: str, tower: nn.Module, model_cfg: dict[str, Any], preprocess: Preprocess):
        super().__init__()
        if not isinstance(tower, (TimmModel, VisionTransformer)):
            raise TypeError(f"encoder {name!r}: unsupported open_clip tower {type(tower).__name__}")
        self.name = name
        self.weights = "random initialisation"  # where the tower's values came from (for logs and checkpoints)
        self.tower = tower
        self.model_cfg = model_cfg
        self.preprocess = preprocess
        self.pooled_dim = int(model_cfg["embed_dim"])
        if isinstance(tower, TimmModel):
            self.patch_dim = int(tower.trunk.num_features)
            self.num_patches = int(tower.trunk.patch_embed.num_patches)
        else:
            tower.output_tokens = True
            self.patch_dim = int(tower.conv1.out_channels)
            gh, gw = tower.grid_size
            self.num_patches = int(gh * gw)

    def forward(self, images: torch.Tensor) -> VisionFeatures:
        if isinstance(self.tower, TimmModel):
            trunk = self.tower.trunk
            tokens = trunk.forward_features(images)
            pooled = self.tower.head(trunk.forward_head(tokens))
            return VisionFeatures(pooled, tokens[:, trunk.num_prefix_tokens :])
        pooled, patches = self.tower(images)
        return VisionFeatures(pooled, patches)


def _read_open_clip_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: vision_path must be an open_clip folder (open_clip_config.json and "
            "weights), e.g. a local copy of BiomedCLIP's repository"
        )
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if "model_cfg" not in cfg or "vision_cfg" not in cfg["model_cfg"]:
        raise ValueError(f"{path}: expected an open_clip config with model_cfg.vision_cfg")
    return cfg


def _resolve_config(name: str, vision_path: str | Path | None) -> dict[str, Any]:
    if vision_path is not None:
        return _read_open_clip_config(Path(vision_path) / OPEN_CLIP_CONFIG)
    shipped = ARCH_DIR / f"{name}.json"
    if shipped.exists():
        return _read_open_clip_config(shipped)
    model_cfg = open_clip.get_model_config(name)
    if model_cfg is None:
        raise ValueError(
            f"unknown vision encoder {name!r}: medcap ships {list_encoders()}, "
            "and any open_clip model name (open_clip.list_models()) works"
        )
    return {"model_cfg": model_cfg, "preprocess_cfg": model_cfg.get("preprocess_cfg", {})}


def find_weights_file(folder: str | Path) -> Path:
    folder = Path(folder)
    for fname in WEIGHT_FILES:
        if (folder / fname).exists():
            return folder / fname
    raise FileNotFoundError(f"{folder}: no encoder weights found (looked for {', '.join(WEIGHT_FILES)})")


def _visual_state_dict(weights: Path) -> dict[str, torch.Tensor]:
    """The image-tower part of an open_clip checkpoint, prefix removed."""
    state = _open_clip_load_state_dict(str(weights), weights_only=True)
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    if not visual:
        raise ValueError(f"{weights}: no 'visual.*' tensors: not an open_clip CLIP checkpoint")
    return visual


def _preprocess(cfg: dict[str, Any]) -> Preprocess:
    size = cfg["model_cfg"]["vision_cfg"].get("image_size", 224)
    return Preprocess.from_open_clip({"size": size, **cfg.get("preprocess_cfg", {})})


def encoder_preprocess(name: str = "biomedclip", vision_path: str | Path | None = None) -> Preprocess:
    """An encoder's preprocessing without building the encoder (its config alone)."""
    return _preprocess(_resolve_config(name, vision_path))


class PretrainedWeightsUnavailable(MedcapError, FileNotFoundError):
    """Pretrained weights asked for are neither in the local hub cache nor downloadable."""


def hub_repo(name: str) -> tuple[str, str] | None:
    """(repository, weights file) on the Hugging Face hub that an encoder's pretrained weights
    come from (the shipped JSON's ``hf_hub`` entry), or None: random initialisation only."""
    shipped = ARCH_DIR / f"{name}.json"
    entry = json.loads(shipped.read_text()).get("hf_hub") if shipped.is_file() else None
    return (entry["repo"], entry["weights"]) if entry else None


def hub_snapshot(repo: str, weights: str) -> Path:
    """The cached snapshot folder holding the repository's open_clip config and weights. The
    local cache comes first (no network is touched when both files are there, and with
    ``HF_HUB_OFFLINE=1`` never); otherwise huggingface_hub downloads them where it may."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.constants import HF_HUB_CACHE

    paths = []
    for fname in (OPEN_CLIP_CONFIG, weights):
        cached = try_to_load_from_cache(repo, fname)
        if isinstance(cached, str):
            paths.append(Path(cached))
            continue
        try:
            paths.append(Path(hf_hub_download(repo, fname)))
        except Exception as e:  # offline, no network, gated, not found: one clear message
            raise PretrainedWeightsUnavailable(
                f"pretrained weights {repo}/{fname} are not in the Hugging Face cache ({HF_HUB_CACHE}) and could "
                f"not be downloaded ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}). Download them "
                f"once on a machine with internet access (`hf download {repo} {OPEN_CLIP_CONFIG} {weights}`, then "
                "copy the cache, or set HF_HOME), or pass vision_path=FOLDER (a copy of the repository), or "
                "vision_pretrained=False for random weights"
            ) from None
    if paths[0].parent != paths[1].parent:
        raise PretrainedWeightsUnavailable(f"{repo}: config and weights come from different snapshots {paths}")
    return paths[0].parent


def build_vision_encoder(
    name: str = "biomedclip", vision_path: str | Path | None = None, pretrained: bool = False, weights: bool = True
) -> VisionEncoder:
    """Build encoder ``name``: from a local open_clip folder with weights (``vision_path``), from
    its pretrained weights on the Hugging Face hub (``pretrained``, where the encoder has some:
    BiomedCLIP's image tower, as the original medcap loaded it), or with random weights.

    A folder (given, or the hub's cached snapshot) is an open_clip repository: its
    ``open_clip_config.json`` decides the architecture, its weights file the values; only the
    image tower is built. ``encoder.weights`` says where the values came from. ``weights=False``
    reads the architecture only (``vision_path``'s config; no weights file is opened).
    """
    source = "random initialisation"
    if vision_path is None and pretrained and weights and (hub := hub_repo(name)) is not None:
        vision_path = hub_snapshot(*hub)
        source = f"pretrained {hub[0]} (revision {vision_path.name}, from the Hugging Face cache {vision_path})"
    elif vision_path is not None:
        source = f"the open_clip folder {vision_path}"
    cfg = _resolve_config(name, vision_path)
    model_cfg = cfg["model_cfg"]
    tower = _build_vision_tower(
        model_cfg["embed_dim"], model_cfg["vision_cfg"], quick_gelu=model_cfg.get("quick_gelu", False)
    )
    encoder = VisionEncoder(name, tower, model_cfg, _preprocess(cfg))
    if vision_path is not None and weights:
        file = find_weights_file(vision_path)
        missing, unexpected = tower.load_state_dict(_visual_state_dict(file), strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{file}: image tower does not match {Path(vision_path) / OPEN_CLIP_CONFIG}; "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    encoder.weights = source
    return encoder
