"""Vision checkpoints: the original release layout loads unchanged; bad files fail by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from medcap.models.checkpoints import (
    CheckpointMismatchError,
    load_vision_checkpoint,
    read_vision_checkpoint,
    save_vision_checkpoint,
)
from medcap.models.fusion import build_medcap_model

ROOT = Path(__file__).resolve().parents[1]
IMAGE_ID = 1000
D = 64  # the tiny LLM's width


def original_visual_state() -> dict[str, torch.Tensor]:
    """BiomedCLIP's image tower as the original medcap saved it: 151 tensors, names and shapes
    written out from its documented layout (not read from medcap's model)."""
    g = torch.Generator().manual_seed(0)

    def t(*shape):
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    state = {
        "trunk.cls_token": t(1, 1, 768),
        "trunk.pos_embed": t(1, 197, 768),
        "trunk.patch_embed.proj.weight": t(768, 3, 16, 16),
        "trunk.patch_embed.proj.bias": t(768),
    }
    for i in range(12):
        b = f"trunk.blocks.{i}."
        state.update(
            {
                b + "norm1.weight": t(768),
                b + "norm1.bias": t(768),
                b + "attn.qkv.weight": t(2304, 768),
                b + "attn.qkv.bias": t(2304),
                b + "attn.proj.weight": t(768, 768),
                b + "attn.proj.bias": t(768),
                b + "norm2.weight": t(768),
                b + "norm2.bias": t(768),
                b + "mlp.fc1.weight": t(3072, 768),
                b + "mlp.fc1.bias": t(3072),
                b + "mlp.fc2.weight": t(768, 3072),
                b + "mlp.fc2.bias": t(768),
            }
        )
    state.update({"trunk.norm.weight": t(768), "trunk.norm.bias": t(768), "head.proj.weight": t(512, 768)})
    assert len(state) == 151
    return state


def original_projector_state(n: int, d: int = D) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    shapes = {"0.weight": (d, 512), "0.bias": (d,), "2.weight": (d * n, d), "2.bias": (d * n,)}
    return {k: torch.randn(*s, generator=g).to(torch.bfloat16) for k, s in shapes.items()}


@pytest.fixture(scope="module")
def original_last_pt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("release") / "last.pt"
    torch.save({"visual": original_visual_state(), "projector": original_projector_state(32)}, path)
    return path


def test_original_release_layout_loads_with_n_inferred(original_last_pt, tiny_decoder):
    model = build_medcap_model(
        tiny_decoder, image_token_id=IMAGE_ID, vision="biomedclip", vision_checkpoint=original_last_pt
    )
    assert model.num_image_tokens == 32
    saved = torch.load(original_last_pt, weights_only=True)
    for k, v in model.visual.tower.state_dict().items():
        assert v.dtype == torch.float32  # converted to the run's dtype
        assert torch.equal(v, saved["visual"][k].float()), k
    for k, v in model.projector.state_dict().items():
        assert torch.equal(v, saved["projector"][k].float()), k


def test_flat_layout_and_n50(tmp_path, tiny_decoder):
    flat = {f"visual.{k}": v for k, v in original_visual_state().items()}
    flat.update({f"projector.{k}": v for k, v in original_projector_state(50).items()})
    torch.save(flat, tmp_path / "flat.pt")
    model = build_medcap_model(
        tiny_decoder, image_token_id=IMAGE_ID, vision="biomedclip", vision_checkpoint=tmp_path / "flat.pt"
    )
    assert model.num_image_tokens == 50


def _save_original(path, visual=None, projector=None):
    torch.save(
        {"visual": visual or original_visual_state(), "projector": projector or original_projector_state(32)},
        path,
    )
    return path


def test_missing_key_is_named(tmp_path, tiny_decoder):
    visual = original_visual_state()
    del visual["trunk.norm.bias"]
    path = _save_original(tmp_path / "bad.pt", visual=visual)
    with pytest.raises(
        CheckpointMismatchError, match=r"bad.pt \['visual'\][\s\S]*missing key: trunk.norm.bias"
    ):
        build_medcap_model(tiny_decoder, image_token_id=IMAGE_ID, vision="biomedclip", vision_checkpoint=path)


def test_shape_mismatch_names_both_shapes(tmp_path, tiny_decoder):
    visual = original_visual_state()
    visual["head.proj.weight"] = torch.zeros(256, 768, dtype=torch.bfloat16)
    path = _save_original(tmp_path / "bad.pt", visual=visual)
    with pytest.raises(
        CheckpointMismatchError, match=r"head.proj.weight: checkpoint \(256, 768\) vs model \(512, 768\)"
    ):
        build_medcap_model(tiny_decoder, image_token_id=IMAGE_ID, vision="biomedclip", vision_checkpoint=path)


def test_unexpected_key_and_wrong_encoder_are_named(tmp_path, tiny_decoder):
    visual = original_visual_state()
    visual["trunk.extra"] = torch.zeros(3)
    path = _save_original(tmp_path / "bad.pt", visual=visual)
    with pytest.raises(CheckpointMismatchError, match="unexpected key: trunk.extra"):
        build_medcap_model(tiny_decoder, image_token_id=IMAGE_ID, vision="biomedclip", vision_checkpoint=path)


def test_projector_for_another_llm_width(tmp_path, tiny_decoder):
    path = _save_original(tmp_path / "wide.pt", projector=original_projector_state(32, d=4096 // 32))
    with pytest.raises(
        CheckpointMismatchError, match="LLM of width 128, but the configured model has width 64"
    ):
        build_medcap_model(tiny_decoder, image_token_id=IMAGE_ID, vision="biomedclip", vision_checkpoint=path)


def test_explicit_num_image_tokens_must_agree(original_last_pt, tiny_decoder):
    with pytest.raises(CheckpointMismatchError, match="produces 32 image tokens, but num_image_tokens=50"):
        build_medcap_model(
            tiny_decoder,
            image_token_id=IMAGE_ID,
            vision="biomedclip",
            num_image_tokens=50,
            vision_checkpoint=original_last_pt,
        )


def test_unreadable_files_fail_with_the_file_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        read_vision_checkpoint(tmp_path / "nope.pt")
    (tmp_path / "cut.pt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="cut.pt: not a readable torch checkpoint"):
        read_vision_checkpoint(tmp_path / "cut.pt")
    torch.save({"visual": {}, "projector": {}, "obj": Path("x")}, tmp_path / "pickle.pt")
    with pytest.raises(ValueError, match=r"pickle.pt: refused: it holds objects other than tensors") as refused:
        read_vision_checkpoint(tmp_path / "pickle.pt")
    # the reason, not torch's advice on loading it unsafely, and no terminal colour codes
    assert "Unsupported global: GLOBAL pathlib.PosixPath" in str(refused.value)
    assert "\x1b" not in str(refused.value) and "weights_only` set to `False`" not in str(refused.value)
    torch.save({"model": {}}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt: expected 'visual' and 'projector'"):
        read_vision_checkpoint(tmp_path / "other.pt")


def test_save_load_round_trip_is_atomic_and_self_describing(tmp_path, tiny_decoder):
    torch.manual_seed(0)
    model = build_medcap_model(tiny_decoder, image_token_id=IMAGE_ID, vision="vit_tiny", num_image_tokens=3)
    path = save_vision_checkpoint(
        model, tmp_path / "ckpt" / "meta_model_0.pt", epoch=0, step=12, config={"lr": 1e-4}
    )
    assert sorted(p.name for p in path.parent.iterdir()) == ["meta_model_0.pt"]  # no temp file left
    ckpt = read_vision_checkpoint(path)
    assert ckpt.meta["encoder"] == "vit_tiny" and ckpt.meta["num_image_tokens"] == 3
    assert ckpt.meta["epoch"] == 0 and ckpt.meta["step"] == 12 and ckpt.meta["config"] == {"lr": 1e-4}
    with torch.no_grad():
        for p in model.projector.parameters():
            p.zero_()
    load_vision_checkpoint(model, path)
    assert torch.equal(model.projector[0].weight, ckpt.projector["0.weight"])


def test_vision_mismatch_with_saved_encoder(tmp_path, tiny_spec, tiny_decoder):
    model = build_medcap_model(tiny_decoder, image_token_id=IMAGE_ID, vision="vit_tiny", num_image_tokens=3)
    path = save_vision_checkpoint(model, tmp_path / "m.pt")
    decoder = tiny_spec.torchtune_decoder()  # a second, unfused decoder
    with pytest.raises(ValueError, match="trained with vision=vit_tiny, but vision=biomedclip"):
        build_medcap_model(decoder, image_token_id=IMAGE_ID, vision="biomedclip", vision_checkpoint=path)


@pytest.mark.parametrize("vision", ["vit_tiny", "timm_vit_tiny"])
def test_export_round_trip_through_open_clip(vision, tmp_path, tiny_decoder):
    torch.manual_seed(0)
    model = build_medcap_model(tiny_decoder, image_token_id=IMAGE_ID, vision=vision, num_image_tokens=2)
    with torch.no_grad():  # stand-in for training: move every weight away from its init
        for p in model.visual.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ckpt = save_vision_checkpoint(model, tmp_path / "meta_model_0.pt")
    out = tmp_path / "exported"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "export_vision_encoder.py"),
            "--vision_checkpoint",
            str(ckpt),
            "--output_dir",
            str(out),
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    clip = open_clip.create_model(f"local-dir:{out}").eval()
    size = model.visual.preprocess.size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        assert torch.equal(clip.encode_image(x), model.visual.eval()(x).pooled)
    _, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert f"CenterCrop(size=({size}, {size}))" in repr(preprocess)


@pytest.mark.parametrize("connector", ["question_mlp", "question_film", "patch_film", "patch_question"])
def test_question_connector_round_trip_is_read_from_the_file(connector, tmp_path, tiny_decoder, tiny_spec):
    torch.manual_seed(0)
    tokens = {"patch_film": 16, "patch_question": 17}.get(connector, 3)  # one per patch of vit_tiny's 4 x 4 (+1)
    model = build_medcap_model(tiny_decoder, image_token_id=IMAGE_ID, vision="vit_tiny", connector=connector,
                               num_image_tokens=tokens)  # fmt: skip
    with torch.no_grad():
        for p in model.projector.parameters():
            p.add_(torch.randn_like(p))  # film starts at zero: make every weight tell
    path = save_vision_checkpoint(model, tmp_path / "meta_model_0.pt", epoch=0, step=1)
    assert read_vision_checkpoint(path).meta["connector"] == connector
    fresh = build_medcap_model(tiny_spec.torchtune_decoder(), image_token_id=IMAGE_ID, vision="vit_tiny",
                               vision_checkpoint=path)  # fmt: skip
    assert fresh.projector.kind == connector and fresh.num_image_tokens == tokens
    saved, loaded = model.projector.state_dict(), fresh.projector.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
