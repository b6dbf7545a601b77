"""Score tests/data/protocol_pairs.json with the peers' own code and record the verdicts in
tests/data/protocol_peer_expected.json, which tests/test_protocols.py compares medcap's
reimplementations with.

Run it with the Python of a venv where the peers are installed (they pin their own torch, so not
medcap's venv); it imports nothing from medcap:

    python3.11 -m venv /opt/lmms
    /opt/lmms/bin/pip install lmms-eval==0.7.3 'filelock>=3.24.2,<4'
    /opt/lmms/bin/pip install --no-deps multimedeval==1.0.0 && /opt/lmms/bin/pip install torchmetrics bert_score nibabel
    /opt/lmms/bin/python tools/protocol_peer_scores.py            # rewrites the recorded file
    /opt/lmms/bin/python tools/protocol_peer_scores.py --out X    # writes X instead (the slow test)

lmms-eval: ``lmms_eval/tasks/slake/utils.py`` is loaded from the installed package and its
``slake_process_results`` and ``slake_aggregate_*`` functions run on each pair. MultiMedEval:
``multimedeval.task_families.VQA.evaluate`` runs on each pair alone and on each dataset's pairs
together; the package's ``__init__`` (which wires up every one of its tasks, with their own heavy
dependencies) is bypassed, the modules that ``VQA`` lives in run unchanged. A peer that is not
installed is left out (its recorded entries are kept).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import logging
import platform
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAIRS = ROOT / "tests" / "data" / "protocol_pairs.json"
EXPECTED = ROOT / "tests" / "data" / "protocol_peer_expected.json"


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{name} is not installed in {sys.executable}")
    return Path(list(spec.submodule_search_locations)[0])


def _load_file(module_name: str, path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def lmms_eval_scores(pairs: list[dict]) -> dict:
    """Per pair: lmms-eval's record (normalised texts, is_correct); per dataset: its aggregates."""
    utils = _load_file("lmms_slake_utils", _package_dir("lmms_eval") / "tasks" / "slake" / "utils.py")
    records = {}
    for p in pairs:
        doc = {"question": "", "answer": p["answer"], "answer_type": p["answer_type"], "qid": p["id"], "q_lang": "en",
               "modality": "", "content_type": ""}  # fmt: skip
        rec = utils.slake_process_results(doc, [p["prediction"]])["slake_accuracy"]
        records[p["id"]] = {k: rec[k] for k in ("prediction_normalized", "target_normalized", "is_correct")}
    aggregates = {}
    for ds in sorted({p["dataset"] for p in pairs}):
        recs = []
        for p in pairs:
            if p["dataset"] == ds:
                doc = {"answer": p["answer"], "answer_type": p["answer_type"], "qid": p["id"], "q_lang": "en"}
                recs.append(utils.slake_process_results(doc, [p["prediction"]])["slake_accuracy"])
        aggregates[ds] = {"overall": utils.slake_aggregate_accuracy(recs),
                          "open": utils.slake_aggregate_open_accuracy(recs),
                          "closed": utils.slake_aggregate_closed_accuracy(recs)}  # fmt: skip
    return {"items": records, "aggregates": aggregates}


def _multimedeval_vqa() -> type:
    """``multimedeval.task_families.VQA`` without running the package's ``__init__``."""
    pkg = types.ModuleType("multimedeval")
    pkg.__path__ = [str(_package_dir("multimedeval"))]
    sys.modules.setdefault("multimedeval", pkg)
    from multimedeval.task_families import VQA
    from multimedeval.utils import BatcherOutput

    class Pairs(VQA):
        def __init__(self, samples: list[dict]):
            super().__init__(engine=None, logger=logging.getLogger("multimedeval"))
            self.dataset = samples

        def setup(self):
            pass

        def format_question(self, sample, prompt=False):
            return sample["question"]

        def get_correct_answer(self, sample):  # as its VQA-RAD, SLAKE and Path-VQA tasks do
            return sample["answer"].lower().strip()

    Pairs.BatcherOutput = BatcherOutput
    return Pairs


def multimedeval_scores(pairs: list[dict]) -> dict:
    Pairs = _multimedeval_vqa()

    def evaluate(subset: list[dict]) -> dict:
        task = Pairs([{"question": "", "answer": p["answer"]} for p in subset])
        predictions = [{"idx": i, "answer": Pairs.BatcherOutput(text=p["prediction"])} for i, p in enumerate(subset)]
        return {k: float(v) for k, v in task.evaluate(predictions).metrics.items()}

    return {
        "items": {p["id"]: evaluate([p]) for p in pairs},
        "aggregates": {ds: evaluate([p for p in pairs if p["dataset"] == ds]) for ds in sorted({p["dataset"] for p in pairs})},
    }


PEERS = {  # name: (distribution, scorer)
    "lmms_eval": ("lmms-eval", lmms_eval_scores),
    "multimedeval": ("multimedeval", multimedeval_scores),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=EXPECTED, help="where to write (default: the recorded file)")
    ap.add_argument("--only", choices=sorted(PEERS), action="append", help="score with these peers only")
    args = ap.parse_args(argv)
    pairs = json.loads(PAIRS.read_text())["pairs"]
    out = json.loads(args.out.read_text()) if args.out.is_file() else {}
    out.setdefault("about", "Verdicts of the peers' own scoring code on tests/data/protocol_pairs.json, written by "
                            "tools/protocol_peer_scores.py; tests/test_protocols.py compares medcap's protocols with them.")  # fmt: skip
    out.setdefault("peers", {})
    done = 0
    for name, (dist, scorer) in PEERS.items():
        if args.only and name not in args.only:
            continue
        version = _version(dist)
        if version is None:
            print(f"{name}: {dist} is not installed in {sys.executable}; its recorded entries are kept", file=sys.stderr)
            continue
        out["peers"][name] = {"distribution": dist, "version": version, "python": platform.python_version(),
                              **scorer(pairs)}  # fmt: skip
        done += 1
        print(f"{name} {version}: {len(pairs)} pairs scored")
    if not done:
        print("no peer installed here: nothing recorded", file=sys.stderr)
        return 1
    args.out.write_text(json.dumps(out, indent=1, ensure_ascii=False, sort_keys=True) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
