"""The routes: OpenAI's chat completions (plain and streamed) and model list, the preview of the
image the model sees, health, Prometheus metrics and the page. Each reads the served model from
``request.app.state.served`` (see ``app.create_app``); errors are raised, and mapped to OpenAI's
error object in one place (``app.HANDLERS``)."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import asdict
from pathlib import Path

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse

from medcap.serving.engine import Event, Job
from medcap.serving.errors import APIError, api_error
from medcap.serving.image_urls import decode_image_url, png_preview
from medcap.serving.metrics import CONTENT_TYPE
from medcap.serving.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ModelCard,
    ModelList,
)
from medcap.serving.requests import load_json, parse_body, prepare

STATIC = Path(__file__).parent / "static"
GRACE_S = 5.0  # beyond a request's own timeout, before the web layer stops waiting for the worker
IMAGE_DECODERS = 4  # images decoded at once (each may take hundreds of MB while decoding)


class ClientGone(Exception):
    """The client closed the connection before its answer was ready."""


def require_key(request: Request) -> None:
    """The Bearer key, when one is set: compared in constant time, never logged or echoed."""
    key = request.app.state.served.settings.api_key
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise APIError(401, "missing or wrong API key: send it as 'Authorization: Bearer <key>'",
                       code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


router = APIRouter()
keyed = [Depends(require_key)]


async def json_body(request: Request) -> bytes:
    media = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media != "application/json":
        raise APIError(415, f"Content-Type must be application/json, not {media or 'missing'}",
                       code="unsupported_media_type")  # fmt: skip
    return await request.body()


@router.get("/", include_in_schema=False)
async def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    ok = request.app.state.served.engine.alive
    return JSONResponse({"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)


@router.get("/metrics", dependencies=keyed)
async def prometheus(request: Request) -> Response:
    return Response(request.app.state.served.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/v1/models", dependencies=keyed)
async def models(request: Request) -> ModelList:
    info = request.app.state.served.info
    described = {k: v for k, v in asdict(info).items() if k not in ("name", "created")}
    return ModelList(data=[ModelCard(id=info.name, created=info.created, medcap=described)])


@router.post("/v1/preview", dependencies=keyed)
async def preview(request: Request) -> Response:
    """The image as the model's data path reads it (DICOM windowed, NIfTI sliced), as PNG."""
    settings, decoders = request.app.state.served.settings, request.app.state.decoders
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


@router.post("/v1/chat/completions", dependencies=keyed, openapi_extra={"requestBody": {
    "required": True, "content": {"application/json": {"schema": ChatCompletionRequest.model_json_schema()}}}})
async def chat_completions(request: Request) -> Response:  # fmt: skip
    served = request.app.state.served
    info = served.info
    req = parse_body(await json_body(request))
    if req.model and req.model != info.name:
        raise APIError(404, f"the model '{req.model}' is not served here; this server serves '{info.name}'",
                       param="model", code="model_not_found")  # fmt: skip
    prepared = await anyio.to_thread.run_sync(prepare, req, served.context, limiter=request.app.state.decoders)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()
    job = Job(prepared, lambda e: loop.call_soon_threadsafe(events.put_nowait, e), served.settings.request_timeout_s)
    served.engine.submit(job)
    try:  # the first event: admitted to the batch (a stream starts here), or an error (429s come earlier)
        first = await next_event(events, job, request.is_disconnected)
    except BaseException:
        job.cancel()
        raise
    if first.kind == "error":
        raise first.error
    created = int(time.time())
    if prepared.stream:
        return StreamingResponse(stream(job, first, events, created, info.name), media_type="text/event-stream",
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
    message = AssistantMessage(content="".join(text))
    return ChatCompletion(id=job.id, created=created, model=info.name, usage=event.usage,
                          choices=[Choice(message=message, finish_reason=event.finish_reason)])  # fmt: skip


async def stream(job: Job, first: Event, events: asyncio.Queue, created: int, model: str) -> AsyncIterator[str]:
    """OpenAI's chunks as server-sent events, ending with ``data: [DONE]``."""

    def chunk(delta: Delta, finish: str | None = None) -> str:
        choice = ChunkChoice(delta=delta, finish_reason=finish)
        return ChatCompletionChunk(id=job.id, created=created, model=model, choices=[choice]).sse()

    try:
        yield chunk(Delta(role="assistant", content=""))
        event = first
        while True:
            if event.kind == "start":
                pass  # admitted: the role chunk above already told the client
            elif event.kind == "delta":
                yield chunk(Delta(content=event.text))
            elif event.kind == "done":
                yield chunk(Delta(), event.finish_reason)
                if job.request.include_usage:
                    yield ChatCompletionChunk(id=job.id, created=created, model=model, choices=[],
                                              usage=event.usage).sse()  # fmt: skip
                break
            else:
                yield f"data: {json.dumps(api_error(event.error).body())}\n\n"
                break
            try:
                event = await next_event(events, job, None)
            except APIError as e:
                event = Event("error", error=e)
        yield "data: [DONE]\n\n"
    finally:
        job.cancel()
