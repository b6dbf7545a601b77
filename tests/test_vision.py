"""Vision encoders: registry, preprocessing, and parity with open_clip on the same files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from medcap.models.vision import build_vision_encoder, list_encoders

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

# BiomedCLIP's published open_clip_config.json, text tower included: medcap must build the image
# tower from it without ever touching the text tower (whose BERT lives on the hub).
BIOMEDCLIP_CONFIG = {
    "model_cfg": {
        "embed_dim": 512,
        "vision_cfg": {
            "timm_model_name": "vit_base_patch16_224",
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": 224,
        },
        "text_cfg": {
            "hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
            "hf_tokenizer_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": 256,
        },
    },
    "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)},
}
# An offline-buildable text tower for the open_clip side of the parity test.
SMALL_TEXT_CFG = {"context_length": 16, "vocab_size": 64, "width": 32, "heads": 1, "layers": 1}


def test_registry_lists_shipped_encoders():
    assert {"biomedclip", "vit_tiny", "timm_vit_tiny"} <= set(list_encoders())
    with pytest.raises(ValueError, match="unknown vision encoder 'nope'.*biomedclip"):
        build_vision_encoder("nope")


def test_biomedclip_architecture_matches_the_original():
    enc = build_vision_encoder("biomedclip")
    state = enc.tower.state_dict()
    assert len(state) == 151
    assert state["trunk.pos_embed"].shape == (1, 197, 768)
    assert state["trunk.blocks.11.attn.qkv.weight"].shape == (2304, 768)
    assert state["head.proj.weight"].shape == (512, 768)
    assert "head.proj.bias" not in state
    assert (enc.pooled_dim, enc.patch_dim, enc.num_patches) == (512, 768, 196)
    p = enc.preprocess
    assert (p.size, p.mean, p.std, p.interpolation, p.resize_mode) == (
        224,
        OPENAI_MEAN,
        OPENAI_STD,
        "bicubic",
        "shortest",
    )


@pytest.mark.parametrize("name", ["vit_tiny", "timm_vit_tiny", "ViT-B-16"])
def test_features_pooled_and_patches(name):
    torch.manual_seed(0)
    enc = build_vision_encoder(name).eval()
    x = torch.randn(2, 3, enc.preprocess.size, enc.preprocess.size)
    with torch.no_grad():
        feats = enc(x)
        tower_out = enc.tower(x)
    reference = tower_out[0] if isinstance(tower_out, tuple) else tower_out
    assert feats.pooled.shape == (2, enc.pooled_dim)
    assert feats.patches.shape == (2, enc.num_patches, enc.patch_dim)
    assert torch.equal(feats.pooled, reference)  # pooled = open_clip's own image embedding


def test_cls_pooling_after_final_norm_for_timm_towers():
    enc = build_vision_encoder("timm_vit_tiny").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        tokens = enc.tower.trunk.forward_features(x)  # ends with the final LayerNorm
        expected = tokens[:, 0] @ enc.tower.head.proj.weight.T
        assert torch.allclose(enc(x).pooled, expected, atol=1e-6)


def test_preprocess_real_ct_slice():
    from pydicom import dcmread
    from pydicom.data import get_testdata_file

    pixels = dcmread(get_testdata_file("CT_small.dcm")).pixel_array.astype(np.float32)
    pixels = (pixels - pixels.min()) / (np.ptp(pixels) or 1) * 255
    image = Image.fromarray(pixels.astype(np.uint8)).convert("RGB").resize((160, 128))
    out = build_vision_encoder("biomedclip").preprocess.transform()(image)
    assert out.shape == (3, 224, 224)
    # normalised with the OpenAI statistics: black maps to -mean/std
    assert out.min().item() == pytest.approx(min(-m / s for m, s in zip(OPENAI_MEAN, OPENAI_STD)), abs=0.05)


@pytest.mark.parametrize("weights_name", ["open_clip_pytorch_model.bin", "open_clip_model.safetensors"])
def test_biomedclip_equals_open_clip_from_the_same_local_dir(weights_name, tmp_path):
    """vision_path=DIR (a BiomedCLIP download) gives open_clip's image features exactly."""
    torch.manual_seed(0)
    parity_cfg = {
        "model_cfg": {**BIOMEDCLIP_CONFIG["model_cfg"], "text_cfg": SMALL_TEXT_CFG},
        "preprocess_cfg": BIOMEDCLIP_CONFIG["preprocess_cfg"],
    }
    reference = open_clip.CLIP(**parity_cfg["model_cfg"]).eval()
    state = reference.state_dict()
    if weights_name.endswith(".bin"):
        torch.save(state, tmp_path / weights_name)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / weights_name))
    (tmp_path / "open_clip_config.json").write_text(json.dumps(parity_cfg))
    loaded = open_clip.create_model(f"local-dir:{tmp_path}").eval()

    # medcap reads BiomedCLIP's real config (HF text tower) from the same folder: never built.
    (tmp_path / "open_clip_config.json").write_text(json.dumps(BIOMEDCLIP_CONFIG))
    ours = build_vision_encoder("biomedclip", vision_path=tmp_path).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = loaded.encode_image(x)
        got = ours(x).pooled
    assert torch.equal(got, expected)
    assert not torch.equal(got, build_vision_encoder("biomedclip").eval()(x).pooled)


