"""The server's settings: the generate recipe's (so its configs, ``custom_generation_config`` and
``smollm2/135M_demo_generation``, serve unchanged) plus the server's own keys, with their
defaults here. ``medcap serve --config X port=8080 max_batch_size=16`` overrides them."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from medcap.data.images import MAX_PIXELS
from medcap.errors import ConfigError
from medcap.settings import GenerateSettings

API_KEY_ENV = "MEDCAP_API_KEY"
REQUEST_DEFAULTS = ("max_new_tokens", "temperature", "top_k", "seed")  # the recipe's, a request's defaults


@dataclass(frozen=True)
class ServeSettings(GenerateSettings):
    """The generate recipe's settings (the model, and a request's defaults: ``max_new_tokens``,
    ``temperature``, ``top_k``, ``seed``) plus what the web layer and the batching worker read.
    ``api_key`` is never printed."""

    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 8000
    api_key: str | None = field(default=None, repr=False)  # or the MEDCAP_API_KEY environment variable; Bearer token on /v1/*
    insecure: bool = False  # allow a non-loopback host without an api_key
    model_name: str | None = None  # the id /v1/models lists; default: medcap-<LLM folder>[-<checkpoint>]
    max_batch_size: int | None = None  # rows decoded together (default: the config's batch_size)
    batch_wait_ms: float = 10.0  # how long the first waiting request waits for company
    max_queue: int = 64  # requests waiting for a row; more get 429 + Retry-After
    request_timeout_s: float = 300.0  # from arrival to the last token; then 504 (or an error event)
    max_body_mb: float = 32.0  # request body limit (413 above it); images travel base64 inside it
    max_image_pixels: int = MAX_PIXELS  # per image, checked before decoding (at most the data path's MAX_PIXELS)
    image_root: str | None = None  # file:// image URLs are read only under this folder (none: refused)
    retry_after_s: int = 1  # the Retry-After a 429 carries
    log_level: str = "info"  # uvicorn's

    @classmethod
    def from_config(cls, cfg: Any, recipe: str | None = None, environ: dict[str, str] | None = None,
                    **known: Any) -> ServeSettings:  # fmt: skip
        """The config's keys; the API key from ``MEDCAP_API_KEY`` when the config has none."""
        environ = os.environ if environ is None else environ
        if not cfg.get("api_key") and "api_key" not in known:
            known["api_key"] = environ.get(API_KEY_ENV) or None
        return super().from_config(cfg, recipe, **known)

    def __post_init__(self) -> None:
        if self.max_batch_size is None:  # the recipe's batch size, unless set apart
            object.__setattr__(self, "max_batch_size", self.batch_size)

    def check(self) -> None:
        """Clear errors for values that cannot work, before a model is loaded."""
        super().check()
        problems = []
        for name, low in (("max_batch_size", 1), ("max_queue", 1), ("port", 0), ("batch_wait_ms", 0),
                          ("request_timeout_s", 1e-3), ("max_body_mb", 1e-3)):  # fmt: skip
            if getattr(self, name) < low:
                problems.append(f"{name}={getattr(self, name)!r}: expected a number >= {low}")
        if not 1 <= self.max_image_pixels <= MAX_PIXELS:
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
        own = ServeSettings.keys() - GenerateSettings.keys()
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name in own or f.name in REQUEST_DEFAULTS}
        shown["api_key"] = "set" if self.api_key else "none"
        return ", ".join(f"{k}={v}" for k, v in shown.items())
