"""Linear and kNN probes of frozen features (medcap.probing, recipes/probe.py): an encoder trained
to see a pattern scores near 1 and near chance on shuffled labels, a checkpoint and its open_clip
export give the same features, the feature cache is reused and invalidated, every label source
reads its classes and splits with no source on both sides, and the recipe runs end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from helpers import draw_jpeg
from PIL import Image

from medcap.models.checkpoints import export_open_clip_dir
from medcap.models.vision import VisionEncoder, build_vision_encoder
from medcap.probing import (
    EncoderSpec,
    ProbeSettings,
    encoder_specs,
    extract_features,
    load_encoder,
    run_probe,
)
from medcap.probing.classifiers import bootstrap_intervals, few_shot, scores
from medcap.probing.labels import read_labels

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("diagonal", "horizontal", "vertical")
FAST = {"vision": "vit_tiny", "bootstrap_resamples": 100, "fewshot_draws": 2, "progress": False}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch and one BLAS thread: on a shared 2-core machine, spinning threads cost 10x."""
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(1):
        yield
    torch.set_num_threads(threads)


def draw_pattern(kind: str, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """Stripes whose direction is the class; period, phase and noise vary."""
    yy, xx = np.mgrid[0:size, 0:size]
    coord = {"horizontal": yy, "vertical": xx, "diagonal": xx + yy}[kind]
    wave = np.sin(2 * np.pi * coord / rng.integers(6, 12) + rng.uniform(0, 2 * np.pi))
    pixels = 128 + 90 * wave + rng.normal(0, 25, (size, size))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).convert("RGB")


@pytest.fixture(scope="module")
def patterns(tmp_path_factory) -> Path:
    """labels.csv: 12 images per class, two images per source group, no split column."""
    root = tmp_path_factory.mktemp("patterns")
    rng = np.random.default_rng(0)
    rows = []
    for kind in CLASSES:
        for i in range(12):
            draw_pattern(kind, rng).save(root / f"{kind}_{i}.png")
            rows.append({"image": f"{kind}_{i}.png", "label": kind, "group": f"{kind}{i // 2}"})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def save_checkpoint(encoder: VisionEncoder, path: Path) -> Path:
    """A medcap vision checkpoint dict (cls_mlp-shaped projector for an LLM of width 32)."""
    projector = {
        "0.weight": torch.zeros(32, encoder.pooled_dim),
        "0.bias": torch.zeros(32),
        "2.weight": torch.zeros(64, 32),
        "2.bias": torch.zeros(64),
    }
    meta = {"encoder": encoder.name, "connector": "cls_mlp", "num_image_tokens": 2, "llm_dim": 32, "epoch": 0}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"visual": encoder.tower.state_dict(), "projector": projector, "medcap": meta}, path)
    return path


