"""Weights in and out: the small vision checkpoint (ours and the original medcap layouts) that
holds only what learned, the strict loader every load goes through, and export to open_clip.

Vision checkpoint layout (``meta_model_{epoch}.pt``, and the original release ``last.pt``)::

    {"visual": <open_clip image-tower state dict>, "projector": <connector state dict>,
     "medcap": {"encoder", "connector", "num_image_tokens", "llm_dim", "epoch", "step", "config"},
     "llm_lora": {"rank", "alpha", "modules", "state"}}   # only when the LLM was adapted (LoRA)

The original's earliest files were flat (``visual.*`` / ``projector.*`` keys); both load.
"""

from __future__ import annotations

import glob
import logging
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medcap.errors import MedcapError
from medcap.io import atomic_write, atomic_write_json
from medcap.models.connectors import PER_PATCH, connector_spec
from medcap.models.lora import LORA_KEY, lora_payload

log = logging.getLogger("medcap")

MEDCAP_KEY = "medcap"
FORMAT_VERSION = 1


class CheckpointMismatchError(MedcapError, ValueError):
    """Keys or shapes of a checkpoint do not fit the model built for it."""


@dataclass
class VisionCheckpoint:
    path: Path
    visual: dict[str, torch.Tensor]
    projector: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] | None = None  # the LLM's LoRA spec and weights (medcap.models.lora), if adapted

    def resolve_connector(
        self, connector: str | None, num_image_tokens: int | None, llm_dim: int
    ) -> tuple[str, int]:
        """Connector kind and N implied by the projector's shapes (the file decides)."""
        saved = self.meta.get("connector", "cls_mlp")  # the original only had cls_mlp
        if connector is not None and connector != saved:
            raise CheckpointMismatchError(
                f"{self.path}: holds a {saved} connector, but connector={connector}"
            )
        _, width, out = connector_spec(self.projector)
        if width != llm_dim:
            raise CheckpointMismatchError(
                f"{self.path}: projector.0.weight is for an LLM of width {width}, "
                f"but the configured model has width {llm_dim}"
            )
        if saved in PER_PATCH:
            n = int(self.meta["num_image_tokens"])
        else:
            if out % width:
                raise CheckpointMismatchError(
                    f"{self.path}: projector.2.weight has {out} rows, not a multiple of width {width}"
                )
            n = out // width
        if num_image_tokens is not None and num_image_tokens != n:
            raise CheckpointMismatchError(
                f"{self.path}: connector produces {n} image tokens, but num_image_tokens={num_image_tokens}"
            )
        return saved, n


class CorruptCheckpointError(MedcapError, ValueError):
    """A checkpoint file that cannot be read at all."""


class UnsafeCheckpointError(MedcapError, ValueError):
    """A file that ``torch.load(weights_only=True)`` refuses: it would run code to load."""


def unpickling_reason(e: BaseException) -> str:
    """What the file holds that is not allowed: torch's "Unsupported global" line, without its
    advice on loading the file unsafely and without terminal colour codes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    for line in text.splitlines():
        if "Unsupported global" in line or "WeightsUnpickler error" in line:
            line = line.strip().removeprefix("WeightsUnpickler error:").strip()
            return line.split(" was not an allowed global")[0]
    return text.strip().splitlines()[-1] if text.strip() else type(e).__name__


def refuse_unsafe(path: str | Path, e: BaseException) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{path}: refused: it holds objects other than tensors and plain containers, which loading "
        f"would execute ({unpickling_reason(e)})"
    )


def safe_load(path: str | Path) -> Any:
    """``torch.load`` restricted to tensors and plain containers, with errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise refuse_unsafe(path, e) from e
    except (RuntimeError, zipfile.BadZipFile, EOFError) as e:
        raise CorruptCheckpointError(f"{path}: not a readable torch checkpoint (truncated or corrupt?): {e}") from e


def read_vision_checkpoint(path: str | Path) -> VisionCheckpoint:
    path = Path(path)
    obj = safe_load(path)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of state dicts, found {type(obj).__name__}")
    if isinstance(obj.get("visual"), dict) and isinstance(obj.get("projector"), dict):
        return VisionCheckpoint(path, obj["visual"], obj["projector"], dict(obj.get(MEDCAP_KEY) or {}), obj.get(LORA_KEY))
    visual = {k[len("visual.") :]: v for k, v in obj.items() if k.startswith("visual.")}
    projector = {k[len("projector.") :]: v for k, v in obj.items() if k.startswith("projector.")}
    if visual and projector:
        return VisionCheckpoint(path, visual, projector, dict(obj.get(MEDCAP_KEY) or {}))
    raise ValueError(
        f"{path}: expected 'visual' and 'projector' state dicts (or flat 'visual.*'/'projector.*' "
        f"keys); found keys {sorted(obj)[:8]}"
    )


