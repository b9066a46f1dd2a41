"""``wrap()`` and ``GuardedModel``: one core flow behind chat, stream and generate."""

from __future__ import annotations

import contextlib
import math
import numbers
import queue
import threading
import time
from collections.abc import Generator, Iterator, Sequence
from typing import Any

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from guardrails import conversation as conv_mod
from guardrails.defense import CallContext, Defense, Row, _RowStopper
from guardrails.engine import Engine
from guardrails.results import GuardedResult


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
        self._disabled = False
        self._unwrapped = False
        self._lock = threading.RLock()
        self._busy = False
        #: per-row verdicts of the last generate() call (generate returns only what the model returns)
        self.last_verdicts: list[list[Any]] = []

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
        """Run the bare model inside the block (baselines in the same process)."""
        old, self._disabled = self._disabled, True
        try:
            yield self
        finally:
            self._disabled = old

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
        return [] if self._disabled else self.defenses

    def render(self, conversation: Any) -> str:
        """The prompt string the model gets for ``conversation`` with no defense applied."""
        return self.engine.render([conv_mod.validate(conversation)])[0]

    # -- public calls ------------------------------------------------------------------------
    def chat(self, conversations: Any, **generate_kwargs: Any) -> GuardedResult | list[GuardedResult]:
        """Answer one conversation (-> GuardedResult) or a list (-> one GuardedResult each, one batch)."""
        batch, single = conv_mod.validate_batch(conversations)
        check_generate_kwargs(generate_kwargs)
        with self._call("chat"):
            rows = [Row(i, c) for i, c in enumerate(batch)]
            ctx = _exhaust(self._flow(CallContext(self.engine, "chat", rows, dict(generate_kwargs))))
        results = [self._result(r, ctx) for r in rows]
        return results[0] if single else results

    def stream(self, conversation: Any, **generate_kwargs: Any) -> GuardedStream:
        """Text chunks as they are generated, with the same defenses; ``.result`` once exhausted."""
        if (isinstance(conversation, (list, tuple)) and conversation
                and all(isinstance(c, (list, tuple)) for c in conversation)):
            raise TypeError(f"stream() takes one conversation (a list of messages), got a list of {len(conversation)} "
                            "conversations; use chat([...]) for a batch, or one stream() per conversation")
        check_generate_kwargs(generate_kwargs)
        return GuardedStream(self, conv_mod.validate(conversation), generate_kwargs)

    def generate(self, **kwargs: Any) -> Any:
        """Drop-in for ``model.generate``: returns exactly what it returns.

        Only during-generation stages run here (there is no conversation to edit and no text to
        rewrite); their per-row verdicts are in ``last_verdicts``.
        """
        inputs = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
        if inputs is None:
            raise ValueError("generate() needs input_ids (or inputs_embeds), as model.generate does")
        check_generate_kwargs(kwargs)
        with self._call("generate"):
            for d in self.active_defenses:
                d.check_mode("generate")
            rows = [Row(i, None, batch_index=i) for i in range(inputs.shape[0])]
            ctx = CallContext(self.engine, "generate", rows, kwargs)
            ctx.inputs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
            ctx.prompt_len = inputs.shape[1]
            ctx.stop_flags = torch.zeros(len(rows), dtype=torch.bool)
            with contextlib.ExitStack() as stack:
                for d in self.active_defenses:
                    stack.enter_context(d.during(ctx))
                out = self.model.generate(**self._generate_kwargs(ctx, kwargs))
            for d in self.active_defenses:
                d.finish_during(ctx)
            self.last_verdicts = [r.verdicts for r in rows]
            return out

    # -- the one core flow -------------------------------------------------------------------
    @contextlib.contextmanager
    def _call(self, mode: str) -> Iterator[None]:
        if self._unwrapped:
            raise RuntimeError("this GuardedModel was unwrapped; call wrap(model, ...) again to guard it")
        with self._lock:
            if self._busy:
                raise RuntimeError(
                    f"{mode}() was called while another call on this GuardedModel is running in the same thread "
                    "(e.g. inside a stream loop); finish or close the stream first"
                )
            self._busy = True
            try:
                if mode != "generate":
                    for d in self.active_defenses:
                        d.check_mode(mode)
                yield
            finally:
                self._busy = False

    def _generate_kwargs(self, ctx: CallContext, kwargs: dict[str, Any]) -> dict[str, Any]:
        kw = dict(kwargs)
        procs = LogitsProcessorList(kw.pop("logits_processor", None) or [])
        procs.extend(ctx.logits_processors)
        crit = StoppingCriteriaList(kw.pop("stopping_criteria", None) or [])
        crit.extend(ctx.stopping_criteria)
        crit.append(_StepStopper(ctx))  # last, so flags set by other criteria count in the same step
        if procs:
            kw["logits_processor"] = procs
        kw["stopping_criteria"] = crit
        return kw

    def _flow(self, ctx: CallContext) -> Generator[int, None, CallContext]:
        """before -> encode -> during + generate -> decode -> after. Yields token ids in stream mode."""
        defenses, rows, mode = self.active_defenses, ctx.rows, ctx.mode
        for d in defenses:
            d.run_before(ctx)
        active = [r for r in rows if not r.refused]
        if active:
            for b, r in enumerate(active):
                r.batch_index = b
            ctx.inputs = self.engine.encode([r.conversation for r in active])
            ctx.prompt_len = ctx.inputs["input_ids"].shape[1]
            ctx.stop_flags = torch.zeros(len(active), dtype=torch.bool)
            with contextlib.ExitStack() as stack:
                for d in defenses:
                    stack.enter_context(d.during(ctx))
                kw = self._generate_kwargs(ctx, ctx.generate_kwargs)
                kw.setdefault("pad_token_id", self.engine.pad_token_id)
                t0 = time.perf_counter()
                if mode == "stream":
                    sequences = yield from _generate_in_thread(self.model, ctx, kw)
                else:
                    with torch.inference_mode():
                        out = self.model.generate(**ctx.inputs, **kw)
                    sequences = out if isinstance(out, torch.Tensor) else out.sequences
                ctx.add_time("model.generate", (time.perf_counter() - t0) * 1e3)
            stops = self.engine.stop_token_ids_for(ctx.generate_kwargs)
            for r, ids in zip(active, self.engine.split_new_tokens(sequences, ctx.prompt_len, stops)):
                r.token_ids = ids
                if r.refused:  # refused while generating: keep the refusal, record what was generated
                    r.original_text = self.engine.decode(ids)
                else:
                    r.text = self.engine.decode(ids)
            for d in defenses:
                d.finish_during(ctx)
        for d in defenses:
            d.run_after(ctx)
        return ctx

    def _result(self, row: Row, ctx: CallContext) -> GuardedResult:
        return GuardedResult(
            text=row.text,
            refused=row.refused,
            verdicts=row.verdicts,
            timings=dict(ctx.timings),
            token_ids=row.token_ids,
            original_text=row.original_text,
            conversation=row.conversation,
        )

    def _releasable(self, ctx: CallContext, row: Row, n: int) -> int:
        return min([d.releasable(ctx, row, n) for d in self.active_defenses], default=n)