@pytest.fixture(scope="module")
def trained(patterns, tmp_path_factory) -> Path:
    """vit_tiny with a linear head on its pooled output, 30 full-batch Adam steps on the patterns."""
    torch.manual_seed(0)
    encoder = build_vision_encoder("vit_tiny")
    frame = pd.read_csv(patterns)
    transform = encoder.preprocess.transform()
    x = torch.stack([transform(Image.open(patterns.parent / f).convert("RGB")) for f in frame.image])
    y = torch.tensor([CLASSES.index(c) for c in frame.label])
    head = torch.nn.Linear(encoder.pooled_dim, len(CLASSES))
    opt = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=2e-3)
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(head(encoder(x).pooled), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return save_checkpoint(encoder, tmp_path_factory.mktemp("run") / "checkpoint" / "meta_model_0.pt")


def test_trained_encoder_scores_near_one_shuffled_labels_near_chance(patterns, trained, tmp_path):
    cache = tmp_path / "cache"
    result = run_probe([trained], patterns, tmp_path / "out", cache_dir=str(cache), **FAST)
    assert list(result["results"]) == ["meta_model_0", "random_vit_tiny", "pixels_16"]
    for clf in ("logreg", "knn"):
        assert result["results"]["meta_model_0"][clf]["balanced_accuracy"]["value"] >= 0.9
    assert result["encoders"]["pixels_16"]["dim"] == 256 and result["encoders"]["meta_model_0"]["dim"] == 64
    for name, per_clf in result["results"].items():
        for res in per_clf.values():
            for m in ("accuracy", "balanced_accuracy", "macro_f1", "macro_auroc"):
                assert res[m]["ci_low"] <= res[m]["value"] <= res[m]["ci_high"], (name, m)
    assert result["labels"]["n_train"] + result["labels"]["n_test"] == 36

    frame = pd.read_csv(patterns)
    frame["label"] = np.random.default_rng(1).permutation(frame.label.to_numpy())
    frame.to_csv(patterns.parent / "shuffled.csv", index=False)
    shuffled = run_probe(
        [trained], patterns.parent / "shuffled.csv", tmp_path / "shuffled", cache_dir=str(cache), **FAST
    )
    assert all(e["computed"] == 0 and e["cached"] == 36 for e in shuffled["encoders"].values())  # same images
    for clf in ("logreg", "knn"):
        assert shuffled["results"]["meta_model_0"][clf]["balanced_accuracy"]["value"] < 0.6


def test_checkpoint_and_exported_folder_give_the_same_features(patterns, trained, tmp_path):
    images = read_labels(patterns).images
    spec = encoder_specs([trained], "vit_tiny")[0]
    assert (spec.kind, spec.vision) == ("checkpoint", "vit_tiny")
    folder = export_open_clip_dir(load_encoder(spec), tmp_path / "exported")
    exported = encoder_specs([{"vision_path": str(folder)}])[0]
    assert (exported.kind, exported.vision) == ("open_clip", "vit_tiny")  # architecture read from the folder
    a = extract_features(spec, images, progress=False).values
    b = extract_features(exported, images, progress=False).values
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_feature_cache_is_reused_and_invalidated_by_a_changed_checkpoint_or_image(
    patterns, trained, tmp_path, monkeypatch
):
    seen = []
    forward = VisionEncoder.forward
    monkeypatch.setattr(VisionEncoder, "forward", lambda self, x: seen.append(len(x)) or forward(self, x))
    ckpt = tmp_path / "model.pt"
    ckpt.write_bytes(trained.read_bytes())
    images = read_labels(patterns).images
    spec = encoder_specs([ckpt], "vit_tiny")[0]

    def run():
        return extract_features(spec, images, cache_dir=tmp_path / "cache", batch_size=16, progress=False)

    first = run()
    assert (first.computed, first.cached, sum(seen)) == (36, 0, 36)
    again = run()
    assert (again.computed, again.cached, sum(seen)) == (0, 36, 36)  # no forward pass at all
    np.testing.assert_array_equal(first.values, again.values)

    state = torch.load(ckpt, weights_only=True)
    state["visual"] = {
        k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in state["visual"].items()
    }
    torch.save(state, ckpt)  # same path, same name, new weights
    changed = run()
    assert (changed.computed, sum(seen)) == (36, 72) and not np.allclose(changed.values, first.values)

    draw_pattern("vertical", np.random.default_rng(99)).save(images[0].image.split("#")[0])
    one = run()
    assert (one.computed, one.cached) == (1, 35)


def test_patch_features_are_the_flattened_patch_tokens_cached_apart(patterns, trained, tmp_path):
    """features=patches gives what patch_mlp / patch_film read (position kept), under its own
    cache key; the pooled key is unchanged (caches from before stay valid); the pixel baseline
    is the same either way; an unknown kind is refused before anything is built."""
    from medcap.probing.encoders import encoder_key

    images = read_labels(patterns).images[:5]
    spec = encoder_specs([trained], "vit_tiny")[0]
    encoder = load_encoder(spec).eval()
    patches = extract_features(spec, images, cache_dir=tmp_path, progress=False, features="patches")
    pooled = extract_features(spec, images, cache_dir=tmp_path, progress=False)
    assert patches.values.shape == (5, encoder.num_patches * 64) and pooled.values.shape == (5, encoder.pooled_dim)
    assert patches.cache_file != pooled.cache_file and pooled.computed == 5
    transform = encoder.preprocess.transform()
    with torch.no_grad():
        x = torch.stack([transform(Image.open(images[0].image).convert("RGB"))])
        np.testing.assert_allclose(patches.values[0], encoder(x).patches.flatten(1)[0].numpy(), atol=1e-5)
    assert encoder_key(spec, 0, "fp32") == encoder_key(spec, 0, "fp32", "pooled") != encoder_key(spec, 0, "fp32", "patches")
    pixels = encoder_specs(["pixels"], "vit_tiny")[0]
    np.testing.assert_array_equal(extract_features(pixels, images, progress=False, features="patches").values,
                                  extract_features(pixels, images, progress=False).values)  # fmt: skip
    with pytest.raises(ValueError, match="features='tokens': expected one of"):
        ProbeSettings(features="tokens").check()


def test_demo_probe_reads_what_the_connector_reads(trained, tmp_path):
    from medcap.demo.probe import connector_features

    state = torch.load(trained, weights_only=True)
    assert connector_features(trained) == "pooled"  # cls_mlp
    for connector in ("patch_mlp", "patch_film", "patch_question"):
        state["medcap"]["connector"] = connector
        torch.save(state, tmp_path / f"{connector}.pt")
        assert connector_features(tmp_path / f"{connector}.pt") == "patches"


def test_metrics_match_scikit_learn_and_bootstrap_handles_missing_classes():
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, roc_auc_score

    rng = np.random.default_rng(0)
    for k in (2, 4):
        y = rng.integers(0, k, 60)
        proba = rng.dirichlet(np.ones(k), 60)
        proba[np.arange(60), y] += rng.uniform(0, 0.6, 60)  # better than chance, with errors
        proba /= proba.sum(1, keepdims=True)
        s, pred = scores(y, proba), proba.argmax(1)
        auroc = roc_auc_score(y, proba[:, 1]) if k == 2 else roc_auc_score(y, proba, multi_class="ovr")
        assert s["accuracy"] == pytest.approx(accuracy_score(y, pred))
        assert s["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
        assert s["macro_f1"] == pytest.approx(f1_score(y, pred, average="macro"))
        assert s["macro_auroc"] == pytest.approx(auroc)
    y = np.array([0] * 30 + [1] * 30 + [2])  # class 2 is missing from about a third of resamples
    proba = np.eye(3)[y] * 0.5 + 0.5 / 3
    ci = bootstrap_intervals(y, proba, n_resamples=200, seed=0)
    assert all(np.isfinite(ci[m]).all() for m in ci) and ci["macro_auroc"] == (1.0, 1.0)


def test_few_shot_sizes_stop_at_what_exists():
    rng = np.random.default_rng(0)
    y_train = np.array([0] * 3 + [1] * 6)
    x_train = rng.normal(size=(9, 4)) + y_train[:, None]
    rows = few_shot(x_train, y_train, x_train, y_train, 2, sizes=(1, 2, 4, 8, 16), draws=3)
    sizes = {r["shots"]: r["n_train"] for r in rows}
    assert sizes == {
        1: 2,
        2: 4,
        4: 7,
        8: 9,
    }  # class 0 gives all 3 it has; 8 takes everything, 16 is not drawn
    assert sum(r["shots"] == 8 for r in rows) == 2  # one draw (each classifier) once every image is in
    rows = few_shot(x_train[2:5], np.array([0, 1, 1]), x_train, y_train, 2, sizes=(1, 16), knn_k=5)
    assert {(r["shots"], r["n_train"]) for r in rows} == {(1, 2), (16, 3)}  # kNN's k cut to the 3 images


def test_csv_labels_selectors_groups_and_errors(tmp_path):
    import nibabel as nib

    volume = np.random.default_rng(0).integers(0, 1000, (16, 16, 6)).astype(np.int16)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "brain.nii.gz")
    for i in range(4):
        draw_jpeg(tmp_path / "img" / f"{i}.jpg", seed=i)
    rows = [
        "image,label,split,group",
        "brain.nii.gz#plane=axial&index=1,mri,train,s1",
        "brain.nii.gz#plane=axial&index=4,mri,train,s1",
        f"{tmp_path / 'img' / '0.jpg'},ct,train,s2",
        "img/1.jpg,ct,test,s3",
        "img/2.jpg,mri,validate,s4",
        "img/3.jpg,mri,test,s5",
    ]
    (tmp_path / "a.csv").write_text("\n".join(rows) + "\n")
    lset = read_labels(tmp_path / "a.csv")
    assert lset.classes == ["ct", "mri"] and lset.split_how == "given"
    assert [im.split for im in lset.images] == ["train", "train", "train", "test", "train", "test"]
    assert lset.images[0].image == f"{tmp_path / 'brain.nii.gz'}#plane=axial&index=1"
    assert extract_features(
        EncoderSpec("p", "pixels", pixel_size=8), lset.images[:2], progress=False
    ).values.shape == (2, 64)

    bad = tmp_path / "bad.csv"
    bad.write_text("image,label\nimg/1.jpg,ct\nimg/missing.jpg,ct\n")
    with pytest.raises(ValueError, match=r"bad.csv, record 2 \(line 3\): image .*missing.jpg not found"):
        read_labels(bad)
    with pytest.raises(ValueError, match=r"bad.csv: no column 'diagnosis' \(label_column\)"):
        read_labels(bad, label_column="diagnosis")
    (tmp_path / "b.csv").write_text(
        "image,label,split\nimg/0.jpg,ct,train\nimg/1.jpg,mri,test\nimg/2.jpg,ct,test\n"
    )
    with pytest.raises(ValueError, match="b.csv: class 'mri' has no training image"):
        read_labels(tmp_path / "b.csv")
    (tmp_path / "d.csv").write_text(
        "image,label,split\nimg/0.jpg,ct,train\nimg/1.jpg,mri,train\nimg/2.jpg,ct,test\nimg/3.jpg,mri,test\nimg/0.jpg,pet,test\n"
    )
    kept = read_labels(tmp_path / "d.csv", unseen_test_classes="drop")  # left out, and counted
    assert kept.classes == ["ct", "mri"] and len(kept.images) == 4 and kept.summary()["dropped_unseen_classes"] == {"pet": 1}
    (tmp_path / "c.csv").write_text(
        "image,label,split,group\nimg/0.jpg,ct,train,p1\nimg/1.jpg,ct,test,p1\n"
        "img/2.jpg,mri,train,p2\nimg/3.jpg,mri,test,p3\n"
    )
    with pytest.raises(ValueError, match="source group 'p1' is in both train"):
        read_labels(tmp_path / "c.csv")


def test_drawn_split_never_puts_a_source_on_both_sides(patterns):
    for seed in range(4):
        lset = read_labels(patterns, seed=seed)
        train = {im.group for im in lset.images if im.split == "train"}
        test = {im.group for im in lset.images if im.split == "test"}
        assert train and test and not train & test
        assert {im.label for im in lset.images if im.split == "test"} == set(CLASSES)  # stratified


def test_folder_labels_flat_and_with_train_test(tmp_path):
    for i, cls in enumerate(["ct", "ct", "ct", "mri", "mri", "mri", "xray", "xray"]):
        draw_jpeg(tmp_path / "flat" / cls / f"{i}.jpg", seed=i)
        draw_jpeg(tmp_path / "split" / ("test" if i in (2, 5, 7) else "train") / cls / f"{i}.jpg", seed=i)
    (tmp_path / "flat" / "ct" / "notes.txt").write_text("not an image")
    flat = read_labels(tmp_path / "flat")
    assert flat.classes == ["ct", "mri", "xray"] and len(flat.images) == 8
    assert flat.split_how.startswith("drawn") and {im.split for im in flat.images} == {"train", "test"}
    split = read_labels(tmp_path / "split")
    assert split.split_how == "given"
    assert sorted(Path(im.image).name for im in split.images if im.split == "test") == [
        "2.jpg",
        "5.jpg",
        "7.jpg",
    ]


def slake_rows(img: str, modality: str, plane: str, first_qid: int) -> list[dict]:
    base = {
        "img_name": f"{img}/source.jpg",
        "q_lang": "en",
        "base_type": "vqa",
        "location": "Head",
        "modality": modality,
    }
    qs = [
        ("What modality is used to take this image?", modality, "OPEN", "Modality"),
        (f"Is this a {modality}?", "Yes", "CLOSED", "Modality"),
        ("In which plane is this image taken?", plane, "OPEN", "Plane"),
        ("Which part of the body does this image show?", "Head", "OPEN", "Organ"),
    ]
    return [
        {**base, "qid": first_qid + n, "question": q, "answer": a, "answer_type": t, "content_type": c}
        for n, (q, a, t, c) in enumerate(qs)
    ]


def test_slake_labels_by_content_type_and_vqarad_by_question_type(tmp_path):
    root = tmp_path / "SLAKE"
    parts = {"train.json": range(0, 6), "validate.json": range(6, 8), "test.json": range(8, 12)}
    for name, ids in parts.items():
        rows = []
        for n in ids:
            draw_jpeg(root / "imgs" / f"xmlab{n}" / "source.jpg", seed=n)
            rows += slake_rows(
                f"xmlab{n}", "MRI" if n % 2 else "CT", "Transverse" if n % 3 else "Coronal", 10 * n
            )
        (root / name).write_text(json.dumps(rows))
    lset = read_labels(root, "Modality")
    assert (
        lset.classes == ["CT", "MRI"] and len(lset.images) == 12
    )  # one label per image; closed ones ignored
    assert sum(im.split == "train" for im in lset.images) == 8  # validate counts as training
    assert {im.group for im in lset.images if im.split == "test"} == {f"xmlab{n}" for n in range(8, 12)}
    assert read_labels(root, "plane").classes == ["Coronal", "Transverse"]
    with pytest.raises(ValueError, match=r"no OPEN question of kind 'Color'.*'Modality'"):
        read_labels(root, "Color")
    single = read_labels(root / "train.json", "Modality")  # one file: split drawn by image folder
    assert len(single.images) == 6 and single.split_how.startswith("drawn")

    rad = tmp_path / "VQA-RAD"
    rows = []
    for n in range(8):
        draw_jpeg(rad / "VQA_RAD Image Folder" / f"synpic{n}.jpg", seed=n)
        for phrase in ("freeform", "test_freeform"):  # the same image on both sides of the official split
            rows.append(
                {
                    "qid": f"{n}{phrase}",
                    "image_name": f"synpic{n}.jpg",
                    "question": "What modality is this?",
                    "answer": ["CT", "ct", "MRI", "MRI"][n % 4],
                    "answer_type": "OPEN",
                    "question_type": "MODALITY",
                    "phrase_type": phrase,
                }
            )
    (rad / "VQA_RAD Dataset Public.json").write_text(json.dumps(rows))
    vqarad = read_labels(rad, "modality")
    assert vqarad.classes == ["CT", "MRI"] and len(vqarad.images) == 8  # 'ct' spelt as most records spell it
    assert not {im.group for im in vqarad.images if im.split == "train"} & {
        im.group for im in vqarad.images if im.split == "test"
    }


def test_encoder_specs_expand_globs_and_add_the_baselines(trained, tmp_path):
    for epoch in (10, 2):
        (tmp_path / f"meta_model_{epoch}.pt").write_bytes(trained.read_bytes())
    specs = encoder_specs([str(tmp_path / "meta_model_*.pt"), "random:biomedclip"], "biomedclip", 8)
    assert [(s.name, s.kind, s.vision) for s in specs] == [
        ("meta_model_2", "checkpoint", "vit_tiny"),
        ("meta_model_10", "checkpoint", "vit_tiny"),
        ("random_biomedclip", "random", "biomedclip"),
        ("random_vit_tiny", "random", "vit_tiny"),
        ("pixels_8", "pixels", None),
    ]
    with pytest.raises(FileNotFoundError, match="no file matches"):
        encoder_specs([str(tmp_path / "nothing_*.pt")])
    settings = ProbeSettings.from_config({"fewshot_sizes": [1, 2], "device": "cpu", "unrelated": 1})
    assert settings.fewshot_sizes == (1, 2)


@pytest.mark.slow
def test_recipe_end_to_end(patterns, trained, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "medcap.cli",
            "run",
            "probe",
            "--config",
            "probe",
            f"labels={patterns}",
            f"output_dir={out}",
            "vision=vit_tiny",
            f"vision_checkpoint={trained.parent}/meta_model_*.pt",
            "bootstrap_resamples=50",
            "fewshot_draws=2",
            "fewshot_sizes=[1,4]",
            "logreg_Cs=[0.01,1.0]",
            "progress=False",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "probe.json").read_text())
    assert set(result["results"]) == {"meta_model_0", "random_vit_tiny", "pixels_16"}
    assert result["results"]["meta_model_0"]["logreg"]["balanced_accuracy"]["value"] >= 0.9
    assert result["settings"]["device"] == "cpu" and result["settings"]["logreg_Cs"] == [0.01, 1.0]
    table = pd.read_csv(out / "probe.csv")
    assert len(table) == 6 and {"macro_auroc_ci_low", "balanced_accuracy_ci_high"} <= set(table.columns)
    assert set(pd.read_csv(out / "probe_fewshot.csv").shots) == {1, 4}
    with Image.open(out / "probe.png") as figure:
        assert figure.width > 800
    assert "meta_model_0" in proc.stdout


