"""Files written so that a crash, a full disk or a killed run never leaves half of one behind,
and a failed write says which file, why, and what is left."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from medcap.errors import ConfigError, OutputWriteError

# torch.save reports a failed write as a RuntimeError from its zip writer
_TORCH_WRITE_FAILED = re.compile(r"unexpected pos|file write failed|PytorchStreamWriter failed")


def write_failure(e: BaseException) -> str | None:
    """Why a write failed, or None when ``e`` is not a failed write."""
    if isinstance(e, OSError):
        return str(e)
    if isinstance(e, RuntimeError) and _TORCH_WRITE_FAILED.search(str(e)):
        first = str(e).strip().splitlines()[0]
        return "torch's checkpoint writer failed: " + re.sub(r"^\[enforce fail at [^\]]*\]\s*\.?\s*", "", first)
    return None


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any], what: str = "file") -> Path:
    """Call ``write`` on a temporary file beside ``path``, fsync, then rename over ``path``: the
    previous file stays whole until the new one is. A failed write (disk full, a file size
    limit) removes the temporary file and raises ``OutputWriteError`` naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    existed = path.exists()
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        reason = write_failure(e)
        if reason is None:
            raise
        kept = f"the previous {what} is kept" if existed else "nothing was written there"
        raise OutputWriteError(f"cannot write {path}: {reason} (disk full?); {kept}") from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def ensure_writable(folders: Iterable[tuple[str, str | Path | None]]) -> None:
    """Create each (config key, folder) and prove it writable before any model is loaded, so a
    wrong path fails in a second, not after the first epoch."""
    for key, folder in folders:
        if folder is None or str(folder) in ("", "None", "null"):
            continue
        folder = Path(str(folder))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".medcap-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"{key}={folder}: cannot create or write this folder ({e})") from None


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    data = json.dumps(obj, indent=indent, ensure_ascii=False).encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def read_csv_rows(path: str | Path) -> list[dict[str, str]]:
    """A CSV's rows as dicts. A byte order mark (the original medcap wrote its CSVs as
    ``utf-8-sig``, as spreadsheet programs expect) is not part of the first column's name."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def _rows_with_ends(text: str) -> Iterator[tuple[list[str], int]]:
    """Each CSV record of ``text`` and the character offset just after it."""
    lines = text.splitlines(keepends=True)
    consumed = [0]

    def feed() -> Iterator[str]:
        for line in lines:
            consumed[0] += len(line)
            yield line

    try:
        for record in csv.reader(feed()):
            yield record, consumed[0]
    except csv.Error:  # a quoted field cut off at the end of the file
        return


def complete_length(path: Path) -> tuple[int, int]:
    """(bytes of the file up to its last complete row, rows after the header there). A row is
    complete when its line ending is on disk: one cut by a failed write is not."""
    data = path.read_bytes()
    text = data.decode("utf-8", errors="replace")
    end, count = 0, -1
    for _, offset in _rows_with_ends(text):
        if text[offset - 1 : offset] not in ("\n", "\r"):
            break
        end, count = offset, count + 1
    return len(text[:end].encode("utf-8", errors="replace")), max(count, 0)


def read_complete_rows(path: str | Path) -> list[dict[str, str]]:
    """``read_csv_rows`` without a last row that a failed write cut."""
    path = Path(path)
    length, _ = complete_length(path)
    text = path.read_bytes()[:length].decode("utf-8-sig")
    return list(csv.DictReader(text.splitlines(keepends=True)))


class ResumableCSV:
    """An output CSV written a row at a time (flushed), keyed by an ``index`` column, so that an
    interrupted run leaves every finished row behind and a rerun does only the rest. A row cut
    by a failed write (a full disk) is cut off the file before the rerun appends. Written as
    ``utf-8-sig`` like the original's (spreadsheet programs need the byte order mark to show
    non-ASCII text); a rerun appends without a second mark.

    ``write=False`` keeps the bookkeeping but writes nothing (all ranks but one, say)."""

    def __init__(self, path: str | Path, columns: list[str], write: bool = True):
        self.path = Path(path)
        self.done: dict[int, dict[str, str]] = {}
        if self.path.exists():
            if write:
                self._drop_cut_row()
            self.done = {
                int(r["index"]): r for r in read_csv_rows(self.path) if (r.get("index") or "").strip().isdigit()
            }
        new_file = not self.path.exists() or self.path.stat().st_size == 0
        if write:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path if write else os.devnull, "a", newline="", encoding="utf-8-sig")  # noqa: SIM115
        self._writer = csv.DictWriter(self._file, fieldnames=columns)
        if new_file:
            self._guarded(self._writer.writeheader)

    def _drop_cut_row(self) -> None:
        length, _ = complete_length(self.path)
        if length < self.path.stat().st_size:
            os.truncate(self.path, length)

    def _guarded(self, write: Callable[[], Any]) -> None:
        try:
            write()
            self._file.flush()
        except OSError as e:
            raise OutputWriteError(
                f"cannot write {self.path}: {e} (disk full?); {len(self.done)} rows kept; a rerun resumes"
            ) from e

    def add(self, row: dict[str, Any]) -> None:
        self._guarded(lambda: self._writer.writerow(row))
        self.done[int(row["index"])] = {k: str(v) for k, v in row.items()}

    def close(self) -> None:
        # after a failed write, closing flushes the same bytes again and fails again: that was
        # reported; what is on disk is what a rerun finds
        with contextlib.suppress(OSError):
            self._file.close()

    def __enter__(self) -> ResumableCSV:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
