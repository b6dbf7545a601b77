"""The original medcap's command lines, verbatim: each is built by the same Python f-string its
README or README_FINETUNE prints (only the variables at the top of those snippets, which are
the user's own settings, are chosen here: paths, epochs, GPUs), run from a working folder laid
out as the original expected (``./datasets/...``, ``./models/...``), with the LLM swapped for a
tiny Llama-3-vocabulary one by overrides appended to the line. Every original tool runs with no
arguments from that folder.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TinyLlama, draw_jpeg, make_hf_llama, write_hub_biomedclip, write_meta_checkpoint
from test_checkpoints import original_projector_state, original_visual_state

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
# 8 heads and KV heads: the judge's line runs tensor parallel over 8 processes
SPEC = TinyLlama(vocab_size=128256, layers=2, dim=64, ffn=128, heads=8, kv_heads=8, max_seq_len=1024)
TINY_LLM = [*SPEC.overrides(), "device=cpu", "dtype=fp32"]
TINY_EVAL = [*SPEC.overrides(), "device=cpu", "dtype=fp32"]


def slake_rows():
    rows = []
    for i in range(2):
        common = {"img_id": i, "img_name": f"xmlab{i}/source.jpg", "q_lang": "en", "location": "Chest",
                  "modality": "CT", "base_type": "vqa", "triple": ["vhead", "_", "_"]}  # fmt: skip
        rows.append({**common, "qid": 10 * i, "question": "Is this a CT?", "answer": "Yes", "answer_type": "CLOSED",
                     "content_type": "Modality"})  # fmt: skip
        rows.append({**common, "qid": 10 * i + 1, "question": "Which organ is shown?", "answer": "Lung",
                     "answer_type": "OPEN", "content_type": "Organ"})  # fmt: skip
    return rows


def write_release(path: Path) -> Path:
    """A vision checkpoint in the original release layout (BiomedCLIP tower, N = 32, bf16)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"visual": original_visual_state(), "projector": original_projector_state(32, d=SPEC.dim)}, path)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory, llama3_tokenizer_path):
    """The original's working folder: its code paths (torchtune/_cli/tune.py, recipes/, tools/,
    chat_llama3.py) beside ./datasets and ./models as its README has users download them."""
    w = tmp_path_factory.mktemp("original")
    for name in ("torchtune", "recipes", "tools", "chat_llama3.py"):
        (w / name).symlink_to(ROOT / name)
    d = w / "datasets"
    # SLAKE images + SLAKE-text (read from ./datasets/SLAKE) + SLAKE VQA
    for i in range(2):
        draw_jpeg(d / "SLAKE" / "imgs" / f"xmlab{i}" / "source.jpg", seed=i)
    for split in ("train", "validation", "test"):
        text = [{"img_name": f"xmlab{i}/source.jpg", "text": f"A chest CT, slice {i}."} for i in range(2)]
        (d / "SLAKE" / f"{split}_text.json").write_text(json.dumps(text))
    for split in ("train", "validate", "test"):
        (d / "SLAKE" / f"{split}.json").write_text(json.dumps(slake_rows()))
    # VQA-RAD (VQA and VQA-RAD-text)
    rad = d / "VQA_RAD"
    rows = []
    for i, phrase in enumerate(["freeform", "test_freeform", "test_para"]):
        draw_jpeg(rad / "VQA_RAD Image Folder" / f"synpic{i}.jpg", seed=10 + i)
        rows.append({"qid": i, "image_name": f"synpic{i}.jpg", "image_organ": "CHEST", "answer": "yes" if i % 2 else "lung",
                     "answer_type": "CLOSED" if i % 2 else "OPEN", "question_type": "PRES", "question": f"Question {i}?",
                     "phrase_type": phrase})  # fmt: skip
    (rad / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    for split in ("train", "test"):
        (rad / f"{split}_text.json").write_text(json.dumps([{"image_name": "synpic0.jpg", "text": "A chest film."}]))
    # PMC-OA as the original expected it
    pmc = d / "pmc_oa"
    for split in ("train", "valid", "test"):
        draw_jpeg(pmc / "caption_T060_filtered_top4_sep_v0_subfigures" / f"PMC1_{split}.jpg", seed=20)
        (pmc / f"{split}.jsonl").write_text(json.dumps({"image": f"PMC1_{split}.jpg", "caption": "Fig. 1: CT."}) + "\n")
    # ROCOv2
    roco = d / "ROCOv2"
    for split in ("train", "valid", "test"):
        draw_jpeg(roco / "images" / split / f"ROCO_{split}.jpg", seed=30)
        (roco / f"{split}_captions.csv").write_text(f"ID,Caption\nROCO_{split},Head CT.\n")
    # ROCOv2-VQARAD-SLAKE-text: raw images; tools/preprocess_images.py writes images_preprocess
    rvs = d / "ROCOv2-VQARAD-SLAKE-text"
    draw_jpeg(rvs / "images" / "roco" / "a.jpg", size=96, seed=40)
    draw_jpeg(rvs / "images" / "slake" / "b.jpg", size=80, seed=41)
    (rvs / "train.json").write_text(json.dumps([{"id": "roco/a.jpg", "caption": "Axial CT."},
                                                {"id": "slake/b.jpg", "caption": "Chest MRI."}]))  # fmt: skip
    # models: Llama-3-8B-Instruct in Meta's layout, Llama-3.1 in Hugging Face's (shards), the 70B judge
    m = w / "models" / "llama3"
    meta = write_meta_checkpoint(make_hf_llama(SPEC, seed=0), SPEC, m / "Meta-Llama-3-8B-Instruct")
    shutil.copy(llama3_tokenizer_path, meta / "tokenizer.model")
    judge = write_meta_checkpoint(make_hf_llama(SPEC, seed=3), SPEC, m / "Meta-Llama-3-70B-Instruct")
    shutil.copy(llama3_tokenizer_path, judge / "tokenizer.model")
    hf = m / "Meta-Llama-3.1-8B-Instruct"
    make_hf_llama(SPEC, seed=1).save_pretrained(hf, safe_serialization=True, max_shard_size="12MB")
    (hf / "original").mkdir()
    shutil.copy(llama3_tokenizer_path, hf / "original" / "tokenizer.model")
    assert len(list(hf.glob("model-0000*-of-0000*.safetensors"))) > 1
    write_release(w / "models" / "medcap-rocov2-vqarad-slake" / "last.pt")
    write_release(w / "models" / "medcap-pmcoa" / "last.pt")
    write_release(w / "models" / "medcap-textplus-pmcoa-patients-llama3.1" / "meta_model_last.pt")
    write_hub_biomedclip(w / "hf_cache")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(w / "hf_cache"), "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    env.pop("PYTHONPATH", None)
    return {"dir": w, "env": env}


def run(site, line: str, *overrides: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``line`` exactly as the original's snippet builds it, through bash, in the working folder."""
    proc = subprocess.run(["bash", "-c", " ".join([line, *overrides])], cwd=site["dir"], env=site["env"],
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip
    assert proc.returncode == 0, f"{line[:200]}...\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


def tool(site, name: str) -> subprocess.CompletedProcess:
    return run(site, f"python tools/{name}.py")


def test_installed_torchtune_wins_over_the_launcher_folder(site):
    proc = run(site, 'PYTHONPATH=./ python -c "import torchtune; print(torchtune.__file__)"')
    assert "site-packages" in proc.stdout and str(site["dir"]) not in proc.stdout
    assert not (ROOT / "torchtune" / "__init__.py").exists()


def test_every_original_tool_runs_without_arguments(site):
    out = site["dir"] / "datasets" / "medcap"
    tool(site, "convert_slake_text_to_sharegpt")
    assert [len(json.loads((out / f"slake_{s}.json").read_text())) for s in ("train", "val", "test")] == [2, 2, 2]
    tool(site, "convert_slake_to_sharegpt")
    assert len(json.loads((out / "slake_vqa_test.json").read_text())) == 4
    tool(site, "convert_pmcoa_to_sharegpt")
    assert json.loads((out / "pmcoa_train.json").read_text())[0]["conversations"][1]["value"] == "Fig. 1: CT."
    tool(site, "convert_rocov2_to_sharegpt")
    assert (out / "rocov2_val.json").is_file()
    tool(site, "convert_vqarad_text_to_sharegpt")
    captions = json.loads((out / "vqarad_train.json").read_text())
    assert captions[0]["conversations"][1]["value"] == "A chest film."
    tool(site, "convert_vqarad_to_sharegpt")  # VQA under its own names: the captions survive
    assert len(json.loads((out / "vqarad_vqa_test.json").read_text())) == 2
    assert json.loads((out / "vqarad_train.json").read_text()) == captions
    proc = tool(site, "preprocess_images")
    rvs = site["dir"] / "datasets" / "ROCOv2-VQARAD-SLAKE-text"
    from PIL import Image

    assert Image.open(rvs / "images_preprocess" / "roco" / "a.jpg").size == (224, 224)
    assert "wrote 2 images" in proc.stdout
    tool(site, "convert_rocov2_vqarad_slake_text_to_sharegpt")
    records = json.loads((out / "rocov2_vqarad_slake_train.json").read_text())
    assert len(records) == 2 and records[0]["image"] == "a.jpg"


# The original README's training snippet, with its variables (the user's choices) set here.
def readme_training_line(GPU=0, name="slake", vision="biomedclip", epochs=1, data_dir="./datasets/medcap",  # noqa: N803
                         llama_dir="./models/llama3/Meta-Llama-3-8B-Instruct",
                         pretrained_medcap="./models/medcap-rocov2-vqarad-slake/last.pt",
                         result_dir="./results_medcap", postfix_result=""):  # fmt: skip
    cmd=f"PYTHONPATH=./ CUDA_VISIBLE_DEVICES={GPU} python torchtune/_cli/tune.py run full_finetune_single_device --config llama3/8B_full_single_device \
    seed=1 \
    epochs={epochs} \
    batch_size=16 \
    gradient_accumulation_steps=1 \
    vision={vision} \
    dataset._component_=torchtune.datasets.chat_dataset \
    dataset.source={data_dir}/{name}_train.json \
    dataset.conversation_style=sharegpt \
    dataset.chat_format=ChatFormat \
    dataset.max_seq_len=400 \
    tokenizer.path={llama_dir}/tokenizer.model \
    checkpointer.checkpoint_dir={llama_dir} \
    vision_checkpoint={pretrained_medcap} \
    checkpointer.output_dir={result_dir}/{name}_{vision}{postfix_result}/checkpoint \
    metric_logger.log_dir={result_dir}/{name}_{vision}{postfix_result}/log \
    output_dir={result_dir}/{name}_{vision}{postfix_result}"  # fmt: skip
    return cmd


# README_FINETUNE's PMC-OA stage: the same line without vision_checkpoint (pretrained BiomedCLIP).
def finetune_pmcoa_line(GPU=0, name="pmcoa", vision="biomedclip", epochs=1, data_dir="./datasets/medcap",  # noqa: N803
                        llama_dir="./models/llama3/Meta-Llama-3-8B-Instruct", result_dir="./results_medcap",
                        postfix_result=""):  # fmt: skip
    cmd=f"PYTHONPATH=./ CUDA_VISIBLE_DEVICES={GPU} python torchtune/_cli/tune.py run full_finetune_single_device --config llama3/8B_full_single_device \
    seed=1 \
    epochs={epochs} \
    batch_size=16 \
    gradient_accumulation_steps=1 \
    vision={vision} \
    dataset._component_=torchtune.datasets.chat_dataset \
    dataset.source={data_dir}/{name}_train.json \
    dataset.conversation_style=sharegpt \
    dataset.chat_format=ChatFormat \
    dataset.max_seq_len=400 \
    tokenizer.path={llama_dir}/tokenizer.model \
    checkpointer.checkpoint_dir={llama_dir} \
    checkpointer.output_dir={result_dir}/{name}_{vision}{postfix_result}/checkpoint \
    metric_logger.log_dir={result_dir}/{name}_{vision}{postfix_result}/log \
    output_dir={result_dir}/{name}_{vision}{postfix_result}"  # fmt: skip
    return cmd


# The original README's test snippet (one epoch of its loop), with "Modify the configs" applied by
# replacing test_metrics=True / dataset_source as it says.
def readme_test_line(epoch=0, GPU=0, name="slake", vision="biomedclip", data_dir="./datasets/medcap",  # noqa: N803
                     llama_dir="./models/llama3/Meta-Llama-3-8B-Instruct", result_dir="./results_medcap",
                     postfix_result=""):  # fmt: skip
    cmd=f"PYTHONPATH=./ CUDA_VISIBLE_DEVICES={GPU} python torchtune/_cli/tune.py run recipes/generate.py --config recipes/configs/custom_generation_config.yaml \
        test_metrics=True \
        seed=1 \
        max_new_tokens=200 \
        top_k=null \
        temperature=0 \
        vision={vision} \
        dataset_source={data_dir}/{name}_val.json \
        dataset_conversation_style=sharegpt \
        dataset_chat_format=ChatFormat \
        dataset_max_seq_len=200 \
        tokenizer.path={llama_dir}/tokenizer.model \
        checkpointer.checkpoint_dir={llama_dir} \
        vision_checkpoint={result_dir}/{name}_{vision}{postfix_result}/checkpoint/meta_model_{epoch}.pt \
        output_dir={result_dir}/{name}_{vision}{postfix_result}"  # fmt: skip
    return cmd


def read_csv(path: Path) -> list[dict[str, str]]:
    assert path.read_bytes()[:3] == b"\xef\xbb\xbf", f"{path}: no byte order mark (the original's utf-8-sig)"
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained_slake(site):
    """The README's training line (SLAKE-text from the released medcap-rocov2-vqarad-slake)."""
    tool(site, "convert_slake_text_to_sharegpt")
    proc = run(site, readme_training_line(), *TINY_LLM)
    return proc


def test_readme_training_line(site, trained_slake):
    run_dir = site["dir"] / "results_medcap" / "slake_biomedclip"
    ckpt = torch.load(run_dir / "checkpoint" / "meta_model_0.pt", weights_only=True)
    assert len(ckpt["visual"]) == 151 and ckpt["medcap"]["num_image_tokens"] == 32
    assert ckpt["projector"]["2.weight"].shape == (32 * SPEC.dim, SPEC.dim)
    assert "medcap-rocov2-vqarad-slake/last.pt" in ckpt["medcap"]["vision_init"]
    assert (run_dir / "log").is_dir() and (run_dir / "loss_curve.png").is_file()


def test_readme_test_line_captions(site, trained_slake):
    run(site, readme_test_line(), *TINY_EVAL)
    out = site["dir"] / "results_medcap" / "slake_biomedclip"
    rows = read_csv(out / "test_out_meta_model_0.csv")
    assert len(rows) == 2 and list(rows[0])[:4] == ["image", "instruction", "output", "generated"]
    scores = (out / "test_meta_model_0.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in scores] == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]


@pytest.mark.parametrize("kind, root, n", [("slake", "./datasets/SLAKE", 4), ("vqarad", "./datasets/VQA_RAD", 2)])
def test_readme_test_line_vqa_with_the_in_process_judge(site, trained_slake, kind, root, n):
    line = readme_test_line().replace("test_metrics=True", f"test_{kind}=True")
    line = line.replace("dataset_source=./datasets/medcap/slake_val.json", f"dataset_source={root}")
    run(site, line, "eval_vqa=True", *TINY_EVAL)
    out = site["dir"] / "results_medcap" / "slake_biomedclip"
    answers = read_csv(out / f"test_out_{kind}_meta_model_0.csv")
    assert len(answers) == n and all(r["description"] for r in answers)  # the original's two turns
    judged = read_csv(out / f"acc_out_{kind}_meta_model_0.csv")
    assert len(judged) == n and all(r["verdict"] in ("right", "wrong", "unparsed") for r in judged)
    assert judged[0]["instruction"].startswith("Respond with only RIGHT or WRONG")
    accuracy = (out / f"acc_{kind}_meta_model_0.csv").read_text().strip()
    assert accuracy == "nan" or 0.0 <= float(accuracy) <= 1.0
    metrics = json.loads((out / "metrics_meta_model_0.json").read_text())[kind]
    assert metrics["judge"]["all"]["n"] == n


def test_readme_judge_line_on_a_csv_in_the_original_form(site):
    """`torchrun --nproc_per_node 8 chat_llama3.py ...` on a CSV as the original wrote it: a
    byte order mark, and the whole decoded prompt (header tokens as text) as instruction."""
    name, vision, postfix_result, epoch = "slakeorig", "biomedclip", "", 0
    folder = site["dir"] / "results_medcap" / f"{name}_{vision}{postfix_result}"
    folder.mkdir(parents=True)
    image_run = "\u2460" * 32
    prompt = ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n{img}\n\nDescribe the image in a detailed "
              "and informative manner.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nA chest CT with "
              "a long description of what it shows.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{q}<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n")  # fmt: skip
    rows = [("xmlab0/source.jpg", "Is this a CT?", "Yes", "Yes"), ("xmlab1/source.jpg", "Which organ is shown?", "Lung", "Liver")]
    with open(folder / f"test_out_{name}_meta_model_{epoch}.csv", "w", newline="", encoding="utf-8-sig") as f:
        w = csv.writer(f)
        w.writerow(["image", "instruction", "output", "generated"])
        for image, q, gold, pred in rows:
            w.writerow([image, prompt.format(img=image_run, q=q), gold, pred])
    cmd=f"torchrun --nproc_per_node 8 chat_llama3.py \
        --ckpt_dir ./models/llama3/Meta-Llama-3-70B-Instruct \
        --tokenizer_path ./models/llama3/Meta-Llama-3-70B-Instruct/tokenizer.model \
        --temperature 0 --max_seq_len 200 --max_batch_size 8 \
        --exp eval_vqa \
        --csv_path ./results_medcap/{name}_{vision}{postfix_result}/test_out_{name}_meta_model_{epoch}.csv"  # fmt: skip
    run(site, cmd)
    judged = read_csv(folder / f"test_out_{name}_meta_model_{epoch}_70B_out.csv")
    assert [r["question"] for r in judged] == ["Is this a CT?", "Which organ is shown?"]
    assert [r["image"] for r in judged] == ["xmlab0/source.jpg", "xmlab1/source.jpg"]
    assert all(r["verdict"] != "too_long" for r in judged)
    assert (folder / f"test_out_{name}_meta_model_{epoch}_70B_acc.csv").read_text().strip() != "nan"


def test_readme_finetune_stages(site):
    """README_FINETUNE: PMC-OA from pretrained BiomedCLIP (the hub cache), then
    ROCOv2-VQARAD-SLAKE-text from the released medcap-pmcoa weights."""
    tool(site, "convert_pmcoa_to_sharegpt")
    proc = run(site, finetune_pmcoa_line(), *TINY_LLM)
    assert "pretrained microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in proc.stdout + proc.stderr
    stage1 = torch.load(site["dir"] / "results_medcap" / "pmcoa_biomedclip" / "checkpoint" / "meta_model_0.pt",
                        weights_only=True)  # fmt: skip
    assert "pretrained microsoft/BiomedCLIP" in stage1["medcap"]["vision_init"]
    tool(site, "preprocess_images")
    tool(site, "convert_rocov2_vqarad_slake_text_to_sharegpt")
    line = readme_training_line(name="rocov2_vqarad_slake", pretrained_medcap="./models/medcap-pmcoa/last.pt")
    run(site, line, *TINY_LLM)
    stage2 = torch.load(site["dir"] / "results_medcap" / "rocov2_vqarad_slake_biomedclip" / "checkpoint"
                        / "meta_model_0.pt", weights_only=True)  # fmt: skip
    assert "medcap-pmcoa/last.pt" in stage2["medcap"]["vision_init"]


def test_later_distributed_line_on_a_hugging_face_folder(site):
    """README_FINETUNE's later line: torchrun flags before the recipe, the llama3_1 config by
    path, and checkpointer.checkpoint_dir = the Hugging Face folder of Llama-3.1-8B-Instruct."""
    data = site["dir"] / "datasets" / "medcap"
    tool(site, "convert_slake_text_to_sharegpt")
    (data / "textplus_pmcoa_patients_train.json").write_text((data / "slake_train.json").read_text())
    GPU = "0,1"  # noqa: N806
    NUM_GPU = len(GPU.split(","))  # noqa: N806
    name, vision, epochs, data_dir = "textplus_pmcoa_patients", "biomedclip", 1, "./datasets/medcap"
    llama_dir = "./models/llama3/Meta-Llama-3.1-8B-Instruct"
    pretrained_medcap = "./models/medcap-textplus-pmcoa-patients-llama3.1/meta_model_last.pt"
    result_dir, postfix_result = "./results_medcap", ""
    cmd=f"PYTHONPATH=./ CUDA_VISIBLE_DEVICES={GPU} python torchtune/_cli/tune.py run --master_port 29500 --nproc_per_node {NUM_GPU} full_finetune_distributed --config recipes/configs/llama3_1/8B_full.yaml \
    epochs={epochs} \
    batch_size=8 \
    gradient_accumulation_steps=1 \
    optimizer.lr=2e-5 \
    vision={vision} \
    dataset._component_=torchtune.datasets.chat_dataset \
    dataset.source={data_dir}/{name}_train.json \
    dataset.conversation_style=sharegpt \
    dataset.max_seq_len=1000 \
    tokenizer.path={llama_dir}/original/tokenizer.model \
    checkpointer.checkpoint_dir={llama_dir} \
    vision_checkpoint={pretrained_medcap} \
    checkpointer.output_dir={result_dir}/{name}_{vision}{postfix_result}/checkpoint \
    metric_logger.log_dir={result_dir}/{name}_{vision}{postfix_result}/log \
    output_dir={result_dir}/{name}_{vision}{postfix_result}"  # fmt: skip
    run(site, cmd, *TINY_LLM)
    ckpt = torch.load(site["dir"] / "results_medcap" / f"{name}_{vision}" / "checkpoint" / "meta_model_0.pt",
                      weights_only=True)  # fmt: skip
    assert len(ckpt["visual"]) == 151 and ckpt["medcap"]["num_image_tokens"] == 32


def test_an_override_no_recipe_reads_is_an_error(site):
    proc = subprocess.run(["bash", "-c", readme_training_line() + " vision_chekpoint=x " + " ".join(TINY_LLM)],
                          cwd=site["dir"], env=site["env"], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode != 0
    assert "vision_chekpoint (did you mean vision_checkpoint?)" in proc.stderr
