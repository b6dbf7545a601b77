"""Image-chat records -> token ids, labels and pixels for the fused model.

Tokenisation goes through the config's torchtune model tokenizer (``tokenize_messages``), so
header and end-of-turn tokens are the tokenizer's real special ids, exactly as in inference.
Each image becomes ``num_image_tokens`` copies of the tokenizer's image id, an id no text can
produce. Loss covers the assistant turns only unless ``train_on_input=True`` (the original
medcap trained on the instruction too); image positions never carry loss.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchtune.data import CROSS_ENTROPY_IGNORE_IDX, Message

from medcap.data.images import load_image
from medcap.data.sharegpt import ChatRecord, read_records, record_to_chat
from medcap.errors import MedcapError

log = logging.getLogger(__name__)

# What the original README's overrides name, and what medcap reads in their place.
TORCHTUNE_CHAT_DATASET = "torchtune.datasets.chat_dataset"
MEDCAP_CHAT_DATASET = "medcap.data.chat_dataset"
CONVERSATION_STYLES = ("sharegpt", "openai", "auto")


class SampleTooLongError(MedcapError, ValueError):
    """``strict=True`` and a record cannot fit ``max_seq_len`` without losing image tokens."""


def image_token_id(tokenizer: Any) -> int:
    image_id = getattr(tokenizer, "image_id", None)
    if image_id is None:
        raise ValueError(
            f"{type(tokenizer).__name__} has no image_id: medcap needs a tokenizer with a reserved "
            "image id (torchtune's Llama-3 tokenizer, or medcap.data.chatml for HF tokenizers)"
        )
    return int(image_id)


def tokenize_chat(
    tokenizer: Any, messages: list[Message], num_image_tokens: int, *, add_end_tokens: bool = True
) -> tuple[list[int], list[bool]]:
    """Tokens and loss masks (True = no loss), each image id expanded to N placeholders."""
    tokens, mask = tokenizer.tokenize_messages(messages, add_end_tokens=add_end_tokens)
    image_id = image_token_id(tokenizer)
    if image_id not in tokens:
        return list(tokens), list(mask)
    out_tokens: list[int] = []
    out_mask: list[bool] = []
    for tok, m in zip(tokens, mask):
        if tok == image_id:
            out_tokens += [image_id] * num_image_tokens
            out_mask += [True] * num_image_tokens
        else:
            out_tokens.append(tok)
            out_mask.append(m)
    return out_tokens, out_mask


def prompt_tokens(tokenizer: Any, messages: list[Message], num_image_tokens: int) -> list[int]:
    """The prompt for the model's next answer: the conversation as training tokenizes it, then
    the assistant's header with no end token (the original decoded and re-encoded prompts,
    turning header tokens into text). Evaluation and serving both ask here."""
    tokens, _ = tokenize_chat(tokenizer, [*messages, Message(role="assistant", content="")], num_image_tokens,
                              add_end_tokens=False)  # fmt: skip
    return tokens


def fit_to_length(
    tokens: list[int], labels: list[int], max_seq_len: int | None, image_id: int
) -> tuple[list[int], list[int]] | str:
    """Cut to ``max_seq_len`` unless that would cut image tokens or leave no label: then the
    reason the record cannot be used."""
    if max_seq_len is None or len(tokens) <= max_seq_len:
        return tokens, labels
    if image_id in tokens[max_seq_len:]:
        return "image tokens beyond max_seq_len"
    tokens, labels = tokens[:max_seq_len], labels[:max_seq_len]
    if all(lab == CROSS_ENTROPY_IGNORE_IDX for lab in labels):
        return "no answer token within max_seq_len"
    return tokens, labels


@contextlib.contextmanager
def sample_rng(seed: int) -> Iterator[None]:
    """Torch's and Python's global generators seeded for one sample, restored afterwards."""
    python = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python)


def sample_seed(base: int, epoch: int, index: int) -> int:
    """A seed for one sample in one epoch, independent of the order samples are drawn in."""
    return int(np.random.SeedSequence([base, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class ImageChatDataset(Dataset):
    """Map-style dataset over a chat file; a record that cannot fit ``max_seq_len`` comes out as
    ``None`` (the collate function drops and counts it) or raises when ``strict``.

    With ``augment_seed`` set, each sample's random image augmentation is drawn from its own
    generator seeded by (seed, epoch, index): the key ``(index, epoch)`` that training's sampler
    yields. So the augmentation of a sample never depends on what was drawn before it (the
    order, other ranks, DataLoader workers, or a resume in the middle of an epoch)."""

    def __init__(
        self,
        tokenizer: Any,
        source: str | Path | Sequence[str | Path],
        *,
        num_image_tokens: int,
        image_transform: Callable | None = None,
        max_seq_len: int | None = None,
        train_on_input: bool = False,
        new_system_prompt: str | None = None,
        image_dir: str | Path | None = None,
        strict: bool = False,
        augment_seed: int | None = None,
    ):
        # several files (VQA and captions, say) read as one: each record keeps its own file
        sources = [source] if isinstance(source, (str, Path)) else list(source)
        if not sources:
            raise ValueError("dataset source: no file given")
        self.sources = [Path(s) for s in sources]
        self.records: list[tuple[Path, dict[str, Any], int]] = [
            (path, rec, i) for path in self.sources for i, rec in enumerate(read_records(path))
        ]
        # torchtune tokenizers truncate inside tokenize_messages, which could cut an image id
        # before it is expanded; the dataset owns truncation instead, on its own copy of the
        # tokenizer (the caller's keeps its limit)
        tokenizer_limit = getattr(tokenizer, "max_seq_len", None)
        if tokenizer_limit:
            tokenizer = copy.copy(tokenizer)
            tokenizer.max_seq_len = None
        self.tokenizer = tokenizer
        self.num_image_tokens = num_image_tokens
        self.image_transform = image_transform
        self.image_id = image_token_id(tokenizer)
        self.max_seq_len = max_seq_len or tokenizer_limit
        self.train_on_input = train_on_input
        self.new_system_prompt = new_system_prompt
        self.image_dir = Path(image_dir) if image_dir else None
        self.strict = strict
        self.augment_seed = augment_seed

    def __len__(self) -> int:
        return len(self.records)

    def field_values(self, name: str) -> list[Any]:
        """Each record's ``name`` field (None where absent), read without loading any image."""
        return [record.get(name) for _, record, _ in self.records]

    def chat(self, index: int) -> ChatRecord:
        path, record, number = self.records[index]
        return record_to_chat(
            record,
            number,
            source=path,
            image_dir=self.image_dir,
            train_on_input=self.train_on_input,
            new_system_prompt=self.new_system_prompt,
        )

    def load_pixels(self, chat: ChatRecord, seed: int | None = None) -> torch.Tensor | None:
        if not chat.images:
            return None
        if self.image_transform is None:
            raise ValueError(
                f"{chat.source}, record {chat.index}: has an image but no image_transform was given"
            )
        images = [load_image(p, record=chat.index) for p in chat.images]
        transform = self.image_transform
        if getattr(transform, "takes_modality", False):  # augmentation by the record's modality
            transform = functools.partial(transform, modality=chat.metadata.get("modality"))
        with sample_rng(seed) if seed is not None else contextlib.nullcontext():
            return torch.stack([transform(image) for image in images])

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any] | None:
        """``key``: an index, or (index, epoch) as training's sampler yields."""
        index, epoch = (int(key[0]), int(key[1])) if isinstance(key, (tuple, list)) else (int(key), 0)
        chat = self.chat(index)
        tokens, mask = tokenize_chat(self.tokenizer, chat.messages, self.num_image_tokens)
        labels = [CROSS_ENTROPY_IGNORE_IDX if m else t for t, m in zip(tokens, mask)]
        fitted = fit_to_length(tokens, labels, self.max_seq_len, self.image_id)
        if isinstance(fitted, str):
            if self.strict:
                raise SampleTooLongError(
                    f"{chat.source}, record {chat.index}: {len(tokens)} tokens; {fitted} ({self.max_seq_len})"
                )
            return None
        tokens, labels = fitted
        seed = None if self.augment_seed is None else sample_seed(self.augment_seed, epoch, index)
        return {"tokens": tokens, "labels": labels, "images": self.load_pixels(chat, seed), "index": index}


