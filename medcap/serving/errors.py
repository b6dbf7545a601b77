"""Errors as OpenAI's API returns them: an HTTP status and
``{"error": {"message", "type", "param", "code"}}``, so OpenAI clients raise their usual
exceptions (``BadRequestError``, ``AuthenticationError``, ``RateLimitError``, ...)."""

from __future__ import annotations

from typing import Any

TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class APIError(Exception):
    """A request the server answers with ``status`` and an OpenAI-style error object. The message
    must never hold a secret (the API key) or DICOM tag values."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or TYPES.get(status, "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class EngineError(Exception):
    """What the batching worker reports about a request, in its own terms; ``api_error`` is the
    one place that turns it into a status code."""


class QueueFull(EngineError):
    def __init__(self, waiting: int, retry_after_s: int):
        super().__init__(f"the server is busy: {waiting} requests are waiting; retry later")
        self.retry_after_s = retry_after_s


class Unavailable(EngineError):
    """The worker is not running (not started, stopped, or shutting down)."""


class RequestTimedOut(EngineError):
    def __init__(self, timeout_s: float):
        super().__init__(f"request timed out after {timeout_s:g} s")


class UnreadableRequest(EngineError):
    """The model could not take the request in (its prefill failed on the request's own input)."""


class DecodingFailed(EngineError):
    """A bug while decoding: the requests in flight fail, the server goes on."""


def api_error(error: Exception) -> APIError:
    """A worker's error as OpenAI's error object and status."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, QueueFull):
        return APIError(429, str(error), code="queue_full", headers={"Retry-After": str(error.retry_after_s)})
    if isinstance(error, Unavailable):
        return APIError(503, str(error), code="unavailable")
    if isinstance(error, RequestTimedOut):
        return APIError(504, str(error), code="timeout")
    if isinstance(error, UnreadableRequest):
        return APIError(400, str(error), code="prefill_failed")
    if isinstance(error, DecodingFailed):
        return APIError(500, str(error), code="internal_error")
    return APIError(500, "internal server error", code="internal_error")
