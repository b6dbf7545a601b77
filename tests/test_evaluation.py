"""The generate recipe: SLAKE / VQA-RAD / captioning CSVs, many checkpoints with one LLM load,
resume after interruption, and the original README's evaluation command."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TinyLlama, draw_jpeg, load_tiny_decoder, make_hf_llama, write_meta_checkpoint
from omegaconf import OmegaConf

from medcap.models.checkpoints import save_vision_checkpoint
from medcap.models.fusion import build_medcap_model

ROOT = Path(__file__).resolve().parents[1]
SPEC = TinyLlama(vocab_size=400, layers=2, dim=64, ffn=128, heads=4, kv_heads=2, max_seq_len=512)


def slake_row(qid, img, question, answer, answer_type, content_type, lang="en"):
    return {"img_id": img, "img_name": f"xmlab{img}/source.jpg", "question": question, "answer": answer,
            "q_lang": lang, "location": "Chest", "modality": "CT", "answer_type": answer_type, "base_type": "vqa",
            "content_type": content_type, "triple": ["vhead", "_", "_"], "qid": qid}  # fmt: skip


@pytest.fixture(scope="module")
def ws(tmp_path_factory, chatml_tokenizer_json):
    root = tmp_path_factory.mktemp("eval")
    llm = write_meta_checkpoint(make_hf_llama(SPEC, seed=0, steerable=True), SPEC, root / "llm")
    slake = root / "SLAKE"
    for i in range(3):
        draw_jpeg(slake / "imgs" / f"xmlab{i}" / "source.jpg", seed=i)
    rows = [
        slake_row(1, 0, "Is this a CT?", "Yes", "CLOSED", "Modality"),
        slake_row(2, 1, "Which organ is shown?", "Lung", "OPEN", "Organ"),
        slake_row(3, 2, "Is the lung healthy?", "No", "CLOSED", "Abnormality"),
        slake_row(4, 2, "这是CT吗?", "是", "CLOSED", "Modality", lang="zh"),
        slake_row(5, 0, "What modality is used?", "CT", "OPEN", "Modality"),
    ]
    (slake / "test.json").write_text(json.dumps(rows, ensure_ascii=False))
    captions = [{"conversations": [{"from": "human", "value": "Describe the image."}, {"from": "gpt", "value": f"a chest ct number {i}"}],
                 "image": f"xmlab{i}/source.jpg", "meta": f"dir={slake / 'imgs'}"} for i in range(3)]  # fmt: skip
    (root / "slake_val.json").write_text(json.dumps(captions))
    ckpt_dir = root / "checkpoint"
    for epoch in range(2):
        torch.manual_seed(epoch)
        model = build_medcap_model(
            load_tiny_decoder(SPEC, llm, "meta", root / "x"),
            image_token_id=400,
            vision="vit_tiny",
            num_image_tokens=4,
        )
        save_vision_checkpoint(model, ckpt_dir / f"meta_model_{epoch}.pt", epoch=epoch)
    return {
        "root": root,
        "llm": llm,
        "slake": slake,
        "captions": root / "slake_val.json",
        "ckpt": ckpt_dir,
        "tok": chatml_tokenizer_json,
    }


def eval_overrides(ws, out, *extra):
    return [
        *SPEC.overrides(), "device=cpu", "dtype=fp32", "temperature=0", "top_k=null", "max_new_tokens=6",
        "tokenizer._component_=medcap.data.chatml.chatml_tokenizer", f"tokenizer.path={ws['tok']}",
        f"checkpointer.checkpoint_dir={ws['llm']}", f"output_dir={out}", "vision=vit_tiny", *extra,
    ]  # fmt: skip


def make_cfg(ws, out, *extra):
    base = OmegaConf.load(ROOT / "recipes" / "configs" / "custom_generation_config.yaml")
    return OmegaConf.merge(base, OmegaConf.from_dotlist(eval_overrides(ws, out, *extra)))


def recipe(cfg):
    """The generate recipe (``recipes/generate.py``), driven in this process."""
    from medcap.cli import load_recipe
    from medcap.settings import GenerateSettings

    return load_recipe("generate").EvaluationRecipe(GenerateSettings.from_config(cfg, "generate"))


def evaluate(cfg) -> dict:
    return recipe(cfg).run()


def read_csv(path):
    with open(path, "rb") as f:  # written as the original wrote them: utf-8 with a byte order mark
        assert f.read(3) == b"\xef\xbb\xbf", path
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def test_slake_all_checkpoints_one_llm_load(ws, tmp_path, monkeypatch):
    from medcap.models import assembly

    loads = []
    real = assembly.build_llm
    monkeypatch.setattr(assembly, "build_llm", lambda *a, **k: loads.append(1) or real(*a, **k))
    cfg = make_cfg(ws, tmp_path, "test_slake=True", f"dataset_source={ws['slake']}", "vqa_mode=direct",
                   f"vision_checkpoint={ws['ckpt']}/meta_model_*.pt", "batch_size=3")  # fmt: skip
    results = evaluate(cfg)
    assert len(loads) == 1
    assert sorted(results) == ["meta_model_0", "meta_model_1"]
    rows = read_csv(tmp_path / "test_out_slake_meta_model_0.csv")
    assert list(rows[0])[:4] == ["image", "instruction", "output", "generated"]
    assert [r["qid"] for r in rows] == ["1", "2", "3", "5"]  # English only, closed and open
    assert rows[1]["answer_type"] == "OPEN" and rows[1]["output"] == "Lung"
    summary = json.loads((tmp_path / "metrics_meta_model_0.json").read_text())["slake"]
    assert (summary["closed_n"], summary["open_n"]) == (2, 2)
    assert summary["by_content_type"]["Modality"]["n"] == 2
    protocols = summary["protocols"]  # protocols=None: every one, on the same answers
    assert list(protocols) == ["medcap", "lmms_eval", "multimedeval", "medevalkit", "llava_med"]
    assert protocols["medcap"]["closed"] == summary["closed_accuracy"] and protocols["lmms_eval"]["n"] == 4
    other = read_csv(tmp_path / "test_out_slake_meta_model_1.csv")
    assert [r["generated"] for r in rows] != [r["generated"] for r in other]  # the checkpoints differ

    # batch size does not change greedy answers
    cfg1 = make_cfg(ws, tmp_path / "b1", "test_slake=True", f"dataset_source={ws['slake']}", "vqa_mode=direct",
                    f"vision_checkpoint={ws['ckpt']}/meta_model_0.pt", "batch_size=1")  # fmt: skip
    evaluate(cfg1)
    assert [r["generated"] for r in read_csv(tmp_path / "b1" / "test_out_slake_meta_model_0.csv")] == [
        r["generated"] for r in rows
    ]


def test_resume_after_interruption(ws, tmp_path, monkeypatch):

    cfg = make_cfg(ws, tmp_path, "test_slake=True", f"dataset_source={ws['slake']}", "vqa_mode=describe_then_answer",
                   f"vision_checkpoint={ws['ckpt']}/meta_model_0.pt", "answer_types=[CLOSED]", "batch_size=1")  # fmt: skip
    evaluate(cfg)
    path = tmp_path / "test_out_slake_meta_model_0.csv"
    full = read_csv(path)
    assert len(full) == 2 and all(r["description"] for r in full)  # two turns: a description first
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]))  # the run died before its last row
    from medcap.evaluation import answering

    calls = []
    real = answering.generate_two_turns
    monkeypatch.setattr(answering, "generate_two_turns", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    evaluate(cfg)
    assert sum(calls) == 1  # one item: its description and its answer, in one two-turn call
    assert read_csv(path) == full


def test_captioning_metrics_files(ws, tmp_path):

    cfg = make_cfg(
        ws,
        tmp_path,
        "test_metrics=True",
        f"dataset_source={ws['captions']}",
        f"vision_checkpoint={ws['ckpt']}/meta_model_1.pt",
    )
    evaluate(cfg)
    rows = read_csv(tmp_path / "test_out_meta_model_1.csv")
    assert [r["output"] for r in rows] == [f"a chest ct number {i}" for i in range(3)]
    assert all(r["instruction"] == "Describe the image." for r in rows)
    metrics = dict(line.split(",") for line in (tmp_path / "test_meta_model_1.csv").read_text().splitlines())
    # the original's test_{ckpt}.csv: pycocoevalcap's names, six decimals
    assert list(metrics) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]
    assert all(len(v.split(".")[1]) == 6 for v in metrics.values())
    assert json.loads((tmp_path / "metrics_meta_model_1.json").read_text())["captions"]["n"] == 3


def test_long_prompts_are_skipped_not_cut(ws, tmp_path, capsys):

    cfg = make_cfg(ws, tmp_path, "test_slake=True", f"dataset_source={ws['slake']}", "vqa_mode=direct",
                   f"vision_checkpoint={ws['ckpt']}/meta_model_0.pt", "dataset_max_seq_len=20")  # fmt: skip
    evaluate(cfg)
    assert not read_csv(tmp_path / "test_out_slake_meta_model_0.csv")
    assert "4 items skipped: prompt longer than dataset_max_seq_len=20" in capsys.readouterr().out
    assert json.loads((tmp_path / "metrics_meta_model_0.json").read_text())["slake"]["skipped_too_long"] == 4


def test_vqarad_and_an_original_layout_checkpoint(ws, tmp_path):
    """VQA-RAD's official test split from its own file layout, with a checkpoint saved the way
    the original medcap saved them (no 'medcap' entry, bf16)."""

    root = tmp_path / "VQA_RAD"
    rows = []
    for i, phrase in enumerate(["freeform", "test_freeform", "test_para", "test_freeform"]):
        draw_jpeg(root / "VQA_RAD Image Folder" / f"synpic{i}.jpg", seed=i)
        rows.append({"qid": i, "image_name": f"synpic{i}.jpg", "image_organ": "CHEST", "answer": "yes" if i % 2 else "lung",
                     "answer_type": "CLOSED" if i % 2 else "OPEN", "question_type": "PRES", "question": f"q{i}?",
                     "phrase_type": phrase})  # fmt: skip
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    ours = torch.load(ws["ckpt"] / "meta_model_0.pt", weights_only=True)
    original = {k: {n: t.to(torch.bfloat16) for n, t in ours[k].items()} for k in ("visual", "projector")}
    torch.save(original, tmp_path / "last.pt")
    cfg = make_cfg(
        ws,
        tmp_path,
        "test_vqarad=True",
        f"dataset_source={root}",
        "vqa_mode=direct",
        f"vision_checkpoint={tmp_path}/last.pt",
        "protocols=[medevalkit]",
    )
    evaluate(cfg)
    out = read_csv(tmp_path / "test_out_vqarad_last.csv")
    assert [r["qid"] for r in out] == ["1", "2", "3"]  # the official test split only
    summary = json.loads((tmp_path / "metrics_last.json").read_text())["vqarad"]
    assert (summary["closed_n"], summary["open_n"]) == (2, 1)
    assert list(summary["protocols"]) == ["medevalkit"]  # protocols=[medevalkit], VQA-RAD's rules
    assert all(json.loads(r["score"]) for r in out)


def test_single_image_inference_on_a_dicom(ws, tmp_path, capsys):
    from pydicom.data import get_testdata_file


    cfg = make_cfg(ws, tmp_path, f"image={get_testdata_file('CT_small.dcm')}", "prompt=Is there a pleural effusion?",
                   f"vision_checkpoint={ws['ckpt']}/meta_model_0.pt")  # fmt: skip
    answer = evaluate(cfg)["answer"]
    assert capsys.readouterr().out.strip().endswith(answer)
    bad = make_cfg(ws, tmp_path, f"image={tmp_path}/missing.dcm", "prompt=x")
    with pytest.raises(Exception, match="missing.dcm: image file not found"):
        evaluate(bad)


def test_eval_split_val_and_metrics_of_separate_runs_merge(ws, tmp_path):
    import shutil


    slake = tmp_path / "SLAKE"
    shutil.copytree(ws["slake"], slake)
    (slake / "validate.json").write_text(json.dumps([slake_row(9, 1, "Is this an MRI?", "No", "CLOSED", "Modality")]))
    ckpt = f"vision_checkpoint={ws['ckpt']}/meta_model_0.pt"
    out = tmp_path / "out"
    evaluate(make_cfg(ws, out, "test_slake=True", "eval_split=val", f"dataset_source={slake}",
                              "vqa_mode=direct", ckpt))  # fmt: skip
    assert [r["instruction"] for r in read_csv(out / "test_out_slake_meta_model_0.csv")] == ["Is this an MRI?"]
    evaluate(make_cfg(ws, out, "test_metrics=True", f"dataset_source={ws['captions']}", ckpt))
    metrics = json.loads((out / "metrics_meta_model_0.json").read_text())
    assert metrics["slake"]["n"] == 1 and metrics["captions"]["n"] == 3  # the second run kept the first's
    with pytest.raises(ValueError, match="VQA-RAD has no validation split"):
        evaluate(make_cfg(ws, out, "test_vqarad=True", "eval_split=val", f"dataset_source={slake}"))


def test_bf16_evaluation_on_cpu(ws, tmp_path):
    """The GPU's evaluation path on a CPU: the LLM in bf16, the vision side fp32 under autocast."""

    cfg = make_cfg(ws, tmp_path, "dtype=bf16", "test_slake=True", f"dataset_source={ws['slake']}", "vqa_mode=direct",
                   f"vision_checkpoint={ws['ckpt']}/meta_model_0.pt")  # fmt: skip
    evaluator = recipe(cfg)
    evaluator.run()
    model = evaluator.answerer.model
    assert {p.dtype for p in model.decoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.visual.parameters()} | {p.dtype for p in model.projector.parameters()} == {torch.float32}
    rows = read_csv(tmp_path / "test_out_slake_meta_model_0.csv")
    assert len(rows) == 4 and all(r["generated"] for r in rows)


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "medcap.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=900)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _same_metrics(a: Path, b: Path) -> None:
    strip = lambda m: {k: {n: v for n, v in t.items() if n != "seconds"} for k, t in m.items()}  # noqa: E731
    assert strip(json.loads(a.read_text())) == strip(json.loads(b.read_text()))


