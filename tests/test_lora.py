"""The LoRA comparison model (``make claims``): only the adapters and the vision side learn, the
base LLM file stays byte for byte what it was, and a checkpoint with LoRA weights reloads into
the same model."""

from __future__ import annotations

import hashlib

import pytest
import torch
from test_training import SPEC, medcap, train_args, workspace  # noqa: F401 (the fixture)

from medcap.errors import ConfigError
from medcap.models.checkpoints import atomic_save, vision_checkpoint_payload
from medcap.models.fusion import build_medcap_model
from medcap.models.lora import LORA_KEY, LoraSpec, lora_spec_of

IMAGE_ID = 1000
N = 4


def _batch(vocab: int = 512):
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (2, 20), generator=g)
    tokens[0, 1 : 1 + N] = IMAGE_ID
    tokens[1, 2 : 2 + N] = IMAGE_ID
    return tokens, torch.randn(2, 3, 64, 64, generator=g)


SPEC4 = LoraSpec(rank=4, alpha=8.0)


def _lora_model(decoder, spec=SPEC4, **kw):
    torch.manual_seed(0)
    return build_medcap_model(decoder, image_token_id=IMAGE_ID, vision="vit_tiny", num_image_tokens=N,
                              llm_lora=spec, **kw)  # fmt: skip


def test_only_adapters_and_vision_side_learn(tiny_decoder):
    model = _lora_model(tiny_decoder)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.split(".")[0] in ("visual", "projector") or ".lora_a." in n or ".lora_b." in n for n in trainable
    ), sorted(trainable)
    # 2 layers x 7 projections x (lora_a, lora_b)
    assert sum(".lora_" in n for n in trainable) == 2 * 7 * 2
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tokens, images = _batch()
    untrained = model(tokens, images=images).detach()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        logits = model(tokens, images=images)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 512), tokens[:, 1:].reshape(-1).clamp(max=511))
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(".lora_b." in k for k in changed) and any(k.startswith("visual.") for k in changed)
    assert all(k.startswith(("visual.", "projector.")) or ".lora_" in k for k in changed), sorted(changed)
    assert not torch.allclose(model(tokens, images=images), untrained)


def test_lora_starts_as_the_base_model(tiny_decoder, tiny_spec, llm_dirs, tmp_path):
    from helpers import load_tiny_decoder

    plain = load_tiny_decoder(tiny_spec, llm_dirs["meta"], "meta", tmp_path / "p")
    adapted = _lora_model(tiny_decoder)  # lora_b starts at zero: the same function as the base LLM
    tokens = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(adapted(tokens), plain(tokens), atol=1e-5)
    # and from the same random vision side as the frozen model under the same seed
    torch.manual_seed(0)
    frozen = build_medcap_model(plain, image_token_id=IMAGE_ID, vision="vit_tiny", num_image_tokens=N)
    for part in ("visual", "projector"):
        a, b = getattr(frozen, part).state_dict(), getattr(adapted, part).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), part


def test_checkpoint_holds_the_adapters_and_reloads_to_the_same_outputs(tiny_decoder, tiny_spec, llm_dirs, tmp_path):
    from helpers import load_tiny_decoder

    model = _lora_model(tiny_decoder).eval()
    with torch.no_grad():  # stand-in for training: adapters away from their zero start
        for n, p in model.named_parameters():
            if ".lora_" in n or n.startswith("projector."):
                p.add_(torch.randn_like(p) * 0.05)
    path = atomic_save(vision_checkpoint_payload(model, epoch=0, step=1), tmp_path / "meta_model_0.pt")
    saved = torch.load(path, weights_only=True)
    assert saved[LORA_KEY]["rank"] == 4 and saved[LORA_KEY]["alpha"] == 8.0
    assert all(".lora_" in k for k in saved[LORA_KEY]["state"]) and len(saved[LORA_KEY]["state"]) == 28

    reloaded = build_medcap_model(load_tiny_decoder(tiny_spec, llm_dirs["meta"], "meta", tmp_path / "r"),
                                  image_token_id=IMAGE_ID, vision="vit_tiny", vision_checkpoint=path).eval()  # fmt: skip
    assert lora_spec_of(reloaded.decoder) == LoraSpec(4, 8.0)
    tokens, images = _batch()
    with torch.no_grad():
        assert torch.equal(model(tokens, images=images), reloaded(tokens, images=images))
    with pytest.raises(ValueError, match="holds LoRA"):
        build_medcap_model(load_tiny_decoder(tiny_spec, llm_dirs["meta"], "meta", tmp_path / "s"), image_token_id=IMAGE_ID,
                           vision="vit_tiny", vision_checkpoint=path, llm_lora=LoraSpec(8, 8.0))  # fmt: skip


