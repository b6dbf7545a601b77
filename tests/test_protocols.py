"""The scoring protocols (``medcap/evaluation/protocols``) against their peers' own code, on the
answer pairs of tests/data/protocol_pairs.json:

- lmms-eval and MultiMedEval install from PyPI: their verdicts were recorded by running their
  code (tools/protocol_peer_scores.py -> protocol_peer_expected.json), and a slow test re-derives
  them live when a venv with the peers is named (MEDCAP_LMMS_EVAL_PYTHON / MEDCAP_MULTIMEDEVAL_PYTHON);
- LLaVA-Med and MedEvalKit are GitHub-only: the pairs carry the verdicts derived by hand from
  reading their code;
- medcap's protocol is medcap's own scorer.
Also the ``protocols`` setting and the VQA task's ``protocols`` summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medcap.errors import ConfigError
from medcap.evaluation.protocols import DEFAULT, PROTOCOLS, resolve, score_protocols
from medcap.evaluation.protocols.base import Row
from medcap.evaluation.protocols.lmms_eval import normalize as lmms_normalize
from medcap.evaluation.protocols.multimedeval import bleu1
from medcap.evaluation.vqa import summarize_scores

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data"
PAIRS = json.loads((DATA / "protocol_pairs.json").read_text())["pairs"]
RECORDED = json.loads((DATA / "protocol_peer_expected.json").read_text())["peers"]
BY_ID = {p["id"]: p for p in PAIRS}
DATASETS = sorted({p["dataset"] for p in PAIRS})


def verdict(name: str, pair: dict):
    return PROTOCOLS[name].verdict(Row.of(pair), pair["dataset"])


def of_dataset(ds: str) -> list[dict]:
    return [p for p in PAIRS if p["dataset"] == ds]


def test_pairs_cover_the_tricky_cases():
    """Each kind of case the table exists for is in it, and the protocols disagree on it."""
    notes = " ".join(p["note"] for p in PAIRS)
    for word in ("case", "full stop", "article", "number word", "synonym", "substring", "empty", "bracket",
                 "hyphen", "contraction", "thousands", "VQA-RAD"):  # fmt: skip
        assert word in notes, word
    assert {p["answer_type"] for p in PAIRS} == {"OPEN", "CLOSED"} and DATASETS == ["slake", "vqarad"]
    split = [p["id"] for p in PAIRS if len({verdict(n, p).value > 0.5 for n in PROTOCOLS}) > 1]
    assert len(split) >= len(PAIRS) // 2, "most pairs should separate at least two protocols"


# ------------------------------------------------------------------ lmms-eval (recorded from its code)
def test_lmms_eval_recording_names_its_version():
    assert RECORDED["lmms_eval"]["version"] == "0.7.3"
    assert set(RECORDED["lmms_eval"]["items"]) == set(BY_ID), "re-record: tools/protocol_peer_scores.py"


@pytest.mark.parametrize("pid", sorted(BY_ID))
def test_lmms_eval_matches_its_code(pid):
    pair, peer = BY_ID[pid], RECORDED["lmms_eval"]["items"][pid]
    assert lmms_normalize(pair["prediction"]) == peer["prediction_normalized"]
    assert lmms_normalize(pair["answer"]) == peer["target_normalized"]
    assert verdict("lmms_eval", pair).value == float(peer["is_correct"])


@pytest.mark.parametrize("ds", DATASETS)
def test_lmms_eval_aggregates_match_its_code(ds):
    ours = PROTOCOLS["lmms_eval"].score(of_dataset(ds), ds)
    peer = RECORDED["lmms_eval"]["aggregates"][ds]
    for key in ("overall", "open", "closed"):
        assert ours[key] == pytest.approx(peer[key]), key


# ------------------------------------------------------------------ MultiMedEval (recorded from its code)
def test_multimedeval_recording_names_its_version():
    assert RECORDED["multimedeval"]["version"] == "1.0.0"
    assert set(RECORDED["multimedeval"]["items"]) == set(BY_ID), "re-record: tools/protocol_peer_scores.py"


@pytest.mark.parametrize("pid", sorted(BY_ID))
def test_multimedeval_matches_its_code(pid):
    """One pair alone through ``VQA.evaluate``: its closed accuracy is this answer's verdict when
    MultiMedEval counts it closed, else its open recall and open accuracy are."""
    pair, peer = BY_ID[pid], RECORDED["multimedeval"]["items"][pid]
    v = verdict("multimedeval", pair)
    ours = PROTOCOLS["multimedeval"].score([pair], pair["dataset"])
    if v.group == "closed":
        assert ours["closed"] == peer["closedQuestionsAccuracy"]
        assert peer["openQuestionsRecall"] == 0  # the peer's figure for an empty group
    else:
        assert ours["open"] == pytest.approx(peer["openQuestionsRecall"])
        assert ours["open_accuracy"] == peer["openQuestionsAccuracy"]
    assert ours["overall"] == pytest.approx(peer["recall"])
    assert ours["f1"] == pytest.approx(peer["F1"], abs=1e-6)
    assert ours["bleu1"] == pytest.approx(peer["bleu"], abs=1e-6)


@pytest.mark.parametrize("ds", DATASETS)
def test_multimedeval_aggregates_match_its_code(ds):
    ours = PROTOCOLS["multimedeval"].score(of_dataset(ds), ds)
    peer = RECORDED["multimedeval"]["aggregates"][ds]
    pairs = {"closed": "closedQuestionsAccuracy", "open": "openQuestionsRecall", "open_accuracy": "openQuestionsAccuracy",
             "overall": "recall", "f1": "F1", "bleu1": "bleu"}  # fmt: skip
    for key, theirs in pairs.items():
        assert ours[key] == pytest.approx(peer[theirs], abs=1e-6), key


def test_bleu1_is_precision_times_brevity_penalty():
    assert bleu1("liver", "liver") == 1.0
    assert bleu1("", "liver") == 0.0 and bleu1("heart", "liver") == 0.0
    assert bleu1("left", "left lung") == pytest.approx(0.36787944)  # exp(1 - 2/1)
    assert bleu1("left lung heart", "left lung") == pytest.approx(2 / 3)  # longer: no penalty


# ------------------------------------------------------------------ GitHub-only peers (derived by hand)
@pytest.mark.parametrize("name", ["llava_med", "medevalkit"])
def test_hand_derived_verdicts(name):
    wrong = []
    for pair in PAIRS:
        want, got = pair["expect"][name], verdict(name, pair)
        if got.group != want["group"] or got.value != pytest.approx(want["value"], abs=1e-6):
            wrong.append(f"{pair['id']}: {got.group} {got.value} (expected {want['group']} {want['value']})")
    assert not wrong, "\n".join(wrong)


def test_llava_med_closed_substring_rule_and_medcap_difference():
    """The substring rule finds "no" in "normal"; medcap's first-word rule does not."""
    pair = BY_ID["no_in_normal"]
    assert verdict("llava_med", pair).value == 1.0 and verdict("medcap", pair).value == 0.0


