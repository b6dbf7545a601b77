"""``make claims``: the verdict logic on synthetic scores, the fixed rewordings and text checks,
and (slow) the quick mode end to end on the real SmolLM2 and the mini SLAKE."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import commands_in_process

from medcap.claims.probes import TEXT_PROMPTS, RewordError, reword
from medcap.claims.stats import (
    FROZEN_BETTER,
    FROZEN_WORSE,
    MIN_ITEMS,
    NO_CLEAR_DIFFERENCE,
    TOO_FEW_ITEMS,
    paired_interval,
    verdict,
)


def _scores(p: float, n: int = 200, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random(n) < p).astype(float)


def test_a_clearly_better_frozen_model_is_frozen_better():
    interval = paired_interval(_scores(0.8, seed=1), _scores(0.3, seed=2))
    assert interval["ci_low"] > 0 and interval["n"] == 200
    assert verdict(interval) == FROZEN_BETTER


def test_a_clearly_worse_frozen_model_is_frozen_worse():
    assert verdict(paired_interval(_scores(0.2, seed=1), _scores(0.9, seed=2))) == FROZEN_WORSE


def test_the_same_model_twice_or_noise_is_no_clear_difference():
    same = _scores(0.5, seed=3)
    tied = paired_interval(same, same)
    assert tied["difference"] == tied["ci_low"] == tied["ci_high"] == 0.0
    assert verdict(tied) == NO_CLEAR_DIFFERENCE
    # twelve items, one more right: the interval spans zero
    a = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0, 1, 1, 0.0])
    b = a.copy()
    b[4] = 0
    assert verdict(paired_interval(a, b)) == NO_CLEAR_DIFFERENCE


def test_too_few_items_give_no_verdict_whatever_the_interval():
    """Nine items, every one right for (a) and wrong for (b): the interval is [1, 1], yet below
    the minimum no claim is decided."""
    few = paired_interval(np.ones(MIN_ITEMS - 1), np.zeros(MIN_ITEMS - 1))
    assert few["ci_low"] == 1.0 and verdict(few) == TOO_FEW_ITEMS
    enough = paired_interval(np.ones(MIN_ITEMS), np.zeros(MIN_ITEMS))
    assert verdict(enough) == FROZEN_BETTER


def test_the_interval_is_paired_not_two_independent_samples():
    """Per-item differences of +0.1 on scores that vary a lot: independent samples would not
    separate them, the pairing does."""
    base = np.random.default_rng(0).random(50)
    interval = paired_interval(base + 0.1, base)
    assert interval["ci_low"] == pytest.approx(0.1) and verdict(interval) == FROZEN_BETTER


def test_unpaired_scores_are_refused():
    with pytest.raises(ValueError, match="same items"):
        paired_interval([1, 0, 1], [1, 0])


def test_every_demo_question_kind_is_reworded_and_the_options_are_kept():
    assert reword("Is this a CT scan or an MRI?") == "Which of the two is this picture: a CT scan or an MRI?"
    assert reword("Is this an X-ray?") == "Would you say this picture is an X-ray?"
    assert reword("What modality is used to take this image?") != "What modality is used to take this image?"
    with pytest.raises(RewordError, match="no fixed rewording"):
        reword("How large is the liver?")


def test_text_checks_accept_the_right_reply_and_refuse_a_wrong_one():
    by_prompt = {p.prompt: p for p in TEXT_PROMPTS}
    legs = by_prompt["How many legs does a dog have? Answer with a number only."]
    assert legs.check("4") and legs.check("A dog has four legs.") and not legs.check("3, not 4, is 3")
    assert by_prompt["What is 2 + 2? Answer with a number only."].check("2 + 2 = 4")
    ice = by_prompt["Is ice hot? Answer yes or no."]
    assert ice.check("No, ice is cold.") and not ice.check("Yes")
    upper = by_prompt["Write the word hello in capital letters only."]
    assert upper.check("HELLO") and not upper.check("Hello")
    assert {p.kind for p in TEXT_PROMPTS} == {"counting", "yes/no fact", "format"}


def test_quick_mode_asks_every_kind_of_text_prompt_and_the_full_run_all_of_them():
    from medcap.claims.pipeline import Plan

    quick = Plan.quick().text_prompts()
    assert len(quick) == 12 and all(p in TEXT_PROMPTS for p in quick)
    assert {p.kind for p in quick} == {p.kind for p in TEXT_PROMPTS}
    assert Plan.full().text_prompts() == TEXT_PROMPTS


@pytest.mark.slow
def test_quick_mode_end_to_end(tmp_path, smollm2, demo_slake):
    from medcap.claims.pipeline import main
    from medcap.demo.pipeline import DemoPaths

    paths = DemoPaths(tmp_path)
    paths.llm.parent.mkdir(parents=True)
    paths.llm.symlink_to(smollm2, target_is_directory=True)
    paths.slake.symlink_to(demo_slake[0], target_is_directory=True)
    with commands_in_process():  # the same commands, in this process (tests/helpers.py)
        summary = main(["--output_dir", str(tmp_path), "--quick"])
    work = tmp_path / "claims_quick"
    saved = json.loads((work / "claims.json").read_text())
    assert saved["claims"] == summary["claims"] and len(saved["claims"]) == 4
    # 4 items per measure: below the minimum, so no claim is decided
    assert all(c["verdict"] in (TOO_FEW_ITEMS, "no items") for c in saved["claims"])
    page = (work / "claims.html").read_text()
    assert page.count("<tr") > 10 and 'href="../report.html"' in page
    # (a)'s LLM is the untouched one: its plain-text replies are the untouched LLM's
    assert all(p["frozen"] == p["untouched"] for p in saved["text_prompts"])
    assert len(saved["text_prompts"]) == 12 and saved["plan"]["batch_size"] == 2  # quick: 4 prompts of each kind
    assert saved["measures"]["vqa_all"]["n"] == 4 and saved["measures"]["caption_rouge_l"]["n"] == 4
    # the LoRA run saved adapters beside the vision weights; the frozen one did not
    import torch

    lora_ckpt = torch.load(saved["learning_rates"]["lora"]["checkpoint"], weights_only=True)
    frozen_ckpt = torch.load(saved["learning_rates"]["frozen"]["checkpoint"], weights_only=True)
    assert lora_ckpt["llm_lora"]["rank"] == 8 and "llm_lora" not in frozen_ckpt
    assert (work / "SLAKE_reworded" / "test.json").is_file()
