"""The batching worker: one thread owns the model and decodes every running request together
(``medcap.decoding.ContinuousBatch``); the async web layer hands it requests through a bounded queue
and gets events back (text deltas, then done or an error) through each request's sink.

Admission: a waiting request joins the running batch at the next step boundary once the waiting
requests fill the free rows (``max_batch_size``) or the oldest has waited ``batch_wait_ms``, so
joins come in groups (one prefill, one cache rebuild) without holding anyone long. A full queue
(``max_queue`` waiting) is a 429 at once, never an unbounded backlog. Each request ends at its
own stop tokens, stop strings, ``max_tokens``, timeout (``request_timeout_s``, from arrival) or
cancellation (the client went away); an error in the model fails the requests it touched, not
the server.
"""

from __future__ import annotations

import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from medcap.decoding import ContinuousBatch, DecodeStep, Row, Sampling
from medcap.models.assembly import autocast
from medcap.serving.errors import (
    DecodingFailed,
    EngineError,
    QueueFull,
    RequestTimedOut,
    Unavailable,
    UnreadableRequest,
)
from medcap.serving.metrics import Metrics
from medcap.serving.requests import Prepared

log = logging.getLogger("medcap.serve")
IDLE_POLL_S = 0.25  # an idle worker wakes this often to expire waiting requests


@dataclass
class Event:
    """What the worker tells the web layer about one request."""

    kind: str  # "start" (admitted to the batch), then "delta"s, then "done"; or "error" at any point
    text: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    error: EngineError | None = None


@dataclass(eq=False)
class Job:
    """One chat request on its way through the worker. ``sink`` must be thread-safe."""

    request: Prepared
    sink: Callable[[Event], None]
    timeout_s: float
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    arrival: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    ids: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the answer already delivered
    row: Row | None = None
    finished: bool = False

    @property
    def deadline(self) -> float:
        return self.arrival + self.timeout_s

    def cancel(self) -> None:
        """Called from the web layer (client gone, or it gave up): the worker drops the job."""
        self.cancelled.set()


