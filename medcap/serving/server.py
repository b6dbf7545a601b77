"""Config -> loaded model -> the app on uvicorn: ``medcap serve`` and, for tests and benchmarks,
``BackgroundServer`` (the same app in a thread of this process, on a free loopback port).

The model comes from the generate recipe's keys through ``medcap.models.assembly.load_for_inference``
(as evaluation loads it): ``model`` + ``checkpointer`` + ``tokenizer``, the vision keys,
``device``, ``dtype``, ``seed`` and ``vision_checkpoint`` (a glob serves its last match, in epoch
order: ``meta_model_*.pt``). With ``engine=vllm`` a vLLM server at ``vllm_url`` decodes
(``vllm_engine.VLLMEngine``); the model's context is the smaller of the decoder's and vLLM's.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import uvicorn
from omegaconf import DictConfig

from medcap.engines import VLLMClient
from medcap.models.assembly import load_for_inference
from medcap.models.checkpoints import latest_checkpoint
from medcap.serving.app import ModelInfo, Served, create_app
from medcap.serving.engine import Engine
from medcap.serving.metrics import Metrics
from medcap.serving.requests import PromptContext
from medcap.serving.settings import ServeSettings
from medcap.serving.vllm_engine import VLLMEngine

log = logging.getLogger("medcap.serve")


def load(cfg: DictConfig) -> Served:
    """Everything ``create_app`` needs, from a generate-recipe config plus the serving keys."""
    settings = ServeSettings.from_config(cfg, "serve")
    settings.check_exposure()
    ckpt = latest_checkpoint(settings.vision_checkpoint)
    if settings.compile:  # continuous batches change size every few steps: each size would recompile
        log.warning("compile=True is the generate recipe's; medcap serve decodes eagerly")
    client = None
    if settings.engine == "vllm":  # a wrong URL fails now, not after the LLM has loaded
        client = VLLMClient(settings.vllm_url, settings.vllm_model, timeout_s=settings.request_timeout_s)
        client.models()
    # as in evaluation: the LLM in ``dtype``, the vision side fp32 under autocast (the worker's)
    # engine=vllm: of the LLM only its token embedding table; vLLM runs the rest
    loaded = load_for_inference(settings, ckpt, embeddings_only=client is not None)
    model, tokenizer = loaded.model, loaded.tokenizer
    max_seq_len = int(model.decoder.max_seq_len)
    if client is not None:
        served = client.connect(hidden_size=model.llm_dim, vocab_size=model.tok_embeddings.num_embeddings)
        max_seq_len = min(max_seq_len, served.max_model_len or max_seq_len)
        log.info("engine: vLLM at %s serving %s (context %s)", client.url, served.id, served.max_model_len)
    llm = Path(str(settings.checkpointer.get("checkpoint_dir", "llm"))).name
    name = settings.model_name or f"medcap-{llm}" + (f"-{ckpt.stem}" if ckpt else "")
    preprocess = model.visual.preprocess
    info = ModelInfo(
        name=name, llm=llm, vision_checkpoint=ckpt.name if ckpt else None, vision=model.visual.name,
        connector=type(model.projector).__name__, num_image_tokens=model.num_image_tokens,
        image_size=int(preprocess.size), max_seq_len=max_seq_len, created=int(time.time()),
    )  # fmt: skip
    context = PromptContext(
        tokenizer=tokenizer, num_image_tokens=model.num_image_tokens, transform=preprocess.transform(),
        max_seq_len=max_seq_len, default_max_tokens=settings.max_new_tokens,
        default_temperature=settings.temperature, default_top_k=settings.top_k,
        image_root=settings.image_root, max_image_pixels=settings.max_image_pixels,
    )  # fmt: skip
    metrics = Metrics()
    common = dict(max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                  batch_wait_ms=settings.batch_wait_ms, retry_after_s=settings.retry_after_s, seed=settings.seed,
                  metrics=metrics)  # fmt: skip
    if client is not None:
        engine: Engine = VLLMEngine(model, tokenizer, client, **common)
    else:
        engine = Engine(model, tokenizer, step=loaded.step, **common)
    return Served(engine, context, settings, info, metrics)


def _uvicorn_config(app: Any, settings: ServeSettings, host: str, port: int, log_level: str) -> uvicorn.Config:
    return uvicorn.Config(
        app, host=host, port=port, log_level=log_level, lifespan="on", server_header=False,
        # a hard backstop behind the queue's own 429s: connections beyond this get 503
        limit_concurrency=settings.max_queue + settings.max_batch_size + 64, timeout_graceful_shutdown=10,
    )  # fmt: skip


def serve(cfg: DictConfig) -> None:
    """``medcap serve``: load the model, then answer until interrupted."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    served = load(cfg)
    s = served.settings
    log.info("settings: %s", s.described())
    shown = "127.0.0.1" if s.host in ("0.0.0.0", "::") else s.host
    log.info("serving %s: page http://%s:%d/ ; OpenAI base_url http://%s:%d/v1%s", served.info.name, shown, s.port,
             shown, s.port, "" if s.api_key else " (no API key)")  # fmt: skip
    uvicorn.Server(_uvicorn_config(create_app(served), s, s.host, s.port, s.log_level)).run()


class BackgroundServer:
    """The app served by uvicorn in a daemon thread of this process, for tests and benchmarks:

        with BackgroundServer(load(cfg)) as server:
            openai.OpenAI(base_url=server.url + "/v1", api_key="-")...
    """

    def __init__(self, served: Served, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.served = served
        self.app = create_app(served)
        self.server = uvicorn.Server(_uvicorn_config(self.app, served.settings, host, port, log_level))
        self.thread = threading.Thread(target=self.server.run, name="medcap-serve-http", daemon=True)
        self.host, self.port = host, port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *_: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)
