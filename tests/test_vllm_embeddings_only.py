"""``engine=vllm`` loads only the LLM's token embedding table (``medcap.models.embeddings_only``):
for Meta's ``consolidated.00.pth`` and Hugging Face's safetensors, no decoder layer is built and
the whole-LLM loader is never called (a spy), the table equals the full load's, and the generate
recipe's answers through a stand-in vLLM (``vllm_fakes.FakeVLLM``, decoding with the whole LLM)
equal medcap's own engine's. ``eval_vqa=True`` (its judge runs the LLM here) loads it whole; a
LoRA-adapted checkpoint, which a stock vLLM cannot serve, is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import (
    TinyLlama,
    draw_jpeg,
    load_tiny_decoder,
    make_hf_llama,
    write_hf_checkpoint,
    write_meta_checkpoint,
)
from omegaconf import OmegaConf
from vllm_fakes import FakeVLLM, greedy_from_embeddings

from medcap.errors import ConfigError
from medcap.models import assembly
from medcap.models.checkpoints import save_vision_checkpoint
from medcap.models.embeddings_only import TokenEmbeddingsOnly, read_token_embeddings
from medcap.models.fusion import build_medcap_model
from medcap.models.lora import LoraSpec
from medcap.settings import GenerateSettings

ROOT = Path(__file__).resolve().parents[1]
SPEC = TinyLlama(vocab_size=400, layers=2, dim=64, ffn=128, heads=4, kv_heads=2, max_seq_len=512)
N = 4


@pytest.fixture(scope="module")
def ws(tmp_path_factory, chatml_tokenizer_json):
    from medcap.data.chatml import ChatMLTokenizer

    root = tmp_path_factory.mktemp("embeddings_only")
    hf = make_hf_llama(SPEC, seed=0, steerable=True)
    llms = {"meta": write_meta_checkpoint(hf, SPEC, root / "meta"), "hf": write_hf_checkpoint(hf, root / "hf")}
    image_id = ChatMLTokenizer(chatml_tokenizer_json).image_id
    torch.manual_seed(0)
    model = build_medcap_model(load_tiny_decoder(SPEC, llms["meta"], "meta", root / "x"), vision="vit_tiny",
                               num_image_tokens=N, image_token_id=image_id)  # fmt: skip
    save_vision_checkpoint(model, root / "checkpoint" / "meta_model_0.pt", epoch=0)
    torch.manual_seed(0)
    lora = build_medcap_model(load_tiny_decoder(SPEC, llms["meta"], "meta", root / "x"), vision="vit_tiny",
                              num_image_tokens=N, image_token_id=image_id, llm_lora=LoraSpec(rank=2, alpha=4.0))  # fmt: skip
    save_vision_checkpoint(lora, root / "lora" / "meta_model_0.pt", epoch=0)
    return {"root": root, "tok": chatml_tokenizer_json, "image": draw_jpeg(root / "scan.jpg", seed=1), **llms}


def cfg(ws, fmt: str, *extra: str):
    base = OmegaConf.load(ROOT / "recipes" / "configs" / "custom_generation_config.yaml")
    return OmegaConf.merge(base, OmegaConf.from_dotlist([
        *SPEC.overrides(), "device=cpu", "dtype=fp32", "temperature=0", "top_k=null", "max_new_tokens=12",
        "tokenizer._component_=medcap.data.chatml.chatml_tokenizer", f"tokenizer.path={ws['tok']}",
        f"checkpointer.checkpoint_dir={ws[fmt]}", f"output_dir={ws['root'] / 'out'}", "vision=vit_tiny",
        f"vision_checkpoint={ws['root'] / 'checkpoint' / 'meta_model_0.pt'}", *extra,
    ]))  # fmt: skip


def settings(ws, fmt: str, *extra: str) -> GenerateSettings:
    return GenerateSettings.from_config(cfg(ws, fmt, *extra), "generate")


def spy_whole_llm(monkeypatch) -> None:
    """The whole-LLM path (torchtune's checkpointers, through ``read_llm_state``) must not run."""
    from torchtune.training import FullModelHFCheckpointer, FullModelMetaCheckpointer

    def refuse(*_a, **_k):
        pytest.fail("the whole LLM checkpoint was read")

    monkeypatch.setattr(assembly, "read_llm_state", refuse)
    monkeypatch.setattr(FullModelHFCheckpointer, "load_checkpoint", refuse)
    monkeypatch.setattr(FullModelMetaCheckpointer, "load_checkpoint", refuse)


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_only_the_embedding_table_is_read(ws, fmt, monkeypatch):
    full = assembly.load_for_inference(settings(ws, fmt), None).model
    spy_whole_llm(monkeypatch)
    loaded = assembly.load_for_inference(settings(ws, fmt), None, embeddings_only=True)
    model = loaded.model
    assert isinstance(model.decoder, TokenEmbeddingsOnly) and loaded.step is None
    assert len(model.decoder.layers) == 0 and model.decoder.num_layers == SPEC.layers
    assert model.decoder.max_seq_len == SPEC.max_seq_len
    assert not list(model.decoder.parameters())  # no layer, norm or head: the table moved to the model
    llm = sum(p.numel() for n, p in model.named_parameters() if not n.startswith(("visual.", "projector.")))
    assert llm == SPEC.vocab_size * SPEC.dim
    assert torch.equal(model.tok_embeddings.weight, full.tok_embeddings.weight)
    assert model.tok_embeddings.weight.dtype == full.tok_embeddings.weight.dtype == torch.float32
    with pytest.raises(RuntimeError, match="only the LLM's token embedding table is loaded here"):
        model(torch.ones(1, 3, dtype=torch.long))


def test_the_table_is_read_from_each_layout(ws):
    meta, where = read_token_embeddings({"checkpoint_dir": str(ws["meta"])})
    assert where.endswith("consolidated.00.pth ['tok_embeddings.weight']")
    hf, where = read_token_embeddings({"checkpoint_dir": str(ws["hf"]), "checkpoint_files": ["model.safetensors"]})
    assert where.endswith("model.safetensors ['model.embed_tokens.weight']")
    assert torch.equal(meta, hf) and meta.shape == (SPEC.vocab_size, SPEC.dim)
    wrong = cfg(ws, "hf", "model.vocab_size=401")
    with pytest.raises(Exception, match=r"shape mismatch weight: checkpoint \(400, 64\) vs model \(401, 64\)"):
        assembly.load_for_inference(GenerateSettings.from_config(wrong, "generate"), None, embeddings_only=True)


def recipe(s: GenerateSettings):
    from medcap.cli import load_recipe

    return load_recipe("generate").EvaluationRecipe(s)


@pytest.mark.parametrize("fmt", ["meta", "hf"])
def test_generate_through_vllm_without_the_llm_equals_medcaps_engine(ws, fmt, monkeypatch):
    ask = (f"image={ws['image']}", "prompt=What modality is this image?")
    ours = recipe(settings(ws, fmt, *ask)).run()["answer"]
    whole = assembly.load_for_inference(settings(ws, fmt), None).model
    with FakeVLLM(greedy_from_embeddings(whole), hidden_size=SPEC.dim, max_model_len=512) as server:
        spy_whole_llm(monkeypatch)
        r = recipe(settings(ws, fmt, *ask, "engine=vllm", f"vllm_url={server.url}"))
        theirs = r.run()["answer"]
        assert len(r.answerer.model.decoder.layers) == 0
        assert server.bodies  # vLLM decoded
    assert theirs == ours and len(ours) > 0


def test_eval_vqa_loads_the_whole_llm_for_its_judge(ws):
    with FakeVLLM(lambda embeds, body: [5], hidden_size=SPEC.dim, max_model_len=512) as server:
        r = recipe(settings(ws, "hf", "engine=vllm", f"vllm_url={server.url}", "eval_vqa=True"))
        assert len(r.load(None).model.decoder.layers) == SPEC.layers


def test_a_lora_checkpoint_is_refused(ws):
    lora = ws["root"] / "lora" / "meta_model_0.pt"
    with pytest.raises(ConfigError, match="adapted with LoRA .* use engine=medcap"):
        assembly.load_for_inference(settings(ws, "meta"), lora, embeddings_only=True)
    assembly.load_for_inference(settings(ws, "meta"), lora)  # engine=medcap runs it
