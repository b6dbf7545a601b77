"""A stock vLLM server as the frozen LLM: medcap's prompt embeddings (the LLM's own embedding
table, image tokens written in: ``MedcapModel.embed``) go to vLLM's Completions API as
``prompt_embeds`` (base64 of ``torch.save`` of a ``[seq, hidden]`` tensor; the server runs with
``--enable-prompt-embeds``), and the generated token ids come back (``return_token_ids``), so
medcap's tokenizer turns them into the same text its own engine would.

Every failure is one line naming the URL and what was expected: no server there
(``VLLMUnreachable``), another model (``ModelMismatch``: ``/v1/models`` and, where the served
folder is readable here, its ``config.json`` against the checkpoint's hidden size and vocabulary),
embeddings of the wrong width (``EmbeddingWidthMismatch``), a prompt plus ``max_tokens`` over the
served context (``ContextTooLong``), anything else vLLM refuses (``VLLMError``).
"""

from __future__ import annotations

import base64
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from medcap.errors import ConfigError, MedcapError

CONNECT_TIMEOUT_S = 10.0
# how vLLM words its refusals (its messages are not typed; matched loosely, lower case)
CONTEXT_WORDS = ("maximum context length", "max_model_len", "context length", "too long", "longer than the maximum")
WIDTH_WORDS = ("hidden size", "hidden_size", "shape")


class VLLMError(MedcapError):
    """vLLM refused or failed a request; the message names the server and what it said."""


class VLLMUnreachable(VLLMError, ConfigError):
    """No vLLM server answers at ``vllm_url``."""


class ModelMismatch(VLLMError, ConfigError):
    """The server serves another LLM than the checkpoint's (or several, and none was named)."""


class EmbeddingWidthMismatch(VLLMError, ConfigError):
    """The prompt embeddings' width is not the served model's hidden size."""


class ContextTooLong(VLLMError, ValueError):
    """The prompt plus ``max_tokens`` is over the served model's context."""


@dataclass(frozen=True)
class VLLMRequest:
    """How one answer is decoded: medcap's ``Sampling`` in vLLM's terms. ``banned`` ids inside the
    vocabulary get a -100 logit bias (the image placeholder, which asks for an image when fed back)."""

    max_tokens: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    banned: tuple[int, ...] = ()


