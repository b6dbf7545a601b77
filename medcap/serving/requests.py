"""OpenAI chat-completion requests -> what the batching worker decodes: prompt token ids (the
evaluation's own prompt path, ``medcap.data.dataset.prompt_tokens``), image tensors
through the encoder's eval transform, and the sampling settings.

The schema is OpenAI's (``messages`` with string or part-list content; ``max_tokens``,
``temperature``, ``top_p``, ``stop``, ``seed``, ``stream``), plus medcap's ``top_k``. Features
medcap cannot honour (``n > 1``, penalties, logprobs, tools, JSON mode) are refused with a 400
naming the field rather than silently ignored. Within a message, images come before its text,
as medcap trains (``<image>`` then the question), which the question-aware connectors rely on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import ValidationError
from torchtune.data import Message

from medcap.data.dataset import prompt_tokens
from medcap.serving.errors import APIError
from medcap.serving.image_urls import decode_image_url
from medcap.serving.protocol import ChatCompletionRequest, TextPart

MAX_IMAGES = 8  # per request
MAX_INT_DIGITS = 20  # an int64 or uint64 seed has at most 20 digits


UNSUPPORTED = {
    "n": "only n=1 is supported",
    "presence_penalty": "penalties are not supported (0 only)",
    "frequency_penalty": "penalties are not supported (0 only)",
    "logprobs": "logprobs are not supported",
    "tools": "tool calls are not supported",
}
BRANCH = re.compile(r"^(str|int|float|bool|none|list\[.*|tagged-union\[.*|function-.*)$")


def _param(loc: tuple[Any, ...]) -> str:
    """Pydantic's error location -> OpenAI's ``param`` (``messages[0].content[1].image_url``),
    without pydantic's union-branch labels and discriminator tags."""
    out: list[str] = []
    tagged = False
    for part in loc:
        if isinstance(part, int):
            out.append(f"[{part}]")
        elif BRANCH.match(str(part)):
            tagged = str(part).startswith("list[tagged-union")
        elif tagged and out and out[-1].startswith("["):
            tagged = False  # the part's "type" value, which pydantic puts in the location
        else:
            out.append(f".{part}" if out else str(part))
    return "".join(out)


class OutOfRange:
    """An integer literal too long to be any field's value, left unconverted so that validation
    names the field it was sent in (``int()`` of thousands of digits is slow, and refused past
    4300); no field type accepts it."""

    def __init__(self, text: str):
        self.digits = len(text.lstrip("-"))


def _bounded_int(text: str) -> int | OutOfRange:
    return int(text) if len(text) <= MAX_INT_DIGITS else OutOfRange(text)


def load_json(body: bytes) -> Any:
    """Request JSON, or a 400 for anything that is not (including nesting past the parser's
    recursion limit)."""
    try:
        return json.loads(body, parse_int=_bounded_int)
    except RecursionError:
        raise APIError(400, "request body is not valid JSON (nested too deeply)", code="invalid_json") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise APIError(400, f"request body is not valid JSON ({e})", code="invalid_json") from None


def parse_body(body: bytes) -> ChatCompletionRequest:
    """JSON bytes -> a validated request, or a 400 naming the field."""
    data = load_json(body)
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return ChatCompletionRequest.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        first = max(errors, key=lambda err: len(err["loc"]))  # the branch that got furthest
        param = _param(tuple(first["loc"]))
        if isinstance(first.get("input"), OutOfRange):
            first = {**first, "msg": f"an integer of {first['input'].digits} digits is out of range"}
        elif first["type"] in ("list_type", "string_type") and param.endswith("content"):
            first = {**first, "msg": "expected a string or a list of content parts"}
        elif param in UNSUPPORTED:
            first = {**first, "msg": UNSUPPORTED[param]}
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param or None,
                       code="invalid_value") from None  # fmt: skip


@dataclass
class PromptContext:
    """What turning a request into model input needs; built once per server."""

    tokenizer: Any
    num_image_tokens: int
    transform: Any  # PIL image -> [3, H, W] (the encoder's eval transform); None: text only
    max_seq_len: int  # the decoder's context: prompt + max_tokens must fit
    default_max_tokens: int
    default_temperature: float
    default_top_k: int | None
    image_root: str | None
    max_image_pixels: int


@dataclass
class Prepared:
    """A validated request, ready for the worker."""

    prompt: list[int]
    images: torch.Tensor | None  # [M, 3, H, W]
    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool


def _messages(req: ChatCompletionRequest, ctx: PromptContext) -> tuple[list[Message], list[torch.Tensor]]:
    messages, pixels = [], []
    for i, m in enumerate(req.messages):
        role = "system" if m.role == "developer" else m.role
        if isinstance(m.content, str) or m.content is None:
            messages.append(Message(role=role, content=m.content or "", masked=role != "assistant"))
            continue
        images, texts = [], []
        for j, part in enumerate(m.content):
            param = f"messages[{i}].content[{j}]"
            if isinstance(part, TextPart):
                texts.append({"type": "text", "content": part.text})
                continue
            if role != "user":
                raise APIError(400, f"{param}: images belong in user messages", param=param)
            if ctx.transform is None:
                raise APIError(400, f"{param}: this server serves a text-only model", param=param)
            if len(pixels) == MAX_IMAGES:
                raise APIError(400, f"{param}: at most {MAX_IMAGES} images per request", param=param)
            image = decode_image_url(part.image_url.url, image_root=ctx.image_root,
                                     max_pixels=ctx.max_image_pixels, param=f"{param}.image_url.url")  # fmt: skip
            pixels.append(ctx.transform(image))
            images.append({"type": "image", "content": image})
        messages.append(Message(role=role, content=images + texts, masked=role != "assistant"))
    return messages, pixels


def prepare(req: ChatCompletionRequest, ctx: PromptContext) -> Prepared:
    """Tokens, images and sampling settings of a validated request (decodes its images: call it
    off the event loop)."""
    messages, pixels = _messages(req, ctx)
    prompt = prompt_tokens(ctx.tokenizer, messages, ctx.num_image_tokens)
    room = ctx.max_seq_len - len(prompt)
    asked = req.max_completion_tokens or req.max_tokens
    if room < 1 or (asked is not None and asked > room):
        raise APIError(
            400, f"the prompt is {len(prompt)} tokens (images included) and max_tokens {asked or 1}, over the "
            f"model's context of {ctx.max_seq_len} tokens",
            param="max_tokens" if asked and room >= 1 else "messages", code="context_length_exceeded",
        )  # fmt: skip
    temperature = ctx.default_temperature if req.temperature is None else req.temperature
    return Prepared(
        prompt=list(prompt),
        images=torch.stack(pixels) if pixels else None,
        max_tokens=asked or min(ctx.default_max_tokens, room),
        temperature=float(temperature),
        top_k=req.top_k if req.top_k is not None else ctx.default_top_k,
        top_p=1.0 if req.top_p is None else float(req.top_p),
        seed=req.seed,
        stop=list(req.stop or []),
        stream=req.stream,
        include_usage=bool(req.stream_options and req.stream_options.include_usage),
    )