def chat_dataset(
    tokenizer: Any,
    *,
    source: str | Sequence[str],
    num_image_tokens: int,
    image_transform: Callable | None = None,
    max_seq_len: int | None = None,
    train_on_input: bool = False,
    new_system_prompt: str | None = None,
    image_dir: str | None = None,
    strict: bool = False,
    conversation_style: str = "auto",
    chat_format: str | None = None,
    conversation_column: str | None = None,
    **unused: Any,
) -> ImageChatDataset:
    """medcap's image-chat dataset under the keys of torchtune's ``chat_dataset``.

    ``conversation_style`` (sharegpt / openai: both spellings are read either way) and the
    original's ``chat_format`` (a dummy there too: the format comes from the tokenizer) are
    accepted so the original command lines run unchanged.
    """
    if conversation_style not in CONVERSATION_STYLES:
        raise ValueError(f"conversation_style={conversation_style!r}; expected one of {CONVERSATION_STYLES}")
    if unused:
        log.warning("chat_dataset ignores options it does not use: %s", sorted(unused))
    return ImageChatDataset(
        tokenizer,
        source,
        num_image_tokens=num_image_tokens,
        image_transform=image_transform,
        max_seq_len=max_seq_len,
        train_on_input=train_on_input,
        new_system_prompt=new_system_prompt,
        image_dir=image_dir,
        strict=strict,
    )


def resolve_dataset_component(component: str) -> str:
    """``torchtune.datasets.chat_dataset`` (the original README) means medcap's dataset:
    torchtune's own cannot carry images."""
    return MEDCAP_CHAT_DATASET if component == TORCHTUNE_CHAT_DATASET else component