@dataclass
class Completion:
    """What vLLM generated: token ids (a stop token, where it stopped at one, excluded)."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


@dataclass(frozen=True)
class ServedModel:
    """The model a client talks to: its id, its context, and what its ``config.json`` says when
    the folder it was loaded from is readable here."""

    id: str
    max_model_len: int | None
    hidden_size: int | None = None
    vocab_size: int | None = None


def encode_embeds(embeds: torch.Tensor) -> str:
    """[seq, hidden] -> vLLM's ``prompt_embeds`` text: base64 of ``torch.save`` of the tensor."""
    if embeds.dim() != 2:
        raise ValueError(f"prompt embeddings must be [seq, hidden], got shape {list(embeds.shape)}")
    buffer = io.BytesIO()
    torch.save(embeds.detach().to("cpu").contiguous(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_embeds(text: str) -> torch.Tensor:
    """The inverse of ``encode_embeds`` (what vLLM does with it), for tests and fake servers."""
    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=True)


def base_url(url: str) -> str:
    """``http://host:port`` from ``http://host:port``, ``.../`` or ``.../v1`` (OpenAI's base_url)."""
    url = str(url).strip().rstrip("/")
    if not re.match(r"^https?://[^/]+", url):
        raise ConfigError(f"vllm_url={url}: expected http://HOST:PORT (the vLLM server's address)")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def _config_dims(root: str | None) -> tuple[int | None, int | None]:
    """(hidden_size, vocab_size) from the served folder's ``config.json``, where it is readable
    here (vLLM on this machine or a shared filesystem); (None, None) otherwise."""
    if not root:
        return None, None
    path = Path(root) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None, None
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    hidden, vocab = config.get("hidden_size"), config.get("vocab_size")
    return (int(hidden) if hidden else None), (int(vocab) if vocab else None)


class VLLMClient:
    """One vLLM server's Completions API. Thread-safe (httpx's client is): evaluation sends a
    batch's prompts at once from a pool of threads, and vLLM batches them."""

    def __init__(self, url: str, model: str | None = None, *, timeout_s: float = 600.0):
        self.url = base_url(url)
        self.wanted = model
        self.http = httpx.Client(timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S))
        self.served: ServedModel | None = None

    def close(self) -> None:
        self.http.close()

    # ------------------------------------------------------------------ HTTP and errors
    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self.http.request(method, self.url + path, **kwargs)
        except httpx.TimeoutException as e:
            raise VLLMUnreachable(f"vllm_url={self.url}: no answer from {path} in time ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise VLLMUnreachable(
                f"vllm_url={self.url}: no vLLM server answers there ({type(e).__name__}: {e}); start one "
                "(`make vllm`, or `vllm serve MODEL --enable-prompt-embeds`) or fix vllm_url"
            ) from None
        if response.status_code >= 400:
            raise self.error(response, path)
        return response

    def error(self, response: httpx.Response, path: str) -> VLLMError:
        """vLLM's error answer as one of the errors above."""
        try:
            response.read()
            body = response.json()
            message = body.get("error", body).get("message") if isinstance(body, dict) else None
            message = message or body.get("detail") or response.text
        except (ValueError, AttributeError, httpx.HTTPError):
            message = response.text if response.is_stream_consumed else ""
        message = " ".join(str(message).split())[:500] or response.reason_phrase
        lower = message.lower()
        where = f"vLLM at {self.url}{path}"
        if response.status_code == 404 and "model" in lower:
            return ModelMismatch(f"{where}: {message}")
        if response.status_code == 404:
            return VLLMUnreachable(f"{where}: not found (404): is this a vLLM server? ({message})")
        if "enable-prompt-embeds" in lower or "enable_prompt_embeds" in lower:
            return VLLMError(f"{where}: the server does not take prompt embeddings; start it with "
                             f"--enable-prompt-embeds ({message})")  # fmt: skip
        if any(w in lower for w in CONTEXT_WORDS):
            return ContextTooLong(f"{where}: the prompt and max_tokens are over the served context ({message})")
        if "embed" in lower and any(w in lower for w in WIDTH_WORDS):
            return EmbeddingWidthMismatch(f"{where}: the prompt embeddings' width does not fit the served model "
                                          f"({message})")  # fmt: skip
        return VLLMError(f"{where} answered {response.status_code}: {message}")

    # ------------------------------------------------------------------ the model
    def models(self) -> list[dict[str, Any]]:
        """``/v1/models``'s entries."""
        data = self._send("GET", "/v1/models").json()
        return list(data.get("data") or []) if isinstance(data, dict) else []

    def connect(self, *, hidden_size: int, vocab_size: int | None = None) -> ServedModel:
        """Pick the served model (``vllm_model``, or the only one) and check it is the
        checkpoint's LLM: hidden size and vocabulary from its ``config.json`` where readable here,
        and a one-token request whose embedding width the server must accept."""
        entries = self.models()
        ids = [str(e.get("id")) for e in entries]
        if self.wanted is not None:
            chosen = [e for e in entries if e.get("id") == self.wanted]
            if not chosen:
                raise ModelMismatch(f"vllm_model={self.wanted}: vLLM at {self.url} serves {ids}, not that model")
        elif len(entries) != 1:
            raise ModelMismatch(f"vLLM at {self.url} serves {ids or 'no model'}: name one with vllm_model=")
        else:
            chosen = entries
        entry = chosen[0]
        hidden, vocab = _config_dims(entry.get("root"))
        length = entry.get("max_model_len")
        # the vocabulary bounds the banned ids sent as logit_bias (vLLM refuses ids beyond it)
        served = ServedModel(str(entry["id"]), int(length) if length else None, hidden, vocab or vocab_size)
        where = f"vLLM at {self.url} serves {served.id}"
        if hidden is not None and hidden != hidden_size:
            raise ModelMismatch(f"{where} (hidden size {hidden}), but the checkpoint's LLM has hidden size "
                                f"{hidden_size}: serve the LLM medcap was trained on")  # fmt: skip
        if vocab is not None and vocab_size is not None and vocab != vocab_size:
            raise ModelMismatch(f"{where} (vocabulary {vocab}), but the checkpoint's LLM has a vocabulary of "
                                f"{vocab_size}: serve the LLM medcap was trained on")  # fmt: skip
        self.served = served
        try:  # the width the server takes, whatever its folder said
            self.complete(torch.zeros(1, hidden_size), VLLMRequest(max_tokens=1))
        except EmbeddingWidthMismatch as e:
            raise EmbeddingWidthMismatch(f"{e} (medcap sends hidden size {hidden_size})") from None
        return served

    # ------------------------------------------------------------------ completions
    def body(self, embeds: torch.Tensor, request: VLLMRequest, *, stream: bool = False) -> dict[str, Any]:
        """The Completions request for one prompt's embeddings [seq, hidden]."""
        if self.served is None:
            raise RuntimeError("VLLMClient.connect() first")
        limit = self.served.max_model_len
        if limit is not None and embeds.shape[0] + request.max_tokens > limit:
            raise ContextTooLong(
                f"vLLM at {self.url}: the prompt is {embeds.shape[0]} tokens (images included) and max_tokens "
                f"{request.max_tokens}, over {self.served.id}'s context of {limit} tokens (its --max-model-len)"
            )
        body: dict[str, Any] = {
            "model": self.served.id,
            "prompt_embeds": encode_embeds(embeds),
            "max_tokens": int(request.max_tokens),
            "temperature": float(request.temperature),
            "top_p": float(request.top_p),
            "return_token_ids": True,
            "skip_special_tokens": False,
            "stream": stream,
        }
        if request.temperature > 0 and request.top_k is not None:
            body["top_k"] = int(request.top_k)
        if request.seed is not None:
            body["seed"] = int(request.seed) % (2**63)
        if request.stop_token_ids:
            body["stop_token_ids"] = [int(t) for t in request.stop_token_ids]
        vocab = self.served.vocab_size
        banned = [int(b) for b in request.banned if b >= 0 and (vocab is None or b < vocab)]
        if banned:
            body["logit_bias"] = {str(b): -100 for b in banned}
        if stream:
            body["stream_options"] = {"include_usage": False}
        return body

    def complete(self, embeds: torch.Tensor, request: VLLMRequest) -> Completion:
        """One answer, whole."""
        data = self._send("POST", "/v1/completions", json=self.body(embeds, request)).json()
        choice = (data.get("choices") or [{}])[0]
        return Completion(self._ids(choice, request), choice.get("finish_reason"))

    def stream(self, embeds: torch.Tensor, request: VLLMRequest) -> Iterator[Completion]:
        """One answer as it is generated: a ``Completion`` per chunk (its new token ids; the last
        one has the finish reason). Closing the iterator closes the connection, and vLLM aborts
        the request."""
        body = self.body(embeds, request, stream=True)
        try:
            with self.http.stream("POST", self.url + "/v1/completions", json=body) as response:
                if response.status_code >= 400:
                    raise self.error(response, "/v1/completions")
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[len("data:") :].strip()
                    if payload == "[DONE]":
                        return
                    data = json.loads(payload)
                    if "error" in data:
                        message = data["error"].get("message") if isinstance(data["error"], dict) else data["error"]
                        raise VLLMError(f"vLLM at {self.url}/v1/completions failed mid-stream: {message}")
                    for choice in data.get("choices") or []:
                        yield Completion(self._ids(choice, request), choice.get("finish_reason"))
        except httpx.TimeoutException as e:
            raise VLLMUnreachable(f"vllm_url={self.url}: the stream stalled ({type(e).__name__})") from None
        except httpx.TransportError as e:
            raise VLLMUnreachable(f"vllm_url={self.url}: the connection failed ({type(e).__name__}: {e})") from None

    def _ids(self, choice: dict[str, Any], request: VLLMRequest) -> list[int]:
        ids = choice.get("token_ids")
        if ids is None:
            raise VLLMError(f"vLLM at {self.url} returned no token_ids: it is older than medcap needs "
                            "(return_token_ids came in vLLM 0.10.2)")  # fmt: skip
        out = []
        stops = set(request.stop_token_ids)
        for tok in ids:
            if int(tok) in stops:
                break
            out.append(int(tok))
        return out