def test_medevalkit_marks_its_judge():
    out = PROTOCOLS["medevalkit"].score(of_dataset("slake"), "slake")
    assert "judge needed" in out["judge"]
    assert all("judge" not in PROTOCOLS[n].score(PAIRS[:3]) for n in PROTOCOLS if n != "medevalkit")


# ------------------------------------------------------------------ medcap's own
@pytest.mark.parametrize("ds", DATASETS)
def test_medcap_protocol_is_medcaps_scorer(ds):
    rows = of_dataset(ds)
    ours, summary = PROTOCOLS["medcap"].score(rows, ds), summarize_scores(rows)
    assert ours["closed"] == pytest.approx(summary["closed_accuracy"])
    assert ours["open"] == pytest.approx(summary["open_recall"])
    assert ours["open_f1"] == pytest.approx(summary["open_f1"])
    assert (ours["open_n"], ours["closed_n"]) == (summary["open_n"], summary["closed_n"])


def test_score_protocols_shape():
    out = score_protocols(of_dataset("slake"))
    assert list(out) == list(DEFAULT)
    for name, s in out.items():
        assert s["n"] == len(of_dataset("slake"))
        assert s["open_n"] + s["closed_n"] <= s["n"]
        assert (s["overall"] is None) == (s["overall_metric"] is None), name
        for key in ("open", "closed"):
            assert 0.0 <= s[key] <= 1.0, (name, key)


def test_row_needs_prediction_and_answer():
    with pytest.raises(KeyError, match="prediction and answer"):
        Row.of({"answer": "yes"})
    assert Row.of({"generated": "a", "output": "b", "answer_type": " closed "}) == Row("a", "b", "CLOSED")


# ------------------------------------------------------------------ the setting
def test_resolve_protocols():
    assert resolve(None) == DEFAULT == ("medcap", "lmms_eval", "multimedeval", "medevalkit", "llava_med")
    assert resolve("lmms_eval, medcap") == ("lmms_eval", "medcap")
    assert resolve("[llava_med,llava_med]") == ("llava_med",)
    assert resolve(["multimedeval"]) == ("multimedeval",)
    with pytest.raises(ConfigError, match="'lmms-eval' \\(did you mean lmms_eval\\?\\)"):
        resolve(["lmms-eval"])
    with pytest.raises(ConfigError, match="no protocol named 'vqav2'; known: medcap"):
        resolve("vqav2")
    with pytest.raises(ConfigError, match="no protocol named"):
        resolve("")


def test_generate_settings_protocols():
    from medcap.settings import GenerateSettings

    assert GenerateSettings.from_config({}, "generate").protocols is None
    assert GenerateSettings.from_config({"protocols": "medcap,llava_med"}, "generate").protocols == "medcap,llava_med"
    with pytest.raises(ConfigError, match="did you mean multimedeval"):
        GenerateSettings.from_config({"protocols": ["multimedevel"]}, "generate")


