"""``wrap()`` and ``GuardedModel``: one core flow behind chat, stream and generate.

Concurrency contract. Per-call state lives in the call (:class:`~guardrails.defense.CallContext`),
never on the wrapper or the model, so one GuardedModel may be used from any number of threads:

- calls on one model object are serialised by that model's lock (:func:`guardrails.calls.model_lock`),
  shared by every wrapper around it; a call holds it only while it uses the model, never while it
  waits for its caller, so nothing a caller does between stream chunks can block other calls;
- hooks a call installs act only for that call (:meth:`CallContext.scoped`): a second wrapper around
  the same model, or a plain ``model.generate``, sees the bare model;
- ``disabled()`` and ``record()`` apply to the calling thread (contextvars), not to other threads;
- a stream may be stepped from any thread, one step at a time; its generation runs in a worker
  thread that ends by itself (at ``max_new_tokens``), or at once when the stream is closed or
  garbage-collected; its defenses are those active when ``stream()`` was called;
- every tokenizer call holds that tokenizer's lock (:func:`guardrails.engine.tokenizer_lock`): a fast
  tokenizer keeps its padding settings as shared state (transformers#47085).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import numbers
import queue
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, overload

import torch
from transformers import LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from guardrails import conversation as conv_mod
from guardrails.calls import call_scope, model_lock
from guardrails.defense import CallContext, Defense, Row
from guardrails.engine import Engine
from guardrails.results import GuardedResult, Verdict

#: generate() options with their smallest value: a wrong type fails deep inside transformers, if at all
_INT_OPTIONS = {"max_new_tokens": 1, "max_length": 1, "min_new_tokens": 0, "min_length": 0, "num_beams": 1,
                "num_return_sequences": 1, "top_k": 0}
_FLOAT_OPTIONS = ("temperature", "top_p", "repetition_penalty")


def check_generate_kwargs(kwargs: dict[str, Any]) -> None:
    """Refuse a mistyped generation option (``max_new_tokens="5"``) with its name, before any defense runs."""
    for name, low in _INT_OPTIONS.items():
        v = kwargs.get(name)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {v!r} ({type(v).__name__})")
        if v < low:
            raise ValueError(f"{name} must be at least {low}, got {v}")
    for name in _FLOAT_OPTIONS:
        v = kwargs.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v)):
            raise TypeError(f"{name} must be a finite number, got {v!r} ({type(v).__name__})")
    if "do_sample" in kwargs and not isinstance(kwargs["do_sample"], bool):
        raise TypeError(f"do_sample must be True or False, got {kwargs['do_sample']!r}")


def check_one_answer_each(kwargs: dict[str, Any], model: Any) -> None:
    """chat/stream return one answer per conversation: refuse several sequences per row, which would
    come back interleaved with the other rows' answers."""
    n = kwargs.get("num_return_sequences")
    if n is None:
        n = getattr(kwargs.get("generation_config"), "num_return_sequences", None)
    if n is None:
        n = getattr(getattr(model, "generation_config", None), "num_return_sequences", 1)
    if (n or 1) > 1:
        raise ValueError(f"chat() and stream() return one answer per conversation, got num_return_sequences={n}; "
                         "to sample several answers put the conversation in the batch several times "
                         "(chat([conv] * n, do_sample=True)), or call generate(**inputs, num_return_sequences=n)")


#: ids of the GuardedModels disabled in this context (each thread has its own)
_DISABLED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar("guardrails_disabled", default=frozenset())
#: (guarded model, its log) for every record() block open in this context
_RECORDERS: contextvars.ContextVar[tuple[tuple[Any, list[CallRecord]], ...]] = contextvars.ContextVar(
    "guardrails_recorders", default=())


@dataclass
class CallRecord:
    """One finished call inside ``record()``: its mode, per-row verdicts and timings."""

    mode: str
    verdicts: list[list[Verdict]]
    timings: dict[str, float]


