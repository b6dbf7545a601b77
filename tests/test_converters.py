"""Converters in tools/: fixtures written here in the public datasets' real schemas."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import draw_jpeg

from medcap.data.sources import CAPTION_INSTRUCTIONS, SourceError, read_slake, read_vqarad
from medcap.models.vision import build_vision_encoder

ROOT = Path(__file__).resolve().parents[1]


def tool(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def slake_row(
    qid, img, lang="en", answer_type="CLOSED", content_type="Modality", question="Is this a CT?", answer="Yes"
):
    return {
        "img_id": int(img.removeprefix("xmlab")),
        "img_name": f"{img}/source.jpg",
        "question": question,
        "answer": answer,
        "q_lang": lang,
        "location": "Chest",
        "modality": "CT",
        "answer_type": answer_type,
        "base_type": "vqa",
        "content_type": content_type,
        "triple": ["vhead", "_", "_"],
        "qid": qid,
    }


@pytest.fixture
def slake(tmp_path):
    root = tmp_path / "datasets" / "SLAKE"
    for i in range(4):
        draw_jpeg(root / "imgs" / f"xmlab{i}" / "source.jpg", seed=i)
    train = [
        slake_row(1, "xmlab0"),
        slake_row(2, "xmlab0", lang="zh", question="这是CT吗?", answer="是"),
        slake_row(
            3, "xmlab1", answer_type="OPEN", content_type="Organ", question="Which organ?", answer="Lung"
        ),
    ]
    (root / "train.json").write_text(json.dumps(train, ensure_ascii=False))
    (root / "validate.json").write_text(json.dumps([slake_row(4, "xmlab2")]))
    (root / "test.json").write_text(
        json.dumps([slake_row(5, "xmlab3"), slake_row(6, "xmlab9")])
    )  # xmlab9 missing
    text = root.parent / "SLAKE-text"
    text.mkdir()
    for split, imgs in {"train": ["xmlab0", "xmlab1"], "validation": ["xmlab2"], "test": ["xmlab3"]}.items():
        rows = [{"img_name": f"{i}/source.jpg", "text": f"An axial CT ① of {i}."} for i in imgs]
        (text / f"{split}_text.json").write_text(json.dumps(rows, ensure_ascii=False))
    return root


def test_slake_vqa_english_only_with_metadata(slake, tmp_path, capsys):
    out = tmp_path / "out"
    tool("convert_slake_to_sharegpt")(["--data_dir", str(slake), "--output_dir", str(out)])
    train = json.loads((out / "slake_vqa_train.json").read_text())
    assert [r["qid"] for r in train] == [1, 3]  # the Chinese row is filtered
    assert train[1]["answer_type"] == "OPEN" and train[1]["content_type"] == "Organ"
    assert train[1]["conversations"] == [
        {"from": "human", "value": "Which organ?"},
        {"from": "gpt", "value": "Lung"},
    ]
    assert len(json.loads((out / "slake_vqa_test.json").read_text())) == 1
    printed = capsys.readouterr().out
    assert "slake_vqa_test.json: 1 records; 1 dropped for missing images" in printed and "xmlab9" in printed
    zh = read_slake(slake, "train", lang="zh")
    assert [it.extra["qid"] for it in zh] == [2]


def test_slake_validation_spelling(slake):
    (slake / "validate.json").rename(slake / "validation.json")
    assert [it.extra["qid"] for it in read_slake(slake, "val")] == [4]
    (slake / "validation.json").unlink()
    with pytest.raises(SourceError, match=r"none of \['validate.json', 'validation.json'\]"):
        read_slake(slake, "val")


def test_strict_stops_and_writes_nothing(slake, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "convert_slake_to_sharegpt.py"),
            "--data_dir",
            str(slake),
            "--output_dir",
            str(out),
            "--strict",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and "1 of 2 images missing for slake_vqa_test.json" in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_slake_text_captions_and_instructions(slake, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)  # the default text dir, ./datasets/SLAKE-text, is found from here
    tool("convert_slake_text_to_sharegpt")(["--data_dir", str(slake), "--output_dir", str(out)])
    train = json.loads((out / "slake_train.json").read_text())
    val = json.loads((out / "slake_val.json").read_text())
    assert train[0]["conversations"][1]["value"] == "An axial CT (1) of xmlab0."  # "①" kept free
    assert all(r["conversations"][0]["value"] in CAPTION_INSTRUCTIONS for r in train)
    assert val[0]["conversations"][0]["value"] == "Describe the image in a detailed and informative manner."
    tool("convert_slake_text_to_sharegpt")(
        ["--data_dir", str(slake), "--output_dir", str(tmp_path / "again")]
    )
    assert json.loads((tmp_path / "again" / "slake_train.json").read_text()) == train  # seeded draw


def test_converted_files_load_from_any_directory(slake, tmp_path, monkeypatch, llama3_tok):
    from medcap.data.dataset import ImageChatDataset

    out = tmp_path / "out"
    tool("convert_slake_to_sharegpt")(["--data_dir", str(slake), "--output_dir", str(out)])
    monkeypatch.chdir(ROOT)
    ds = ImageChatDataset(
        llama3_tok,
        out / "slake_vqa_train.json",
        num_image_tokens=2,
        image_transform=build_vision_encoder("vit_tiny").preprocess.transform(),
    )
    assert ds[1]["images"].shape == (1, 3, 64, 64)
    assert ds.chat(1).metadata["content_type"] == "Organ"


def test_vqarad_official_split(tmp_path):
    root = tmp_path / "VQA_RAD"
    rows = []
    for i, phrase in enumerate(["freeform", "para", "test_freeform", "test_para", "frame"]):
        draw_jpeg(root / "VQA_RAD Image Folder" / f"synpic{i}.jpg", seed=i)
        rows.append(
            {
                "qid": i,
                "image_name": f"synpic{i}.jpg",
                "image_case_url": "",
                "image_organ": "CHEST",
                "answer": 2 if i == 3 else "yes",
                "answer_type": "CLOSED " if i == 2 else "OPEN",
                "question_type": "PRES",
                "question": f"q{i}?",
                "phrase_type": phrase,
                "qid_linked_id": "",
                "question_rephrase": "",
                "question_relation": "",
                "question_frame": "",
                "evaluation": "given",
            }
        )
    (root / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    test = read_vqarad(root, "test")
    assert [it.extra["qid"] for it in test] == [2, 3]
    assert test[0].extra["answer_type"] == "CLOSED" and test[1].answer == "2"
    out = tmp_path / "out"
    tool("convert_vqarad_to_sharegpt")(["--data_dir", str(root), "--output_dir", str(out)])
    assert len(json.loads((out / "vqarad_vqa_train.json").read_text())) == 3
    assert len(json.loads((out / "vqarad_vqa_test.json").read_text())) == 2


def test_rocov2_and_pmcoa(tmp_path):
    roco = tmp_path / "ROCOv2"
    for split in ("train", "valid", "test"):
        draw_jpeg(roco / "images" / split / f"ROCOv2_2023_{split}_000001.jpg")
        (roco / f"{split}_captions.csv").write_text(
            f'ID,Caption\nROCOv2_2023_{split}_000001,"Chest X-ray, PA view."\nROCOv2_2023_{split}_000002,Missing image.\n'
        )
    out = tmp_path / "out"
    tool("convert_rocov2_to_sharegpt")(["--data_dir", str(roco), "--output_dir", str(out)])
    rec = json.loads((out / "rocov2_test.json").read_text())
    assert (
        len(rec) == 1
        and rec[0]["conversations"][1]["value"] == "Chest X-ray, PA view."
        and rec[0]["id"].endswith("000001")
    )

    pmc = tmp_path / "PMC-OA"
    for split in ("train", "valid", "test"):
        draw_jpeg(pmc / "images" / f"PMC1_{split}.jpg")
        (pmc / f"{split}.jsonl").write_text(
            json.dumps({"image": f"PMC1_{split}.jpg", "caption": "Fig 1. CT.", "pmcid": "PMC1"}) + "\n"
        )
    tool("convert_pmcoa_to_sharegpt")(["--data_dir", str(pmc), "--output_dir", str(out), "--image_subdir", "images"])
    assert json.loads((out / "pmcoa_val.json").read_text())[0]["pmcid"] == "PMC1"
    (pmc / "test.jsonl").write_text('{"image": "x.jpg"}\n')
    with pytest.raises(SourceError, match=r"test.jsonl, record 0: missing field\(s\) \['caption'\]"):
        tool("convert_pmcoa_to_sharegpt")(["--data_dir", str(pmc), "--output_dir", str(out), "--image_subdir", "images"])


def test_preprocess_images_like_the_encoder(tmp_path, capsys):
    """Resize + centre crop as BiomedCLIP's preprocessing, same relative paths, DICOM and 16-bit
    PNG through medcap's reader (written as PNG), a strip padded to a square first, a bad file
    skipped and named; the result equals the encoder's own transform up to the tensor."""
    import numpy as np
    from PIL import Image
    from pydicom.data import get_testdata_file

    from medcap.data.images import load_image

    src = tmp_path / "images"
    (src / "ct").mkdir(parents=True)
    shutil.copy(get_testdata_file("CT_small.dcm"), src / "ct" / "slice.dcm")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 65535, (120, 90), dtype=np.uint16)).save(src / "w16.png")
    Image.fromarray(rng.integers(0, 255, (40, 200, 3), dtype=np.uint8)).save(src / "strip.jpg")
    (src / "broken.png").write_bytes(b"not an image")
    status = tool("preprocess_images")(["--input_dir", str(src), "--workers", "1"])
    out = tmp_path / "images_preprocess"
    assert status == 0 and "skipped" in capsys.readouterr().out
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.*")) == ["ct/slice.png", "strip.jpg", "w16.png"]
    assert all(Image.open(p).size == (224, 224) for p in out.rglob("*.*"))
    transform = build_vision_encoder("biomedclip").preprocess.transform()
    ours = transform(Image.open(out / "w16.png"))
    direct = transform(load_image(src / "w16.png"))
    assert (ours - direct).abs().max() < 0.05  # one extra 8-bit rounding (PNG) at most
    strip = np.asarray(Image.open(out / "strip.jpg"))
    assert strip[:40].mean() < 5 and strip[-40:].mean() < 5  # black padding above and below
    assert tool("preprocess_images")(["--input_dir", str(src), "--workers", "1", "--strict"]) == 1
