"""Evaluation across processes (``medcap run --nproc_per_node N generate ...``): each rank
answers every N-th item into its own part file beside the task's CSV (no two ranks ever write
one file), then rank 0 merges the parts into the CSV one process would have written (same rows,
same order, same name) and removes them. A rerun after any rank was killed reads the CSV and
every part left behind as done, whatever the number of ranks then."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from medcap.evaluation.outputs import rows_by_index
from medcap.io import atomic_write, read_complete_rows


def part_path(final: Path, rank: int) -> Path:
    return final.with_name(f".{final.name}.rank{rank}")


def part_files(final: Path) -> list[Path]:
    return sorted(final.parent.glob(f".{final.name}.rank*"))


def done_rows(final: Path) -> dict[int, dict[str, str]]:
    """Rows already answered: in the merged CSV, or in a part file of an earlier run."""
    done: dict[int, dict[str, str]] = {}
    for path in [final, *part_files(final)]:
        if path.is_file():
            done.update(rows_by_index(read_complete_rows(path)))
    return done


def shard(items: list[Any], world_size: int, rank: int) -> list[Any]:
    """Every ``world_size``-th item from ``rank``: neighbouring items (similar lengths in most
    sets) spread over the ranks."""
    return items[rank::world_size]


def merge(final: Path, order: list[int], columns: list[str]) -> None:
    """The CSV one process would have written: every done row, in item order, written whole
    (through a temporary file), then the part files removed."""
    rows = done_rows(final)
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for index in order:
        if index in rows:
            writer.writerow(rows[index])
    data = buffer.getvalue().encode("utf-8-sig")
    atomic_write(final, lambda f: f.write(data))
    for part in part_files(final):
        part.unlink()
