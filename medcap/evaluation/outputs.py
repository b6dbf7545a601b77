"""Every evaluation output file's name, in one place, and the one reader of their rows.

The names are the original medcap's (its users' scripts and the judge look for them):
``test_out_{ckpt}.csv`` (captions), ``test_out_{kind}_{ckpt}.csv`` (VQA), ``test_{ckpt}.csv``
(caption scores); medcap adds ``metrics_{ckpt}.json``. ``{ckpt}`` is the checkpoint file's stem,
``untrained`` for a model without one. The judge writes ``<csv>_70B_out.csv``,
``<csv>_70B_acc.csv`` and ``<csv>_70B_summary.json`` beside the CSV it judges.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medcap.io import read_csv_rows

CSV_COLUMNS = ["image", "instruction", "output", "generated"]  # the original's, in its order
EXTRA_COLUMNS = ["index", "answer_type", "content_type", "qid", "description", "score"]
UNTRAINED = "untrained"


def checkpoint_tag(path: str | Path | None) -> str:
    return UNTRAINED if path is None else Path(path).stem


def rows_by_index(rows: list[dict[str, str]]) -> dict[int, dict[str, str]]:
    """Rows keyed by their ``index`` column (rows without one are not medcap's and are left out)."""
    return {int(r["index"]): r for r in rows if (r.get("index") or "").strip().isdigit()}


@dataclass(frozen=True)
class EvalOutputs:
    """The files one checkpoint's evaluation writes under ``output_dir``."""

    output_dir: Path
    tag: str

    @classmethod
    def for_checkpoint(cls, output_dir: str | Path, checkpoint: str | Path | None) -> EvalOutputs:
        return cls(Path(output_dir), checkpoint_tag(checkpoint))

    def task_csv(self, task: str) -> Path:
        """``captions`` -> ``test_out_{ckpt}.csv``; ``slake``/``vqarad`` -> ``test_out_{kind}_{ckpt}.csv``."""
        name = f"test_out_{self.tag}.csv" if task == "captions" else f"test_out_{task}_{self.tag}.csv"
        return self.output_dir / name

    @property
    def caption_scores(self) -> Path:
        return self.output_dir / f"test_{self.tag}.csv"

    @property
    def metrics(self) -> Path:
        return self.output_dir / f"metrics_{self.tag}.json"

    def judged(self, task: str) -> tuple[Path, Path, Path]:
        """``eval_vqa=True``: the in-process judge's replies (``acc_out_{kind}_{ckpt}.csv``), its
        accuracy (``acc_{kind}_{ckpt}.csv``, one number, as the original) and medcap's summary."""
        stem = f"{task}_{self.tag}"
        return (self.output_dir / f"acc_out_{stem}.csv", self.output_dir / f"acc_{stem}.csv",
                self.output_dir / f"acc_{stem}_summary.json")  # fmt: skip

    def rows(self, task: str) -> dict[int, dict[str, str]]:
        """A task's CSV rows by index ({} when it was not run)."""
        path = self.task_csv(task)
        return rows_by_index(read_csv_rows(path)) if path.is_file() else {}

    def read_metrics(self) -> dict[str, Any]:
        return json.loads(self.metrics.read_text(encoding="utf-8")) if self.metrics.is_file() else {}


def judge_outputs(csv_path: str | Path) -> tuple[Path, Path, Path]:
    """The judge's replies, its accuracy and its summary, beside the judged CSV."""
    stem = Path(csv_path).with_suffix("")
    return Path(f"{stem}_70B_out.csv"), Path(f"{stem}_70B_acc.csv"), Path(f"{stem}_70B_summary.json")
