"""``medcap serve engine=vllm``: the same worker interface as ``engine.Engine`` (``submit``, events
per request, ``start`` / ``stop``), but a vLLM server decodes. Each admitted request gets a thread
that computes its prompt embeddings here (the vision encoder and the LLM's embedding table, one
request at a time) and streams vLLM's tokens back through ``Engine``'s own token handling (stop
tokens, stop strings, ``max_tokens``, text held back while a stop string may be starting), so the
served API, its streaming and its errors are unchanged. ``max_batch_size`` requests are in flight
at once; vLLM batches them itself. A vLLM that is gone is a 503, a prompt over its context a 400.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from medcap.engines import ContextTooLong, VLLMClient, VLLMError, VLLMUnreachable
from medcap.engines.remote import prompt_embeddings, vllm_request
from medcap.models.assembly import autocast
from medcap.serving.engine import IDLE_POLL_S, Engine, Event, Job
from medcap.serving.errors import DecodingFailed, Unavailable, UnreadableRequest
from medcap.serving.metrics import Metrics

log = logging.getLogger("medcap.serve")


class VLLMEngine(Engine):
    def __init__(self, model: Any, tokenizer: Any, client: VLLMClient, *, max_batch_size: int, max_queue: int,
                 batch_wait_ms: float, retry_after_s: int = 1, seed: int | None = None,
                 metrics: Metrics | None = None):  # fmt: skip
        super().__init__(model, tokenizer, max_batch_size=max_batch_size, max_queue=max_queue,
                         batch_wait_ms=batch_wait_ms, retry_after_s=retry_after_s, seed=seed, metrics=metrics)  # fmt: skip
        self.client = client
        self.pool = ThreadPoolExecutor(max_workers=self.max_batch_size, thread_name_prefix="medcap-vllm-request")
        self.embedding = threading.Lock()  # the vision encoder runs one request at a time
        self.dtype = model.tok_embeddings.weight.dtype

    def _batch(self, step: Any) -> None:
        """No rows here: vLLM decodes (and the LLM's layers are not loaded in this process)."""
        return None

    # ------------------------------------------------------------------ worker side
    def _serve_forever(self) -> None:
        """Hand waiting requests to request threads while fewer than ``max_batch_size`` run."""
        while True:
            with self.cond:
                while not self.stopping:
                    self._drop_stale_waiting()
                    if self.waiting and len(self.running) < self.max_batch_size:
                        break
                    self.cond.wait(timeout=IDLE_POLL_S)
                if self.stopping:
                    break
                job = self.waiting.popleft()
                self.metrics.queue_depth.set(len(self.waiting))
                self.running.append(job)
                self.metrics.running.set(len(self.running))
            self.pool.submit(self._run, job)
        shutdown = Unavailable("the server is shutting down")
        with self.cond:
            running, waiting, self.waiting = list(self.running), list(self.waiting), deque()
        for job in running:
            job.cancel()
        for job in [*running, *waiting]:
            self._fail(job, shutdown)
        self.pool.shutdown(wait=False, cancel_futures=True)

    def _run(self, job: Job) -> None:
        """One request: embed, stream from vLLM, end it (done, or an error the API maps)."""
        try:
            if job.cancelled.is_set():
                return
            req = job.request
            with self.embedding, torch.no_grad(), autocast(self.device, self.dtype):
                embeds = prompt_embeddings(self.model, [req.prompt], req.images, self.tokenizer.pad_id)[0]
            request = vllm_request(self._sampling(req), max_new_tokens=req.max_tokens,
                                   stop_tokens=sorted(self.stop_tokens), banned=(self.model.image_token_id,))  # fmt: skip
            self.metrics.prefill_size.observe(1)
            self._send(job, Event("start"))
            chunks = self.client.stream(embeds, request)
            try:
                for chunk in chunks:
                    if job.cancelled.is_set():
                        self._end(job, None)
                    elif time.monotonic() >= job.deadline:
                        self._end(job, self._timeout_error(job))
                    for tok in chunk.token_ids:
                        if job.finished:
                            break
                        self.metrics.generated(1)
                        self._take_token(job, tok)
                    if job.finished:
                        break
            finally:
                chunks.close()  # vLLM aborts a request whose connection closes
            if not job.finished:  # vLLM stopped at a stop token (it sends none back) or its own end
                self._take_token(job, next(iter(self.stop_tokens)))
        except ContextTooLong as e:
            self._end(job, UnreadableRequest(self._said(e)))
        except VLLMUnreachable as e:
            log.error("%s", e)
            self._end(job, Unavailable(f"the LLM server is not answering ({type(e).__name__})"))
        except VLLMError as e:
            log.error("%s", e)
            self._end(job, DecodingFailed(f"the LLM server failed this request: {self._said(e)}"))
        except Exception as e:  # noqa: BLE001 - this request fails; the server goes on
            log.exception("request failed")
            why = f"the model could not read this request ({type(e).__name__})"
            self._end(job, UnreadableRequest(why) if isinstance(e, ValueError) else DecodingFailed(why))
        finally:
            with self.cond:
                if job in self.running:
                    self.running.remove(job)
                    self.metrics.running.set(len(self.running))
                self.cond.notify_all()

    def _said(self, error: Exception) -> str:
        """vLLM's error for the API's client, which is not told the LLM server's address."""
        return str(error).replace(self.client.url, "the LLM server")

    def _end(self, job: Job, error: Any, finish_reason: str | None = None) -> None:
        """``Engine._end`` without the batch's row (vLLM holds the request); frees a place."""
        with self.cond:
            if job.finished:
                return
            job.row = None
            super()._end(job, error, finish_reason)
            self.cond.notify_all()

    def _fail_running(self, error: Any) -> None:
        with self.cond:
            running, self.running = self.running, []
            self.metrics.running.set(0)
        for job in running:
            job.cancel()
            self._fail(job, error)
