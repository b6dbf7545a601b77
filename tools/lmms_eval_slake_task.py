"""Write an lmms-eval task for a local SLAKE folder, so that lmms-eval evaluates offline (its own
``slake`` task downloads BoKelvin/SLAKE from the Hugging Face Hub).

    python tools/lmms_eval_slake_task.py --slake /data/Slake1.0 --out lmms_tasks/
    lmms-eval --include_path lmms_tasks --tasks medcap_slake --model openai ...   (docs/other-harnesses.md)

The folder is SLAKE's own layout (``imgs/``, ``train.json``, ``validate.json`` or
``validation.json``, ``test.json``), as the demo's mini SLAKE is. Written into ``--out``:

- ``medcap_slake.jsonl``: the split's English questions, each with its image's absolute path;
- ``medcap_slake.yaml``: the task, as lmms-eval's ``slake_en`` (prompt: the question +
  "\\nAnswer the question using a single word or phrase.", greedy, 32 new tokens), reading the
  JSONL through the ``json`` dataset builder instead of the Hub;
- ``utils.py``: the task's functions. Images come from the local paths; the scoring is
  lmms-eval's own (``lmms_eval.tasks.slake.utils``), so the numbers are its ``slake`` numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

TASK = "medcap_slake"
POST_PROMPT = "\nAnswer the question using a single word or phrase."
SPLIT_FILES = {"test": ("test.json",), "val": ("validate.json", "validation.json"), "train": ("train.json",)}
METRICS = (  # (metric, lmms-eval's aggregation function)
    ("slake_accuracy", "slake_aggregate_accuracy"),
    ("slake_open_accuracy", "slake_aggregate_open_accuracy"),
    ("slake_closed_accuracy", "slake_aggregate_closed_accuracy"),
)

UTILS = '''"""The medcap_slake task's functions (written by medcap's tools/lmms_eval_slake_task.py): images
from local paths; the scoring is lmms-eval's own slake scoring."""

from PIL import Image


def doc_to_visual(doc):
    return [Image.open(doc["image_path"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    kwargs = lmms_eval_specific_kwargs or {}
    return f"{kwargs.get('pre_prompt', '')}{doc['question'].strip()}{kwargs.get('post_prompt', '')}"


def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
    return [{"role": "user", "content": [{"type": "image", "url": doc_to_visual(doc)[0]},
                                         {"type": "text", "text": doc_to_text(doc, lmms_eval_specific_kwargs)}]}]


def _slake():
    from lmms_eval.tasks.slake import utils

    return utils


def process_results(doc, results):
    return _slake().slake_process_results(doc, results)

'''


def _aggregation(function: str) -> str:
    return f"def {function}(results):\n    return _slake().{function}(results)\n"


def split_file(slake: Path, split: str) -> Path:
    for name in SPLIT_FILES[split]:
        if (slake / name).is_file():
            return slake / name
    raise FileNotFoundError(f"{slake}: no {' or '.join(SPLIT_FILES[split])} (a SLAKE folder has imgs/ and the split JSON files)")


def records(slake: Path, split: str) -> list[dict]:
    """The split's English questions with absolute image paths; an error names the record."""
    path = split_file(slake, split)
    rows = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for i, row in enumerate(rows):
        if str(row.get("q_lang", "en")).lower() != "en":
            continue
        missing = [k for k in ("img_name", "question", "answer", "answer_type") if k not in row]
        if missing:
            raise ValueError(f"{path}: record {i} has no {', '.join(missing)}")
        image = (slake / "imgs" / row["img_name"]).resolve()
        if not image.is_file():
            raise FileNotFoundError(f"{path}: record {i} (qid {row.get('qid')}): no image {image}")
        out.append({"qid": str(row.get("qid", i)), "question": row["question"], "answer": str(row["answer"]),
                    "answer_type": row["answer_type"], "content_type": row.get("content_type", ""),
                    "modality": row.get("modality", ""), "q_lang": "en", "image_path": str(image)})  # fmt: skip
    if not out:
        raise ValueError(f"{path}: no English question")
    return out


def task_yaml(task: str, data: Path) -> str:
    """The task config (YAML with lmms-eval's ``!function`` tags, written as text)."""
    metrics = "".join(
        f"  - metric: {m}\n    aggregation: !function utils.{f}\n    higher_is_better: true\n" for m, f in METRICS
    )
    return (
        f"task: {task}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_visual: !function utils.doc_to_visual\n"
        "doc_to_text: !function utils.doc_to_text\n"
        "doc_to_messages: !function utils.doc_to_messages\n"
        'doc_to_target: "answer"\n'
        "process_results: !function utils.process_results\n"
        "generation_kwargs:\n  max_new_tokens: 32\n  temperature: 0\n  do_sample: false\n"
        f"metric_list:\n{metrics}"
        "lmms_eval_specific_kwargs:\n  default:\n    pre_prompt: \"\"\n"
        f"    post_prompt: {json.dumps(POST_PROMPT)}\n"
        "metadata:\n  version: 0.0\n  source: medcap tools/lmms_eval_slake_task.py\n"
    )


def write_task(slake: Path, out: Path, split: str = "test", task: str = TASK, limit: int | None = None) -> dict:
    """The three files under ``out``; returns their paths and the question count."""
    rows = records(Path(slake), split)[: limit or None]
    out.mkdir(parents=True, exist_ok=True)
    data = (out / f"{task}.jsonl").resolve()
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (out / f"{task}.yaml").write_text(task_yaml(task, data), encoding="utf-8")
    utils = UTILS + "\n" + "\n\n".join(_aggregation(f) for _, f in METRICS)
    (out / "utils.py").write_text(utils, encoding="utf-8")
    return {"yaml": out / f"{task}.yaml", "utils": out / "utils.py", "data": data, "questions": len(rows)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--slake", type=Path, required=True, help="a SLAKE folder (imgs/, test.json, ...)")
    ap.add_argument("--out", type=Path, required=True, help="the folder to pass to lmms-eval's --include_path")
    ap.add_argument("--split", choices=sorted(SPLIT_FILES), default="test")
    ap.add_argument("--task", default=TASK, help="the task name for --tasks")
    ap.add_argument("--limit", type=int, default=None, help="keep the first N questions")
    args = ap.parse_args(argv)
    try:
        written = write_task(args.slake, args.out, args.split, args.task, args.limit)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{written['questions']} questions; task {args.task} in {args.out} (lmms-eval --include_path {args.out} "
          f"--tasks {args.task})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