def test_two_processes_write_what_one_process_writes(ws, tmp_path):
    """`medcap run --nproc_per_node 2 generate`: each rank answers half, rank 0 merges: the same
    CSVs (bytes) and metrics as one process; after a killed rank, a rerun keeps its rows."""
    common = ["generate", "--config", "custom_generation_config", "test_slake=True", f"dataset_source={ws['slake']}",
              "vqa_mode=describe_then_answer", "batch_size=2", f"vision_checkpoint={ws['ckpt']}/meta_model_*.pt"]  # fmt: skip
    one, two = tmp_path / "one", tmp_path / "two"
    _cli("run", *common, *eval_overrides(ws, one))
    _cli("run", "--nproc_per_node", "2", *common, *eval_overrides(ws, two))
    for tag in ("meta_model_0", "meta_model_1"):
        assert (two / f"test_out_slake_{tag}.csv").read_bytes() == (one / f"test_out_slake_{tag}.csv").read_bytes()
        _same_metrics(two / f"metrics_{tag}.json", one / f"metrics_{tag}.json")
    assert not list(two.glob(".*.rank*"))  # the parts are merged away

    # rank 1 was killed after writing one row of its part (and half of the next): the rerun keeps
    # that row (marked here so that a regenerated one would show) and answers only the rest
    three = tmp_path / "three"
    three.mkdir()
    rows = read_csv(one / "test_out_slake_meta_model_0.csv")
    with open(three / ".test_out_slake_meta_model_0.csv.rank1", "w", newline="", encoding="utf-8-sig") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerow({**rows[1], "generated": "KEPT FROM THE KILLED RANK"})
        f.write(rows[3]["index"] + ',"cut')
    _cli("run", "--nproc_per_node", "2", *common[:-1], f"vision_checkpoint={ws['ckpt']}/meta_model_0.pt",
         *eval_overrides(ws, three))  # fmt: skip
    merged = read_csv(three / "test_out_slake_meta_model_0.csv")
    assert [r["generated"] for r in merged] == [r["generated"] if i != 1 else "KEPT FROM THE KILLED RANK"
                                                for i, r in enumerate(rows)]  # fmt: skip


