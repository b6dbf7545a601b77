"""``medcap serve``: a trained medcap model behind an OpenAI-compatible chat API with images,
batched across requests, and a web page to try it.

- ``settings``: the server's config keys and their defaults, on the generate recipe's (its configs
  work unchanged);
- ``protocol``: OpenAI's request, response, chunk and model-list bodies;
- ``requests``: a validated request -> prompt tokens, image tensors and sampling settings;
- ``image_urls``: ``data:`` and ``file://`` image URLs -> images, with size and path checks;
- ``engine``: the bounded queue and the one worker thread that owns the model, decoding every
  running request together (``medcap.decoding.ContinuousBatch``); it reports errors in its own
  terms (``errors.EngineError``);
- ``errors``: OpenAI's error object, and the one mapping from errors to status codes;
- ``routes``: the endpoints; ``app``: ``create_app`` wires them, the guard and the page
  (``static/``); ``metrics``: Prometheus counters;
- ``server``: config -> model (``load_for_inference``, as evaluation) -> uvicorn.
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
