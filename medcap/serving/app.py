"""The FastAPI app: OpenAI's chat-completions and models endpoints, a preview of the image the
model sees, health and Prometheus metrics, and the page at ``/``.

Every error is OpenAI's error object with the right status (400 malformed, 401 key, 403 path
outside ``image_root``, 404 model, 413 body, 415 content type, 429 queue full, 504 timeout).
``/health`` and the page answer without the key; everything under ``/v1`` and ``/metrics``
needs it when one is set. The key is compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from medcap.serving.engine import Engine, Event, Job
from medcap.serving.errors import APIError
from medcap.serving.image_urls import decode_image_url, png_preview
from medcap.serving.metrics import CONTENT_TYPE, Metrics
from medcap.serving.requests import ChatCompletionRequest, PromptContext, load_json, parse_body, prepare
from medcap.serving.settings import ServeSettings

log = logging.getLogger("medcap.serve")
STATIC = Path(__file__).parent / "static"
ENDPOINTS = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/preview"}
GRACE_S = 5.0  # beyond a request's own timeout, before the web layer stops waiting for the worker
IMAGE_DECODERS = 4  # images decoded at once (each may take hundreds of MB while decoding)
PAGE_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)


@dataclass(frozen=True)
class ModelInfo:
    """What ``/v1/models`` and the page say about the model: names, never full paths."""

    name: str
    llm: str
    vision_checkpoint: str | None
    vision: str
    connector: str
    num_image_tokens: int
    image_size: int | None
    max_seq_len: int
    created: int


@dataclass
class Served:
    """A loaded model, ready to serve."""

    engine: Engine
    context: PromptContext
    settings: ServeSettings
    info: ModelInfo
    metrics: Metrics


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def _error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class Guard:
    """Pure ASGI middleware: the body size limit (413), requests counted by endpoint and status,
    and the page's Content-Security-Policy. Pure ASGI, so streamed responses pass through."""

    def __init__(self, app: Callable, *, limit: int, metrics: Metrics):
        self.app, self.limit, self.metrics = app, limit, metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        endpoint = path if path in ENDPOINTS else "/static" if path.startswith("/static/") else "other"
        status = {"code": 500, "started": False}

        page = path == "/" or path.startswith("/static/")

        async def counted_send(message: dict) -> None:
            if message["type"] == "http.response.start":
                status.update(code=message["status"], started=True)
                extra = [(b"x-content-type-options", b"nosniff")]
                if page:
                    extra.append((b"content-security-policy", PAGE_POLICY.encode()))
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            declared = dict(scope.get("headers") or []).get(b"content-length")
            if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
                raise APIError(413 if declared.isdigit() else 400, f"request body over the limit of {self.limit} "
                               "bytes (max_body_mb)" if declared.isdigit() else "bad Content-Length",
                               code="body_too_large" if declared.isdigit() else "invalid_request")  # fmt: skip
            received = 0

            async def limited_receive() -> dict:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.limit:
                        raise APIError(413, f"request body over the limit of {self.limit} bytes (max_body_mb)",
                                       code="body_too_large")  # fmt: skip
                return message

            await self.app(scope, limited_receive, counted_send)
        except APIError as e:
            if status["started"]:
                raise
            await _error_response(e)(scope, receive, counted_send)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()


