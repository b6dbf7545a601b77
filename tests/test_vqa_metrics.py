"""VQA scoring on a table of answers, and caption metrics through pycocoevalcap (Java)."""

from __future__ import annotations

import pytest

from medcap.evaluation import captioning
from medcap.evaluation.vqa import closed_correct, normalize_answer, summarize_scores, token_f1, token_recall


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The Lung.", "lung"),
        ("Two", "2"),
        ("3.5 cm", "3.5 cm"),
        ("  An MRI!! ", "mri"),
        ("left-lung", "left lung"),
    ],
)
def test_normalize(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    "prediction, answer, right",
    [
        ("No, it is normal.", "No", True),
        ("Normal", "no", False),  # "no" is inside "normal": a substring test would count it
        ("Not really", "no", False),
        ("Yes.", "yes", True),
        ("yes and no", "no", False),
        ("the liver", "Liver", True),
        ("liver and lung", "liver", False),
        ("", "yes", False),
    ],
)
def test_closed(prediction, answer, right):
    assert closed_correct(prediction, answer) is right


# Issue 18, point 7: cases where real model output was scored wrong against VQAv2's normalisation.
@pytest.mark.parametrize(
    "prediction, gold, equal",
    [
        ("1,000", "1000", True),  # thousands separator
        ("12,345,678 cells", "12345678 cells", True),
        ("3,5", "35", False),  # a list or a European decimal: the comma stays a separator
        ("2,50", "250", False),
        ("3,5", "3, 5", True),
        ("dont know", "don't know", True),  # VQA's contractions table
        ("Isnt", "isn't", True),
        ("isn\u2019t", "isnt", True),  # typographic apostrophe
        ("the patient\u2019s liver", "patient's liver", True),
        (".5 cm", "5 cm", False),  # a leading-period decimal is 0.5, never 5
        (".5 cm", "0.5 cm", True),
        ("2.5 cm", "25 cm", False),  # decimal points survive
        ("Yes\u2026", "yes", True),  # Unicode punctuation stuck to a word
        ("\u201cYes\u201d", "yes", True),
        ("yes\uff01", "yes", True),
        ("CT\u3002", "ct", True),
        ("\uff23\uff34", "CT", True),  # full-width letters
        ("3\x015", "3.5", False),  # a control character is no decimal point
        ("yes\x01", "yes", True),
    ],
)
def test_normalized_equal(prediction, gold, equal):
    assert (normalize_answer(prediction) == normalize_answer(gold)) is equal


@pytest.mark.parametrize(
    "prediction, answer, right",
    [
        ("Yes\u2026", "yes", True),
        ("\u201cNo\u201d, it is clear.", "No", True),
        ("yes\uff01", "Yes", True),
        ("\uff23\uff34", "CT", True),
        ("CT\u3002", "CT", True),
        ("Not\u2026", "no", False),  # still the first word, never a substring
        (".5 cm", "5 cm", False),
        ("1,000", "1000", True),
    ],
)
def test_closed_unicode_and_numbers(prediction, answer, right):
    assert closed_correct(prediction, answer) is right


def test_open_recall_and_f1():
    assert token_recall("the left lung", "Lung") == 1.0
    assert token_f1("left lung", "lung") == pytest.approx(2 / 3)
    assert token_recall("heart", "left lung") == 0.0
    assert token_f1("", "") == 1.0


def test_summary_counts_every_question():
    items = [
        {"prediction": "Yes", "answer": "yes", "answer_type": "CLOSED", "content_type": "Modality"},
        {"prediction": "Normal", "answer": "no", "answer_type": "CLOSED ", "content_type": "Abnormality"},
        {"prediction": "left lung", "answer": "lung", "answer_type": "OPEN", "content_type": "Organ"},
        {"prediction": "heart", "answer": "liver", "answer_type": "OPEN", "content_type": "Organ"},
    ]
    s = summarize_scores(items)
    assert (s["n"], s["closed_n"], s["open_n"]) == (4, 2, 2)
    assert s["closed_accuracy"] == 0.5
    assert s["open_recall"] == 0.5 and s["open_exact_match"] == 0.0
    assert s["by_content_type"]["Organ"]["open_n"] == 2
    assert s["by_content_type"]["Modality"]["closed_accuracy"] == 1.0


def test_caption_metrics_with_java():
    refs = [
        "an axial ct scan of the chest showing both lungs",
        "a chest x ray with a left pleural effusion",
        "mri of the brain in the sagittal plane",
    ]
    perfect = captioning.caption_metrics(refs, refs)
    assert perfect["n"] == 3
    assert perfect["BLEU-4"] == pytest.approx(1.0, abs=1e-6) and perfect["ROUGE-L"] == pytest.approx(1.0)
    assert perfect["METEOR"] > 0.9
    wrong = captioning.caption_metrics(["a photo of a cat", "the heart is large", "knee"], refs)
    assert wrong["BLEU-4"] < 0.1 and wrong["CIDEr"] < perfect["CIDEr"] and wrong["ROUGE-L"] < 0.5


def test_missing_java_is_named(monkeypatch):
    monkeypatch.setattr(captioning.shutil, "which", lambda _: None)
    with pytest.raises(captioning.JavaMissingError, match="default-jre-headless"):
        captioning.caption_metrics(["a"], ["b"])