class Engine:
    def __init__(self, model: Any, tokenizer: Any, *, max_batch_size: int, max_queue: int, batch_wait_ms: float,
                 retry_after_s: int = 1, seed: int | None = None, metrics: Metrics | None = None,
                 step: DecodeStep | None = None):  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.stop_tokens = {int(t) for t in tokenizer.stop_tokens}
        self.max_batch_size, self.max_queue = int(max_batch_size), int(max_queue)
        self.batch_wait_s = float(batch_wait_ms) / 1000.0
        self.retry_after_s = int(retry_after_s)
        self.metrics = metrics or Metrics()
        self.device = model.tok_embeddings.weight.device
        self.batch = self._batch(step)
        self.waiting: deque[Job] = deque()
        self.running: list[Job] = []
        self.cond = threading.Condition()
        self.seeds = random.Random(seed)
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="medcap-serve-worker", daemon=True)

    def _batch(self, step: DecodeStep | None) -> ContinuousBatch | None:
        """The rows decoded together (``VLLMEngine``: none here, vLLM holds them)."""
        return ContinuousBatch(self.model, self.tokenizer.pad_id, step)

    # ------------------------------------------------------------------ web-layer side
    def start(self) -> None:
        self.thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.stopping

    def submit(self, job: Job) -> None:
        """Queue ``job`` or refuse it at once: 429 when ``max_queue`` requests already wait."""
        if not self.alive:
            raise Unavailable("the server is not running its model worker")
        with self.cond:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(len(self.waiting), self.retry_after_s)
            self.waiting.append(job)
            self.metrics.queue_depth.set(len(self.waiting))
            self.cond.notify_all()

    # ------------------------------------------------------------------ worker side
    def _loop(self) -> None:
        torch.set_grad_enabled(False)  # grad mode is per thread, and so is autocast:
        with autocast(self.device, self.model.tok_embeddings.weight.dtype):  # the evaluation's precision
            self._serve_forever()

    def _serve_forever(self) -> None:
        while True:
            try:
                joining = self._take()
                if self.stopping:
                    break
                self._expire()
                if joining:
                    self._admit(joining)
                if self.running:
                    self._step()
            except Exception:  # noqa: BLE001 - a bug here must not take the server down
                log.exception("serving worker error: failing the requests in flight")
                self._fail_running(DecodingFailed("internal error while decoding"))
        shutdown = Unavailable("the server is shutting down")
        self._fail_running(shutdown)
        with self.cond:
            waiting, self.waiting = list(self.waiting), deque()
        for job in waiting:
            self._fail(job, shutdown)

    def _take(self) -> list[Job]:
        """Waiting requests to admit now (possibly none); blocks only while nothing runs."""
        with self.cond:
            while not self.stopping:
                self._drop_stale_waiting()
                free = self.max_batch_size - len(self.running)
                if self.waiting and free > 0:
                    age = time.monotonic() - self.waiting[0].arrival
                    if len(self.waiting) >= free or age >= self.batch_wait_s:
                        joining = [self.waiting.popleft() for _ in range(min(free, len(self.waiting)))]
                        self.metrics.queue_depth.set(len(self.waiting))
                        return joining
                    if self.running:
                        return []
                    self.cond.wait(timeout=self.batch_wait_s - age)
                elif self.running:
                    return []
                else:
                    self.cond.wait(timeout=IDLE_POLL_S)
        return []

    def _drop_stale_waiting(self) -> None:
        now = time.monotonic()
        stale = [j for j in self.waiting if j.cancelled.is_set() or now >= j.deadline]
        for job in stale:
            self.waiting.remove(job)
            self._fail(job, self._timeout_error(job) if not job.cancelled.is_set() else None)
        if stale:
            self.metrics.queue_depth.set(len(self.waiting))

    def _timeout_error(self, job: Job) -> EngineError:
        return RequestTimedOut(job.timeout_s)

    def _expire(self) -> None:
        now = time.monotonic()
        for job in list(self.running):
            if job.cancelled.is_set():
                self._end(job, None)
            elif now >= job.deadline:
                self._end(job, self._timeout_error(job))

    def _sampling(self, req: Prepared) -> Sampling:
        if req.temperature <= 0:
            return Sampling()
        seed = req.seed if req.seed is not None else self.seeds.getrandbits(63)
        rng = torch.Generator(device=self.device).manual_seed(int(seed) % (2**63))
        return Sampling(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, rng=rng)

    def _admit(self, jobs: list[Job]) -> None:
        rows = []
        for job in jobs:
            req = job.request
            job.row = Row(req.prompt, req.images, req.max_tokens, self._sampling(req), owner=job)
            rows.append(job.row)
        try:
            firsts = self.batch.admit(rows)
        except Exception as e:  # noqa: BLE001 - these requests fail; the running ones go on
            log.exception("prefill failed for %d request(s)", len(jobs))
            why = f"the model could not read this request ({type(e).__name__})"
            error = UnreadableRequest(why) if isinstance(e, ValueError) else DecodingFailed(why)
            for job in jobs:
                self._fail(job, error)
            return
        self.metrics.prefill_size.observe(len(jobs))
        self.running.extend(jobs)
        self.metrics.running.set(len(self.running))
        self.metrics.generated(len(jobs))
        for job, tok in zip(jobs, firsts):
            self._send(job, Event("start"))
            self._take_token(job, tok)

    def _step(self) -> None:
        self.metrics.batch_size.observe(len(self.batch.live))
        picks = self.batch.step()
        self.metrics.generated(len(picks))
        for row, tok in picks:
            self._take_token(row.owner, tok)
        if self.batch.dead and self.batch.dead >= len(self.batch.live):
            self.batch.compact()  # dead rows cost a live row's compute; a join drops them anyway

    def _take_token(self, job: Job, tok: int) -> None:
        """Record one generated token; deliver the text that can no longer change; finish the
        job at a stop token, a stop string or ``max_tokens``."""
        if job.finished:
            return
        req = job.request
        if tok in self.stop_tokens:  # the text held back for a stop string that never came
            self._deliver(job, self.tokenizer.decode(job.ids) if job.ids else "")
            self._end(job, None, "stop")
            return
        job.ids.append(tok)
        text = self.tokenizer.decode(job.ids)
        for stop in req.stop:
            at = text.find(stop, max(0, job.sent - len(stop)))
            if at >= 0:
                self._deliver(job, text[:at])
                self._end(job, None, "stop")
                return
        if len(job.ids) >= req.max_tokens:
            self._deliver(job, text)
            self._end(job, None, "length")
            return
        hold = max((len(s) for s in req.stop), default=1) - 1  # a stop string may be starting
        safe = len(text) - hold
        while safe > 0 and text[safe - 1] == "\ufffd":  # a character whose bytes are still coming
            safe -= 1
        self._deliver(job, text[:safe])

    def _deliver(self, job: Job, text: str) -> None:
        if len(text) > job.sent:
            self._send(job, Event("delta", text=text[job.sent :]))
            job.sent = len(text)

    def _end(self, job: Job, error: EngineError | None, finish_reason: str | None = None) -> None:
        """Finish a running job: release its row; deliver done (or the error)."""
        if job in self.running:
            self.running.remove(job)
            self.metrics.running.set(len(self.running))
        if job.row is not None:
            self.batch.release(job.row)
        if job.cancelled.is_set() and error is None and finish_reason is None:
            job.finished = True
            return
        if error is not None:
            self._fail(job, error)
            return
        job.finished = True
        usage = {"prompt_tokens": len(job.request.prompt), "completion_tokens": len(job.ids),
                 "total_tokens": len(job.request.prompt) + len(job.ids)}  # fmt: skip
        self.metrics.latency.observe(time.monotonic() - job.arrival)
        self._send(job, Event("done", finish_reason=finish_reason, usage=usage))

    def _fail(self, job: Job, error: EngineError | None) -> None:
        job.finished = True
        if error is not None:
            self._send(job, Event("error", error=error))

    def _fail_running(self, error: EngineError) -> None:
        running, self.running = self.running, []
        self.metrics.running.set(0)
        self.batch.reset()
        for job in running:
            self._fail(job, error)

    @staticmethod
    def _send(job: Job, event: Event) -> None:
        try:
            job.sink(event)
        except Exception:  # noqa: BLE001 - the client's loop is gone: nobody to tell
            job.cancel()
