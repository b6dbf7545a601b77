"""Chat records with images -> torchtune ``Message`` lists plus image paths.

Two spellings are read:

- the original medcap ShareGPT files, unchanged: a JSON list of
  ``{"conversations": [{"from": "human"|"gpt"|"system", "value": ...}], "image": NAME,
  "meta": "dir=FOLDER;..."}`` (image path = FOLDER / NAME; empty ``meta`` = text-only);
- a clean form: JSON list or JSONL, ``image`` (or ``images``) relative to the data file's folder
  or absolute, turns under ``conversations`` (from/value) or ``messages`` (role/content).

The image goes where a ``<image>`` marker is (LLaVA's convention), or where the original's run of
"①" characters is, or, with neither, at the start of the first user turn. Other fields (qid,
answer_type, content_type, ...) are kept as metadata for evaluation.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medcap.errors import MedcapError

if TYPE_CHECKING:
    from torchtune.data import Message

IMAGE_MARKER = "<image>"
ORIGINAL_PLACEHOLDER = "\u2460"  # "①", the original medcap's image placeholder character
_MARKER_RE = re.compile(rf"{re.escape(IMAGE_MARKER)}|{ORIGINAL_PLACEHOLDER}+\s*")
# meta is "key=value;key=value"; a value may itself hold "=" or ";" (paths do), so split only
# at a ";" that starts another "identifier=".
_META_SPLIT = re.compile(r";(?=\s*[A-Za-z_][A-Za-z0-9_]*=)")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
CHAT_KEYS = ("conversations", "messages")
IMAGE_KEYS = ("image", "images", "meta")


class RecordError(MedcapError, ValueError):
    """A record that cannot be used; the message names the file and the record."""


@dataclass
class ChatRecord:
    index: int
    messages: list[Message]
    images: list[Path]
    metadata: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None  # the file it came from, for error messages


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """A JSON list, or JSONL (one object a line); errors name the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"dataset file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise RecordError(f"{path}, line {lineno}: malformed JSON ({e.msg})") from e
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno} ({e.msg})") from e
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise RecordError(f"{path}, record {i}: expected a JSON object, found {type(rec).__name__}")
    return records


def parse_meta(meta: str) -> dict[str, str]:
    """``"dir=./a=b;c;split=train"`` -> ``{"dir": "./a=b;c", "split": "train"}``."""
    out: dict[str, str] = {}
    for part in _META_SPLIT.split(meta.strip()):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"meta entry {part!r} is not key=value")
        out[key.strip()] = value
    return out


def _image_paths(rec: dict[str, Any], base_dir: Path, image_dir: Path | None) -> list[Path]:
    names = rec.get("images", rec.get("image"))
    if names in (None, "", []):
        return []
    names = [names] if isinstance(names, str) else list(names)
    meta = parse_meta(rec["meta"]) if rec.get("meta") else {}
    if image_dir is not None:
        folder = image_dir
    elif "dir" in meta:
        folder = Path(meta["dir"])
        # the original ran from the repository root; a relative dir may also mean the data file's
        if not folder.is_absolute() and not folder.exists() and (base_dir / folder).exists():
            folder = base_dir / folder
    elif rec.get("meta") == "" and "meta" in rec:
        return []  # the original's text-only record
    else:
        folder = base_dir
    return [Path(n) if Path(n).is_absolute() else folder / n for n in names]


def _split_images(text: str) -> list[str | None]:
    """Text with markers -> pieces, ``None`` where an image goes."""
    pieces: list[str | None] = []
    pos = 0
    for m in _MARKER_RE.finditer(text):
        pieces.append(text[pos : m.start()])
        pieces.append(None)
        pos = m.end()
    pieces.append(text[pos:])
    return [p for p in pieces if p is None or p.strip()]


def record_to_chat(
    rec: dict[str, Any],
    index: int,
    *,
    source: Path,
    image_dir: Path | None = None,
    train_on_input: bool = False,
    new_system_prompt: str | None = None,
) -> ChatRecord:
    from torchtune.data import Message  # here, so readers and converters start without torch

    where = f"{source}, record {index}"
    turns = next((rec[k] for k in CHAT_KEYS if k in rec), None)
    if not isinstance(turns, list) or not turns:
        raise RecordError(f"{where}: expected a non-empty 'conversations' (or 'messages') list")
    images = _image_paths(rec, source.parent, image_dir)

    messages: list[Message] = []
    markers = 0
    for t, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise RecordError(f"{where}, turn {t}: expected an object with from/value or role/content")
        role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
        text = turn.get("value", turn.get("content"))
        if role is None or not isinstance(text, str):
            raise RecordError(f"{where}, turn {t}: unknown role or missing text ({sorted(turn)})")
        if role == "system" and new_system_prompt is not None:
            continue
        pieces = _split_images(text) if role == "user" else [text]
        content: list[dict[str, Any]] = []
        for piece in pieces:
            if piece is None:
                if markers >= len(images):
                    raise RecordError(f"{where}, turn {t}: more image markers than images ({len(images)})")
                content.append({"type": "image", "content": images[markers]})
                markers += 1
            else:
                content.append({"type": "text", "content": piece})
        messages.append(
            Message(role=role, content=content, masked=role != "assistant" and not train_on_input)
        )

    if markers and markers != len(images):
        raise RecordError(f"{where}: {len(images)} images but {markers} image markers")
    if images and not markers:  # no marker: all images open the first user turn
        first_user = next((m for m in messages if m.role == "user"), None)
        if first_user is None:
            raise RecordError(f"{where}: has an image but no user turn to put it in")
        first_user.content[:0] = [{"type": "image", "content": p} for p in images]
    if new_system_prompt is not None:
        messages.insert(0, Message(role="system", content=new_system_prompt, masked=not train_on_input))
    if not any(m.role == "assistant" for m in messages):
        raise RecordError(f"{where}: no assistant turn to learn from")

    metadata = {k: v for k, v in rec.items() if k not in CHAT_KEYS and k not in IMAGE_KEYS}
    return ChatRecord(index=index, messages=messages, images=images, metadata=metadata, source=source)