def load_checked(module: nn.Module, state: dict[str, torch.Tensor], what: str, assign: bool = False) -> None:
    """Strict load that names every missing, unexpected or mis-shaped key and casts dtypes.
    ``assign`` keeps the given tensors (e.g. memory-mapped ones) instead of copying them."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or misshaped:
        lines = [f"{what} does not fit the model:"]
        lines += [f"  missing key: {k}" for k in missing[:10]]
        lines += [f"  unexpected key: {k}" for k in unexpected[:10]]
        lines += [f"  shape mismatch {m}" for m in misshaped[:10]]
        more = len(missing) + len(unexpected) + len(misshaped) - (len(lines) - 1)
        if more > 0:
            lines.append(f"  ... and {more} more")
        raise CheckpointMismatchError("\n".join(lines))
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True, assign=assign)


def load_vision_state(model: nn.Module, ckpt: VisionCheckpoint) -> None:
    load_checked(model.visual.tower, ckpt.visual, f"{ckpt.path} ['visual']")
    load_checked(model.projector, ckpt.projector, f"{ckpt.path} ['projector']")


def load_vision_checkpoint(model: nn.Module, path: str | Path) -> VisionCheckpoint:
    """Load a vision checkpoint into an already built model (its N must match), and its LLM
    LoRA weights when it has them (the model must carry adapters of the same shape then)."""
    from medcap.models.lora import load_lora_state, lora_spec_of

    ckpt = read_vision_checkpoint(path)
    ckpt.resolve_connector(None, model.num_image_tokens, model.llm_dim)
    adapted = lora_spec_of(model.decoder) is not None
    if adapted != (ckpt.lora is not None):
        held = "holds LLM LoRA weights" if ckpt.lora is not None else "holds no LLM LoRA weights"
        raise CheckpointMismatchError(f"{path}: {held}, unlike the model loaded before it; evaluate it on its own")
    load_vision_state(model, ckpt)
    if ckpt.lora is not None:
        load_lora_state(model.decoder, ckpt.lora["state"], f"{path} ['{LORA_KEY}']")
    return ckpt


def atomic_save(obj: Any, path: str | Path) -> Path:
    """``torch.save`` through a temporary name: a crash never leaves a corrupt checkpoint."""
    return atomic_write(path, lambda f: torch.save(obj, f), what="checkpoint")


def vision_checkpoint_payload(
    model: nn.Module,
    *,
    epoch: int | None = None,
    step: int | None = None,
    config: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
    states: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None,
) -> dict[str, Any]:
    """Only the trainable side, on the CPU, in the original layout plus a ``medcap`` entry, and
    an ``llm_lora`` entry when the LLM carries LoRA adapters (the base LLM file never changes).
    ``states`` gives (visual, projector) state dicts already gathered (FSDP2 runs)."""

    def cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", dtype or v.dtype).clone() for k, v in state.items()}

    visual, projector = states or (model.visual.tower.state_dict(), model.projector.state_dict())
    lora = lora_payload(model.decoder)
    payload = {
        "visual": cpu(visual),
        "projector": cpu(projector),
        MEDCAP_KEY: {
            "format_version": FORMAT_VERSION,
            "encoder": model.visual.name,
            "connector": model.projector.kind,
            "num_image_tokens": model.num_image_tokens,
            "llm_dim": model.llm_dim,
            "image_token_id": model.image_token_id,
            "vision_init": getattr(model.visual, "weights", None),  # what training started from
            "epoch": epoch,
            "step": step,
            "config": config or {},
        },
    }
    if lora is not None:
        payload[LORA_KEY] = lora
    return payload


def save_vision_checkpoint(model: nn.Module, path: str | Path, **meta: Any) -> Path:
    return atomic_save(vision_checkpoint_payload(model, **meta), path)


# A one-layer text tower so that ``open_clip.create_model('local-dir:...')`` can build the
# exported folder offline. It is a placeholder: only ``encode_image`` is meaningful.
PLACEHOLDER_TEXT_CFG = {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1}


def export_open_clip_dir(encoder: nn.Module, output_dir: str | Path) -> Path:
    """Write ``encoder`` as an open_clip ``local-dir`` folder (config + safetensors weights)."""
    import open_clip
    from safetensors.torch import save

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model_cfg = {k: v for k, v in encoder.model_cfg.items() if k != "text_cfg"}
    model_cfg["text_cfg"] = dict(PLACEHOLDER_TEXT_CFG)
    clip = open_clip.CLIP(**model_cfg)
    load_checked(clip.visual, encoder.tower.state_dict(), "exported image tower")
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": encoder.preprocess.to_open_clip(),
        "medcap": {"encoder": encoder.name, "note": "text tower is a random placeholder; use encode_image"},
    }
    state = {k: v.detach().contiguous().clone() for k, v in clip.state_dict().items()}
    atomic_write(output_dir / "open_clip_model.safetensors", lambda f: f.write(save(state)))
    atomic_write_json(output_dir / "open_clip_config.json", config, indent=2)
    return output_dir


def write_meta_llm_checkpoint(
    tune_state: dict[str, torch.Tensor], params: dict[str, Any], folder: str | Path
) -> Path:
    """A torchtune-format LLM state dict written in Meta's layout (``consolidated.00.pth`` +
    ``params.json``), which ``FullModelMetaCheckpointer`` reads back (tests, demos, conversions)."""
    from torchtune.models.convert_weights import tune_to_meta

    folder = Path(folder)
    atomic_save(tune_to_meta(dict(tune_state)), folder / "consolidated.00.pth")
    atomic_write_json(folder / "params.json", params, indent=2)
    return folder


def _natural(path: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path)]


def expand_checkpoints(spec: Any) -> list[Path | None]:
    """Vision checkpoints named by a setting: a file, a glob (``meta_model_*.pt``: every match,
    in epoch order) or a list of them; None is the untrained encoder."""
    if spec is None:
        return [None]
    specs = list(spec) if isinstance(spec, (list, tuple)) or type(spec).__name__ == "ListConfig" else [spec]
    paths: list[Path] = []
    for s in specs:
        s = str(s)
        if any(ch in s for ch in "*?["):
            matches = glob.glob(s)
            if not matches:
                raise FileNotFoundError(f"vision_checkpoint={s}: no file matches")
            paths += [Path(p) for p in sorted(matches, key=_natural)]
        else:
            paths.append(Path(s))
    return paths


def epoch_checkpoints(folder: str | Path) -> list[Path]:
    """A training run's ``meta_model_{epoch}.pt`` files in ``folder``, in epoch order (none: [])."""
    return sorted(Path(folder).glob("meta_model_*.pt"), key=lambda p: int(p.stem.split("_")[-1]))


