"""Evaluation items -> answers: prompts as token ids (the training path plus the assistant
header: the original decoded and re-encoded them, turning header tokens into text), images
through the encoder's eval transform, batched KV-cache decoding, and the original's two-turn
protocol (describe the image, then answer the question in a second turn).

With ``remote`` (``engine=vllm``) the same prompt embeddings go to a vLLM server, which decodes:
the answers are the same text, built from the token ids vLLM returns. Its second turn is sent
whole, as ``two_turn_cache=False`` runs it here: vLLM prefills it again, except the first
prompt's full KV blocks that its prefix cache recognises (it hashes prompt embeddings by block);
the description and the question always."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torchtune.data import Message

from medcap.data.dataset import prompt_tokens
from medcap.data.images import load_image
from medcap.decoding import DecodeStep, Sampling, generate, generate_two_turns
from medcap.engines.remote import RemoteGenerator
from medcap.evaluation.tasks import EvalItem, user_message
from medcap.models.assembly import autocast
from medcap.models.fusion import MedcapModel

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
        reuse_first_turn: bool = True,
        step: DecodeStep | None = None,
        remote: RemoteGenerator | None = None,
    ):
        self.model, self.tokenizer, self.decoding = model, tokenizer, decoding
        self.batch_size, self.dtype = batch_size, dtype
        self.sampling = Sampling(temperature=decoding.temperature, top_k=decoding.top_k, rng=rng)
        self.step = step  # a compiled one (compile_decoding), or None: eager
        self.device = model.tok_embeddings.weight.device
        self.transform = model.visual.preprocess.transform()
        self.skipped = 0  # prompts longer than max_prompt_len since the last reset
        self.reuse_first_turn = reuse_first_turn and remote is None
        self.remote = remote  # engine=vllm: vLLM decodes from the prompt embeddings

    def prompt(self, messages: list[Message]) -> list[int]:
        return prompt_tokens(self.tokenizer, messages, self.model.num_image_tokens)

    def fits(self, tokens: list[int]) -> bool:
        return self.decoding.max_prompt_len is None or len(tokens) <= int(self.decoding.max_prompt_len)

    def images(self, items: list[EvalItem]) -> torch.Tensor | None:
        """The items' images through the eval transform; an error names the file and the record."""
        pixels = [self.transform(load_image(it.image, record=it.record)) for it in items if it.image is not None]
        return torch.stack(pixels).to(self.device) if pixels else None

    def generate(self, batch: list[tuple[list[int], EvalItem]], max_new_tokens: int) -> list[str]:
        """Answers to (prompt, item) pairs."""
        decode = self.remote.generate if self.remote is not None else partial(generate, step=self.step)
        with autocast(self.device, self.dtype):
            ids = decode(self.model, [p for p, _ in batch], self.images([it for _, it in batch]),
                         max_new_tokens=max_new_tokens, stop_tokens=self.tokenizer.stop_tokens,
                         pad_id=self.tokenizer.pad_id, sampling=self.sampling)  # fmt: skip
        return [self.tokenizer.decode(x).strip() for x in ids]

    def answer(self, items: list[EvalItem], two_turn: bool) -> Iterator[tuple[EvalItem, str, str]]:
        """(item, description or "", answer) per item whose prompt fits."""
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            if two_turn:
                descriptions, answers = self.two_turns(chunk)
            else:
                descriptions = [""] * len(chunk)
                prompts = [self.prompt(it.messages) for it in chunk]
                keep = [k for k, p in enumerate(prompts) if self.fits(p)]
                replies = self.generate([(prompts[k], chunk[k]) for k in keep], self.decoding.max_new_tokens) if keep else []
                answers = dict(zip(keep, replies))
            self.skipped += len(chunk) - len(answers)
            for k in sorted(answers):
                yield chunk[k], descriptions[k], answers[k]

    def second_prompts(self, chunk: list[EvalItem], descriptions: list[str]) -> list[list[int]]:
        return [
            self.prompt([user_message(it.image, DESCRIBE), Message(role="assistant", content=d),
                         Message(role="user", content=it.instruction, masked=True)])
            for it, d in zip(chunk, descriptions)
        ]  # fmt: skip

    def two_turns(self, chunk: list[EvalItem]) -> tuple[list[str], dict[int, str]]:
        """The original's protocol: describe the image, then answer the question in a second turn;
        each turn gets half of ``max_new_tokens``, as the original's did. The second turn runs on
        the first turn's KV caches (``reuse_first_turn``, by default) or from scratch."""
        half = max(1, self.decoding.max_new_tokens // 2)
        firsts = [self.prompt([user_message(it.image, DESCRIBE)]) for it in chunk]
        if not self.reuse_first_turn:
            descriptions = self.generate(list(zip(firsts, chunk)), half)
            seconds = self.second_prompts(chunk, descriptions)
            keep = [k for k, p in enumerate(seconds) if self.fits(p)]
            replies = self.generate([(seconds[k], chunk[k]) for k in keep], half) if keep else []
            return descriptions, dict(zip(keep, replies))
        descriptions = [""] * len(chunk)

        def follow_up(described: list[list[int]]) -> list[list[int] | None]:
            descriptions[:] = [self.tokenizer.decode(x).strip() for x in described]
            return [p if self.fits(p) else None for p in self.second_prompts(chunk, descriptions)]

        with autocast(self.device, self.dtype):
            _, seconds = generate_two_turns(self.model, firsts, self.images(chunk), follow_up, max_new_tokens=(half, half),
                                            stop_tokens=self.tokenizer.stop_tokens, pad_id=self.tokenizer.pad_id,
                                            sampling=self.sampling, step=self.step)  # fmt: skip
        return descriptions, {k: self.tokenizer.decode(x).strip() for k, x in enumerate(seconds) if x is not None}
