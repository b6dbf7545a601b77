"""The FastAPI app: ``create_app`` wires the routes (``routes``), the request guard, the page's
static files and the one mapping from errors to OpenAI's error object; the served model (engine,
prompt context, settings, info, metrics) lives on ``app.state.served``.

Every error is OpenAI's error object with the right status (400 malformed, 401 key, 403 path
outside ``image_root``, 404 model, 413 body, 415 content type, 429 queue full, 499 client gone,
504 timeout); a 500 is a bug. ``/health`` and the page answer without the key; everything under
``/v1`` and ``/metrics`` needs it when one is set.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from medcap.serving.engine import Engine
from medcap.serving.errors import APIError, EngineError, api_error
from medcap.serving.metrics import Metrics
from medcap.serving.requests import PromptContext
from medcap.serving.routes import IMAGE_DECODERS, STATIC, ClientGone, router
from medcap.serving.settings import ServeSettings

log = logging.getLogger("medcap.serve")
ENDPOINTS = {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/preview"}
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


async def _api_error(_: Request, e: Exception) -> JSONResponse:
    return _error_response(api_error(e))


async def _http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
    return _error_response(APIError(e.status_code, str(e.detail), headers=dict(e.headers or {})))


async def _client_gone(_: Request, __: Exception) -> Response:
    # the client hung up (mid-body, or before its answer): not a server error; counted as 499,
    # as nginx does, and not logged as one
    return Response(status_code=499)


async def _internal(_: Request, e: Exception) -> JSONResponse:
    log.error("internal error (%s)", type(e).__name__, exc_info=e)
    return _error_response(APIError(500, "internal server error", code="internal_error"))


HANDLERS: dict[type[Exception], Callable] = {
    APIError: _api_error,
    EngineError: _api_error,
    StarletteHTTPException: _http_error,
    ClientGone: _client_gone,
    ClientDisconnect: _client_gone,
    Exception: _internal,
}


def create_app(served: Served) -> FastAPI:
    """The routes around one loaded model; the engine's thread starts and stops with the app."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        served.engine.start()
        try:
            yield
        finally:
            await anyio.to_thread.run_sync(served.engine.stop)

    app = FastAPI(title="medcap", version="1", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.served = served
    app.state.decoders = anyio.CapacityLimiter(IMAGE_DECODERS)  # images decoded at once
    app.add_middleware(Guard, limit=int(served.settings.max_body_mb * 1024 * 1024), metrics=served.metrics)
    for kind, handler in HANDLERS.items():
        app.add_exception_handler(kind, handler)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
