"""A stand-in for a vLLM server (its ``/v1/models`` and its Completions API with ``prompt_embeds``,
``return_token_ids`` and streaming, and its refusals in its own words), in a thread of the test
process: the client's requests, error mapping and streaming are tested without vLLM. The tokens
come from ``decode(embeds, body)``: ``greedy_from_embeddings`` runs a model's decoder on the
received embeddings with no cache (an oracle independent of medcap's KV-cache decoding)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch

from medcap.engines import decode_embeds

Decode = Callable[[torch.Tensor, dict], list[int]]


def greedy_from_embeddings(model: Any) -> Decode:
    """vLLM's job done by ``model.decoder`` (which takes embeddings once fused): greedy, the whole
    sequence re-run every step, stopping at ``stop_token_ids`` (kept, as vLLM returns them) or
    ``max_tokens``; logit_bias -100 rules a token out."""

    @torch.no_grad()
    def decode(embeds: torch.Tensor, body: dict) -> list[int]:
        h = embeds[None].to(model.tok_embeddings.weight.dtype)
        stops = set(body.get("stop_token_ids") or [])
        banned = [int(k) for k in (body.get("logit_bias") or {})]
        out: list[int] = []
        for _ in range(int(body["max_tokens"])):
            logits = model.decoder(h)[0, -1]
            if banned:
                logits[banned] = float("-inf")
            tok = int(logits.argmax())
            out.append(tok)
            if tok in stops:
                break
            h = torch.cat([h, model.tok_embeddings(torch.tensor([[tok]]))], dim=1)
        return out

    return decode


class FakeVLLM:
    """``with FakeVLLM(decode, hidden_size=64) as server: VLLMClient(server.url)``. ``bodies``
    holds every completion request received (prompt_embeds decoded into ``embeds``)."""

    def __init__(self, decode: Decode, *, hidden_size: int, model_id: str = "served-llm", root: str | None = None,
                 max_model_len: int = 256, refuse: tuple[int, str] | None = None):  # fmt: skip
        self.decode, self.hidden_size, self.model_id = decode, hidden_size, model_id
        self.root, self.max_model_len, self.refuse = root, max_model_len, refuse
        self.bodies: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_: Any) -> None:
                pass

            def _json(self, status: int, data: Any) -> None:
                raw = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _error(self, status: int, message: str) -> None:
                self._json(status, {"error": {"message": message, "type": "BadRequestError", "code": status}})

            def do_GET(self) -> None:
                if self.path != "/v1/models":
                    return self._error(404, "Not Found")
                entry = {"id": fake.model_id, "object": "model", "root": fake.root or fake.model_id,
                         "max_model_len": fake.max_model_len}  # fmt: skip
                self._json(200, {"object": "list", "data": [entry]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/completions":
                    return self._error(404, "Not Found")
                if fake.refuse:
                    return self._error(*fake.refuse)
                if body.get("model") != fake.model_id:
                    return self._error(404, f"The model `{body.get('model')}` does not exist.")
                embeds = decode_embeds(body["prompt_embeds"])
                fake.bodies.append({**body, "embeds": embeds})
                if embeds.shape[-1] != fake.hidden_size:
                    return self._error(400, f"`prompt_embeds` hidden_size {embeds.shape[-1]} does not match the "
                                            f"model's hidden_size {fake.hidden_size}.")  # fmt: skip
                total = embeds.shape[0] + int(body["max_tokens"])
                if total > fake.max_model_len:
                    return self._error(400, f"This model's maximum context length is {fake.max_model_len} tokens. "
                                            f"However, you requested {total} tokens.")  # fmt: skip
                ids = fake.decode(embeds, body)
                stopped = bool(ids) and ids[-1] in set(body.get("stop_token_ids") or [])
                finish = "stop" if stopped else "length"
                if not body.get("stream"):
                    choice = {"index": 0, "text": "", "token_ids": ids, "finish_reason": finish}
                    return self._json(200, {"id": "cmpl-1", "object": "text_completion", "choices": [choice]})
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for k, tok in enumerate(ids):
                    last = k == len(ids) - 1
                    choice = {"index": 0, "text": "", "token_ids": [tok], "finish_reason": finish if last else None}
                    self.wfile.write(f"data: {json.dumps({'choices': [choice]})}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeVLLM:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
