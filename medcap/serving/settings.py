"""The server's settings: config keys like every other medcap setting, with their defaults here
so the generate recipe's configs (``custom_generation_config``, ``smollm2/135M_demo_generation``)
serve unchanged. ``medcap serve --config X port=8080 max_batch_size=16`` overrides them."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from medcap.data.images import MAX_PIXELS
from medcap.errors import ConfigError

API_KEY_ENV = "MEDCAP_API_KEY"


def _number_at_least(value: Any, low: float) -> bool:
    """A number (or numeric text from the command line) >= ``low``."""
    try:
        return float(value) >= low
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class ServeSettings:
    """Everything the web layer and the batching worker read. ``api_key`` is never printed."""

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)  # or the MEDCAP_API_KEY environment variable; Bearer token on /v1/*
    insecure: bool = False  # allow a non-loopback host without an api_key
    model_name: str | None = None  # the id /v1/models lists; default: medcap-<LLM folder>[-<checkpoint>]
    max_batch_size: int = 8  # rows decoded together (default: the config's batch_size)
    batch_wait_ms: float = 10.0  # how long the first waiting request waits for company
    max_queue: int = 64  # requests waiting for a row; more get 429 + Retry-After
    request_timeout_s: float = 300.0  # from arrival to the last token; then 504 (or an error event)
    max_body_mb: float = 32.0  # request body limit (413 above it); images travel base64 inside it
    max_image_pixels: int = MAX_PIXELS  # per image, checked before decoding (at most the data path's MAX_PIXELS)
    image_root: str | None = None  # file:// image URLs are read only under this folder (none: refused)
    max_new_tokens: int = 256  # a request's default max_tokens (the recipe's max_new_tokens)
    temperature: float = 0.0  # a request's default temperature (the recipe's)
    top_k: int | None = None  # a request's default top_k (the recipe's)
    seed: int | None = None  # seeds the sampling of requests that bring no seed of their own
    retry_after_s: int = 1  # the Retry-After a 429 carries
    log_level: str = "info"  # uvicorn's

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_config(cls, cfg: Any, environ: dict[str, str] | None = None) -> ServeSettings:
        """The config's top-level keys. The recipe's own ``max_new_tokens``, ``temperature``,
        ``top_k`` and ``seed`` are a request's defaults; its ``batch_size`` is ``max_batch_size``'s."""
        environ = os.environ if environ is None else environ
        get = cfg.get
        values: dict[str, Any] = {}
        for f in fields(cls):
            if get(f.name) is not None:
                values[f.name] = get(f.name)
        if get("max_batch_size") is None and get("batch_size") is not None:
            values["max_batch_size"] = get("batch_size")
        if not values.get("api_key"):
            values["api_key"] = environ.get(API_KEY_ENV) or None
        out = cls(**values)
        out.check()
        return out

    def check(self) -> None:
        """Clear errors for values that cannot work, before a model is loaded."""
        problems = []
        for name in ("max_batch_size", "max_queue", "port"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < (0 if name == "port" else 1):
                problems.append(f"{name}={value!r}: expected a positive integer")
        for name, low in (("batch_wait_ms", 0), ("request_timeout_s", 1e-3), ("max_body_mb", 1e-3), ("max_new_tokens", 1)):
            if not _number_at_least(getattr(self, name), low):
                problems.append(f"{name}={getattr(self, name)!r}: expected a number >= {low}")
        if not (_number_at_least(self.max_image_pixels, 1) and float(self.max_image_pixels) <= MAX_PIXELS):
            problems.append(f"max_image_pixels={self.max_image_pixels}: expected 1..{MAX_PIXELS} (the data path's limit)")
        if self.image_root is not None and not Path(self.image_root).is_dir():
            problems.append(f"image_root={self.image_root}: folder not found")
        if problems:
            raise ConfigError("serve settings: " + "; ".join(problems))

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def check_exposure(self) -> None:
        """Refuse to listen beyond this machine without a key, unless told ``insecure=True``."""
        if not self.loopback and not self.api_key and not self.insecure:
            raise SystemExit(
                f"medcap serve: host={self.host} is reachable from other machines but no api_key is set; set "
                f"{API_KEY_ENV} (or api_key=...), or pass insecure=True to serve without one"
            )

    def described(self) -> str:
        """One line for the log: every setting, the key only as set or not."""
        shown = {f.name: getattr(self, f.name) for f in fields(self)}
        shown["api_key"] = "set" if self.api_key else "none"
        return ", ".join(f"{k}={v}" for k, v in shown.items())