def test_a_frozen_model_checkpoint_has_no_adapters(tiny_decoder):
    model = build_medcap_model(tiny_decoder, image_token_id=IMAGE_ID, vision="vit_tiny", num_image_tokens=N)
    assert LORA_KEY not in vision_checkpoint_payload(model) and lora_spec_of(model.decoder) is None


@pytest.mark.parametrize("rank, modules", [(0, ("q_proj",)), (4, ("gate",)), (4, ())])
def test_bad_lora_settings_are_config_errors(rank, modules):
    with pytest.raises(ConfigError, match="llm_lora"):
        LoraSpec(rank, 8.0, modules)


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lora_training_leaves_the_llm_file_byte_identical(workspace, tmp_path):  # noqa: F811
    llm_file = workspace["llm"] / "consolidated.00.pth"
    before = _sha256(llm_file)
    out = tmp_path / "lora"
    proc = medcap(*train_args(workspace, out, "epochs=2", "optimizer.lr=1e-2", "lr_scheduler.num_warmup_steps=1",
                              "llm_lora_rank=4", "llm_lora_alpha=8", "verify_frozen_llm=True"))  # fmt: skip
    assert "LLM LoRA rank 4" in proc.stdout + proc.stderr
    assert _sha256(llm_file) == before
    assert not any(p.suffix in (".pth", ".safetensors") for p in out.rglob("*"))
    ckpt = torch.load(out / "checkpoint" / "meta_model_1.pt", weights_only=True)
    first = torch.load(out / "checkpoint" / "meta_model_0.pt", weights_only=True)
    assert set(ckpt) == {"visual", "projector", "medcap", LORA_KEY}
    lora = ckpt[LORA_KEY]["state"]
    assert any(k.endswith("lora_b.weight") and lora[k].abs().sum() > 0 for k in lora)  # left its zero start
    assert any(not torch.equal(lora[k], first[LORA_KEY]["state"][k]) for k in lora)
    import json

    assert json.loads((out / "frozen_llm.json").read_text())["unchanged"] is True
    state = torch.load(out / "checkpoint" / "recipe_state.pt", weights_only=True)
    assert all(torch.equal(state["model"][LORA_KEY][k], lora[k]) for k in lora)


def test_a_second_lora_checkpoint_loads_its_own_adapters(tiny_decoder, tmp_path):
    """The generate recipe builds the model for the first checkpoint and loads later ones into it."""
    from medcap.models.checkpoints import load_vision_checkpoint

    model = _lora_model(tiny_decoder).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_b." in n:
                p.add_(torch.randn_like(p) * 0.05)
    path = atomic_save(vision_checkpoint_payload(model), tmp_path / "meta_model_1.pt")
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.zero_()
    load_vision_checkpoint(model, path)
    assert all(torch.equal(v, expected[k]) for k, v in model.state_dict().items())


def test_a_frozen_model_refuses_a_lora_checkpoint_loaded_into_it(tiny_decoder, tiny_spec, llm_dirs, tmp_path):
    from helpers import load_tiny_decoder

    from medcap.models.checkpoints import CheckpointMismatchError, load_vision_checkpoint

    path = atomic_save(vision_checkpoint_payload(_lora_model(tiny_decoder)), tmp_path / "meta_model_0.pt")
    frozen = build_medcap_model(load_tiny_decoder(tiny_spec, llm_dirs["meta"], "meta", tmp_path / "f"),
                                image_token_id=IMAGE_ID, vision="vit_tiny", num_image_tokens=N)  # fmt: skip
    with pytest.raises(CheckpointMismatchError, match="holds LLM LoRA weights"):
        load_vision_checkpoint(frozen, path)


def test_lora_settings_from_the_command_line():
    from medcap.settings import TrainSettings

    assert TrainSettings.from_config({}).llm_lora is None  # medcap: the LLM stays frozen
    s = TrainSettings.from_config({"llm_lora_rank": "8", "llm_lora_modules": ["q_proj", "v_proj"]}, "full_finetune")
    assert s.llm_lora == LoraSpec(8, 16.0, ("q_proj", "v_proj"))
    with pytest.raises(ConfigError, match="llm_lora_modules"):
        TrainSettings.from_config({"llm_lora_rank": 8, "llm_lora_modules": ["o_proj"]})
