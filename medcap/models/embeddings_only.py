"""The frozen LLM when another engine runs it (``engine=vllm``): medcap needs only its token
embedding table (``MedcapModel.embed`` writes the image tokens into the prompt's embeddings), so
only that one tensor is read from the checkpoint; the decoder layers and the head are never
materialised. Hugging Face folders: ``safetensors.safe_open`` reads the one tensor from the shard
that holds it; Meta's ``consolidated.00.pth`` (and ``.bin`` / ``.pt`` files): ``torch.load`` with
``mmap=True`` touches only that tensor's pages.

``TokenEmbeddingsOnly`` stands where the ``TransformerDecoder`` would: its ``tok_embeddings`` (which
``MedcapModel`` takes), ``max_seq_len`` and ``num_layers`` of the configured model (built on the meta
device, so it costs no memory), no layers; running it is an error that says why.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torchtune import config
from torchtune.training import set_default_dtype

from medcap.models.checkpoints import llm_checkpoint_files, load_checked

# where the table lies in each layout (torchtune's name first; HF's, possibly under a prefix)
TUNE_KEY = "tok_embeddings.weight"
HF_SUFFIX = "embed_tokens.weight"


class TokenEmbeddingsOnly(nn.Module):
    """The LLM's token embedding table, standing where its decoder would."""

    def __init__(self, tok_embeddings: nn.Embedding, *, max_seq_len: int, num_layers: int):
        super().__init__()
        self.tok_embeddings = tok_embeddings
        self.max_seq_len = int(max_seq_len)
        self.num_layers = int(num_layers)  # the served LLM's; none of them is here
        self.layers = nn.ModuleList()

    def _elsewhere(self, *_: Any, **__: Any) -> Any:
        raise RuntimeError(
            "only the LLM's token embedding table is loaded here (engine=vllm: vLLM runs the LLM); "
            "its layers cannot run in this process"
        )

    forward = setup_caches = reset_caches = _elsewhere

    def caches_are_enabled(self) -> bool:
        return False

    def caches_are_setup(self) -> bool:
        return False


def _embedding_key(keys: list[str]) -> str | None:
    if TUNE_KEY in keys:
        return TUNE_KEY
    found = sorted((k for k in keys if k.endswith(HF_SUFFIX)), key=len)  # model.embed_tokens.weight first
    return found[0] if found else None


def _from_safetensors(files: list[Path]) -> tuple[torch.Tensor, str] | None:
    from safetensors import safe_open

    index = files[0].parent / "model.safetensors.index.json"
    if index.is_file() and len(files) > 1:  # the index names the shard: one header read, not all
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
        except ValueError:
            weight_map = {}
        key = _embedding_key(list(weight_map))
        if key is not None and (files[0].parent / weight_map[key]) in files:
            files = [files[0].parent / weight_map[key]]
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            key = _embedding_key(list(f.keys()))
            if key is not None:
                return f.get_tensor(key), f"{path} ['{key}']"
    return None


def _from_torch_file(files: list[Path]) -> tuple[torch.Tensor, str] | None:
    for path in files:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):  # {"model": state dict}
            state = state["model"]
        key = _embedding_key(list(state)) if isinstance(state, dict) else None
        if key is not None:
            table = state[key].clone()  # own memory: the file's mapping goes with ``state``
            del state
            return table, f"{path} ['{key}']"
        del state
    return None


def read_token_embeddings(checkpointer: DictConfig | dict) -> tuple[torch.Tensor, str]:
    """The LLM's token embedding table ``[vocab, hidden]`` and where it came from, read alone."""
    folder, names = llm_checkpoint_files(checkpointer["checkpoint_dir"], checkpointer.get("checkpoint_files"))
    files = [folder / name for name in names]
    safetensors = [f for f in files if f.suffix == ".safetensors"]
    found = _from_safetensors(safetensors) if safetensors else _from_torch_file(files)
    if found is None:
        names = ", ".join(f.name for f in files)
        raise KeyError(f"LLM checkpoint in {folder} ({names}): no token embedding table "
                       f"('{TUNE_KEY}' or '*.{HF_SUFFIX}') in it")  # fmt: skip
    return found


def build_token_embeddings(
    cfg_model: DictConfig, checkpointer: DictConfig | dict, dtype: torch.dtype
) -> TokenEmbeddingsOnly:
    """``cfg.model`` built on the meta device (its shapes and context only, no memory), then the
    checkpoint's token embedding table alone, in ``dtype``, checked against the model's shape."""
    with set_default_dtype(dtype), torch.device("meta"):
        shape = config.instantiate(cfg_model)
    table, what = read_token_embeddings(checkpointer)
    embedding = shape.tok_embeddings
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(f"model: its tok_embeddings is a {type(embedding).__name__}, not an nn.Embedding")
    load_checked(embedding, {"weight": table}, f"LLM token embeddings {what}", assign=True)
    layers = getattr(shape, "layers", ())
    return TokenEmbeddingsOnly(embedding, max_seq_len=int(shape.max_seq_len), num_layers=len(layers))
