"""Files written so that a crash, a full disk or a killed run never leaves half of one behind,
and a failed write says which file, why, and what is left."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import re
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

from medcap.errors import ConfigError, OutputWriteError

log = logging.getLogger("medcap")

TEMP_MARK = ".tmp-"  # atomic_write's temporaries: .NAME.tmp-PID beside NAME
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")
_CSV_SPECIAL = re.compile(rb'["\r\n]')
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
    tmp = path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}")
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
    wrong path fails in a second, not after the first epoch; temporaries a killed run left
    there are removed."""
    for key, folder in folders:
        if folder is None or str(folder) in ("", "None", "null"):
            continue
        folder = Path(str(folder))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # host and pid: ranks on two nodes of a shared filesystem may share a pid
            probe = folder / f".medcap-write-test-{socket.gethostname()}-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as e:
            raise ConfigError(f"{key}={folder}: cannot create or write this folder ({e})") from None
        remove_stale_temporaries(folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove ``atomic_write``'s temporaries (``.NAME.tmp-PID``) whose process is gone: what a
    run killed mid-write (SIGKILL, out of memory) leaves beside its checkpoints. A live
    process's temporary (another rank's, a run beside this one) is left alone."""
    removed = []
    for path in folder.iterdir():
        match = _TEMPORARY.match(path.name)
        if match and path.is_file() and int(match["pid"]) != os.getpid() and not _alive(int(match["pid"])):
            path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) a killed run left in %s", len(removed), folder)
    return removed


def atomic_write_json(path: str | Path, obj: Any, indent: int | None = 1) -> Path:
    data = json.dumps(obj, indent=indent, ensure_ascii=False).encode("utf-8")
    return atomic_write(path, lambda f: f.write(data))


def read_csv_rows(path: str | Path) -> list[dict[str, str]]:
    """A CSV's rows as dicts. A byte order mark (the original medcap wrote its CSVs as
    ``utf-8-sig``, as spreadsheet programs expect) is not part of the first column's name."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def complete_length(path: Path) -> tuple[int, int]:
    """(bytes of the file up to the end of its last complete record, records after the header
    there). A record is complete when its line ending is on disk outside any quoted field: a
    record cut by a failed write is not, even where the cut falls just after a line break
    inside a quoted answer, and neither is one cut between the ``\r`` and ``\n`` of ``\r\n``.

    Scanned as bytes with the ``csv`` module's dialect (``"`` quotes, ``""`` escapes a quote):
    the three bytes that matter never occur inside a UTF-8 multi-byte character, and a quote
    count's parity tells whether a byte is inside a quoted field."""
    data = path.read_bytes()
    end, records, quoted = 0, 0, False
    for match in _CSV_SPECIAL.finditer(data):
        byte, i = match.group(), match.start()
        if byte == b'"':
            quoted = not quoted
        elif not quoted and not (byte == b"\n" and data[i - 1 : i] == b"\r"):  # \r\n: done at \r
            stop = i + 1
            if byte == b"\r":
                if stop == len(data):
                    break  # a \r the write cut from its \n
                stop += data[stop : stop + 1] == b"\n"
            records += bool(data[end:i].strip(b"\xef\xbb\xbf"))  # blank lines are not records
            end = stop
    return end, max(records - 1, 0)


def read_complete_rows(path: str | Path) -> list[dict[str, str]]:
    """``read_csv_rows`` without a last row that a failed write cut."""
    path = Path(path)
    length, _ = complete_length(path)
    text = path.read_bytes()[:length].decode("utf-8-sig")
    # not str.splitlines: it also breaks at characters (U+2028, form feed) that csv leaves unquoted
    return list(csv.DictReader(io.StringIO(text, newline="")))


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