@pytest.mark.slow
def test_demo_mini_slake_modality_probe(demo_slake, tmp_path):
    """What the demo runs: labels=its SLAKE root, label_kind=Modality (SLAKE's own split)."""
    root, counts = demo_slake
    result = run_probe(["random:vit_tiny"], root, tmp_path, label_kind="Modality", **FAST)
    labels = result["labels"]
    assert labels["classes"] == sorted(counts["modalities"]) and labels["split"] == "given"
    assert labels["n_train"] == counts["train_images"] + counts["validate_images"]
    assert labels["n_test"] == counts["test_images"]
    assert set(result["results"]) == {"random_vit_tiny", "pixels_16"}


@pytest.mark.slow
def test_pretrained_biomedclip_from_the_hub_cache_is_an_encoder(patterns, tmp_path):
    """encoders=[biomedclip]: the pretrained tower out of the Hugging Face cache (offline), beside
    its random initialisation; the cache key follows the cached weights."""
    from helpers import write_hub_biomedclip

    write_hub_biomedclip(tmp_path / "hub")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "medcap.cli", "run", "probe", "--config", "probe", f"labels={patterns}",
         f"output_dir={out}", "encoders=[biomedclip]", "bootstrap_resamples=20", "fewshot_draws=1",
         "fewshot_sizes=[1]", "logreg_Cs=[1.0]", "progress=False", "figure=False"],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((out / "probe.json").read_text())
    assert set(result["results"]) == {"biomedclip", "random_biomedclip", "pixels_16"}
    assert result["encoders"]["biomedclip"]["dim"] == 512
