"""Files written so that a crash never leaves half of one behind."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write`` on a temporary file beside ``path``, fsync, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    data = json.dumps(obj, indent=indent, ensure_ascii=False).encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def read_csv_rows(path: str | Path) -> list[dict[str, str]]:
    """A CSV's rows as dicts. A byte order mark (the original medcap wrote its CSVs as
    ``utf-8-sig``, as spreadsheet programs expect) is not part of the first column's name."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


class ResumableCSV:
    """An output CSV written a row at a time (flushed), keyed by an ``index`` column, so that an
    interrupted run leaves every finished row behind and a rerun does only the rest.

    ``write=False`` keeps the bookkeeping but writes nothing (all ranks but one, say)."""

    def __init__(self, path: str | Path, columns: list[str], write: bool = True):

        self.path = Path(path)
        self.done: dict[int, dict[str, str]] = {}
        if self.path.exists():
            self.done = {
                int(r["index"]): r for r in read_csv_rows(self.path) if (r.get("index") or "").strip().isdigit()
            }
        new_file = not self.path.exists()
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path if write else os.devnull, "a", newline="", encoding="utf-8")  # noqa: SIM115
        self._writer = csv.DictWriter(self._file, fieldnames=columns)
        if new_file:
            self._writer.writeheader()

    def add(self, row: dict[str, Any]) -> None:
        self._writer.writerow(row)
        self._file.flush()
        self.done[int(row["index"])] = {k: str(v) for k, v in row.items()}

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ResumableCSV:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