def test_vqa_task_summary_has_protocols(tmp_path):
    from medcap.evaluation.tasks import VQATask

    rows = [{"generated": p["prediction"], "output": p["answer"], "answer_type": p["answer_type"]}
            for p in of_dataset("vqarad")]  # fmt: skip
    summary = VQATask("vqarad", [], protocols=("medevalkit", "lmms_eval")).score(rows, None)
    assert list(summary["protocols"]) == ["medevalkit", "lmms_eval"]
    assert summary["protocols"]["medevalkit"] == PROTOCOLS["medevalkit"].score(of_dataset("vqarad"), "vqarad")
    assert "protocols" not in VQATask("vqarad", [], protocols=()).score(rows, None)
    report = VQATask("vqarad", [], protocols=("medevalkit",)).report("ckpt", summary)
    assert "medevalkit" in report and "judge needed" in report


def test_tasks_from_settings_passes_protocols(tmp_path):
    """The setting reaches the VQA task (a two-question SLAKE folder)."""
    from medcap.evaluation.tasks import tasks_from_settings
    from medcap.settings import GenerateSettings

    (tmp_path / "imgs" / "xmlab1").mkdir(parents=True)
    (tmp_path / "imgs" / "xmlab1" / "source.jpg").write_bytes(b"")
    qa = [{"img_id": 1, "img_name": "xmlab1/source.jpg", "question": "Is this a CT?", "answer": "Yes", "q_lang": "en",
           "answer_type": "CLOSED", "content_type": "Modality", "qid": i} for i in range(2)]  # fmt: skip
    for split in ("train", "validate", "test"):
        (tmp_path / f"{split}.json").write_text(json.dumps(qa))
    cfg = {"test_slake": True, "dataset_source": str(tmp_path), "protocols": "llava_med"}
    (task,) = tasks_from_settings(GenerateSettings.from_config(cfg, "generate"))
    assert task.protocols == ("llava_med",)
    (task,) = tasks_from_settings(GenerateSettings.from_config({**cfg, "protocols": None}, "generate"))
    assert task.protocols == DEFAULT


# ------------------------------------------------------------------ live: the peers' own code, now
def _peer_python(var: str) -> str:
    python = os.environ.get(var)
    if not python:
        pytest.skip(f"{var} is not set: name the python of a venv with the peer installed (docs/protocols.md)")
    if not Path(python).is_file():
        pytest.fail(f"{var}={python}: no such file")
    return python


@pytest.mark.slow
@pytest.mark.parametrize(("peer", "var"), [("lmms_eval", "MEDCAP_LMMS_EVAL_PYTHON"),
                                           ("multimedeval", "MEDCAP_MULTIMEDEVAL_PYTHON")])  # fmt: skip
def test_recorded_peer_scores_are_the_peers_own(peer, var, tmp_path):
    """Re-run the peer's code on the pairs: the recorded verdicts are what it gives today."""
    python = _peer_python(var)
    out = tmp_path / "peer.json"
    run = subprocess.run([python, str(ROOT / "tools" / "protocol_peer_scores.py"), "--only", peer, "--out", str(out)],
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    live = json.loads(out.read_text())["peers"][peer]
    assert live["version"] == RECORDED[peer]["version"]
    assert live["items"] == RECORDED[peer]["items"]
    assert live["aggregates"] == RECORDED[peer]["aggregates"]


def test_peer_tool_runs_without_peers(tmp_path):
    """In medcap's own venv no peer is installed: the tool says so and writes nothing."""
    out = tmp_path / "x.json"
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "protocol_peer_scores.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    if run.returncode == 0:
        pytest.skip("a peer is installed in this venv")
    assert "is not installed" in run.stderr and not out.exists()


# ------------------------------------------------------------------ the demo's report
def test_demo_report_shows_protocols():
    from medcap.demo.report import flat_metrics, metrics_table, protocol_table

    def side(answers: list[str]) -> dict:
        rows = [{"prediction": a, "answer": "Yes", "answer_type": "CLOSED"} for a in answers]
        return flat_metrics({"slake": {**summarize_scores(rows), "protocols": score_protocols(rows)}})

    before, after = side(["No", "Normal"]), side(["Yes, it is.", "yes"])
    assert after["protocols"]["lmms_eval"]["closed"] == 0.5 and before["protocols"]["llava_med"]["closed"] == 0.0
    refs = dict.fromkeys(("majority_rate", "yes_no_majority_rate", "question_prior_rate", "yes_no_prior_rate",
                          "choice_prior_rate"), 0.5)  # fmt: skip
    summary = {"baseline": before, "trained": after, **refs}
    table = metrics_table(summary)
    assert "lmms_eval" in table and "0.000 -> 0.500" in table
    html = protocol_table(summary)
    assert html.count("<tr>") == 1 + len(DEFAULT) and "open judge needed" in html
    assert protocol_table({"baseline": {}, "trained": {}}) == ""
