"""Evaluation items -> answers: prompts as token ids (the training path plus the assistant
header: the original decoded and re-encoded them, turning header tokens into text), images
through the encoder's eval transform, batched KV-cache decoding, and the original's two-turn
protocol (describe the image, then answer the question in a second turn)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torchtune.data import Message

from medcap.data.dataset import tokenize_chat
from medcap.data.images import load_image
from medcap.evaluation.tasks import EvalItem, user_message
from medcap.generation import generate
from medcap.models.assembly import autocast
from medcap.models.fusion import MedcapModel

VQA_MODES = ("direct", "describe_then_answer")
DESCRIBE = "Describe the image in a detailed and informative manner."


@dataclass(frozen=True)
class Decoding:
    """How answers are decoded; ``max_prompt_len`` (``dataset_max_seq_len``) skips longer prompts."""

    max_new_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    max_prompt_len: int | None = None


class Answerer:
    def __init__(
        self,
        model: MedcapModel,
        tokenizer: Any,
        decoding: Decoding,
        *,
        batch_size: int = 8,
        dtype: torch.dtype = torch.float32,  # the LLM's: forwards run under autocast to it
        rng: torch.Generator | None = None,
    ):
        self.model, self.tokenizer, self.decoding = model, tokenizer, decoding
        self.batch_size, self.dtype, self.rng = batch_size, dtype, rng
        self.device = model.tok_embeddings.weight.device
        self.transform = model.visual.preprocess.transform()
        self.skipped = 0  # prompts longer than max_prompt_len since the last reset

    def prompt(self, messages: list[Message]) -> list[int]:
        tokens, _ = tokenize_chat(
            self.tokenizer,
            [*messages, Message(role="assistant", content="")],
            self.model.num_image_tokens,
            add_end_tokens=False,
        )
        return tokens

    def fits(self, tokens: list[int]) -> bool:
        return self.decoding.max_prompt_len is None or len(tokens) <= int(self.decoding.max_prompt_len)

    def generate(self, batch: list[tuple[list[int], EvalItem]], max_new_tokens: int) -> list[str]:
        """Answers to (prompt, item) pairs; an image error names the file and the item's record."""
        prompts = [p for p, _ in batch]
        pixels = [self.transform(load_image(it.image, record=it.record)) for _, it in batch if it.image is not None]
        images = torch.stack(pixels).to(self.device) if pixels else None
        with autocast(self.device, self.dtype):
            ids = generate(self.model, prompts, images, max_new_tokens=max_new_tokens,
                           stop_tokens=self.tokenizer.stop_tokens, pad_id=self.tokenizer.pad_id,
                           temperature=self.decoding.temperature, top_k=self.decoding.top_k, rng=self.rng)  # fmt: skip
        return [self.tokenizer.decode(x).strip() for x in ids]

    def answer(self, items: list[EvalItem], two_turn: bool) -> Iterator[tuple[EvalItem, str, str]]:
        """(item, description or "", answer) per item whose prompt fits."""
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            descriptions = [""] * len(chunk)
            if two_turn:
                first = [[user_message(it.image, DESCRIBE)] for it in chunk]
                descriptions = self.generate(
                    [(self.prompt(m), it) for m, it in zip(first, chunk)],
                    max(1, self.decoding.max_new_tokens // 2),
                )
                messages = [
                    [
                        m[0],
                        Message(role="assistant", content=d),
                        Message(role="user", content=it.instruction, masked=True),
                    ]
                    for m, d, it in zip(first, descriptions, chunk)
                ]
            else:
                messages = [it.messages for it in chunk]
            prompts = [self.prompt(m) for m in messages]
            keep = [k for k, p in enumerate(prompts) if self.fits(p)]
            self.skipped += len(chunk) - len(keep)
            # the original gave each of its two turns half of max_new_tokens
            budget = max(1, self.decoding.max_new_tokens // 2) if two_turn else self.decoding.max_new_tokens
            answers = self.generate([(prompts[k], chunk[k]) for k in keep], budget) if keep else []
            for k, ans in zip(keep, answers):
                yield chunk[k], descriptions[k], ans
