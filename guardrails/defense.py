"""The Defense interface and the per-call context every stage receives.

A defense has up to three stages, always run in this order for every call:

- before generation: edit a row's conversation, or refuse the row so it never reaches the model;
- during generation: install forward hooks, logits processors or stopping criteria that live
  exactly as long as the one ``generate`` call (removed in ``finally``, also on exceptions);
- after generation: inspect, rewrite or regenerate a row's answer.

Subclasses override the protected ``_before`` / ``_during`` / ``_after`` methods. The public
``run_*`` methods are final: they time the stage, pass only live rows, and record one
:class:`Verdict` per row, so no defense can forget to.

The contract every defense keeps:

- Capabilities (hidden states, modalities, streaming, stages) are read only through
  :meth:`Defense.requirements`. Its default reads the class-level ``ClassVar`` s and the overridden
  stage methods; a defense whose needs depend on its arguments overrides that one hook and never
  assigns capability attributes on the instance.
- A row's answer changes only through :class:`Row` methods (``refuse``, ``rewrite``, ``truncate``),
  which keep the model's own answer in ``original_text``. ``_before`` and ``_after`` may call them;
  ``_during_verdicts`` only reports: to refuse a row for something found during generation it
  returns a :class:`Refusal`, and the base class applies ``row.refuse``.
- ``check_model`` only checks and changes nothing; ``bind`` is the one step that attaches a defense
  to the wrapped model, called by ``wrap()`` once every defense's checks have passed.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from guardrails.calls import ModelCalls, active_call, scoped_hook
from guardrails.conversation import Conversation
from guardrails.results import Stage, Verdict

if TYPE_CHECKING:
    from guardrails.engine import Engine

MODES = ("chat", "stream", "generate")
#: class attributes read by Defense.requirements()
_CAPABILITIES = frozenset({"needs_hidden_states", "modalities", "supports_streaming"})


@dataclass
class Row:
    """One conversation's state as it moves through the pipeline."""

    index: int
    #: what the model will see; before-stage defenses replace it with edited copies
    conversation: Conversation | None
    refused: bool = False
    refused_by: str | None = None
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    original_text: str | None = None
    verdicts: list[Verdict] = field(default_factory=list)
    #: position in the generated batch, None when the row was not generated
    batch_index: int | None = None
    #: number of generated tokens when a during-stage defense stopped this row
    stopped_at: int | None = None

    def refuse(self, text: str, by: str) -> None:
        """Answer this row with ``text`` instead of the model; later stages leave it alone."""
        if not self.refused and self.token_ids and self.original_text is None:
            self.original_text = self.text
        self.refused, self.refused_by, self.text = True, by, text

    @property
    def conv(self) -> Conversation:
        """``conversation``, never None: the before/after stages only run on chat/stream rows."""
        if self.conversation is None:
            raise ValueError(f"row {self.index} has no conversation (generate() rows hold only token ids)")
        return self.conversation

    def rewrite(self, text: str) -> None:
        """Replace the answer, keeping the model's own answer in ``original_text``."""
        if self.original_text is None:
            self.original_text = self.text
        self.text = text

    def truncate(self, n_tokens: int, text: str) -> None:
        """Keep the first ``n_tokens`` generated tokens, ``text`` being their decoding; the whole
        answer stays in ``original_text``."""
        if not 0 <= n_tokens <= len(self.token_ids):
            raise ValueError(f"row {self.index}: cannot keep {n_tokens} of {len(self.token_ids)} tokens")
        self.rewrite(text)
        self.token_ids = self.token_ids[:n_tokens]


@dataclass(frozen=True)
class Refusal:
    """What a verdict hook returns to refuse a row: the base class records ``verdict`` and calls
    ``row.refuse(text, by=defense name)``, so hooks never mutate rows themselves."""

    verdict: Verdict
    text: str


@dataclass(frozen=True)
class Requirements:
    """What a defense needs from the model and the call; see :meth:`Defense.requirements`."""

    #: reads or edits decoder-layer activations (``wrap()`` checks the layers can be found)
    needs_hidden_states: bool
    #: model kinds it works with: "text" for text-only models, "image" for VLMs
    modalities: frozenset[str]
    #: False when its after stage must see the whole answer (``stream`` holds text back)
    supports_streaming: bool
    #: the stages that run, in order; a subset of the ones the class overrides
    stages: tuple[Stage, ...]
    #: after-stage model calls with the call's rows (``ctx.calls``) reuse the answer's KV cache,
    #: so the pipeline keeps it; never changes what the answer's ``generate`` computes
    reuses_generation_cache: bool = False


