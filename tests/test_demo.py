"""A shortened `make demo`: the same commands (converters, medcap run generate / train, report) on
the real SmolLM2-135M-Instruct and the mini SLAKE, with 3 training steps and 6 items per task.
The commands run in this process (tests/helpers.py: ``run_in_process``, the same entry points
without ~10 s of imports each); ``run_command``'s subprocesses are tested on their own here."""

from __future__ import annotations

import json

import pytest
from helpers import commands_in_process

pytestmark = pytest.mark.slow
METRIC_KEYS = {"closed_accuracy", "open_recall", "open_f1", "bleu4", "rouge_l", "cider", "closed_n", "open_n",
               "caption_n", "closed_yes_no_accuracy", "closed_choice_accuracy"}  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, smollm2, demo_slake):
    from medcap.demo.pipeline import DemoPaths, main

    root = tmp_path_factory.mktemp("demo_run")
    paths = DemoPaths(root)
    paths.llm.parent.mkdir(parents=True)
    paths.llm.symlink_to(smollm2, target_is_directory=True)  # converted once per session
    paths.slake.symlink_to(demo_slake[0], target_is_directory=True)
    with commands_in_process():
        summary = main(["--output_dir", str(root), "--epochs", "1", "--max_steps_per_epoch", "3", "--limit", "6"])
    return paths, summary


def test_run_command_runs_a_subprocess_and_names_a_failed_one(tmp_path, capfd):
    import sys

    from medcap.demo.pipeline import DemoError, run_command

    marker = tmp_path / "ran"
    seconds = run_command([sys.executable, "-c", f"import os; open({str(marker)!r}, 'w').write(os.environ['HF_HUB_OFFLINE'])"],
                          "write a marker")  # fmt: skip
    assert marker.read_text() == "1" and seconds > 0  # offline, whatever the caller's environment
    assert "== write a marker" in capfd.readouterr().out
    with pytest.raises(DemoError, match=r"exit the hard way failed \(exit status 3\): python -c"):
        run_command([sys.executable, "-c", "raise SystemExit(3)"], "exit the hard way")


def test_summary_has_both_models_and_the_reference_rates(demo_run):
    paths, summary = demo_run
    on_disk = json.loads((paths.root / "summary.json").read_text())
    assert on_disk["yes_no_majority_rate"] == 0.5  # yes/no questions come in pairs
    assert on_disk["majority_rate"] == summary["majority_rate"] < 0.5  # choice answers vary
    assert 0.4 <= on_disk["question_prior_rate"] <= 0.65  # balanced per question text too
    assert on_disk["yes_no_prior_rate"] is not None and on_disk["choice_prior_rate"] is not None
    for name in ("baseline", "trained"):
        metrics = on_disk[name]
        assert METRIC_KEYS <= set(metrics)
        assert metrics["closed_n"] + metrics["open_n"] == 6  # --limit 6
        assert metrics["caption_n"] == 6
        assert 0.0 <= metrics["closed_accuracy"] <= 1.0 and metrics["cider"] >= 0.0
        # every yes/no question follows its image's open question of the same content type
        assert metrics["yes_no_implied_n"] == metrics["closed_yes_no_n"] > 0
        assert 0.0 <= metrics["yes_no_implied_accuracy"] <= 1.0 and 0.0 <= metrics["yes_no_agreement"] <= 1.0
        assert set(metrics["protocols"]) == {"medcap", "lmms_eval", "multimedeval", "medevalkit", "llava_med"}
        assert metrics["protocols"]["medcap"]["closed"] == pytest.approx(metrics["closed_accuracy"])
    assert on_disk["training"]["steps"] == 3
    assert on_disk["training"]["llm_unchanged"] is True


def test_report_is_self_contained(demo_run):
    paths, _ = demo_run
    html = (paths.root / "report.html").read_text()
    assert (paths.root / "summary.png").stat().st_size > 10_000
    assert "src=\"data:image/png;base64," in html and "src=\"data:image/jpeg;base64," in html
    assert "src=\"http" not in html and "src=\"/" not in html  # nothing outside the file
    assert "bitwise unchanged" in html
    assert "under each paper's protocol" in html and "lmms_eval" in html
    assert html.count('class="card"') >= 1  # gallery of held-out images


