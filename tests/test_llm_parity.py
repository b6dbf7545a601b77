"""The frozen LLM, loaded through torchtune's checkpointers, equals transformers' Llama."""

from __future__ import annotations

import pytest
import torch
from helpers import TinyLlama, load_tiny_decoder, make_hf_llama, write_hf_checkpoint

from medcap.models.fusion import build_medcap_model

TOL = 1e-4


def _tokens(spec: TinyLlama, batch: int = 2, length: int = 24) -> torch.Tensor:
    return torch.randint(0, spec.vocab_size, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_decoder_logits_match_transformers(fmt, tiny_spec, hf_llama, llm_dirs, tmp_path):
    decoder = load_tiny_decoder(tiny_spec, llm_dirs[fmt], fmt, tmp_path / "out")
    tokens = _tokens(tiny_spec)
    with torch.no_grad():
        ours = decoder(tokens)
        ref = hf_llama(tokens).logits
    diff = (ours - ref).abs().max().item()
    print(f"{fmt} checkpoint: max |logit diff| vs transformers = {diff:.2e}")
    assert diff < TOL


def test_tied_embeddings_llama32_shape(tmp_path):
    """A tied model (Llama 3.2 / SmolLM2 style) has no lm_head in its safetensors."""
    spec = TinyLlama(tied=True)
    hf = make_hf_llama(spec, seed=3)
    folder = write_hf_checkpoint(hf, tmp_path / "hf")
    decoder = load_tiny_decoder(spec, folder, "hf", tmp_path / "out")
    tokens = _tokens(spec)
    with torch.no_grad():
        diff = (decoder(tokens) - hf(tokens).logits).abs().max().item()
    print(f"tied hf checkpoint: max |logit diff| = {diff:.2e}")
    assert diff < TOL


def test_fused_model_equals_transformers_with_inputs_embeds(tiny_spec, hf_llama, tiny_decoder):
    """Image tokens spliced by medcap == the same vectors given to transformers as inputs_embeds."""
    image_id = tiny_spec.vocab_size + 7  # outside the vocabulary: only medcap can place it
    model = build_medcap_model(tiny_decoder, image_token_id=image_id, vision="vit_tiny", num_image_tokens=4)
    model.eval()
    tokens = _tokens(tiny_spec, batch=3, length=20)
    tokens[0, 1:5] = image_id
    tokens[2, 6:10] = image_id
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(tokens, images=images)
        image_tokens = model.encode_images(images)
        ref_embeds = hf_llama.get_input_embeddings()(tokens.clamp(max=tiny_spec.vocab_size - 1))
        ref_embeds[0, 1:5] = image_tokens[0]
        ref_embeds[2, 6:10] = image_tokens[1]
        ref = hf_llama(inputs_embeds=ref_embeds).logits
    diff = (ours - ref).abs().max().item()
    print(f"fused forward: max |logit diff| vs transformers(inputs_embeds) = {diff:.2e}")
    assert diff < TOL
    # and the images matter: a different image changes the logits of its row only
    with torch.no_grad():
        other = model(tokens, images=torch.flip(images, dims=[0]))
    assert (other[0] - ours[0]).abs().max() > 1e-3
    assert torch.equal(other[1], ours[1])


def test_tied_llama3_builder_matches_transformers_with_plain_rope(tmp_path):
    """SmolLM2's shape: tied embeddings, unscaled RoPE (neither torchtune builder fits)."""
    from torchtune.models.convert_weights import hf_to_tune

    from medcap.models.llms import tied_llama3

    spec = TinyLlama(rope_base=100000.0)
    from transformers import LlamaForCausalLM

    cfg = spec.hf_config()
    cfg.tie_word_embeddings = True
    torch.manual_seed(5)
    hf = LlamaForCausalLM(cfg).eval()
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    decoder = tied_llama3(
        vocab_size=spec.vocab_size,
        num_layers=spec.layers,
        num_heads=spec.heads,
        num_kv_heads=spec.kv_heads,
        embed_dim=spec.dim,
        max_seq_len=spec.max_seq_len,
        intermediate_dim=spec.ffn,
        rope_base=100000,
    ).eval()
    decoder.load_state_dict(hf_to_tune(state, num_heads=spec.heads, num_kv_heads=spec.kv_heads, dim=spec.dim))
    tokens = _tokens(spec)
    with torch.no_grad():
        diff = (decoder(tokens) - hf(tokens).logits).abs().max().item()
    assert diff < TOL
    assert decoder.output.tied_module is decoder.tok_embeddings