class _StepStopper(_RowStopper):
    """Keeps ``ctx.step`` current and applies the per-row stop flags defenses set."""

    def __init__(self, ctx: CallContext):
        super().__init__(ctx.stop_flags)
        self.ctx = ctx

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.ctx.step = input_ids.shape[1] - self.ctx.prompt_len
        flags = self.ctx.stop_flags
        if input_ids.shape[0] != flags.shape[0] and flags.shape[0] and input_ids.shape[0] % flags.shape[0] == 0:
            # num_return_sequences / beams expand each row in place: a stopped row stops all of them.
            flags = flags.repeat_interleave(input_ids.shape[0] // flags.shape[0])
        return flags.to(input_ids.device)


class _QueueStreamer(BaseStreamer):
    """Hands each new token id to the consuming thread; the first put() is the prompt."""

    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.queue.put(int(value.reshape(-1)[0]))

    def end(self) -> None:
        self.queue.put(None)


def _generate_in_thread(model: Any, ctx: CallContext, kw: dict[str, Any]) -> Generator[int, None, torch.Tensor]:
    """Run generate in a worker thread and yield its tokens; stop it if the consumer leaves."""
    streamer = _QueueStreamer()
    box: dict[str, Any] = {}

    def work() -> None:
        try:
            with torch.inference_mode():
                box["out"] = model.generate(**ctx.inputs, **kw, streamer=streamer)
        except BaseException as e:  # re-raised in the consumer's thread
            box["error"] = e
            streamer.end()

    thread = threading.Thread(target=work, name="guardrails-stream", daemon=True)
    thread.start()
    try:
        while True:
            tok = streamer.queue.get()
            if tok is None:
                break
            yield tok
    finally:
        if thread.is_alive():
            ctx.stop_all()  # the consumer stopped early: end generation before hooks are removed
        thread.join()
    if "error" in box:
        raise box["error"]
    out = box["out"]
    return out if isinstance(out, torch.Tensor) else out.sequences


class GuardedStream:
    """Iterate for text chunks; ``result`` holds the GuardedResult once the stream is exhausted.

    Text is released as soon as every defense allows it. When an after-stage defense replaced
    text that was already shown, the replacement follows after a blank line and
    ``result.verdicts`` records it (``detail["stream"] == "replaced"``).
    """

    def __init__(self, guarded: GuardedModel, conversation: Any, kwargs: dict[str, Any]):
        self._guarded = guarded
        self._conversation = conversation
        self._kwargs = kwargs
        self.result: GuardedResult | None = None
        self._started = False

    def __iter__(self) -> Iterator[str]:
        if self._started:
            raise RuntimeError("a stream can be iterated once; call guarded.stream(...) again")
        self._started = True
        return self._run()

    def _run(self) -> Iterator[str]:
        g = self._guarded
        stops = g.engine.stop_token_ids_for(self._kwargs)
        row = Row(0, self._conversation)
        ctx = CallContext(g.engine, "stream", [row], dict(self._kwargs))
        shown = ""
        with g._call("stream"):
            flow = g._flow(ctx)
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
                    text = g.engine.decode(ids[: g._releasable(ctx, row, len(ids))])
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