def test_two_turns_on_the_first_turns_cache_equal_recomputing(ws, tmp_path):
    """describe_then_answer: the second turn continued on the first turn's KV caches gives the
    rows (descriptions and answers) that running the second prompt from scratch gives."""

    common = ("test_slake=True", f"dataset_source={ws['slake']}", "vqa_mode=describe_then_answer",
              f"vision_checkpoint={ws['ckpt']}/meta_model_1.pt", "batch_size=3", "max_new_tokens=12")  # fmt: skip
    evaluate(make_cfg(ws, tmp_path / "cached", *common))
    evaluate(make_cfg(ws, tmp_path / "recomputed", *common, "two_turn_cache=False"))
    cached = read_csv(tmp_path / "cached" / "test_out_slake_meta_model_1.csv")
    assert cached == read_csv(tmp_path / "recomputed" / "test_out_slake_meta_model_1.csv")
    assert len(cached) == 4 and all(r["description"] for r in cached)


def test_copied_generate_recipe_is_editable_and_runs(ws, tmp_path):
    """`medcap cp generate` gives the evaluation loop itself; an edited copy runs as a file and
    writes what the shipped recipe writes, plus its edit."""
    mine = tmp_path / "my_eval.py"
    _cli("cp", "generate", str(mine))
    text = mine.read_text()
    assert "class EvaluationRecipe" in text and "def evaluate(self)" in text and "def answer(self" in text
    marker = "                out.add(task.row(it, description, generated))\n"
    assert marker in text
    mine.write_text(text.replace(marker, marker.replace("generated))", 'f"edited: {generated}"))')))
    common = ["--config", "custom_generation_config", "test_slake=True", f"dataset_source={ws['slake']}",
              "vqa_mode=direct", f"vision_checkpoint={ws['ckpt']}/meta_model_0.pt"]  # fmt: skip
    _cli("run", str(mine), *common, *eval_overrides(ws, tmp_path / "edited"))
    _cli("run", "generate", *common, *eval_overrides(ws, tmp_path / "shipped"))
    edited = read_csv(tmp_path / "edited" / "test_out_slake_meta_model_0.csv")
    shipped = read_csv(tmp_path / "shipped" / "test_out_slake_meta_model_0.csv")
    assert [r["generated"] for r in edited] == [f"edited: {r['generated']}" for r in shipped]
    assert len(shipped) == 4