def wrap(model: Any, processor: Any | None = None, defenses: Sequence[Defense] = (), *, layers_path: str | None = None) -> GuardedModel:
    """Put ``defenses`` (run in the given order) around a transformers model.

    >>> guarded = wrap(model, processor, defenses=[SafetySystemPrompt()])
    >>> guarded.chat([{"role": "user", "content": "Hi"}], max_new_tokens=32).text
    """
    return GuardedModel(model, processor, defenses, layers_path=layers_path)


class GuardedModel:
    """A transformers model with a defense pipeline; transparent (attributes forward) and reversible.

    Where each defense stage runs:

    ============  =======  =========  ==========================================
    mode          before   during     after
    ============  =======  =========  ==========================================
    ``chat``      yes      yes        yes
    ``stream``    yes      yes        yes (text held back if the defense must see the whole answer)
    ``generate``  no       yes        no (a defense with before/after stages raises ValueError)
    ============  =======  =========  ==========================================

    Safe to use from several threads; see the module docstring for the contract.
    """

    def __init__(self, model: Any, processor: Any | None, defenses: Sequence[Defense], *, layers_path: str | None = None):
        if isinstance(model, (str, bytes)) or not callable(getattr(model, "generate", None)):
            raise TypeError(
                f"wrap() takes a loaded transformers model with .generate(), got {type(model).__name__}; "
                "load one first, e.g. guardrails.load('HuggingFaceTB/SmolVLM-256M-Instruct')"
            )
        if isinstance(defenses, Defense):
            raise TypeError("defenses must be a list, e.g. defenses=[SafetySystemPrompt()]")
        self.model = model
        self.processor = processor
        self.engine = Engine(model, processor)
        self.layers_path = layers_path
        self.defenses: list[Defense] = []
        seen: dict[str, int] = {}
        for i, d in enumerate(defenses):
            if isinstance(d, type) and issubclass(d, Defense):
                raise TypeError(f"defenses[{i}] is the class {d.__name__}; pass an instance: {d.__name__}()")
            if not isinstance(d, Defense):
                raise TypeError(f"defenses[{i}] is {type(d).__name__}, not a guardrails Defense")
            if any(d is other for other in self.defenses):
                raise ValueError(f"defenses[{i}] ({d.name}) appears twice; create a second instance to run it twice")
            seen[d.name] = seen.get(d.name, 0) + 1
            if seen[d.name] > 1:
                d.name = f"{d.name}#{seen[d.name]}"
            d.check_model(model, self.engine.multimodal)
            if d.requirements().needs_hidden_states:
                self.decoder_layers()  # fails early, naming the model class, when layers cannot be found
            self.defenses.append(d)
        for d in self.defenses:  # only once every check passed: a failed wrap() binds nothing
            d.bind(model, self.engine)
        self._unwrapped = False
        #: shared by every wrapper around this model object: calls on it are serialised
        self._lock = model_lock(model)

    # -- transparency ------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        # Only reached for attributes GuardedModel lacks: forward them to the model (PEFT style).
        if name in ("model", "__setstate__"):
            raise AttributeError(name)
        return getattr(self.model, name)

    def __repr__(self) -> str:
        names = ", ".join(d.name for d in self.defenses) or "no defenses"
        return f"GuardedModel({type(self.model).__name__}, [{names}])"

    @contextlib.contextmanager
    def disabled(self) -> Iterator[GuardedModel]:
        """Run the bare model inside the block (baselines in the same process); this thread only."""
        token = _DISABLED.set(_DISABLED.get() | {id(self)})
        try:
            yield self
        finally:
            _DISABLED.reset(token)

    @contextlib.contextmanager
    def record(self) -> Iterator[list[CallRecord]]:
        """Collect a :class:`CallRecord` for every call this thread makes on this model in the block.

        >>> with guarded.record() as calls:
        ...     out = guarded.generate(**inputs, max_new_tokens=32)
        >>> calls[0].verdicts[0]     # verdicts of row 0 (generate returns only what model.generate returns)
        """
        log: list[CallRecord] = []
        token = _RECORDERS.set((*_RECORDERS.get(), (self, log)))
        try:
            yield log
        finally:
            _RECORDERS.reset(token)

    def unwrap(self) -> Any:
        """The original model object. Hooks only live for one call, so none is left on it."""
        self._unwrapped = True
        return self.model

    def decoder_layers(self):
        """The language model's decoder layers (``steering.layers.LayerInfo``)."""
        from steering.layers import find_decoder_layers

        return find_decoder_layers(self.model, self.layers_path)

    @property
    def active_defenses(self) -> list[Defense]:
        """The defenses a call made now, from this thread, runs (none inside ``disabled()``)."""
        return [] if id(self) in _DISABLED.get() else list(self.defenses)

    def render(self, conversation: Any) -> str:
        """The prompt string the model gets for ``conversation`` with no defense applied."""
        return self.engine.render([conv_mod.validate(conversation)])[0]

    # -- public calls ------------------------------------------------------------------------
    @overload
    def chat(self, conversations: list[dict[str, Any]], **generate_kwargs: Any) -> GuardedResult: ...

    @overload
    def chat(self, conversations: list[list[dict[str, Any]]], **generate_kwargs: Any) -> list[GuardedResult]: ...

    def chat(self, conversations: Any, **generate_kwargs: Any) -> GuardedResult | list[GuardedResult]:
        """Answer one conversation (-> GuardedResult) or a list (-> one GuardedResult each, one batch)."""
        batch, single = conv_mod.validate_batch(conversations)
        check_generate_kwargs(generate_kwargs)
        check_one_answer_each(generate_kwargs, self.model)
        defenses = self._defenses_for("chat")
        rows = [Row(i, c) for i, c in enumerate(batch)]
        ctx = _exhaust(self._flow(CallContext(self.engine, "chat", rows, dict(generate_kwargs)), defenses, _RECORDERS.get()))
        results = [self._result(r, ctx) for r in rows]
        return results[0] if single else results

    def stream(self, conversation: Any, **generate_kwargs: Any) -> GuardedStream:
        """Text chunks as they are generated, with the same defenses; ``.result`` once exhausted."""
        if (isinstance(conversation, (list, tuple)) and conversation
                and all(isinstance(c, (list, tuple)) for c in conversation)):
            raise TypeError(f"stream() takes one conversation (a list of messages), got a list of {len(conversation)} "
                            "conversations; use chat([...]) for a batch, or one stream() per conversation")
        check_generate_kwargs(generate_kwargs)
        check_one_answer_each(generate_kwargs, self.model)
        return GuardedStream(self, conv_mod.validate(conversation), dict(generate_kwargs), self._defenses_for("stream"),
                             _RECORDERS.get())

    def generate(self, **kwargs: Any) -> Any:
        """Drop-in for ``model.generate``: returns exactly what it returns.

        Only during-generation stages run here (there is no conversation to edit and no text to
        rewrite); their per-row verdicts are recorded for :meth:`record`.
        """
        inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if inputs is None:
            raise ValueError("generate() needs input_ids (or inputs_embeds), as model.generate does")
        check_generate_kwargs(kwargs)
        defenses = self._defenses_for("generate")
        rows = [Row(i, None, batch_index=i) for i in range(inputs.shape[0])]
        ctx = CallContext(self.engine, "generate", rows, {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)})
        ctx.inputs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        ctx.prompt_len = inputs.shape[1]
        return _exhaust(self._flow(ctx, defenses, _RECORDERS.get())).output

    # -- the one core flow -------------------------------------------------------------------
    def _defenses_for(self, mode: str) -> list[Defense]:
        if self._unwrapped:
            raise RuntimeError("this GuardedModel was unwrapped; call wrap(model, ...) again to guard it")
        defenses = self.active_defenses
        for d in defenses:
            d.check_mode(mode)
        return defenses

    def _flow(self, ctx: CallContext, defenses: list[Defense],
              recorders: tuple[tuple[Any, list[CallRecord]], ...]) -> Generator[int, None, CallContext]:
        """before -> encode -> during + generate -> decode -> after. Yields token ids in stream mode.

        The model lock is taken per stage and never held across a yield. ``recorders``: the
        ``record()`` blocks open where the call was made (for a stream: where ``stream()`` was called).
        """
        rows, mode = ctx.rows, ctx.mode
        active = rows
        if mode != "generate":
            with self._lock.hold():
                for d in defenses:
                    d.run_before(ctx)
            active = [r for r in rows if not r.refused]
            for b, r in enumerate(active):
                r.batch_index = b
            if active:
                ctx.inputs = self.engine.encode([r.conv for r in active])
                ctx.prompt_len = ctx.inputs["input_ids"].shape[1]
        if active:
            ctx.stop_flags = torch.zeros(len(active), dtype=torch.bool)
            if mode == "stream":
                ctx.output = yield from self._generate_in_thread(ctx, defenses)
            else:
                ctx.output = self._generate(ctx, defenses)
            if mode != "generate":
                stops = self.engine.stop_token_ids_for(ctx.generate_kwargs)
                for r, g in zip(active, self.engine.generations(ctx.output, ctx.prompt_len, stops)):
                    r.token_ids = g.token_ids
                    if r.refused:  # refused while generating: keep the refusal, record what was generated
                        r.original_text = g.text
                    else:
                        r.text = g.text
            for d in defenses:
                d.finish_during(ctx)
        if mode != "generate":
            with self._lock.hold():
                for d in defenses:
                    d.run_after(ctx)
        for owner, log in recorders:
            if owner is self:
                log.append(CallRecord(mode, [r.verdicts for r in rows], dict(ctx.timings)))
        return ctx

    def _generate(self, ctx: CallContext, defenses: list[Defense], streamer: Any = None) -> Any:
        """The answer's ``generate``, with every defense's during stage installed for exactly this call."""
        with self._lock.hold(), call_scope(ctx), contextlib.ExitStack() as stack:
            for d in defenses:
                stack.enter_context(d.during(ctx))
            kw = dict(ctx.generate_kwargs)
            procs = LogitsProcessorList(kw.pop("logits_processor", None) or [])
            procs.extend(ctx.logits_processors)
            crit = StoppingCriteriaList(kw.pop("stopping_criteria", None) or [])
            crit.extend(ctx.stopping_criteria)
            crit.append(_StepStopper(ctx))  # last, so flags set by other criteria count in the same step
            if procs:
                kw["logits_processor"] = procs
            kw["stopping_criteria"] = crit
            if any(d.requirements().reuses_generation_cache for d in defenses):
                ctx.calls.keep_cache(kw, stack)
            t0 = time.perf_counter()
            if ctx.mode == "generate":
                out = self.model.generate(**ctx.inputs, **kw)  # a drop-in: exactly the caller's options
            else:
                out = self.engine.run_generate(ctx.inputs, kw, streamer)
            ctx.add_time("model.generate", (time.perf_counter() - t0) * 1e3)
        return out

    def _generate_in_thread(self, ctx: CallContext, defenses: list[Defense]) -> Generator[int, None, Any]:
        """Run the generation in a worker thread and yield its tokens; stop it if the consumer leaves.

        The worker owns the model lock and the hooks, and gives both back when generation ends, so a
        consumer that is slow, switches threads or never comes back holds nothing.
        """
        streamer = _QueueStreamer()
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["out"] = self._generate(ctx, defenses, streamer)
            except BaseException as e:  # re-raised in the consumer's thread
                box["error"] = e
            finally:
                streamer.end()

        # The worker runs in a copy of the caller's context: disabled()/record() and the call scope carry over.
        thread = threading.Thread(target=contextvars.copy_context().run, args=(work,), name="guardrails-stream", daemon=True)
        thread.start()
        try:
            while (tok := streamer.queue.get()) is not None:
                yield tok
        finally:
            if thread.is_alive():
                ctx.stop_all()  # the consumer stopped early: end generation now
            thread.join()
        if "error" in box:
            raise box["error"]
        return box["out"]

    def _result(self, row: Row, ctx: CallContext) -> GuardedResult:
        mask, b = ctx.inputs.get("attention_mask"), row.batch_index
        prompt_tokens = 0 if b is None else int(mask[b].sum()) if mask is not None else ctx.prompt_len
        return GuardedResult(
            text=row.text,
            refused=row.refused,
            verdicts=row.verdicts,
            timings=dict(ctx.timings),
            token_ids=row.token_ids,
            original_text=row.original_text,
            conversation=row.conversation,
            prompt_tokens=prompt_tokens,
        )