def latest_checkpoint(spec: Any) -> Path | None:
    """One vision checkpoint: a file, or a glob's last match (the latest epoch); a list of more
    than one is an error (serving and single-image answers take one model)."""
    if isinstance(spec, (list, tuple)) or type(spec).__name__ == "ListConfig":
        if len(spec) != 1:
            raise ValueError(f"vision_checkpoint: one checkpoint is needed (a file or a glob), not a list of {len(spec)}")
    found = expand_checkpoints(spec)
    if len(found) > 1:
        log.info("vision_checkpoint=%s matches %d files: taking the last, %s", spec, len(found), found[-1])
    ckpt = found[-1]
    if ckpt is not None and not ckpt.is_file():
        raise FileNotFoundError(f"vision_checkpoint={ckpt}: file not found")
    return ckpt


def llm_checkpoint_files(checkpoint_dir: str | Path, checkpoint_files: Any = None) -> tuple[Path, list[str]]:
    """The LLM checkpoint's folder and the file names to read, by one rule for every loader:
    ``checkpoint_files`` as given where the folder holds them all, else the folder's own
    (``*.safetensors`` beside a ``config.json``, or Meta's ``params.json`` + ``consolidated.00.pth``).
    A model-parallel Meta release (several ``consolidated.NN.pth``) and a folder of neither
    layout are refused in one line."""
    folder = Path(str(checkpoint_dir))
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpointer.checkpoint_dir={folder}: folder not found")
    # a list of names; torchtune's dict form (filename_format, max_filename) or one string: the folder's own
    given = [] if isinstance(checkpoint_files, (str, dict)) or hasattr(checkpoint_files, "keys") else [
        str(f) for f in checkpoint_files or []
    ]
    if given and all((folder / f).is_file() for f in given):
        return folder, given
    shards = sorted(folder.glob("*.safetensors"))
    if (folder / "config.json").is_file() and shards:
        return folder, [p.name for p in shards]
    if (folder / "params.json").is_file() and (folder / "consolidated.00.pth").is_file():
        if len(list(folder.glob("consolidated.*.pth"))) > 1:
            raise ValueError(
                f"{folder}: holds several consolidated.NN.pth shards (a model-parallel release); medcap's "
                "recipes load one file: use the Hugging Face download of the model"
            )
        return folder, ["consolidated.00.pth"]
    held = sorted(p.name for p in folder.iterdir())[:12]
    raise FileNotFoundError(
        f"checkpointer.checkpoint_dir={folder}: found neither Meta's layout (params.json + "
        f"consolidated.00.pth) nor Hugging Face's (config.json + *.safetensors); it holds {held}"
    )

