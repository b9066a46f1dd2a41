"""The one model worker: a thread that owns every call to the guarded model and batches requests.

Requests wait in one bounded queue. The worker takes the oldest; a plain (non-stream) request is
joined by the queued requests with the same options, up to ``max_batch``, waiting at most
``max_wait_ms`` from the time the first one arrived, and the batch is answered by one
``GuardedModel.chat`` call. A stream runs alone: ``GuardedModel.stream`` takes one conversation,
so streams are served one after another (their cost is measured in benchmarks/RESULTS.md).

Each request gets its events (``("chunk", text)``, then ``("done", Answer)`` or
``("error", RequestError)``) on its own asyncio queue, so answers cannot cross. A request whose
client left (``Pending.cancel()``) stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StopStringCriteria

from guardrails.results import GuardedResult
from guardrails.server.config import ServerConfig
from guardrails.server.errors import RequestError
from guardrails.server.protocol import ChatJob, finish_reason

#: seconds a full queue asks clients to wait before retrying
RETRY_AFTER_S = 1


@dataclass
class Answer:
    """A finished request: the guarded result and what the response says of it."""

    result: GuardedResult
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Pending:
    """One request in the worker's hands; events go to ``events`` on the request's event loop."""

    job: ChatJob
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.monotonic)

    def post(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server is gone, and the client with it
            pass

    def cancel(self) -> None:
        self.cancelled.set()


class _Cancelled(StoppingCriteria):
    """Ends generation for rows whose request was cancelled (client gone, shutdown)."""

    def __init__(self, pending: list[Pending], abort: threading.Event):
        self.pending, self.abort = pending, abort

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        flags = [self.abort.is_set() or p.cancelled.is_set() for p in self.pending]
        if input_ids.shape[0] != len(flags):  # beams expand rows in place
            flags = [f for f in flags for _ in range(input_ids.shape[0] // len(flags))]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class ModelWorker:
    """Owns the guarded model for the server; :meth:`submit` from any thread or event loop."""

    def __init__(self, guarded: Any, config: ServerConfig):
        self.guarded, self.config = guarded, config
        self._queue: collections.deque[Pending] = collections.deque()
        self._cond = threading.Condition()
        self._closing = False
        self._abort = threading.Event()
        self._thread = threading.Thread(target=self._run, name="guardrails-model-worker", daemon=True)
        #: batch sizes of the calls made, for the load benchmark and tests (appended by the worker only)
        self.batch_sizes: list[int] = []
        self.failure: BaseException | None = None

    # -- the request side ----------------------------------------------------------------------
    def start(self) -> ModelWorker:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    @property
    def queued(self) -> int:
        return len(self._queue)

    def submit(self, job: ChatJob, loop: asyncio.AbstractEventLoop) -> Pending:
        """Queue ``job``; 429 when the queue is full, 503 when the worker is shutting down or dead."""
        pending = Pending(job, loop)
        with self._cond:
            if self._closing:
                raise RequestError(503, "the server is shutting down; retry on another instance", code="shutting_down")
            if not self._thread.is_alive():
                raise RequestError(503, f"the model worker has stopped ({self.failure!r}); restart the server",
                                   code="worker_stopped")
            if len(self._queue) >= self.config.max_queue:
                raise RequestError(429, f"the server is busy: {len(self._queue)} requests are waiting "
                                        f"(--max-queue {self.config.max_queue}); retry after {RETRY_AFTER_S} s",
                                   code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})
            self._queue.append(pending)
            self._cond.notify_all()
        return pending

    def close(self, grace_s: float) -> None:
        """Refuse new requests, let the queued ones finish for ``grace_s``, then fail the rest with 503."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._thread.join(grace_s)
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
        for p in left:
            p.post("error", RequestError(503, "the server shut down before this request ran", code="shutting_down"))
        self._abort.set()  # the call still running stops at its next token and answers 503
        self._thread.join(10.0)

    # -- the worker thread ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while (batch := self._next_batch()) is not None:
                if batch[0].job.stream:
                    self._stream(batch[0])
                else:
                    self._answer(batch)
        except BaseException as e:  # noqa: BLE001 - recorded for /health and 503s; never silent
            self.failure = e
            raise

    def _next_batch(self) -> list[Pending] | None:
        cfg = self.config
        with self._cond:
            while True:
                while not self._queue and not self._closing:
                    self._cond.wait()
                if not self._queue:
                    return None  # closing and drained
                head = self._queue.popleft()
                if not head.cancelled.is_set():
                    break
            if head.job.stream or cfg.max_batch == 1:
                return [head]
            key, batch = head.job.batch_key(), [head]
            deadline = head.enqueued + cfg.max_wait_ms / 1e3
            while True:
                for p in list(self._queue):
                    if len(batch) >= cfg.max_batch:
                        break
                    if not p.job.stream and p.job.batch_key() == key and not p.cancelled.is_set():
                        self._queue.remove(p)
                        batch.append(p)
                remaining = deadline - time.monotonic()
                if len(batch) >= cfg.max_batch or remaining <= 0 or self._closing:
                    return batch
                self._cond.wait(remaining)

    def _kwargs(self, pending: list[Pending]) -> dict[str, Any]:
        job = pending[0].job
        kw = dict(job.generate_kwargs)
        criteria: list[StoppingCriteria] = [_Cancelled(pending, self._abort)]
        if job.stop:
            criteria.append(StopStringCriteria(self.guarded.engine.tokenizer, list(job.stop)))
        kw["stopping_criteria"] = criteria
        if job.seed is not None:
            torch.manual_seed(job.seed)  # seeded requests run alone (ChatJob.batch_key)
        return kw

    def _answer(self, batch: list[Pending]) -> None:
        self.batch_sizes.append(len(batch))
        try:
            results = self.guarded.chat([p.job.conversation for p in batch], **self._kwargs(batch))
        except Exception as e:  # noqa: BLE001 - answered per request below
            if len(batch) > 1:  # one bad request must not fail its neighbours: answer each alone
                for p in batch:
                    self._answer([p])
                return
            batch[0].post("error", _error(e))
            return
        for p, r in zip(batch, results):
            if self._abort.is_set():
                p.post("error", RequestError(503, "the server shut down while this request ran", code="shutting_down"))
            elif not p.cancelled.is_set():
                p.post("done", self._finish(p.job, r))

    def _stream(self, p: Pending) -> None:
        self.batch_sizes.append(1)
        held = _StopHold(p.job.stop)
        try:
            stream = self.guarded.stream(p.job.conversation, **self._kwargs([p]))
            for piece in stream:
                if p.cancelled.is_set() or self._abort.is_set():
                    break  # _Cancelled ends generation at the next token
                if text := held.feed(piece):
                    p.post("chunk", text)
        except Exception as e:  # noqa: BLE001 - reported to this request only
            p.post("error", _error(e))
            return
        if self._abort.is_set():
            p.post("error", RequestError(503, "the server shut down while this request ran", code="shutting_down"))
        elif not p.cancelled.is_set() and stream.result is not None:
            if text := held.flush():
                p.post("chunk", text)
            p.post("done", self._finish(p.job, stream.result))

    def _finish(self, job: ChatJob, result: GuardedResult) -> Answer:
        text, cut = result.text, False
        if job.stop and not result.refused:
            text, cut = cut_at_stop(text, job.stop)
        return Answer(result, text, finish_reason(result, job.generate_kwargs["max_new_tokens"], cut),
                      result.prompt_tokens, len(result.token_ids))


def cut_at_stop(text: str, stops: tuple[str, ...]) -> tuple[str, bool]:
    """``text`` up to the first stop string (which OpenAI leaves out), and whether one was found."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(hits)], True) if hits else (text, False)


class _StopHold:
    """Streams text but holds back what could be the start of a stop string, and nothing after one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops, self.text, self.sent, self.done = stops, "", 0, False

    def feed(self, piece: str) -> str:
        if self.done:
            return ""
        self.text += piece
        if not self.stops:
            return self._release(len(self.text))
        cut, found = cut_at_stop(self.text, self.stops)
        if found:
            self.done = True
            return self._release(len(cut))
        keep = max(len(s) for s in self.stops) - 1  # a stop string may be split across pieces
        return self._release(max(self.sent, len(self.text) - keep))

    def flush(self) -> str:
        return "" if self.done else self._release(len(self.text))

    def _release(self, upto: int) -> str:
        out, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return out


def _error(e: Exception) -> RequestError:
    if isinstance(e, RequestError):
        return e
    if isinstance(e, (ValueError, TypeError)):  # the library refuses an input with a one-line reason
        return RequestError(400, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
    return RequestError(500, f"internal error while answering: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