class CallContext:
    """Everything one call's stages share: rows, the engine, the model-call service, and what
    generate will receive. One per call: nothing here is shared with another call."""

    def __init__(self, engine: Engine, mode: str, rows: list[Row], generate_kwargs: dict[str, Any]):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.engine = engine
        #: the one way a defense calls the model (batched, locked, scoped, with KV-cache reuse)
        self.calls = ModelCalls(engine, self) if engine is not None else None
        self.mode = mode
        self.rows = rows
        self.generate_kwargs = generate_kwargs
        self.timings: dict[str, float] = {}
        #: filled before the during stage: the batch as sent to generate
        self.inputs: dict[str, torch.Tensor] = {}
        self.prompt_len = 0
        #: what the answer's ``generate`` returned (``GuardedModel.generate`` returns it as is)
        self.output: Any = None
        self.logits_processors = LogitsProcessorList()
        self.stopping_criteria = StoppingCriteriaList()
        self.stop_flags = torch.zeros(0, dtype=torch.bool)
        #: per-defense scratch space for one call (defense name -> dict)
        self.state: dict[str, dict[str, Any]] = {}
        #: tokens generated so far (prompt excluded), updated by the engine's streamer/step hook
        self.step = 0

    @property
    def active(self) -> list[Row]:
        """Rows in the generated batch, in batch order."""
        return sorted((r for r in self.rows if r.batch_index is not None), key=lambda r: r.batch_index or 0)

    def stop_row(self, row: Row, at: int | None = None) -> None:
        """Stop generating ``row`` now; the other rows continue untouched."""
        if row.batch_index is None:
            raise ValueError(f"row {row.index} is not being generated")
        self.stop_flags[row.batch_index] = True
        if row.stopped_at is None:
            row.stopped_at = self.step if at is None else at

    def stop_all(self) -> None:
        self.stop_flags[:] = True

    def scoped(self, hook: Any) -> Any:
        """``hook`` (a forward hook or pre-hook) acting only while this call runs the model.

        Hooks live on the shared model object: wrap every hook a ``_during`` registers, so another
        wrapper's call, or a plain ``model.generate`` in another thread, passes through untouched.
        """
        return scoped_hook(self, hook)

    def is_active(self) -> bool:
        """True while this call runs the model in the current thread/context."""
        return active_call() is self

    def add_time(self, key: str, ms: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + ms


class Defense:
    """Base class of every defense. Override any of ``_before``, ``_during``, ``_after``.

    Capabilities, declared as class attributes and read (by ``wrap()`` and every stage) only
    through :meth:`requirements`:

    - ``needs_hidden_states``: reads or edits decoder-layer activations (needs layer discovery);
    - ``modalities``: model kinds it works with, {"text"} for text-only models, {"image"} for VLMs;
    - ``supports_streaming``: False when its after stage must see the whole answer; ``stream``
      then holds the text back until the defense has run, and the verdict says so.

    Lifecycle at ``wrap()``: ``check_model`` for every defense (raises, changes nothing), then
    ``bind`` for every defense.
    """

    needs_hidden_states: ClassVar[bool] = False
    modalities: ClassVar[frozenset[str]] = frozenset({"text", "image"})
    supports_streaming: ClassVar[bool] = True

    #: unique within one pipeline; ``wrap()`` suffixes duplicates ("SafetySystemPrompt#2")
    name: str

    def __init__(self, name: str | None = None):
        self.name = name or type(self).__name__

    # -- which stages exist ------------------------------------------------------------------
    def _overrides(self, method: str) -> bool:
        return getattr(type(self), method) is not getattr(Defense, method)

    def requirements(self) -> Requirements:
        """This defense's capabilities: the one hook for them. The default reads the class
        attributes and runs every stage the class overrides; a defense whose needs depend on its
        arguments overrides this (``dataclasses.replace(super().requirements(), ...)``)."""
        shadowed = sorted(_CAPABILITIES & vars(self).keys())
        if shadowed:  # an instance attribute would be a second, undocumented way to declare them
            raise TypeError(f"{self.name} sets {', '.join(shadowed)} on the instance; capabilities are class "
                            "attributes, or override requirements() when they depend on the arguments")
        order: tuple[tuple[Stage, str], ...] = (("before", "_before"), ("during", "_during"), ("after", "_after"))
        stages = tuple(s for s, m in order if self._overrides(m))
        cls = type(self)
        return Requirements(cls.needs_hidden_states, frozenset(cls.modalities), cls.supports_streaming, stages)

    @property
    def stages(self) -> tuple[Stage, ...]:
        return self.requirements().stages

    def check_mode(self, mode: str) -> None:
        """Raise when this defense cannot run in ``mode`` (generate() has no conversation)."""
        if mode == "generate" and {"before", "after"} & set(self.stages):
            raise ValueError(
                f"{self.name} works on the conversation or the decoded answer ({', '.join(self.stages)} stages), "
                "which generate(**inputs) does not have; use chat() or stream(), or remove it for generate()"
            )

    def check_model(self, model: Any, multimodal: bool) -> None:
        """Raise when the model cannot meet this defense's needs; subclasses may add checks.

        Only checks: ``wrap()`` may still fail on a later defense, so nothing is changed here."""
        kind = "image" if multimodal else "text"
        modalities = self.requirements().modalities
        if kind not in modalities:
            what = "an image-text-to-text model" if "image" in modalities else "a text model"
            raise ValueError(f"{self.name} needs {what}; {type(model).__name__} is {'multimodal' if multimodal else 'text-only'}")

    def bind(self, model: Any, engine: Engine) -> None:
        """Attach to the wrapped model (e.g. a probe reading its layers); default: nothing.

        Called once per ``wrap()``, after every defense's ``check_model`` has passed."""

    # -- protected stages: override these ----------------------------------------------------
    def _before(self, ctx: CallContext, rows: list[Row]) -> Sequence[Verdict | Refusal | None] | None:
        """Edit ``row.conversation`` or call ``row.refuse``; return a verdict per row (None = pass; a
        :class:`Refusal` refuses the row, as from ``_during_verdicts``)."""
        raise NotImplementedError

    def _during(self, ctx: CallContext, stack: contextlib.ExitStack) -> None:
        """Install hooks / logits processors / stopping criteria, registering their removal on ``stack``."""
        raise NotImplementedError

    def _during_verdicts(self, ctx: CallContext, rows: list[Row]) -> Sequence[Verdict | Refusal | None] | None:
        """Verdicts for what happened during generation (e.g. a gate decision); None = pass.

        Must not change rows: return a :class:`Refusal` to have the base class refuse one."""
        return None

    def _after(self, ctx: CallContext, rows: list[Row]) -> Sequence[Verdict | None] | None:
        """Inspect ``row.text``; ``row.rewrite``/``row.refuse`` to change it; a verdict per row."""
        raise NotImplementedError

    def _releasable(self, ctx: CallContext, row: Row, n_tokens: int) -> int:
        """How many of the ``n_tokens`` generated so far ``stream`` may show (default: all)."""
        return n_tokens

    # -- public, final ---------------------------------------------------------------------
    def run_before(self, ctx: CallContext) -> None:
        if "before" in self.stages:
            self._run(ctx, "before", self._before, [r for r in ctx.rows if not r.refused])

    @contextlib.contextmanager
    def during(self, ctx: CallContext) -> Iterator[None]:
        """Hooks for exactly one generate call; removed on exit, also on exceptions."""
        if "during" not in self.stages:
            yield
            return
        with contextlib.ExitStack() as stack:
            t0 = time.perf_counter()
            self._during(ctx, stack)
            ctx.add_time(f"{self.name}.during", (time.perf_counter() - t0) * 1e3)
            yield

    def finish_during(self, ctx: CallContext) -> None:
        if "during" in self.stages:
            self._run(ctx, "during", self._during_verdicts, ctx.active if ctx.mode != "generate" else ctx.rows)

    def run_after(self, ctx: CallContext) -> None:
        if "after" in self.stages:
            self._run(ctx, "after", self._after, [r for r in ctx.rows if not r.refused])

    def releasable(self, ctx: CallContext, row: Row, n_tokens: int) -> int:
        req = self.requirements()
        if "after" in req.stages and not req.supports_streaming:
            return 0
        return max(0, min(n_tokens, self._releasable(ctx, row, n_tokens)))

    def _run(self, ctx: CallContext, stage: Stage, fn: Any, rows: list[Row]) -> None:
        t0 = time.perf_counter()
        before = [_answer_of(r) for r in rows] if stage == "during" else None
        got = fn(ctx, rows) if rows else None
        ms = (time.perf_counter() - t0) * 1e3
        if before is not None and before != [_answer_of(r) for r in rows]:
            raise RuntimeError(f"{self.name}._during_verdicts changed a row's answer; return a Refusal instead")
        streaming = self.requirements().supports_streaming
        ctx.add_time(f"{self.name}.{stage}", ms)
        got = [None] * len(rows) if got is None else list(got)
        if len(got) != len(rows):
            raise RuntimeError(f"{self.name}.{stage} returned {len(got)} verdicts for {len(rows)} rows")
        live = {id(r) for r in rows}
        for row, v in zip(rows, got):
            v = v if v is not None else Verdict()
            if isinstance(v, Refusal):
                row.refuse(v.text, by=self.name)
                v = v.verdict
            if not isinstance(v, Verdict):
                raise TypeError(f"{self.name}.{stage} returned {type(v).__name__}; return a Verdict, a Refusal or None")
            v.defense, v.stage, v.latency_ms = self.name, stage, ms
            if stage == "after" and ctx.mode == "stream" and not streaming:
                v.detail.setdefault("stream", "held back until this defense had seen the whole answer")
            row.verdicts.append(v)
        # Rows this stage did not see (refused earlier) still get a verdict saying why.
        for row in ctx.rows:
            if id(row) not in live:
                row.verdicts.append(Verdict(defense=self.name, stage=stage, detail={"skipped": f"refused by {row.refused_by}"}))


def _answer_of(row: Row) -> tuple[Any, ...]:
    """What Row methods may change: compared around hooks that must only report."""
    return row.text, row.refused, row.refused_by, row.original_text, len(row.token_ids)
