"""``medcap serve``: a trained medcap model behind an OpenAI-compatible chat API with images,
batched across requests, and a web page to try it.

- ``settings``: the server's config keys and their defaults (the generate recipe's configs work
  unchanged);
- ``requests``: OpenAI chat requests -> prompt tokens and image tensors (validation);
- ``image_urls``: ``data:`` and ``file://`` image URLs -> images, with size and path checks;
- ``errors``: OpenAI's error object;
- ``decoding``: continuous batching on the KV cache (rows join and leave at step boundaries);
- ``engine``: the bounded queue and the one worker thread that owns the model;
- ``metrics``: Prometheus counters; ``app``: the FastAPI routes and the page (``static/``);
- ``server``: config -> model -> uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from omegaconf import DictConfig


def serve(cfg: DictConfig) -> None:
    """Load the model the config names and serve it until interrupted."""
    from medcap.serving.server import serve as _serve

    _serve(cfg)


__all__ = ["serve"]
