"""The demo's image-reading measures (medcap/demo/image_reading.py) on synthetic answers whose
right figures are known, the harness wordings of the training questions, and the harness
suffix at evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medcap.data.sources import HARNESS_SUFFIX, QUESTION_STYLES, Item, styled, vary_questions
from medcap.demo.image_reading import BlindAnswerer, harness_prompt, image_reading, swap_pairs, verdicts
from medcap.demo.probe import INITIAL, NAMES

MODALITY_Q = "What modality is used to take this image?"
MRI_Q = "Is this an MRI?"


def row(index: int, image: str, question: str, gold: str, answer: str, answer_type: str, content: str) -> dict:
    return {"index": str(index), "image": image, "instruction": question, "output": gold, "generated": answer,
            "answer_type": answer_type, "content_type": content}  # fmt: skip


def test_table(images_right: bool) -> list[dict]:
    """Four images, two MRI and two CT; each asked the open modality question and "Is this an MRI?"."""
    rows, k = [], 0
    for i, modality in enumerate(["MRI", "CT", "MRI", "CT"]):
        said = modality if images_right else "MRI"
        rows.append(row(k, f"img{i}.png", MODALITY_Q, modality, said, "OPEN", "Modality"))
        rows.append(row(k + 1, f"img{i}.png", MRI_Q, "Yes" if modality == "MRI" else "No",
                        "Yes" if said == "MRI" else "No", "CLOSED", "Modality"))  # fmt: skip
        k += 2
    return rows


test_table.__test__ = False  # a helper, not a test

TRAIN = [(MODALITY_Q, "MRI", "OPEN"), (MODALITY_Q, "MRI", "OPEN"), (MODALITY_Q, "CT", "OPEN"),
         (MRI_Q, "Yes", "CLOSED"), (MRI_Q, "No", "CLOSED")]  # fmt: skip


def test_swap_pairs_need_the_same_question_different_images_and_golds():
    pairs = swap_pairs(test_table(True))
    # per question: MRI/CT images pair up across modalities only: 2 x 2 pairs, for both questions
    assert len(pairs) == 8
    assert all(a["instruction"] == b["instruction"] and a["image"] != b["image"] and a["output"] != b["output"]
               for a, b in pairs)  # fmt: skip


def test_a_reader_earns_the_swap_pairs_a_blind_answerer_cannot():
    blind = BlindAnswerer(TRAIN)
    reader = image_reading(test_table(True), blind)
    assert reader["image_swap"]["model"] == 1.0
    assert reader["image_swap"]["baseline"] == 0.0  # one answer per question text: never both right
    assert reader["closed_vs_blind"]["model"] == 1.0
    # the blind answerer's tie (Yes once, No once) counts half on every closed question
    assert reader["closed_vs_blind"]["baseline"] == 0.5
    constant = image_reading(test_table(False), blind)  # always says MRI: what the question alone gives
    assert constant["image_swap"]["model"] == 0.0
    cell = constant["by_content_type"]["Modality"]["open"]
    assert cell["model"] == 0.5 and cell["most_common"] == 0.5  # MRI and CT tie; the first by name is "ct"
    assert cell["model_minus_most_common"]["value"] == 0.0


def test_verdicts_follow_the_intervals():
    blind = BlindAnswerer(TRAIN)
    big = test_table(True) * 10  # more items: the intervals narrow
    for k, r in enumerate(big):
        r["index"] = str(k)
    good = verdicts(image_reading(big, blind), None, None)
    assert good["closed_beats_blind_by_0.15"] and good["image_swap_above_blind"]
    assert good["open_modality_beats_most_common"] is True and good["open_plane_beats_most_common"] is None
    bad = verdicts(image_reading(test_table(False), blind), None, None)
    assert not bad["closed_beats_blind_by_0.15"] and not bad["image_swap_above_blind"]
    assert bad["open_modality_beats_most_common"] is False
    step0 = NAMES[INITIAL]
    probe = {"Modality": {"trained_minus": {step0: {"value": 0.1, "ci_low": 0.02, "ci_high": 0.2}}},
             "Plane": {"trained_minus": {step0: {"value": -0.1, "ci_low": -0.3, "ci_high": 0.1}}}}  # fmt: skip
    v = verdicts(image_reading(big, blind), None, probe)
    assert v["probe_above_step0_somewhere"] and not v["probe_at_or_above_step0"]


def test_harness_prompt_pairs_the_same_questions():
    own = test_table(True)
    asked = [dict(r, instruction=r["instruction"] + HARNESS_SUFFIX) for r in test_table(True)]
    asked[1]["generated"] = "MRI"  # "Is this an MRI?" answered with the modality's name
    h = harness_prompt(own, asked, HARNESS_SUFFIX)
    assert h["n"] == 8 and h["changed_answers"] == 1
    assert h["closed"]["model"] == 0.75 and h["closed"]["baseline"] == 1.0
    assert verdicts(image_reading(own, BlindAnswerer(TRAIN)), h, None)["harness_prompt_within_0.05"] is False


def test_question_styles_vary_half_of_the_training_questions_only():
    items = [Item(Path(f"{i}.png"), f"Question {i}?", "yes") for i in range(400)]
    varied = vary_questions(items)
    assert varied == vary_questions(items)  # seeded: the same file every run
    changed = [v for it, v in zip(items, varied) if v.prompt != it.prompt]
    assert 150 < len(changed) < 250
    assert all(any(s.format(q=it.prompt) == v.prompt for s in QUESTION_STYLES) for it, v in zip(items, varied)
               if v.prompt != it.prompt)  # fmt: skip
    assert any(v.prompt.endswith(HARNESS_SUFFIX) for v in changed)
    read = styled(lambda split: list(items), True)
    assert read("train") == varied and read("test") == items and read("val") == items


def test_question_suffix_asks_as_the_harness_does(tmp_path):
    from medcap.evaluation.tasks import question_suffix, vqa_items

    (tmp_path / "imgs").mkdir()
    (tmp_path / "test.json").write_text(json.dumps([
        {"img_name": "a.png", "question": MRI_Q, "answer": "Yes", "q_lang": "en", "answer_type": "CLOSED"}]))  # fmt: skip
    suffix = question_suffix("\\nAnswer the question using a single word or phrase.")
    assert suffix == HARNESS_SUFFIX
    [item] = vqa_items("slake", tmp_path, ["CLOSED"], "test", suffix)
    assert item.instruction == MRI_Q + HARNESS_SUFFIX
    [plain] = vqa_items("slake", tmp_path, ["CLOSED"], "test")
    assert plain.instruction == MRI_Q


@pytest.mark.parametrize("text", [None, "plain"])
def test_question_suffix_without_escapes_is_unchanged(text):
    from medcap.evaluation.tasks import question_suffix

    assert question_suffix(text) == text


def test_tuning_keeps_the_candidate_that_reads_the_validation_images(tmp_path):
    """medcap.demo.tune scores validation answers as the report does and keeps the best candidate."""
    from medcap.demo.tune import best_candidate, score_validation, versus

    blind = BlindAnswerer(TRAIN)
    reader, constant = score_validation(test_table(True), blind), score_validation(test_table(False), blind)
    assert reader["score"] == 1.0 and reader["image_swap"] == 1.0 and reader["n"] == 8
    assert constant["score"] == 0.5 and constant["image_swap"] == 0.0
    assert reader["by_content_type"]["Modality"] == {"closed": 1.0, "open": 1.0}
    assert best_candidate({"config": constant, "lr_3e-3": reader}) == "lr_3e-3"
    # a tie on the score goes to the image-swap score, then to the first candidate
    assert best_candidate({"a": {**reader, "image_swap": 0.5}, "b": reader}) == "b"
    assert best_candidate({"a": reader, "b": dict(reader)}) == "a"
    # paired on the same questions: the reader is right on the 4 the constant answerer gets wrong
    diff = versus({"config": constant, "lr_3e-3": reader}, "lr_3e-3")
    assert diff["value"] == 0.5 and diff["ci_low"] > 0
    assert versus({"config": constant}, "config") is None


def test_tuning_over_seeds_averages_each_candidate_paired_on_questions():
    from medcap.demo.tune import best_candidate, pooled_over_seeds, run_name, versus

    def run(items, swap):
        return {"score": sum(items.values()) / len(items), "closed": 0.5, "blind_closed": 0.5,
                "image_swap": swap, "n": len(items), "items": items}  # fmt: skip

    assert run_name("patch_mlp", None) == "patch_mlp" and run_name("patch_mlp", 2) == "patch_mlp@seed2"
    results = {
        "config": run({"1": 1.0, "2": 0.0, "3": 0.0, "4": 0.0}, 0.1),
        "config@seed2": run({"1": 0.0, "2": 0.0, "3": 0.0, "4": 0.0}, None),
        "a": run({"1": 1.0, "2": 1.0, "3": 0.0, "4": 0.0}, 0.3),  # one lucky seed
        "a@seed2": run({"1": 0.0, "2": 0.0, "3": 0.0, "4": 0.0}, 0.1),
        "b": run({"1": 1.0, "2": 1.0, "3": 0.0, "4": 0.0}, 0.2),  # no second seed: taken as it is
    }
    pooled = pooled_over_seeds(results)
    assert list(pooled) == ["config", "a", "b"]
    assert pooled["config"]["score"] == 0.125 and pooled["config"]["items"]["1"] == 0.5
    assert pooled["config"]["image_swap"] == 0.1 and pooled["config"]["seeds"] == 2  # a missing swap is skipped
    assert pooled["a"]["score"] == 0.25 and pooled["a"]["score_range"] == [0.0, 0.5]
    assert pooled["a"]["image_swap"] == pytest.approx(0.2) and pooled["b"]["seeds"] == 1
    assert best_candidate(pooled) == "b"  # a's first seed alone would tie b's, its average does not
    assert versus(pooled, "a")["value"] == pytest.approx(0.125)


def test_a_tuning_candidate_is_asked_in_the_prompt_it_trained_on():
    from medcap.demo.tune import CANDIDATES, prompt_overrides

    assert prompt_overrides(CANDIDATES["no_system_prompt"]) == {"tokenizer.default_system_prompt": "null"}
    assert prompt_overrides({"optimizer.lr": 3e-3, "epochs": 3}) == {}
    assert prompt_overrides(CANDIDATES["vit_mini"]) == {"vision": "vit_mini"}  # the checkpoint needs its encoder
    assert prompt_overrides(CANDIDATES["patch_mlp"]) == {"connector": "patch_mlp", "num_image_tokens": 16}


def test_a_tuning_result_is_reused_only_under_the_same_configs():
    from medcap.demo.tune import configs_fingerprint, reusable

    fingerprint = configs_fingerprint()
    assert fingerprint == configs_fingerprint() and len(fingerprint) == 16
    done = {"overrides": {"epochs": 3}, "configs": fingerprint, "score": 0.6}
    assert reusable(done, {"epochs": 3}, fingerprint)
    assert not reusable(done, {"epochs": 2}, fingerprint)
    assert not reusable(done, {"epochs": 3}, "another config")
    assert not reusable({"overrides": {"epochs": 3}}, {"epochs": 3}, fingerprint)  # recorded before fingerprints


def test_tuning_answers_the_validation_or_training_split_as_a_test_split(tmp_path):
    from medcap.demo.pipeline import DemoPaths
    from medcap.demo.tune import split_root

    paths = DemoPaths(tmp_path / "demo")
    (paths.slake / "imgs").mkdir(parents=True)
    (paths.slake / "train.json").write_text(json.dumps([{"qid": 0}]))
    (paths.slake / "validate.json").write_text(json.dumps([{"qid": 1}]))
    (paths.slake / "test.json").write_text(json.dumps([{"qid": 2}]))
    root = split_root(paths, tmp_path / "val")
    assert json.loads((root / "test.json").read_text()) == [{"qid": 1}]
    assert (root / "imgs").resolve() == (paths.slake / "imgs").resolve()
    assert json.loads((split_root(paths, tmp_path / "fit", "train") / "test.json").read_text()) == [{"qid": 0}]


def test_the_demo_configs_train_and_evaluate_the_same_model():
    """The generation config loads the training config's checkpoint, and the probe rebuilds the
    same encoder: a change of encoder or connector in one config must be made in the other."""
    from omegaconf import OmegaConf

    from medcap.demo.pipeline import EVAL_CONFIG, TRAIN_CONFIG, trained_encoder
    from medcap.recipe_files import resolve_config

    train, evaluate = (OmegaConf.load(resolve_config(n)) for n in (TRAIN_CONFIG, EVAL_CONFIG))
    for key in ("vision", "connector", "num_image_tokens"):
        assert train[key] == evaluate[key], key
    assert trained_encoder() == train.vision


def test_the_training_split_asks_the_model_validation_scored_and_never_retrains_it(tmp_path, monkeypatch):
    from medcap.demo import tune
    from medcap.demo.pipeline import DemoPaths

    paths = DemoPaths(tmp_path / "demo")
    (paths.slake / "imgs").mkdir(parents=True)
    paths.llm.mkdir(parents=True)
    for name in ("train.json", "validate.json"):
        (paths.slake / name).write_text("[]")
    work = paths.root / "tune"
    trained = work / "lr_3e-3" / "train" / "checkpoint"
    trained.mkdir(parents=True)
    for epoch in (1, 2, 10):
        (trained / f"meta_model_{epoch}.pt").write_bytes(b"")
    overrides = tune.CANDIDATES["lr_3e-3"]
    (work / "tune.json").write_text(json.dumps({"lr_3e-3": {"overrides": overrides, "configs": tune.configs_fingerprint()}}))
    asked = []

    def fake_evaluate(paths, out, checkpoint, root, blind, overrides, split):
        asked.append((checkpoint, split, json.loads((root / "test.json").read_text())))
        return {"score": 0.5, "closed": 0.5, "blind_closed": 0.6, "image_swap": 0.1, "n": 1,
                "by_content_type": {"Plane": {"open": 0.3}}, "items": {"1": 0.5}}  # fmt: skip

    def no_training(*args):
        raise AssertionError("a model validation already scored must not be trained again")

    monkeypatch.setattr(tune, "evaluate_candidate", fake_evaluate)
    monkeypatch.setattr(tune, "train_candidate", no_training)
    monkeypatch.setattr(tune.BlindAnswerer, "from_slake", classmethod(lambda cls, root: cls([])))
    result = tune.main(["--output_dir", str(paths.root), "--only", "lr_3e-3", "--split", "train"])
    assert asked == [(trained / "meta_model_10.pt", "train", [])]
    assert result["best"] is None  # training questions choose nothing
    assert (work / "tune_train.json").is_file() and "lr_3e-3" in json.loads((work / "tune_train.json").read_text())
