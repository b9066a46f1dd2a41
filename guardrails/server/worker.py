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
from transformers import StoppingCriteria

from guardrails.calls import active_call
from guardrails.engine import tokenizer_lock
from guardrails.results import GuardedResult
from guardrails.server.config import ServerConfig
from guardrails.server.errors import RequestError
from guardrails.server.protocol import ChatJob, finish_reason

#: seconds a full queue asks clients to wait before retrying
RETRY_AFTER_S = 1
_SHUT_DOWN_WHILE_RUNNING = RequestError(503, "the server shut down while this request ran", code="shutting_down")


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
        pending = self.pending
        ctx = active_call()  # rows refused before generation are not in the batch: keep the generated ones
        if ctx is not None and len(ctx.rows) == len(pending):
            pending = [p for p, r in zip(pending, ctx.rows) if r.batch_index is not None]
        flags = [self.abort.is_set() or p.cancelled.is_set() for p in pending]
        if flags and input_ids.shape[0] != len(flags):  # beams expand rows in place
            flags = [f for f in flags for _ in range(input_ids.shape[0] // len(flags))]
        return torch.tensor(flags, dtype=torch.bool, device=input_ids.device)


class _GeneratedStop(StoppingCriteria):
    """Stops a row once its generated text holds a stop string. Only generated tokens are read
    (transformers' StopStringCriteria also matches across the prompt, and building it costs
    seconds for a large vocabulary)."""

    def __init__(self, tokenizer: Any, stops: tuple[str, ...]):
        self.tokenizer, self.stops, self.start = tokenizer, stops, -1
        self.window = max(map(len, stops)) + 1  # tokens: each decodes to at least one character

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        if self.start < 0:  # first call: one token has been generated
            self.start = input_ids.shape[1] - 1
        with tokenizer_lock(self.tokenizer):
            tails = self.tokenizer.batch_decode(input_ids[:, max(self.start, input_ids.shape[1] - self.window):],
                                                skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in tails], dtype=torch.bool, device=input_ids.device)


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
        #: requests the model is answering right now (for /health)
        self.running = 0
        self.failure: BaseException | None = None
        self.context_limit = context_limit(guarded, config)

    # -- the request side ----------------------------------------------------------------------
    def start(self) -> ModelWorker:
        self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._closing

    @property
    def queued(self) -> int:
        """Requests waiting for the model (a cancelled one is skipped, so it does not count)."""
        return sum(not p.cancelled.is_set() for p in self._queue)

    def check_capacity(self) -> None:
        """Raise what :meth:`submit` would for a full or stopped worker (a cheap check before parsing)."""
        with self._cond:
            self._check_capacity()

    def submit(self, job: ChatJob, loop: asyncio.AbstractEventLoop) -> Pending:
        """Queue ``job``; 429 when the queue is full, 503 when the worker is shutting down or dead."""
        pending = Pending(job, loop)
        with self._cond:
            self._check_capacity()
            self._queue.append(pending)
            self._cond.notify_all()
        return pending

    def _check_capacity(self) -> None:
        if self._closing:
            raise RequestError(503, "the server is shutting down; retry on another instance", code="shutting_down")
        if not self._thread.is_alive():
            raise RequestError(503, f"the model worker has stopped ({self.failure!r}); restart the server", code="worker_stopped")
        if self.queued >= self.config.max_queue:
            raise RequestError(429, f"the server is busy: {self.queued} requests are waiting "
                                    f"(--max-queue {self.config.max_queue}); retry after {RETRY_AFTER_S} s",
                               code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)})

    def close(self, grace_s: float) -> None:
        """Refuse new requests, let the queued ones finish for ``grace_s``, then fail the rest with 503.
        Idempotent: the server calls it when shutdown starts and again when the app's lifespan ends."""
        if not self._thread.is_alive():
            return
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
        batch: list[Pending] = []
        try:
            while (batch := self._next_batch() or []):
                self.running = len(batch)
                try:
                    if batch[0].job.stream:
                        self._stream(batch[0])
                    else:
                        self._answer(batch)
                finally:
                    self.running = 0
        except BaseException as e:  # noqa: BLE001 - recorded for /health; every request held or waiting is answered
            self.failure = e
            with self._cond:
                left = batch + list(self._queue)
                self._queue.clear()
            for p in left:
                p.post("error", RequestError(503, f"the model worker stopped ({type(e).__name__}: {e}); restart the server",
                                             code="worker_stopped"))
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
            criteria.append(_GeneratedStop(self.guarded.engine.tokenizer, job.stop))
        kw["stopping_criteria"] = criteria
        if job.seed is not None:
            torch.manual_seed(job.seed)  # seeded requests run alone (ChatJob.batch_key)
        return kw

    def _too_long(self, p: Pending) -> bool:
        """Answer 400 to a request whose prompt + max_tokens exceeds the model's context. Measured
        here, on the worker thread (the tokenizer is not shared with request threads): prefill
        cannot be interrupted, so one over-long prompt would hold the model for everyone."""
        if self.context_limit is None:
            return False
        n = int(self.guarded.engine.encode([p.job.conversation])["input_ids"].shape[1])
        new = p.job.generate_kwargs["max_new_tokens"]
        if n + new <= self.context_limit:
            return False
        p.post("error", RequestError(400, f"the prompt is {n} tokens and max_tokens is {new}: {n + new} is above this "
                                          f"model's context of {self.context_limit} tokens; shorten the conversation or "
                                          "ask for fewer tokens", param="messages", code="context_length_exceeded"))
        return True

    def _answer(self, batch: list[Pending]) -> None:
        if batch := [p for p in batch if not self._too_long(p)]:
            self._call(batch)

    def _call(self, batch: list[Pending]) -> None:
        self.batch_sizes.append(len(batch))
        try:
            results = self.guarded.chat([p.job.conversation for p in batch], **self._kwargs(batch))
        except Exception as e:  # noqa: BLE001 - answered per request below
            if len(batch) > 1:  # one bad request must not fail its neighbours: answer each alone
                for p in batch:
                    self._call([p])
                return
            batch[0].post("error", _error(e))
            return
        for p, r in zip(batch, results):
            if self._abort.is_set():
                p.post("error", _SHUT_DOWN_WHILE_RUNNING)
            elif not p.cancelled.is_set():
                p.post("done", self._finish(p.job, r))

    def _stream(self, p: Pending) -> None:
        if self._too_long(p):
            return
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
            p.post("error", _SHUT_DOWN_WHILE_RUNNING)
        elif not p.cancelled.is_set() and stream.result is not None:
            result = stream.result
            # A refusal is the defense's text, whole: stop strings cut the model's answer only.
            rest = result.text[len(held.released):] if result.refused and result.text.startswith(held.released) else held.flush()
            if rest:
                p.post("chunk", rest)
            p.post("done", self._finish(p.job, result))

    def _finish(self, job: ChatJob, result: GuardedResult) -> Answer:
        text, cut = result.text, False
        if job.stop and not result.refused:
            text, cut = cut_at_stop(text, job.stop)
        return Answer(result, text, finish_reason(result, job.generate_kwargs["max_new_tokens"], cut),
                      result.prompt_tokens, len(result.token_ids))


def context_limit(guarded: Any, config: ServerConfig) -> int | None:
    """Prompt + new tokens one request may use: the configured limit, else the model's positions."""
    if config.max_context_tokens is not None:
        return config.max_context_tokens
    cfg = getattr(guarded.model, "config", None)
    cfg = getattr(cfg, "text_config", None) or cfg
    n = getattr(cfg, "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


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

    @property
    def released(self) -> str:
        return self.text[: self.sent]

    def _release(self, upto: int) -> str:
        out, self.sent = self.text[self.sent:upto], max(self.sent, upto)
        return out


def _error(e: Exception) -> RequestError:
    """An exception inside the guarded call is the server's failure (500): requests were checked
    when parsed, so what reaches the model is well-formed."""
    if isinstance(e, RequestError):
        return e
    first = (str(e).splitlines() or [""])[0]
    return RequestError(500, f"internal error while answering: {type(e).__name__}: {first}")