def create_app(served: Served) -> FastAPI:
    """The routes around one loaded model; the engine's thread starts and stops with the app."""
    engine, ctx, settings, info, metrics = (served.engine, served.context, served.settings, served.info,
                                            served.metrics)  # fmt: skip
    decoders = anyio.CapacityLimiter(IMAGE_DECODERS)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(engine.stop)

    app = FastAPI(title="medcap", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.add_middleware(Guard, limit=int(settings.max_body_mb * 1024 * 1024), metrics=metrics)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return _error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return _error_response(APIError(e.status_code, str(e.detail), headers=dict(e.headers or {})))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
        return _error_response(APIError(400, str(e.errors()[0].get("msg", "invalid request"))))

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)
    async def _gone(_: Request, __: Exception) -> Response:
        # the client hung up (mid-body, or before its answer): not a server error; counted as
        # 499, as nginx does, and not logged as one
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def _internal(_: Request, e: Exception) -> JSONResponse:
        log.error("internal error (%s)", type(e).__name__, exc_info=e)
        return _error_response(APIError(500, "internal server error", code="internal_error"))

    def require_key(request: Request) -> None:
        if not settings.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
            raise APIError(401, "missing or wrong API key: send it as 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    keyed = [Depends(require_key)]

    async def json_body(request: Request) -> bytes:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise APIError(415, f"Content-Type must be application/json, not {media or 'missing'}",
                           code="unsupported_media_type")  # fmt: skip
        return await request.body()

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = engine.alive
        return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)

    @app.get("/metrics", dependencies=keyed)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", dependencies=keyed)
    async def models() -> dict[str, Any]:
        card = {"id": info.name, "object": "model", "created": info.created, "owned_by": "medcap",
                "medcap": {k: v for k, v in asdict(info).items() if k not in ("name", "created")}}  # fmt: skip
        return {"object": "list", "data": [card]}

    @app.post("/v1/preview", dependencies=keyed)
    async def preview(request: Request) -> Response:
        """The image as the model's data path reads it (DICOM windowed, NIfTI sliced), as PNG."""
        data = load_json(await json_body(request))
        part = data.get("image_url") if isinstance(data, dict) else None
        url = part.get("url") if isinstance(part, dict) else part
        if not isinstance(url, str):
            raise APIError(400, "expected {\"image_url\": {\"url\": \"data:...\"}}", param="image_url.url")
        image = await anyio.to_thread.run_sync(
            lambda: decode_image_url(url, image_root=settings.image_root, max_pixels=settings.max_image_pixels,
                                     param="image_url.url"), limiter=decoders)  # fmt: skip
        png = await anyio.to_thread.run_sync(png_preview, image, limiter=decoders)
        return Response(png, media_type="image/png", headers={
            "X-Image-Width": str(image.width), "X-Image-Height": str(image.height), "Cache-Control": "no-store",
        })  # fmt: skip

    async def next_event(events: asyncio.Queue, job: Job, disconnected: Callable[[], Awaitable[bool]] | None) -> Event:
        """The worker's next event for ``job``; a 504 if it does not come in time."""
        while True:
            left = job.deadline + GRACE_S - time.monotonic()
            if left <= 0:
                job.cancel()
                raise APIError(504, f"request timed out after {job.timeout_s:g} s", code="timeout")
            try:
                return await asyncio.wait_for(events.get(), timeout=min(left, 1.0))
            except asyncio.TimeoutError:
                if disconnected is not None and await disconnected():
                    job.cancel()
                    raise ClientGone() from None

    @app.post("/v1/chat/completions", dependencies=keyed, openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": ChatCompletionRequest.model_json_schema()}}}})
    async def chat_completions(request: Request) -> Response:  # fmt: skip
        req = parse_body(await json_body(request))
        if req.model and req.model != info.name:
            raise APIError(404, f"the model '{req.model}' is not served here; this server serves '{info.name}'",
                           param="model", code="model_not_found")  # fmt: skip
        prepared = await anyio.to_thread.run_sync(prepare, req, ctx, limiter=decoders)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = Job(prepared, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), settings.request_timeout_s)
        engine.submit(job)
        try:  # the first event: admitted to the batch (a stream starts here), or an error (429s come earlier)
            first = await next_event(events, job, request.is_disconnected)
        except BaseException:
            job.cancel()
            raise
        if first.kind == "error":
            raise first.error
        created = int(time.time())
        if prepared.stream:
            return StreamingResponse(sse(job, first, events, created), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip
        text, event = [], first
        try:
            while event.kind in ("start", "delta"):
                text.append(event.text)
                event = await next_event(events, job, request.is_disconnected)
        finally:
            job.cancel()  # a no-op once done; stops the worker if we gave up
        if event.kind == "error":
            raise event.error
        return JSONResponse({
            "id": job.id, "object": "chat.completion", "created": created, "model": info.name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(text)},
                         "finish_reason": event.finish_reason, "logprobs": None}],
            "usage": event.usage,
        })  # fmt: skip

    async def sse(job: Job, first: Event, events: asyncio.Queue, created: int) -> AsyncIterator[str]:
        """OpenAI's chunks as server-sent events, ending with ``data: [DONE]``."""

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            body = {"id": job.id, "object": "chat.completion.chunk", "created": created, "model": info.name,
                    "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}  # fmt: skip
            return f"data: {json.dumps(body)}\n\n"

        try:
            yield chunk({"role": "assistant", "content": ""})
            event = first
            while True:
                if event.kind == "start":
                    pass  # admitted: the role chunk above already told the client
                elif event.kind == "delta":
                    yield chunk({"content": event.text})
                elif event.kind == "done":
                    yield chunk({}, event.finish_reason)
                    if job.request.include_usage:
                        body = {"id": job.id, "object": "chat.completion.chunk", "created": created,
                                "model": info.name, "choices": [], "usage": event.usage}  # fmt: skip
                        yield f"data: {json.dumps(body)}\n\n"
                    break
                else:
                    yield f"data: {json.dumps(event.error.body())}\n\n"
                    break
                try:
                    event = await next_event(events, job, None)
                except APIError as e:
                    event = Event("error", error=e)
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()

    return app