def test_answers_come_from_the_model_and_evaluations_are_fresh(demo_run):
    paths, _ = demo_run
    baseline = (paths.eval_dir("baseline") / "test_out_slake_untrained.csv").read_text().splitlines()
    trained = list((paths.eval_dir("trained")).glob("test_out_slake_meta_model_*.csv"))
    assert len(baseline) == 7 and len(trained) == 1  # header + 6 rows; the last checkpoint only


def test_the_untrained_model_s_answers_are_cut_short(demo_run):
    import csv

    from medcap.data.chatml import chatml_tokenizer
    from medcap.demo.pipeline import UNTRAINED_ANSWER_TOKENS

    paths, _ = demo_run
    tokenizer = chatml_tokenizer(path=str(paths.llm / "tokenizer.json"))
    with open(paths.eval_dir("baseline") / "test_out_slake_untrained.csv", newline="") as f:
        answers = [row["generated"] for row in csv.DictReader(f)]
    lengths = [len(tokenizer.encode(a, add_bos=False, add_eos=False)) for a in answers]
    assert max(lengths) <= UNTRAINED_ANSWER_TOKENS + 1  # (re-encoding may split a token in two)


def test_second_run_reuses_data_and_llm(demo_run, capfd):
    from medcap.demo.pipeline import prepare

    paths, _ = demo_run
    timings: dict[str, float] = {}
    prepare(paths, timings)
    out = capfd.readouterr().out
    assert "already built (reused)" in out and "already converted (reused)" in out  # the mini SLAKE, the LLM
    assert set(timings) == {"convert_dataset", "convert_llm"}  # the ShareGPT files follow the converters


def test_probe_section_says_whether_training_improved_the_features(demo_run):
    """The demo answers the seed's claim: the trained encoder, random init and pixels, probed on
    the mini SLAKE's modality, plane and body part (held-out test images), with intervals."""
    paths, _ = demo_run
    probe = json.loads((paths.root / "summary.json").read_text())["probe"]
    assert set(probe) == {"Modality", "Plane", "Organ"}
    for section in probe.values():
        assert set(section["encoders"]) == {"trained", "step 0 (training's own initialisation)",
                                            "untrained (another random init)", "pixel baseline"}
        for m in section["encoders"].values():
            acc = m["accuracy"]
            assert 0.0 <= acc["ci_low"] <= acc["value"] <= acc["ci_high"] <= 1.0
        for d in section["trained_minus"].values():
            assert d["ci_low"] <= d["value"] <= d["ci_high"]
            assert d["verdict"] in ("better", "worse", "no clear difference")
        assert section["n_test"] > 0 and section["n_train"] > section["n_test"] // 2
    assert "Does training against the frozen LLM give better image features?" in (paths.root / "report.html").read_text()
    assert (paths.root / "probe" / "modality" / "probe.json").is_file()


def test_image_reading_is_measured_beside_what_needs_no_image(demo_run):
    """The blind answerer, the most common answer, the image swap and the harness's wording, with
    the targets; the training questions were half in harness wordings, test ones never."""
    paths, summary = demo_run
    on_disk = json.loads((paths.root / "summary.json").read_text())
    reading = on_disk["image_reading"]
    assert reading["closed_vs_blind"]["n"] == summary["trained"]["closed_n"]
    assert reading["image_swap"]["baseline"] in (0.0, None) or reading["image_swap"]["n"] == 0
    harness = on_disk["harness_prompt"]
    assert harness["n"] == 6 and harness["suffix"].startswith("\nAnswer the question using a single word")
    asked = (paths.eval_dir("trained_harness_prompt")).glob("test_out_slake_meta_model_*.csv")
    assert "single word or phrase" in next(asked).read_text()
    assert set(on_disk["targets"]) >= {"closed_beats_blind_by_0.15", "image_swap_above_blind",
                                       "harness_prompt_within_0.05", "probe_at_or_above_step0"}
    train = json.loads((paths.data / "slake_vqa_train.json").read_text())
    test = json.loads((paths.data / "slake_vqa_test.json").read_text())
    worded = [r for r in train if "single word or phrase" in r["conversations"][0]["value"]]
    assert 0 < len(worded) < len(train)
    assert not any("single word or phrase" in r["conversations"][0]["value"] for r in test)
    assert (paths.checkpoints / "initial_vision.pt").is_file()
    assert "Does the model read the image?" in (paths.root / "report.html").read_text()
