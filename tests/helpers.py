"""What the tests share besides fixtures: tiny models written to disk in the real formats with
random weights, drawn images, the SmolLM2 converter, and a hub cache holding BiomedCLIP's layout.

Nothing here downloads: the LLM checkpoints are written by transformers / torch in the layouts
Meta and Hugging Face publish (``consolidated.00.pth`` + ``params.json``; ``model.safetensors``
+ ``config.json``), and the reference model is transformers' ``LlamaForCausalLM``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TinyLlama:
    """Dimensions shared by the reference (transformers) and the torchtune decoder."""

    vocab_size: int = 512
    dim: int = 64
    ffn: int = 160
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    max_seq_len: int = 256
    rope_base: float = 500000.0
    norm_eps: float = 1e-5
    tied: bool = False

    def hf_config(self):
        from transformers import LlamaConfig

        rope = {"rope_type": "default", "rope_theta": self.rope_base}
        if self.tied:  # Llama 3.2 shape: tied embeddings and llama3-scaled RoPE
            rope = {
                "rope_type": "llama3",
                "rope_theta": self.rope_base,
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            }
        return LlamaConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.dim,
            intermediate_size=self.ffn,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            max_position_embeddings=self.max_seq_len,
            rms_norm_eps=self.norm_eps,
            rope_parameters=rope,
            tie_word_embeddings=self.tied,
            attention_bias=False,
            mlp_bias=False,
        )

    def torchtune_decoder(self):
        if self.tied:
            from torchtune.models.llama3_2._component_builders import llama3_2 as builder
        else:
            from torchtune.models.llama3 import llama3 as builder
        return builder(
            vocab_size=self.vocab_size,
            num_layers=self.layers,
            num_heads=self.heads,
            num_kv_heads=self.kv_heads,
            embed_dim=self.dim,
            max_seq_len=self.max_seq_len,
            intermediate_dim=self.ffn,
            norm_eps=self.norm_eps,
            rope_base=self.rope_base,
        )

    def overrides(self) -> list[str]:
        """The same decoder as config overrides on ``torchtune.models.llama3.llama3``."""
        return [
            "model._component_=torchtune.models.llama3.llama3",
            f"model.vocab_size={self.vocab_size}",
            f"model.num_layers={self.layers}",
            f"model.num_heads={self.heads}",
            f"model.num_kv_heads={self.kv_heads}",
            f"model.embed_dim={self.dim}",
            f"model.max_seq_len={self.max_seq_len}",
            f"model.intermediate_dim={self.ffn}",
            f"model.norm_eps={self.norm_eps}",
            f"model.rope_base={self.rope_base}",
        ]


def make_hf_llama(spec: TinyLlama, seed: int = 0, steerable: bool = False):
    """Random weights (transformers' init, std 0.02). ``steerable`` scales the value, attention
    output and LM-head projections up: at that init a random decoder barely reads its context and
    its logits are nearly flat, so no image tokens could steer it."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(spec.hf_config()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:  # init leaves RMSNorm weights at 1: perturb so a dropped norm shows
                p.add_(torch.randn_like(p) * 0.1)
            if steerable and ("v_proj" in name or "o_proj" in name):
                p.mul_(12.0)
            if steerable and name == "lm_head.weight":
                p.mul_(16.0)
    return model


def write_hf_checkpoint(model, folder: Path) -> Path:
    """``save_pretrained``: the Hugging Face layout (safetensors + config.json)."""
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_meta_checkpoint(model, spec: TinyLlama, folder: Path) -> Path:
    """Meta's layout: ``consolidated.00.pth`` (Meta key names, unpermuted q/k) + ``params.json``."""
    from torchtune.models.convert_weights import hf_to_tune

    from medcap.models.checkpoints import write_meta_llm_checkpoint

    hf_state = {k: v.clone() for k, v in model.state_dict().items()}
    tune = hf_to_tune(hf_state, num_heads=spec.heads, num_kv_heads=spec.kv_heads, dim=spec.dim)
    params = {
        "dim": spec.dim,
        "n_layers": spec.layers,
        "n_heads": spec.heads,
        "n_kv_heads": spec.kv_heads,
        "vocab_size": spec.vocab_size,
        "norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_base,
    }
    return write_meta_llm_checkpoint(tune, params, folder)


def load_tiny_decoder(spec: TinyLlama, folder: Path, fmt: str, output_dir: Path):
    """The decoder through torchtune's own checkpointers, as a recipe loads it."""
    from torchtune.training import FullModelHFCheckpointer, FullModelMetaCheckpointer

    from medcap.models.assembly import load_llm_weights

    if fmt == "meta":
        ckpt = FullModelMetaCheckpointer(
            checkpoint_dir=str(folder),
            checkpoint_files=["consolidated.00.pth"],
            model_type="LLAMA3",
            output_dir=str(output_dir),
        )
    else:
        ckpt = FullModelHFCheckpointer(
            checkpoint_dir=str(folder),
            checkpoint_files=["model.safetensors"],
            model_type="LLAMA3_2" if spec.tied else "LLAMA3",
            output_dir=str(output_dir),
        )
    decoder = spec.torchtune_decoder()
    load_llm_weights(decoder, ckpt)
    return decoder.eval()


def draw_jpeg(path: Path, size: int = 64, seed: int = 0) -> Path:
    """A drawn test image (JPEG), e.g. standing in for a SLAKE source.jpg."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, quality=90)
    return path


ROOT = Path(__file__).resolve().parents[1]


def smollm2_tool():
    """tools/convert_smollm2_gguf.py as a module (tools/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("convert_smollm2_gguf", ROOT / "tools" / "convert_smollm2_gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BIOMEDCLIP_REPO = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


def write_hub_biomedclip(cache_dir: Path, revision: str = "9f341de24bfb00180f1b847274256e9b65a3a32e") -> dict:
    """A Hugging Face hub cache holding BiomedCLIP's repository in the real layout
    (``models--microsoft--BiomedCLIP-.../snapshots/<rev>/open_clip_config.json`` +
    ``open_clip_pytorch_model.bin``, ``refs/main``), its config naming BiomedCLIP's BERT text
    tower (which must never be built) and a ViT-Ti-sized timm image tower with random weights.
    Returns the image tower's state dict as the file holds it."""
    import json

    import open_clip

    vision_cfg = {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                  "timm_proj": "linear", "image_size": 224}  # fmt: skip
    text_cfg = {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract", "hf_proj_type": "mlp",
                "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256}  # fmt: skip
    small_text = {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1}
    torch.manual_seed(123)
    clip = open_clip.CLIP(embed_dim=512, vision_cfg=vision_cfg, text_cfg=small_text)
    repo = cache_dir / f"models--{BIOMEDCLIP_REPO.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    config = {"model_cfg": {"embed_dim": 512, "vision_cfg": vision_cfg, "text_cfg": text_cfg},
              "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073],
                                 "std": [0.26862954, 0.26130258, 0.27577711]}}  # fmt: skip
    (snapshot / "open_clip_config.json").write_text(json.dumps(config))
    torch.save(clip.state_dict(), snapshot / "open_clip_pytorch_model.bin")
    return {k[len("visual.") :]: v for k, v in clip.state_dict().items() if k.startswith("visual.")}


def run_in_process(args: list[str], what: str) -> float:
    """``medcap.demo.pipeline.run_command`` without the process boundary: the same argument list
    through the same entry point (``medcap.cli.main``, or a ``tools/`` script by path), in this
    process. Each launch would otherwise spend ~10 s importing torch and torchtune; the
    subprocess path itself is tested on its own (tests/test_demo.py)."""
    import os
    import runpy
    import sys
    import time
    from unittest import mock

    from medcap.cli import main as medcap_main
    from medcap.demo.pipeline import COMMAND_ENV, ROOT, DemoError

    if not args or args[0] != sys.executable:
        raise ValueError(f"not a python command: {args}")
    print(f"\n== {what} (in process)\n$ {' '.join(args[1:])}", flush=True)
    start, cwd = time.perf_counter(), os.getcwd()
    try:
        os.chdir(ROOT)
        with mock.patch.dict(os.environ, COMMAND_ENV), mock.patch.object(sys, "argv", list(args[1:])):
            if args[1:3] == ["-m", "medcap.cli"]:
                medcap_main(args[3:])
            else:
                runpy.run_path(args[1], run_name="__main__")
    except SystemExit as e:
        if e.code not in (0, None):
            raise DemoError(f"{what} failed (exit status {e.code}): {' '.join(args[1:])}") from None
    finally:
        os.chdir(cwd)
    return time.perf_counter() - start


@contextlib.contextmanager
def commands_in_process():
    """The demo's, the claims' and the tuning's pipelines run their commands in process."""
    import pytest

    with pytest.MonkeyPatch.context() as mp:
        for module in ("medcap.demo.pipeline", "medcap.claims.pipeline", "medcap.demo.tune"):
            mp.setattr(f"{module}.run_command", run_in_process)
        yield