class _StepStopper(StoppingCriteria):
    """Keeps ``ctx.step`` current and applies the per-row stop flags defenses set."""

    def __init__(self, ctx: CallContext):
        self.ctx = ctx

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.ctx.step = input_ids.shape[1] - self.ctx.prompt_len
        flags = self.ctx.stop_flags
        if input_ids.shape[0] != flags.shape[0] and flags.shape[0] and input_ids.shape[0] % flags.shape[0] == 0:
            # generate()'s num_return_sequences / beams expand each row in place: a stopped row stops all of them.
            flags = flags.repeat_interleave(input_ids.shape[0] // flags.shape[0])
        return flags.to(input_ids.device)


class _QueueStreamer(BaseStreamer):
    """Hands each new token id to the consuming thread; the first put() is the prompt."""

    def __init__(self) -> None:
        self.queue: queue.Queue[int | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(int(value.reshape(-1)[0]))

    def end(self) -> None:
        self.queue.put(None)


class GuardedStream:
    """Iterate for text chunks; ``result`` holds the GuardedResult once the stream is exhausted.

    Text is released as soon as every defense allows it. When an after-stage defense replaced
    text that was already shown, the replacement follows after a blank line and
    ``result.verdicts`` records it (``detail["stream"] == "replaced"``). Closing the iterator (or
    dropping it) stops generation at once.
    """

    def __init__(self, guarded: GuardedModel, conversation: Any, kwargs: dict[str, Any], defenses: list[Defense],
                 recorders: tuple[tuple[Any, list[CallRecord]], ...] = ()):
        self._guarded = guarded
        self._recorders = recorders
        self._conversation = conversation
        self._kwargs = kwargs
        self._defenses = defenses
        self.result: GuardedResult | None = None
        self._started = False

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a stream can be iterated once; call guarded.stream(...) again")
        self._started = True
        return self._run()

    def _releasable(self, ctx: CallContext, row: Row, n: int) -> int:
        return min([d.releasable(ctx, row, n) for d in self._defenses], default=n)

    def _run(self) -> Iterator[str]:
        g = self._guarded
        stops = g.engine.stop_token_ids_for(self._kwargs)
        row = Row(0, self._conversation)
        ctx = CallContext(g.engine, "stream", [row], self._kwargs)
        shown = ""
        flow = g._flow(ctx, self._defenses, self._recorders)
        ids: list[int] = []
        try:
            while True:
                try:
                    tok = next(flow)
                except StopIteration:
                    break
                if tok in stops or row.stopped_at is not None:
                    continue
                ids.append(tok)
                text = g.engine.decode(ids[: self._releasable(ctx, row, len(ids))])
                # A partial multi-byte character decodes to U+FFFD: wait for the rest of it.
                if len(text) > len(shown) and text.startswith(shown) and not text.endswith("\ufffd"):
                    chunk, shown = text[len(shown):], text
                    yield chunk
        finally:
            flow.close()  # consumer left early: stops generation and removes hooks
        final = row.text
        if final.startswith(shown):
            if len(final) > len(shown):
                yield final[len(shown):]
        else:
            for v in row.verdicts:
                if v.action in ("rewrite", "refuse", "regenerate"):
                    v.detail["stream"] = "replaced"
            yield "\n\n" + final
        self.result = g._result(row, ctx)


def _exhaust(flow: Generator[Any, None, CallContext]) -> CallContext:
    while True:
        try:
            next(flow)
        except StopIteration as stop:
            return stop.value
