"""Protector: a harm detector on the answer plus a detoxifier (MLLM-Protector, Pi et al. 2024,
arXiv 2401.02906; pipilurj/MLLM-protector), after the answer or while it streams.

- ``mode="post"``: after generation, score every answer with ``detector.predict(answers, queries)``;
  P(unsafe) >= ``threshold`` sends the row to the detoxifier. The detector always gets the question
  (their inference code dropped it although the detector was trained with it; DESIGN.md 3.4).
- ``mode="stream"``: during generation, a per-row StoppingCriteria scores every still-running row
  each ``every`` new tokens (one batched call); a row that fires stops at once (only that row: the
  others continue untouched) and goes to the detoxifier after generation. Tokens after the last
  check (the tail) are scored once the answer is complete. ``stream()`` shows only tokens already
  checked safe, so a flagged span is never shown.
- With a :class:`~guardrails.classifiers.hidden_probe.HiddenStateProbe` as detector, both modes read
  the activations of the generation itself (a forward hook at the probe's layer): no extra forward.

What a text detector reads in stream mode (``scan``, ``context``, ``final``). With ``scan="window"``
(the default) each check scores a window: the ``every`` tokens new since the row's previous check plus
the ``context`` tokens before them, decoded, with the question; so a check costs the same at token
2,000 as at token 16 (``scan="prefix"``, the behaviour before, re-read the whole answer so far at
every check: O(answer) per check and O(answer^2) per answer). Windows, not encoder state kept
between checks: the shipped detector is a bidirectional encoder with mean pooling (every token's state
depends on every later token, so there is no state to extend), the interface is text in and P(unsafe)
out for every :class:`HarmClassifier` (keyword judges, guard models, sequence classifiers), and the
encoder truncates at 256 of its tokens, so whole-prefix checks never read past about the first 256
words anyway. A row fires when any one window scores >= ``threshold`` (the maximum over windows), so
a harmful passage in the middle is not diluted by benign text around it. Windows overlap by exactly
``context`` tokens and leave no gap: every answer token is new in exactly one window. The carried
context gives a window the sentence it continues (48 tokens by default: with every=16 a window is 64
answer tokens, about 2-3 sentences; see benchmarks/RESULTS.md for how the choice was measured).
After generation (``final``): ``"answer"`` (default) scores the tail window and the whole answer in
one batched call and flags the row when either fires, so on a completed answer stream mode flags
everything post mode flags, and the whole answer's score covers harm that only a reading longer than
one window shows; the extra cost is post mode's one score, paid after decoding, not during it.
``"windows"`` scores the tail window only (no O(answer) step at all). The verdict's
``detail["scored"]`` says which of these was done, and ``detail["checks"]`` lists every span scored
(``from``/``tokens``: answer tokens [from, tokens)). A HiddenStateProbe ignores the three settings:
its running pool over the generation's activations already costs O(1) per step.

Detoxifier (their "correction model"): a causal LM rewrites the flagged answer given the question
and the answer (prompt ``mllm_protector_detoxify``, their with-question variant); by default the
wrapped model itself (``ctx.calls.generate``), batched over flagged rows only. The rewrite is
screened again by the same detector; still unsafe -> the refusal text. ``detoxifier="refuse"``
answers flagged rows with the refusal text directly.

Verdicts (stage "after", one per row): score (the maximum over everything scored), threshold,
categories, ``detail["fired_at"]`` (answer tokens when it fired), ``detail["generated_after_firing"]``
(tokens generated after the firing check: the stop distance), ``detail["checks"]``, the detoxifier
outcome, and the original answer (also ``GuardedResult.original_text``). In stream mode the "during"
verdict says which rows were stopped and where.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, get_args

import torch
from transformers import StoppingCriteria

import prompts
from guardrails import conversation as conv_mod
from guardrails.calls import ModelCalls
from guardrails.classifiers.base import HarmClassifier, HarmScore
from guardrails.classifiers.hidden_probe import HiddenStateProbe
from guardrails.config import Config
from guardrails.defense import CallContext, Defense, Requirements, Row
from guardrails.results import Action, Verdict, check_threshold

__all__ = ["Protector", "ProtectorConfig", "Detoxifier", "MODES", "SCANS", "FINALS", "DETOX_PROMPT", "stream_windows"]

Mode = Literal["post", "stream"]  # "post": after the answer, "stream": every `every` new tokens
MODES: tuple[str, ...] = get_args(Mode)
Scan = Literal["window", "prefix"]  # what one stream check of a text detector reads
SCANS: tuple[str, ...] = get_args(Scan)
Final = Literal["answer", "windows"]  # what a text detector reads after generation in stream mode
FINALS: tuple[str, ...] = get_args(Final)
DETOX_PROMPT = "mllm_protector_detoxify"
# Generation settings that make sense for a separate model (token ids of the wrapped model's tokenizer do not).
_PORTABLE = ("max_new_tokens", "min_new_tokens", "do_sample", "temperature", "top_p", "top_k", "min_p",
             "num_beams", "repetition_penalty", "no_repeat_ngram_size", "length_penalty")


@dataclass(frozen=True)
class ProtectorConfig(Config):
    """Validated settings; see :class:`Protector`."""

    threshold: float = 0.5
    mode: Mode = "post"
    every: int = 16
    refusal_text: str = field(default_factory=lambda: prompts.render("refusal_default"))
    #: new-token limit of a rewrite; None: the call's own generate settings
    max_new_tokens: int | None = None
    #: stream mode, text detector: "window" scores the tokens new since the previous check plus
    #: ``context`` tokens before them (cost per check independent of the answer's length);
    #: "prefix" scores the whole answer so far at every check (the behaviour before windows)
    scan: Scan = "window"
    #: stream mode, scan="window": already-checked answer tokens carried in front of the new ones
    context: int = 48
    #: stream mode, text detector, after generation: "answer" scores the tail window and the whole
    #: answer (flagged if either fires); "windows" the tail window only
    final: Final = "answer"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_threshold(self.threshold)
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise ValueError(f"every must be a positive int (new tokens between checks in stream mode), got {self.every!r}")
        if isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 0:
            raise ValueError(f"context must be an int >= 0 (answer tokens carried into each stream window before the "
                             f"new ones; 0: new tokens only), got {self.context!r}")
        if not isinstance(self.refusal_text, str) or not self.refusal_text.strip():
            raise ValueError("refusal_text must be a non-empty string (what a row gets when it cannot be repaired)")
        if self.max_new_tokens is not None and (isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int)
                                                or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a positive int or None (None: the call's own), got {self.max_new_tokens!r}")


class Detoxifier:
    """Rewrite flagged answers with a causal LM, given the question and the original answer.

    ``model=None``: the wrapped model itself (no second model). Otherwise a separate causal LM and its
    tokenizer/processor; with a chat template the prompt is the user turn, without one it is a raw
    completion prompt (as MLLM-Protector's detoxifier was trained). No image is given: their
    detoxifier is a text LLM, and the flagged answer is what it must repair.

    >>> Protector(detector, detoxifier=Detoxifier(model, tokenizer, max_new_tokens=128))
    """

    def __init__(self, model: Any = None, processor: Any = None, *, prompt: str = DETOX_PROMPT,
                 max_new_tokens: int | None = None, chat_template: bool | None = None):
        template = prompts.get(prompt)
        if set(template.fields) != {"query", "response"}:
            raise ValueError(f"prompt {prompt!r} takes fields {template.fields}; a detoxifier prompt needs exactly "
                             "{query} and {response} (e.g. 'mllm_protector_detoxify')")
        if model is None and processor is not None:
            raise ValueError("processor given without a model; pass Detoxifier(model, tokenizer) or Detoxifier() for the wrapped model")
        if model is not None:
            if not callable(getattr(model, "generate", None)):
                raise TypeError(f"the detoxifier model must be a transformers model with .generate(), got {type(model).__name__}")
            if processor is None:
                raise ValueError("a separate detoxifier model needs its tokenizer or processor: Detoxifier(model, tokenizer)")
        if max_new_tokens is not None and (isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a positive int or None, got {max_new_tokens!r}")
        if chat_template not in (None, True, False):
            raise TypeError(f"chat_template must be None (auto), True or False, got {chat_template!r}")
        self.model, self.processor, self.prompt = model, processor, prompt
        self.max_new_tokens, self.chat_template = max_new_tokens, chat_template
        self._engine: Any = None
        if model is not None:
            from guardrails.engine import Engine

            self._engine = Engine(model, processor)

    @property
    def kind(self) -> str:
        return "self" if self.model is None else "model"

    @classmethod
    def from_pretrained(cls, path: str, **options: Any) -> Detoxifier:
        """A separate causal LM from a local folder (no hub access)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(f"detoxifier={path!r} is not a folder; give 'self', 'refuse' or a saved causal LM folder")
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
        return cls(model, AutoTokenizer.from_pretrained(path, local_files_only=True), **options)

    def describe(self) -> dict[str, Any]:
        name = "wrapped model" if self.model is None else str(getattr(getattr(self.model, "config", None), "_name_or_path", "") or type(self.model).__name__)
        return {"kind": self.kind, "model": name, "prompt": self.prompt}

    def render(self, queries: list[str], answers: list[str]) -> list[str]:
        """The detoxifier prompt of each row (question and original answer filled in)."""
        return [prompts.render(self.prompt, query=q, response=a) for q, a in zip(queries, answers)]

    def rewrite(self, calls: ModelCalls, queries: list[str], answers: list[str]) -> list[str]:
        """One batched generation over the given rows; ``calls`` is the call's (the wrapped model: kind 'self')."""
        if not answers:
            return []
        texts = self.render(queries, answers)
        if self.model is None:
            target, kw = calls, {}  # the wrapped model inherits the call's options
        else:
            call_kw = calls.ctx.generate_kwargs if calls.ctx is not None else {}
            target, kw = ModelCalls(self._engine), {k: v for k, v in call_kw.items() if k in _PORTABLE}
        kw["max_new_tokens"] = self.max_new_tokens  # None keeps the call's limit
        eng = target.engine
        has_template = bool(getattr(eng.processor, "chat_template", None) or getattr(eng.tokenizer, "chat_template", None))
        if self.chat_template is True and not has_template:
            raise ValueError("chat_template=True but the detoxifier's tokenizer has no chat template")
        if self.chat_template is not False and has_template:
            convs = [conv_mod.validate([{"role": "user", "content": t}]) for t in texts]
            return [g.text for g in target.generate(convs, **kw)]
        return [g.text for g in target.generate_texts(texts, **kw)]


def window_start(checked: int, scan: str, context: int) -> int:
    """First answer token of the next window of a row whose tokens up to ``checked`` were scored."""
    return 0 if scan == "prefix" else max(0, checked - context)


def stream_windows(n_tokens: int, every: int, scan: str = "window", context: int = ProtectorConfig.context) -> list[tuple[int, int]]:
    """The spans ``[from, to)`` of answer tokens that stream checks score for an answer of ``n_tokens``
    that ran to its end: one per check, then the tail (if any tokens are left). Without ``final``'s
    whole-answer score.

    >>> stream_windows(40, every=16, context=4)
    [(0, 16), (12, 32), (28, 40)]
    """
    out, checked = [], 0
    for end in [*range(every, n_tokens + 1, every), n_tokens]:
        if end > checked:
            out.append((window_start(checked, scan, context), end))
            checked = end
    return out


def _b(row: Row) -> int:
    """``row.batch_index``, set on every row the during and after stages see (the generated ones)."""
    if row.batch_index is None:
        raise ValueError(f"row {row.index} is not in the generated batch")
    return row.batch_index


@dataclass
class _CallState:
    """One call's streaming state, per batch row (shared with the stream consumer thread)."""

    rows: list[Row]
    queries: list[str]
    checked: list[int]
    fired_at: list[int | None]
    fired: list[HarmScore | None]
    checks: list[list[dict[str, Any]]]
    fired_mask: torch.Tensor
    #: rows seen to have ended (an EOS or padding token) by a text check
    ended: list[bool] = field(default_factory=list)
    capture: Any = None
    #: the text detector's scorer for this call (``HarmClassifier.for_call``)
    detector: HarmClassifier | None = None
    check_ms: float = 0.0
    n_checks: int = 0


class _Scorer(Protocol):
    """How Protector scores answers: the text detector on decoded text, or the probe on activations."""

    #: True when it must see every generate step (not only every ``every`` tokens)
    every_step: bool

    def start(self, ctx: CallContext, stack: contextlib.ExitStack, st: _CallState) -> dict[str, Any] | None:
        """Set up one call (hooks removed by ``stack``); returns what the post-mode during verdict records."""

    def step(self, st: _CallState, input_ids: torch.Tensor) -> None:
        """Called after every generate step, before any check."""

    def partial(self, ctx: CallContext, st: _CallState, cand: list[int], input_ids: torch.Tensor
                ) -> tuple[list[int], list[HarmScore], list[int]]:
        """Score the partial answers of batch rows ``cand`` still answering: (rows scored, their scores,
        the first answer token each score read)."""

    def score(self, ctx: CallContext, st: _CallState, rows: list[Row], texts: list[str], own: bool) -> tuple[list[HarmScore], list[str]]:
        """Score complete answers ``texts`` of ``rows``; ``own``: they are the rows' generated answers.
        Returns the scores and, per row, what they were computed from."""


class _TextScorer:
    """``detector.predict(texts, queries)`` on decoded answer text: a window per check (or the prefix)."""

    every_step = False

    def __init__(self, detector: HarmClassifier, owner: Protector):
        self.detector, self.owner = detector, owner  # the owner's config is read per call (it may be replaced)

    def start(self, ctx: CallContext, stack: contextlib.ExitStack, st: _CallState) -> dict[str, Any] | None:
        st.detector = self.detector.for_call()
        return None

    def step(self, st: _CallState, input_ids: torch.Tensor) -> None:
        pass

    @staticmethod
    def _predict(st: _CallState, texts: list[str], queries: list[str]) -> list[HarmScore]:
        if st.detector is None:
            raise RuntimeError("Protector: the call's detector is set by start(), which did not run")
        return st.detector.predict(texts, queries)

    def partial(self, ctx: CallContext, st: _CallState, cand: list[int], input_ids: torch.Tensor
                ) -> tuple[list[int], list[HarmScore], list[int]]:
        cfg = self.owner.config
        stops = ctx.engine.stop_token_ids
        rows, starts, texts = [], [], []
        for b in cand:
            if st.ended[b]:
                continue
            start = window_start(st.checked[b], cfg.scan, cfg.context)
            # Only the window is read: tokens before it were read by earlier checks (an end seen there set `ended`).
            ids = input_ids[b, ctx.prompt_len + start:].tolist()
            if stops.intersection(ids[st.checked[b] - start:]):
                st.ended[b] = True  # finished: its tail is checked after generation
                continue
            rows.append(b)
            starts.append(start)
            texts.append(ctx.engine.decode(ids))
        return rows, (self._predict(st, texts, [st.queries[b] for b in rows]) if rows else []), starts

    def score(self, ctx: CallContext, st: _CallState, rows: list[Row], texts: list[str], own: bool) -> tuple[list[HarmScore], list[str]]:
        return self._predict(st, texts, [st.queries[_b(r)] for r in rows]), ["text"] * len(rows)


class _ProbeScorer:
    """A HiddenStateProbe reading the generation's own activations (a forward hook at its layer)."""

    every_step = True  # the capture pools every answer position

    def __init__(self, probe: HiddenStateProbe, owner: Defense):
        self.probe, self.owner = probe, owner  # the owner's name may change at wrap() ("Protector#2")

    def start(self, ctx: CallContext, stack: contextlib.ExitStack, st: _CallState) -> dict[str, Any] | None:
        if self.probe.model is not ctx.engine.model:
            raise ValueError(f"{self.owner.name}: the HiddenStateProbe is bound to another model than the wrapped one")
        st.capture = stack.enter_context(self.probe.capture(len(st.rows), ctx.engine.stop_token_ids, scope=ctx))
        return {"capture": f"{self.probe.layer_desc} ({self.probe.config.pooling} pooling)"}

    def step(self, st: _CallState, input_ids: torch.Tensor) -> None:
        if bool(st.fired_mask.any()):
            st.capture.stop(st.fired_mask)  # rows a check stopped add no more positions to their pool
        st.capture.observe(input_ids)

    def partial(self, ctx: CallContext, st: _CallState, cand: list[int], input_ids: torch.Tensor
                ) -> tuple[list[int], list[HarmScore], list[int]]:
        alive = st.capture.alive.cpu().tolist()
        cand = [b for b in cand if alive[b]]
        if not cand:
            return [], [], []
        feats, counts = st.capture.pooled(self.probe.config.pooling)
        idx = torch.tensor(cand, device=feats.device)
        return cand, self.probe.score_pooled(feats[idx], counts[idx]), [0] * len(cand)  # its pool spans the whole answer

    def score(self, ctx: CallContext, st: _CallState, rows: list[Row], texts: list[str], own: bool) -> tuple[list[HarmScore], list[str]]:
        """Reuses the generation's activations where they match the answer; teacher-forces the rest."""
        if not own:
            return self.probe.score_conversations([r.conversation for r in rows], texts, engine=ctx.calls), ["teacher-forced"] * len(rows)
        feats, counts = st.capture.pooled(self.probe.config.pooling)
        out: list[HarmScore | None] = [None] * len(rows)
        how = [""] * len(rows)
        redo = []
        for i, r in enumerate(rows):
            b = _b(r)
            if r.original_text is None and int(counts[b]) == len(r.token_ids):
                out[i] = self.probe.score_pooled(feats[b:b + 1], counts[b:b + 1])[0]
                how[i] = "generation activations (no extra forward)"
            else:
                redo.append(i)
                how[i] = ("teacher-forced: an earlier defense changed the answer" if r.original_text is not None else
                          f"teacher-forced: the hook saw {int(counts[b])} answer positions for {len(r.token_ids)} tokens")
        if redo:
            got = self.probe.score_conversations([rows[i].conversation for i in redo], [texts[i] for i in redo], engine=ctx.calls)
            for i, s in zip(redo, got):
                out[i] = s
        return out, how  # type: ignore[return-value]


class _Criterion(StoppingCriteria):
    """Per-step: feed the scorer; every ``every`` tokens: score running rows, stop those that fire."""

    def __init__(self, protector: Protector, ctx: CallContext, st: _CallState):
        self.protector, self.ctx, self.st = protector, ctx, st

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        st = self.st
        self.protector._scorer.step(st, input_ids)
        n = input_ids.shape[1] - self.ctx.prompt_len
        if self.protector.config.mode == "stream" and n > 0 and n % self.protector.config.every == 0:
            self.protector._check(self.ctx, st, input_ids, n)
        return st.fired_mask.to(input_ids.device)


class Protector(Defense):
    """Harm detector + detoxifier, after the answer (``mode="post"``) or while it streams (``"stream"``).

    >>> guarded = wrap(model, processor, defenses=[Protector(detector, mode="stream", every=16)])
    >>> r = guarded.chat(conversation, max_new_tokens=256)
    >>> v = r.verdicts_of("Protector")[-1]; v.score, v.detail["fired_at"], v.detail["detoxifier"]

    ``detector``: any :class:`HarmClassifier` (P(unsafe) from answer + question), or a
    :class:`HiddenStateProbe` on the wrapped model (reads the generation's own activations).
    ``detoxifier``: "self" (the wrapped model rewrites), "refuse" (the refusal text), or a
    :class:`Detoxifier` with a separate model. ``refusal_text``: the fallback answer.
    ``max_new_tokens``: limit of a rewrite (default: the call's). Stream mode with a text detector:
    ``scan`` ("window": new tokens plus ``context`` tokens before them per check; "prefix": the whole
    answer so far), ``context`` (48), ``final`` ("answer": tail window and whole answer after
    generation; "windows": tail window only); see the module docstring.
    """

    supports_streaming: ClassVar[bool] = True  # stream() shows only tokens the detector has passed

    def __init__(self, detector: HarmClassifier, detoxifier: str | Detoxifier = "self",
                 threshold: float = ProtectorConfig.threshold, mode: Mode = ProtectorConfig.mode,
                 every: int = ProtectorConfig.every, refusal_text: str | None = None, *,
                 max_new_tokens: int | None = ProtectorConfig.max_new_tokens, scan: Scan = ProtectorConfig.scan,
                 context: int = ProtectorConfig.context, final: Final = ProtectorConfig.final, name: str | None = None):
        super().__init__(name)
        if isinstance(detector, type):
            raise TypeError(f"detector is the class {detector.__name__}; pass an instance")
        if not isinstance(detector, HarmClassifier):
            raise TypeError(f"detector must be a guardrails.classifiers.HarmClassifier (P(unsafe) per answer), got {type(detector).__name__}")
        if isinstance(detector, HiddenStateProbe) and detector.head is None:
            raise ValueError("the HiddenStateProbe has no head: fit it (probe.fit(...)) or load one (HiddenStateProbe.load(dir))")
        cfg = {} if refusal_text is None else {"refusal_text": refusal_text}
        self.config = ProtectorConfig(threshold=threshold, mode=mode, every=every, max_new_tokens=max_new_tokens, scan=scan,
                                      context=context, final=final, **cfg)
        if isinstance(detoxifier, str):
            if detoxifier not in ("self", "refuse"):
                raise ValueError(f"detoxifier must be 'self', 'refuse' or a Detoxifier, got {detoxifier!r} "
                                 "(from a spec string a folder path loads a separate causal LM)")
            detoxifier = Detoxifier(max_new_tokens=max_new_tokens) if detoxifier == "self" else "refuse"
        elif not isinstance(detoxifier, Detoxifier):
            raise TypeError(f"detoxifier must be 'self', 'refuse' or a Detoxifier, got {type(detoxifier).__name__}")
        self.detector = detector
        self.detoxifier: Detoxifier | str = detoxifier
        self.probe: HiddenStateProbe | None = detector if isinstance(detector, HiddenStateProbe) else None
        self._scorer: _Scorer = _TextScorer(detector, self) if self.probe is None else _ProbeScorer(self.probe, self)

    @classmethod
    def from_spec(cls, detector: str = "default", **options: Any) -> Protector:
        """Spec options: ``detector=default|DIR`` (a saved probe folder), ``mode=post|stream``, ``every=16``,
        ``threshold=0.5``, ``detoxifier=self|refuse|DIR`` (a local causal LM), ``refusal_text=...``,
        ``max_new_tokens=128``, ``scan=window|prefix``, ``context=48``, ``final=answer|windows``.

        >>> build_defenses("protector:mode=stream,every=16,detector=runs/probe")
        """
        det = load_detector(str(detector))
        # Only the options given go on, so the defaults stay those of __init__ and ProtectorConfig.
        detox = options.get("detoxifier")
        if detox is not None and detox not in ("self", "refuse"):
            options["detoxifier"] = Detoxifier.from_pretrained(str(detox), max_new_tokens=options.get("max_new_tokens"))
        return cls(det, **options)

    # -- wrap time -------------------------------------------------------------------------------
    def requirements(self) -> Requirements:
        # A HiddenStateProbe reads the wrapped model's activations: wrap() must find its decoder layers.
        return dataclasses.replace(super().requirements(), needs_hidden_states=self.probe is not None)

    def check_model(self, model: Any, multimodal: bool) -> None:
        """A HiddenStateProbe must fit the wrapped model (hidden size and layer count) or be bound to it."""
        super().check_model(model, multimodal)
        if self.probe is None:
            return
        if self.probe.model is None:
            self.probe.check(model)
        elif self.probe.model is not model:
            raise ValueError(f"{self.name}: the HiddenStateProbe is bound to another model object than the one being "
                             "wrapped; it reads the wrapped model's own activations. Load it unbound "
                             "(HiddenStateProbe.load(dir)) or bind it: probe.bind(model, processor)")

    def bind(self, model: Any, engine: Any) -> None:
        """Bind an unbound HiddenStateProbe to the wrapped model."""
        if self.probe is not None and self.probe.model is None:
            self.probe.bind(model)

    # -- during: the per-row stopping criterion (and the probe's hook) ---------------------------
    def _during(self, ctx: CallContext, stack: contextlib.ExitStack) -> None:
        rows = ctx.active
        n = len(rows)
        st = _CallState(rows=rows, queries=[conv_mod.last_user_text(r.conv) for r in rows], checked=[0] * n,
                        fired_at=[None] * n, fired=[None] * n, checks=[[] for _ in range(n)],
                        fired_mask=torch.zeros(n, dtype=torch.bool), ended=[False] * n)
        ctx.state[self.name] = {"call": st}
        if self.config.mode == "stream":
            eos = ctx.generate_kwargs.get("eos_token_id", getattr(ctx.engine.model.generation_config, "eos_token_id", None))
            if eos is None:
                raise ValueError(f"{self.name}: stream mode stops single rows, which transformers only does when an "
                                 "eos_token_id is set (finished rows are then padded); pass eos_token_id=... to the call "
                                 "or set model.generation_config.eos_token_id")
        ctx.state[self.name]["note"] = self._scorer.start(ctx, stack, st)
        if self.config.mode == "stream" or self._scorer.every_step:
            ctx.stopping_criteria.append(_Criterion(self, ctx, st))

    def _check(self, ctx: CallContext, st: _CallState, input_ids: torch.Tensor, n: int) -> None:
        """Score every row still answering at ``n`` tokens (one batched call); stop the rows that fire."""
        t0 = time.perf_counter()
        cand = [b for b in range(len(st.rows)) if st.fired_at[b] is None and not bool(ctx.stop_flags[b])]
        cand, scores, starts = self._scorer.partial(ctx, st, cand, input_ids)
        thr = self.config.threshold
        for b, s, start in zip(cand, scores, starts):
            st.checks[b].append({"from": start, "tokens": n, "score": float(s.score)})
            if s.score >= thr:
                st.fired_at[b], st.fired[b] = n, s
                st.fired_mask[b] = True
                ctx.stop_row(st.rows[b], at=n)
            else:
                st.checked[b] = n  # read by stream(): these tokens may now be shown
        ms = (time.perf_counter() - t0) * 1e3
        st.check_ms += ms
        st.n_checks += 1
        ctx.add_time(f"{self.name}.checks", ms)

    def _releasable(self, ctx: CallContext, row: Row, n_tokens: int) -> int:
        if self.config.mode == "post":
            return 0  # the whole answer is scored after generation: nothing is shown before
        st = ctx.state.get(self.name, {}).get("call")
        if st is None or row.batch_index is None:
            return 0
        return st.checked[row.batch_index]

    def _during_verdicts(self, ctx: CallContext, rows: list[Row]) -> list[Verdict | None] | None:
        st: _CallState = ctx.state[self.name]["call"]
        if self.config.mode != "stream":
            note = ctx.state[self.name]["note"]
            return None if note is None else [Verdict(stage="during", detail=dict(note)) for _ in rows]
        out: list[Verdict | None] = []
        for row in rows:
            b = _b(row)
            s = st.fired[b]
            top = max((c["score"] for c in st.checks[b]), default=None)
            out.append(Verdict(
                stage="during", flagged=s is not None, score=s.score if s is not None else top,
                threshold=self.config.threshold, action="stop" if s is not None else "pass",
                categories=list(s.categories) if s is not None else [],
                detail={"fired_at": st.fired_at[b], "checks": list(st.checks[b]), "every": self.config.every,
                        "scored": self._scored(), "checks_ms_total": st.check_ms, "n_check_calls": st.n_checks},
            ))
        return out

    def _scored(self) -> str:
        """What this configuration scores, in words (``detail["scored"]``)."""
        cfg = self.config
        if self.probe is not None:
            what = "the probe on the answer's activations pooled from its first token"
            return what + (f", every {cfg.every} tokens and at the end" if cfg.mode == "stream" else ", after generation")
        if cfg.mode == "post":
            return "the whole answer with the question, after generation"
        if cfg.scan == "prefix":
            return (f"the whole answer so far every {cfg.every} tokens (scan='prefix'), and the whole answer after "
                    "generation when tokens were left unchecked")
        end = "the tail window and the whole answer" if cfg.final == "answer" else "the tail window only (final='windows')"
        return (f"windows: the {cfg.every} new tokens of each check plus up to {cfg.context} tokens before them; "
                f"after generation {end}; flagged when any score >= threshold")

    # -- after: final scores, detoxify, re-screen ------------------------------------------------
    def _final_spans(self, ctx: CallContext, st: _CallState, r: Row) -> list[tuple[int, str, str]]:
        """What is left to score of a completed, unstopped row: (first answer token, text, scope) per span."""
        cfg, b, n = self.config, _b(r), len(r.token_ids)
        if cfg.mode == "post" or r.original_text is not None:
            return [(0, r.text, "answer")]  # changed by an earlier defense: the windows did not see this text
        if self.probe is not None or cfg.scan == "prefix":
            return [] if 0 < n == st.checked[b] else [(0, r.text, "answer")]  # the last check read it all
        spans: list[tuple[int, str, str]] = []
        start = window_start(st.checked[b], cfg.scan, cfg.context)
        if n > st.checked[b] or n == 0:  # the tail: tokens after the last check
            if start == 0:
                return [(0, r.text, "answer")]  # the tail window is the whole answer
            spans.append((start, ctx.engine.decode(r.token_ids[start:]), "tail"))
        last_from = next((c.get("from", 0) for c in reversed(st.checks[b])), None)
        if cfg.final == "answer" and not (not spans and last_from == 0):  # (a last window from token 0 read it all)
            spans.append((0, r.text, "answer"))
        return spans

    def _after(self, ctx: CallContext, rows: list[Row]) -> list[Verdict]:
        cfg = self.config
        st: _CallState = ctx.state[self.name]["call"]
        stream = cfg.mode == "stream"
        flagged: dict[int, HarmScore] = {}
        where: dict[int, str] = {}
        notes: dict[int, dict[str, Any]] = {id(r): {} for r in rows}
        todo_rows: list[Row] = []
        todo: list[tuple[int, str, str]] = []
        s: HarmScore | None
        for r in rows:
            b = _b(r)
            n = st.fired_at[b]
            if stream and n is not None and r.original_text is None:
                notes[id(r)]["generated_after_firing"] = len(r.token_ids) - n  # the stop distance
                if len(r.token_ids) > n:  # transformers kept generating the row (no EOS criterion): cut it here
                    notes[id(r)]["truncated_from"] = len(r.token_ids)
                    r.truncate(n, ctx.engine.decode(r.token_ids[:n]))
                flagged[id(r)], where[id(r)] = st.fired[b], "during"  # type: ignore[assignment]
                continue
            for span in self._final_spans(ctx, st, r):
                todo_rows.append(r)
                todo.append(span)
        t0 = time.perf_counter()
        scores, how = self._scorer.score(ctx, st, todo_rows, [t for _, t, _ in todo], own=True) if todo else ([], [])
        final_ms = (time.perf_counter() - t0) * 1e3
        best: dict[int, HarmScore] = {}
        for r, (start, _, scope), got, h in zip(todo_rows, todo, scores, how):
            st.checks[_b(r)].append({"from": start, "tokens": len(r.token_ids), "score": float(got.score), "stage": "after",
                                     "scope": scope})
            notes[id(r)]["final_score_from"] = h
            if id(r) not in best or got.score > best[id(r)].score:
                best[id(r)] = got
        for r in rows:
            s = best.get(id(r))
            if s is not None and s.score >= cfg.threshold:
                flagged[id(r)], where[id(r)] = s, "after"

        detox = self._detoxify(ctx, st, [r for r in rows if id(r) in flagged])
        out = []
        for r in rows:
            b = _b(r)
            checks = st.checks[b]
            s = flagged.get(id(r))
            detail: dict[str, Any] = {
                "mode": cfg.mode,
                "detector": self.detector.describe(),
                "checks": checks,
                "fired_at": (st.fired_at[b] if where.get(id(r)) == "during" else len(r.token_ids)) if s is not None else None,
                "fired_in": where.get(id(r)),
                "n_tokens": len(r.token_ids),
                "scored": self._scored(),
                "final_score_ms": final_ms,
                **notes[id(r)],
            }
            if stream:
                detail.update(every=cfg.every, stopped_at=r.stopped_at, checked_tokens=st.checked[b])
                if self.probe is None:
                    detail.update(scan=cfg.scan, context=cfg.context, final=cfg.final)
            elif ctx.mode == "stream":
                detail["stream"] = "held back until the whole answer was scored (mode='post')"
            action: Action = "pass"
            if s is not None:
                info = detox[id(r)]
                detail["detoxifier"] = info
                detail["original_text"] = r.text
                if info["outcome"] == "rewritten":
                    r.rewrite(info["rewrite"])
                    action = "rewrite"
                else:
                    r.refuse(cfg.refusal_text, by=self.name)
                    action = "refuse"
            score = s.score if s is not None else max((c["score"] for c in checks), default=None)
            out.append(Verdict(stage="after", flagged=s is not None, score=score, threshold=cfg.threshold, action=action,
                               categories=list(s.categories) if s is not None else [], detail=detail))
        return out

    def _detoxify(self, ctx: CallContext, st: _CallState, rows: list[Row]) -> dict[int, dict[str, Any]]:
        """Per flagged row: the detoxifier's outcome ("rewritten" with the text, or why it was refused)."""
        if not rows:
            return {}
        if self.detoxifier == "refuse":
            return {id(r): {"kind": "refuse", "outcome": "refused (detoxifier='refuse')"} for r in rows}
        d: Detoxifier = self.detoxifier  # type: ignore[assignment]
        queries = [st.queries[_b(r)] for r in rows]
        t0 = time.perf_counter()
        texts = d.rewrite(ctx.calls, queries, [r.text for r in rows])
        rewrite_ms = (time.perf_counter() - t0) * 1e3
        if len(texts) != len(rows):
            raise RuntimeError(f"the detoxifier returned {len(texts)} rewrites for {len(rows)} answers")
        t0 = time.perf_counter()
        live = [i for i, t in enumerate(texts) if t.strip()]
        rescreen = self._scorer.score(ctx, st, [rows[i] for i in live], [texts[i] for i in live], own=False)[0] if live else []
        rescreen_ms = (time.perf_counter() - t0) * 1e3
        by_row = dict(zip(live, rescreen))
        out = {}
        for i, (r, t) in enumerate(zip(rows, texts)):
            info: dict[str, Any] = {**d.describe(), "rewrite": t, "rewrite_ms": rewrite_ms, "rescreen_ms": rescreen_ms}
            s = by_row.get(i)
            if s is None:
                info["outcome"] = "refused (empty rewrite)"
            else:
                info["rescreen_score"] = float(s.score)
                info["outcome"] = "rewritten" if s.score < self.config.threshold else "refused (rewrite still unsafe)"
            out[id(r)] = info
        return out


def load_detector(spec: str) -> HarmClassifier:
    """A detector from a spec value: ``default`` (the shipped detector) or a saved probe folder."""
    import guardrails.classifiers as classifiers

    if spec == "default":
        loader = getattr(classifiers, "load_default_detector", None)
        if loader is None:
            raise ValueError("detector=default needs guardrails.classifiers.load_default_detector, which this installation "
                             "does not have; pass detector=DIR (a folder written by a probe's save())")
        return loader()
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"detector={spec!r} is neither 'default' nor a folder; pass a folder written by "
                         "`python -m guardrails train-detector` or by a probe's save()")
    from guardrails.classifiers.embedding import read_manifest
    from guardrails.classifiers.hidden_probe import KIND

    kind = read_manifest(path).get("kind")
    if kind == KIND:
        return HiddenStateProbe.load(path)  # bound to the wrapped model by Protector.bind
    loader = getattr(classifiers, "load_detector", None)
    if loader is None:
        raise ValueError(f"{spec} holds a {kind!r}; this installation loads only {KIND!r} folders here "
                         "(guardrails.classifiers.load_detector is missing); build the Protector in Python instead")
    return loader(path)