def test_vision_path_errors_are_named(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_vision_encoder("biomedclip", vision_path=tmp_path)
    (tmp_path / "open_clip_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="open_clip_config.json: not valid JSON"):
        build_vision_encoder("biomedclip", vision_path=tmp_path)
    (tmp_path / "open_clip_config.json").write_text(json.dumps(BIOMEDCLIP_CONFIG))
    with pytest.raises(FileNotFoundError, match="no encoder weights found"):
        build_vision_encoder("biomedclip", vision_path=tmp_path)


def _build_in_child(cache: Path, code: str) -> subprocess.CompletedProcess:
    """A fresh process with the hub cache set by environment, offline, as a user's run has it."""
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HOME", None)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_pretrained_biomedclip_comes_from_the_hub_cache_offline(tmp_path):
    """vision=biomedclip without vision_path: the image tower from the Hugging Face cache (the
    original's hf-hub:microsoft/BiomedCLIP-... load), offline, never the BERT text tower."""
    from helpers import write_hub_biomedclip

    expected = write_hub_biomedclip(tmp_path / "hub")
    out = tmp_path / "tower.pt"
    proc = _build_in_child(tmp_path / "hub", f"""
import torch
from medcap.models.vision import build_vision_encoder
enc = build_vision_encoder("biomedclip", pretrained=True)
torch.save(enc.tower.state_dict(), {str(out)!r})
print(enc.weights)
""")
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert set(got) == set(expected) and all(torch.equal(got[k], expected[k]) for k in expected)
    assert "pretrained microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in proc.stdout
    assert "9f341de24bfb" in proc.stdout  # the cached revision is named


def test_missing_pretrained_weights_say_what_to_do(tmp_path):
    proc = _build_in_child(tmp_path / "empty", """
from medcap.models.vision import build_vision_encoder
build_vision_encoder("biomedclip", pretrained=True)
""")
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert "PretrainedWeightsUnavailable" in message and "not in the Hugging Face cache" in message
    assert "vision_path=FOLDER" in message and "vision_pretrained=False" in message


def test_a_vision_checkpoint_alone_decides_the_weights(tmp_path, tiny_decoder):
    """With vision_checkpoint no hub lookup happens (an empty offline cache is no error), and
    vision_pretrained=False builds random weights without asking the hub either."""
    from medcap.models.checkpoints import save_vision_checkpoint
    from medcap.models.fusion import build_medcap_model

    random_init = build_vision_encoder("biomedclip", pretrained=False)
    assert random_init.weights == "random initialisation"
    model = build_medcap_model(tiny_decoder, image_token_id=1000, vision="biomedclip", num_image_tokens=2)
    ckpt = save_vision_checkpoint(model, tmp_path / "meta_model_0.pt")
    assert torch.load(ckpt, weights_only=True)["medcap"]["vision_init"] == "random initialisation"
    code = f"""
from helpers import TinyLlama
from medcap.models.fusion import build_medcap_model
m = build_medcap_model(TinyLlama().torchtune_decoder(), image_token_id=1000, vision="biomedclip",
                       vision_checkpoint={str(ckpt)!r}, vision_pretrained=True)
print(m.visual.weights)
"""
    proc = _build_in_child(tmp_path / "empty", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})\n{code}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"the vision checkpoint {ckpt}" in proc.stdout
