"""Original files in and out, quickly: the judge reads the original's CSVs, one checkpointer
config reads Meta's and Hugging Face's folders, unknown keys are named, CSVs carry the BOM."""

from __future__ import annotations

import csv

import pytest
import torch
from helpers import TinyLlama, make_hf_llama, write_hf_checkpoint, write_meta_checkpoint

from medcap.evaluation.judge import question_text, read_items
from medcap.io import ResumableCSV
from medcap.models.assembly import LLMCheckpointer, load_llm_weights
from medcap.settings import GenerateSettings, TrainSettings, UnknownConfigKeyError, check_keys

DECODED = (
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n" + "\u2460" * 32 + "\n\nDescribe the image."
    "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA CT of the chest.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nIs the lung healthy?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def test_question_is_the_last_user_turn_of_an_original_prompt():
    assert question_text(DECODED) == "Is the lung healthy?"
    assert question_text("Is the lung healthy?") == "Is the lung healthy?"  # medcap's own CSVs


def test_judge_reads_an_original_csv_with_a_byte_order_mark(tmp_path):
    path = tmp_path / "test_out_slake_meta_model_0.csv"
    with open(path, "w", newline="", encoding="utf-8-sig") as f:
        w = csv.writer(f)
        w.writerow(["image", "instruction", "output", "generated"])
        w.writerow(["xmlab1/source.jpg", DECODED, "No", "Yes"])
    (item,) = read_items(path)
    assert (item.image, item.question, item.answer, item.prediction) == ("xmlab1/source.jpg", "Is the lung healthy?", "No", "Yes")


def test_resumable_csv_writes_one_byte_order_mark(tmp_path):
    path = tmp_path / "out.csv"
    for i in range(2):  # a rerun appends
        with ResumableCSV(path, ["index", "text"]) as out:
            out.add({"index": i, "text": "Ödem"})
    data = path.read_bytes()
    assert data.startswith(b"\xef\xbb\xbf") and data.count(b"\xef\xbb\xbf") == 1
    assert sorted(ResumableCSV(path, ["index", "text"], write=False).done) == [0, 1]


@pytest.mark.parametrize("layout", ["meta", "hf"])
def test_one_checkpointer_reads_either_layout(layout, tmp_path):
    spec = TinyLlama()
    hf = make_hf_llama(spec)
    folder = (write_meta_checkpoint(hf, spec, tmp_path / "llm") if layout == "meta"
              else write_hf_checkpoint(hf, tmp_path / "llm"))  # fmt: skip
    # the configs name consolidated.00.pth; a Hugging Face folder holds safetensors instead
    ckpt = LLMCheckpointer(str(folder), "LLAMA3", str(tmp_path / "out"), checkpoint_files=["consolidated.00.pth"])
    decoder = spec.torchtune_decoder()
    load_llm_weights(decoder, ckpt)
    assert torch.equal(decoder.tok_embeddings.weight, hf.model.embed_tokens.weight)


def test_checkpointer_names_what_a_wrong_folder_holds(tmp_path):
    (tmp_path / "weights.ckpt").write_text("x")
    with pytest.raises(FileNotFoundError, match=r"neither Meta's layout .* nor Hugging Face's .* holds \['weights.ckpt'\]"):
        LLMCheckpointer(str(tmp_path), "LLAMA3", str(tmp_path / "out"))


def test_unknown_keys_are_named_with_the_closest_known_one():
    with pytest.raises(UnknownConfigKeyError, match=r"vision_chekpoint \(did you mean vision_checkpoint\?\)"):
        TrainSettings.from_config({"vision_chekpoint": "x", "epochs": 1}, "full_finetune")
    with pytest.raises(UnknownConfigKeyError, match=r"test_slak \(did you mean test_slake\?\)"):
        GenerateSettings.from_config({"test_slak": True}, "generate")
    check_keys({"optimizer_in_bwd": True, "loss": {}}, TrainSettings.keys(), "full_finetune")  # torchtune's: accepted


def test_settings_are_parsed_once_with_their_types_and_one_dtype_reading():
    """Text from the command line becomes the field's type; a value of the wrong kind, or fp16
    (refused by training, evaluation, serving and the probe alike), is an error naming the key."""
    from medcap.errors import ConfigError
    from medcap.probing import ProbeSettings

    s = TrainSettings.from_config({"batch_size": "4", "shuffle": "false", "clip_grad_norm": "1.5", "seed": "3"})
    assert (s.batch_size, s.shuffle, s.clip_grad_norm, s.seed, s.dtype) == (4, False, 1.5, 3, "bf16")
    for bad, key in (({"batch_size": "four"}, "batch_size"), ({"shuffle": "maybe"}, "shuffle"),
                     ({"epochs": 0}, "epochs"), ({"epochs": 1.5}, "epochs")):  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            TrainSettings.from_config(bad)
    for settings in (TrainSettings, GenerateSettings, ProbeSettings):
        with pytest.raises(ConfigError, match="dtype=fp16: fp16 overflows"):
            settings.from_config({"dtype": "fp16"})
    assert ProbeSettings.from_config({"fewshot_sizes": [1, 2]}).fewshot_sizes == (1, 2)
    assert TrainSettings.keys() > {"dataset", "optimizer", "vision", "device", "dtype", "seed"}
