"""The demo's mini SLAKE from shipped images: SLAKE's own format, read by the real converters and
readers, balanced closed questions, and no source shared between train and test."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
SLAKE_FIELDS = {"img_id", "img_name", "question", "answer", "q_lang", "location", "modality", "answer_type",
                "base_type", "content_type", "triple", "qid"}  # fmt: skip


@pytest.fixture
def demo(demo_slake):
    return demo_slake


def test_slake_format_and_real_readers(demo, tmp_path):
    from medcap.data.sources import read_slake, read_slake_text

    root, counts = demo
    rows = json.loads((root / "test.json").read_text())
    assert rows and all(set(r) == SLAKE_FIELDS for r in rows)
    assert all((root / "imgs" / r["img_name"]).is_file() for r in rows)
    assert len(read_slake(root, "test")) == counts["test_questions"] > 20
    assert len(read_slake(root, "val")) == counts["validate_questions"]
    assert len(read_slake_text(root, root, "train")) == counts["train_images"]
    assert len(counts["modalities"]) >= 4  # CT, MRI, X-ray, ultrasound, nuclear medicine
    spec = importlib.util.spec_from_file_location("c", ROOT / "tools" / "convert_slake_to_sharegpt.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--data_dir", str(root), "--output_dir", str(tmp_path), "--strict"])
    assert len(json.loads((tmp_path / "slake_vqa_test.json").read_text())) == counts["test_questions"]


def test_closed_answers_are_balanced_and_sources_not_shared(demo):
    from medcap.demo.slake import dicom_sources, split_groups, volume_sources

    root, _ = demo
    for part in ("train", "test"):
        closed = Counter(
            r["answer"]
            for r in json.loads((root / f"{part}.json").read_text())
            if r["answer_type"] == "CLOSED"
        )
        assert closed["Yes"] == closed["No"] > 0  # a constant yes/no answer scores 50%
        assert len(closed) > 4  # choice questions: the answer is one of the options
    sources = dicom_sources() + volume_sources()
    split = split_groups(sources, seed=0)
    assert {"train", "test"} <= set(split.values())
    by_group: dict[str, set] = {}
    for s in sources:
        by_group.setdefault(s.group, set()).add(split[s.group])
    assert all(len(parts) == 1 for parts in by_group.values())
    assert split_groups(sources, seed=0) == split  # deterministic


def test_a_blind_answerer_stays_near_chance(demo):
    """Fitted on train, answering each closed test question by its text alone."""
    from medcap.data.sources import read_slake
    from medcap.demo.report import majority_rate, question_prior_rate

    root, _ = demo
    closed = {
        split: [(it.prompt, it.answer) for it in read_slake(root, split) if it.extra["answer_type"] == "CLOSED"]
        for split in ("train", "test")
    }
    assert question_prior_rate(closed["train"], closed["test"]) < 0.65
    assert majority_rate([a for _, a in closed["test"]]) < 0.4
    choices = [q for q, _ in closed["test"] if " or " in q]
    assert choices and all(a.lower() in q.lower() for q, a in closed["test"] if " or " in q)


def test_blind_rates():
    from medcap.demo.report import majority_rate, question_prior_rate

    assert majority_rate(["Yes", "No", "yes", "MRI"]) == 0.5
    train = [("Is this an MRI?", "Yes"), ("Is this an MRI?", "Yes"), ("Is this a CT?", "No"), ("Is this a CT?", "Yes")]
    test = [("Is this an MRI?", "No"), ("Is this a CT?", "Yes"), ("Unseen?", "Yes")]
    # MRI -> "yes" (wrong); CT tie -> half; unseen -> the overall majority "yes" (right)
    assert question_prior_rate(train, test) == (0 + 0.5 + 1) / 3


def test_yes_no_implied_by_the_models_own_open_answer():
    from medcap.demo.report import implied_yes_no

    def row(image, question, gold, said, answer_type="CLOSED", content_type="Modality"):
        return {"image": image, "instruction": question, "output": gold, "generated": said,
                "answer_type": answer_type, "content_type": content_type}  # fmt: skip

    rows = dict(enumerate([
        row("a.jpg", "What modality is used to take this image?", "MRI", "mri.", answer_type="OPEN"),
        row("a.jpg", "Is this an MRI?", "Yes", "No"),  # implied Yes: right (the model itself said No)
        row("a.jpg", "Is this a CT scan?", "No", "No"),  # implied No: right
        row("b.jpg", "What modality is used to take this image?", "CT", "MRI", answer_type="OPEN"),
        row("b.jpg", "Is this a CT scan?", "Yes", "Yes"),  # implied No: wrong
        row("b.jpg", "In which plane is this image taken?", "Coronal", "an apple", "OPEN", "Plane"),
        row("b.jpg", "Is this a coronal slice?", "Yes", "Yes", content_type="Plane"),  # names no plane -> No: wrong
        row("b.jpg", "Is this a sagittal slice?", "No", "Yes", content_type="Plane"),  # -> No: right
        row("c.jpg", "Is this an MRI?", "Yes", "Yes"),  # no open answer for c: not counted
        row("a.jpg", "Is this a CT scan or an MRI?", "MRI", "MRI"),  # choice: not counted
    ]))  # fmt: skip
    out = implied_yes_no(rows)
    assert out["yes_no_implied_accuracy"] == 3 / 5 and out["yes_no_implied_n"] == 5
    # implied yes, no, no, no, no; answered no, no, yes, yes, yes: they agree once, below chance
    assert out["yes_no_agreement"] == 1 / 5
    chance = 1 / 5 * 3 / 5 + 4 / 5 * 2 / 5
    assert out["yes_no_agreement_kappa"] == pytest.approx((1 / 5 - chance) / (1 - chance))
    consistent = {0: rows[0], 1: {**rows[1], "generated": "Yes"}, 2: rows[2]}
    assert implied_yes_no(consistent)["yes_no_agreement_kappa"] == 1.0
    assert implied_yes_no({})["yes_no_implied_n"] == 0
