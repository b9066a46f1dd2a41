"""OCRScreen: read the text inside a conversation's images and screen it (typographic attacks).

FigStep and MM-SafetyBench put the harmful instruction in the image as text, where the model's
text-side alignment never sees it. Three ways to bring it back (Gong et al. 2023, arXiv 2311.05608):

- ``"classify"``: a :class:`HarmClassifier` scores the image text with the user's text; a flagged
  row is refused before generation and never reaches the model;
- ``"reveal"``: the image text is written into the user turn ("The image contains the text: ..."),
  so the model's own alignment judges it; no classifier needed;
- ``"gate"``: the wrapped model's own harmfulness direction (an InferAligner :class:`steering.Gate`)
  scores the image text as if it had been typed.

With ``overlap=True`` (classify and gate) OCR runs in a worker thread while the model already
generates; a row found harmful is stopped and refused, and ``stream`` shows nothing of a row until
its screen has passed, so benign inputs pay almost nothing and harmful text is never shown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import StoppingCriteria

import prompts
from guardrails import conversation as conv_mod
from guardrails.calls import ModelCalls
from guardrails.classifiers.base import HarmClassifier
from guardrails.config import Config
from guardrails.defense import CallContext, Defense, Refusal, Requirements, Row
from guardrails.results import Action, Verdict, check_threshold

Mode = Literal["classify", "reveal", "gate"]


@dataclass
class ScreenResult:
    """One input's screen: the OCR text, the score and whether it was flagged."""

    flagged: bool
    score: float | None
    ocr_text: str
    latency_ms: float
    ocr_ms: float
    detail: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"flagged": self.flagged, "score": self.score, "ocr_text": self.ocr_text, "latency_ms": round(self.latency_ms, 2)}


@dataclass(frozen=True)
class OCRScreenConfig(Config):
    """Validated settings; see :class:`OCRScreen`. ``engine``: an OCR engine name or a ``guardrails.ocr.OCREngine``."""

    mode: Mode = "classify"
    threshold: float = 0.5
    engine: Any = "auto"
    overlap: bool = False
    refusal_text: str = field(default_factory=lambda: prompts.render("refusal_default"))
    min_chars: int = 3
    # Off by default, measured: the default detector scores FigStep's own benign typed prompt
    # 0.971, so judging image text + typed text flagged 98% of benign typographic images
    # (benchmarks/ocr_detection.py). Typed text is a prompt classifier's job; this screen
    # judges what only OCR can see.
    with_user_text: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "overlap", bool(self.overlap))
        object.__setattr__(self, "with_user_text", bool(self.with_user_text))
        if self.overlap and self.mode == "reveal":
            raise ValueError("overlap=True cannot apply to mode='reveal': the revealed text must be in the prompt before generation")
        object.__setattr__(self, "threshold", check_threshold(self.threshold))
        from guardrails.ocr.engines import ENGINES

        # Checked now: a wrong name must not surface only at the first image, row after row.
        if isinstance(self.engine, str) and self.engine.lower() not in ("auto", *ENGINES):
            raise ValueError(f"unknown OCR engine {self.engine!r}; choose one of {['auto', *ENGINES]}")
        if not isinstance(self.engine, str) and not callable(getattr(self.engine, "read_all", None)):
            raise TypeError(f"engine must be an OCR engine name or a guardrails.ocr.OCREngine, got {type(self.engine).__name__}")
        if isinstance(self.min_chars, bool) or not isinstance(self.min_chars, int) or self.min_chars < 0:
            raise ValueError(f"min_chars must be an int >= 0 (image text shorter than this is ignored), got {self.min_chars!r}")
        if not isinstance(self.refusal_text, str) or not self.refusal_text.strip():
            raise ValueError("refusal_text must be a non-empty string (what a flagged row gets)")


def screen_text(ocr_text: str, user_text: str) -> str:
    """What the classifier judges: the image text as the instruction, then the typed text."""
    return f"{ocr_text}\n{user_text}".strip() if ocr_text else user_text


class OCRScreen(Defense):
    """Screen text inside images. See the module docstring for the three modes.

    >>> OCRScreen("classify")                     # default detector, threshold 0.5
    >>> OCRScreen("reveal")                       # no classifier: the model judges the revealed text
    >>> OCRScreen("gate", gate=Gate.load(dir))    # the model's own harmfulness direction
    """

    modalities = frozenset({"image"})

    def __init__(
        self,
        mode: Mode = OCRScreenConfig.mode,
        classifier: HarmClassifier | None = None,
        threshold: float = OCRScreenConfig.threshold,
        *,
        engine: Any = OCRScreenConfig.engine,
        gate: Any = None,
        overlap: bool = OCRScreenConfig.overlap,
        refusal_text: str | None = None,
        min_chars: int = OCRScreenConfig.min_chars,
        with_user_text: bool = OCRScreenConfig.with_user_text,
        name: str | None = None,
    ):
        super().__init__(name)
        given = {} if refusal_text is None else {"refusal_text": refusal_text}  # None: the config's default text
        self.config = OCRScreenConfig(mode=mode, threshold=threshold, engine=engine, overlap=overlap, min_chars=min_chars,
                                      with_user_text=with_user_text, **given)
        if mode == "gate" and gate is None:
            raise ValueError("mode='gate' needs gate=steering.Gate (from InferAligner's calibration: steering.Gate.load(DIR))")
        if mode != "gate" and gate is not None:
            raise ValueError(f"gate= is only used in mode='gate', not {mode!r}")
        if mode != "classify" and classifier is not None:
            raise ValueError(f"classifier= is only used in mode='classify', not {mode!r}")
        if classifier is not None and not isinstance(classifier, HarmClassifier):
            raise TypeError(f"classifier must be a guardrails HarmClassifier, got {type(classifier).__name__}")
        self.gate = gate
        self._engine_spec = engine
        self._ocr = None if isinstance(engine, str) else engine
        self._classifier = classifier

    @classmethod
    def from_spec(cls, mode: Mode = OCRScreenConfig.mode, *, detector: str = "default", gate: str | None = None,
                  **kw: Any) -> OCRScreen:
        """Spec options: ``ocr:mode=gate,gate=DIR`` / ``ocr:mode=classify,detector=DIR``; the rest as in ``__init__``."""
        if mode == "classify" and detector != "default":
            from guardrails.classifiers import load_detector

            kw["classifier"] = load_detector(detector)
        if gate is not None:
            from steering import Gate

            kw["gate"] = Gate.load(gate)
        return cls(mode, **kw)

    # -- settings, read from the config (the single source of truth) ----------------------------
    @property
    def mode(self) -> str:
        return self.config.mode

    @property
    def threshold(self) -> float:
        return self.config.threshold

    @property
    def overlap(self) -> bool:
        return self.config.overlap

    @property
    def min_chars(self) -> int:
        return self.config.min_chars

    @property
    def with_user_text(self) -> bool:
        return self.config.with_user_text

    @property
    def refusal_text(self) -> str:
        return self.config.refusal_text

    # -- components, built on first use (OCR engines and detectors take a while to load) --------
    @property
    def ocr(self):
        if self._ocr is None:
            from guardrails.ocr import get_engine

            self._ocr = get_engine(self._engine_spec)
        return self._ocr

    @property
    def classifier(self) -> HarmClassifier:
        if self._classifier is None:
            from guardrails.classifiers import load_default_detector

            self._classifier = load_default_detector()
        return self._classifier

    # -- the screen itself ---------------------------------------------------------------------
    def read(self, images: list[Any]) -> tuple[str, dict[str, Any]]:
        """OCR text of all images joined in order, and what the verdict should record about it."""
        if not images:
            return "", {"images": 0}
        batch = self.ocr.read_all(images)
        text = batch.text.strip()
        if len(images) > 1 and batch.join(""):
            # FigStep-Pro cuts words across images ("diag" | "nose"): judge the seamless join too.
            text = f"{text}\n{batch.join('')}".strip()
        info = {
            "images": len(images),
            "engine": batch.results[0].engine,
            "ocr_ms": round(batch.latency_ms, 2),
            "dropped_low_confidence": [{"text": w.text, "confidence": round(w.confidence, 3)} for w in batch.dropped],
        }
        return (text if len(text) >= self.min_chars else ""), info

    def score(self, ocr_texts: list[str], user_texts: list[str], engine: Any = None) -> list[tuple[float, bool]]:
        """(score, flagged) per row, batched; rows without image text score None upstream.
        ``engine``: the GuardedModel (or a call's ``ctx.calls``), needed for mode 'gate'."""
        joined = [screen_text(o, u) if self.with_user_text else o for o, u in zip(ocr_texts, user_texts)]
        if self.mode == "classify":
            scores = self.classifier.scores(joined)
            return [(float(s), bool(s >= self.threshold)) for s in scores]
        # gate: the text as a typed user turn, scored by the model's own direction at the gate layer
        from steering.hooks import compute_gate

        calls = ModelCalls.of(engine)
        if calls is None:
            raise ValueError(f"{self.name} mode='gate' scores with the wrapped model; pass the GuardedModel")
        convs = [[{"role": "user", "content": [{"type": "text", "text": t}]}] for t in joined]
        inputs = calls.engine.encode(convs)
        # A scope of its own, not the call's: with overlap=True this runs during generation, where the
        # call's hooks (steering, a probe's capture) would otherwise act on this forward too.
        with ModelCalls(calls.engine).using():
            gate_scores, g = compute_gate(calls.model, self.gate, inputs)
        return [(float(s), bool(x > 0)) for s, x in zip(gate_scores.tolist(), g.tolist())]

    def screen(self, images: list[Any], user_text: str = "", engine: Any = None) -> ScreenResult:
        """Screen one input outside a model call (the ``python -m guardrails screen`` command)."""
        t0 = time.perf_counter()
        ocr_text, info = self.read(images)
        if self.mode == "reveal":
            raise ValueError("mode='reveal' has no score of its own; use classify or gate to screen")
        judged = ocr_text or (user_text and self.with_user_text)
        score, flagged = self.score([ocr_text], [user_text], engine)[0] if judged else (None, False)
        return ScreenResult(flagged, score, ocr_text, (time.perf_counter() - t0) * 1e3, info.get("ocr_ms", 0.0), info)

    def requirements(self) -> Requirements:
        base = super().requirements()
        # The gate reads the wrapped model's activations, so wrap() must find its decoder layers;
        # the during stage exists only to run OCR beside generation.
        return dataclasses.replace(base, needs_hidden_states=self.mode == "gate",
                                   stages=base.stages if self.overlap else ("before",))

    def _verdict(self, score: float | None, flagged: bool, ocr_text: str, info: dict[str, Any], action: Action) -> Verdict:
        threshold = self.threshold if self.mode == "classify" else (self.gate.threshold if self.mode == "gate" else None)
        return Verdict(flagged=flagged, score=score, threshold=threshold, action=action,
                       detail={"mode": self.mode, "ocr_text": ocr_text, **info})

    # -- stages ----------------------------------------------------------------------------------
    def _before(self, ctx: CallContext, rows: list[Row]) -> Sequence[Verdict | Refusal | None]:
        if self.overlap:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="guardrails-ocr")
            ctx.state[self.name] = {"pool": pool, "futures": {
                r.index: pool.submit(self.read, conv_mod.images(r.conv)) for r in rows}}
            return [Verdict(detail={"mode": self.mode, "overlap": "OCR running beside generation"}) for _ in rows]
        reads = [self.read(conv_mod.images(r.conv)) for r in rows]
        if self.mode == "reveal":
            out = []
            for r, (text, info) in zip(rows, reads):
                if text:
                    r.conversation = conv_mod.with_user_text(r.conv, prompts.render("reveal_image_text", text=text), position="prefix")
                out.append(self._verdict(None, False, text, info, "edit" if text else "pass"))
            return out
        return self._decide(ctx, rows, reads, action="refuse")

    def _decide(self, ctx: CallContext, rows: list[Row], reads: list[tuple[str, dict]], action: Action, refuse: bool = True) -> list[Verdict | Refusal]:
        """Score rows whose images hold text (one batch); a :class:`Refusal` for the flagged ones when ``refuse``."""
        idx = [i for i, (text, _) in enumerate(reads) if text]
        queries = [conv_mod.last_user_text(rows[i].conv) for i in idx]
        scored = dict(zip(idx, self.score([reads[i][0] for i in idx], queries, ctx.calls))) if idx else {}
        out = []
        for i, (_row, (text, info)) in enumerate(zip(rows, reads)):
            score, flagged = scored.get(i, (None, False))
            v = self._verdict(score, flagged, text, info, action if flagged else "pass")
            out.append(Refusal(v, self.refusal_text) if flagged and refuse else v)
        return out

    def _during(self, ctx: CallContext, stack: contextlib.ExitStack) -> None:
        state = ctx.state[self.name]
        stack.callback(state["pool"].shutdown, wait=False)
        ctx.stopping_criteria.append(_StopWhenFlagged(self, ctx, state))

    def _during_verdicts(self, ctx: CallContext, rows: list[Row]) -> list[Verdict | Refusal]:
        state = ctx.state[self.name]
        self._settle(ctx, state, rows)  # waits for reads that outlasted generation
        out: list[Verdict | Refusal] = []
        for r in rows:
            v = state["done"][r.index]
            if v.flagged:
                v.detail["stopped_at_token"] = r.stopped_at
                v = Refusal(v, self.refusal_text)  # the base class refuses the row
            out.append(v)
        return out

    def _settle(self, ctx: CallContext, state: dict, rows: list[Row]) -> None:
        """Score the finished OCR reads of ``rows`` (waiting for them), once per row."""
        rows = [r for r in rows if r.index not in state.setdefault("done", {})]
        if rows:
            reads = [state["futures"][r.index].result() for r in rows]
            for r, v in zip(rows, self._decide(ctx, rows, reads, action="stop", refuse=False)):
                state["done"][r.index] = v  # a Verdict: refuse=False

    def _releasable(self, ctx: CallContext, row: Row, n_tokens: int) -> int:
        state = ctx.state.get(self.name)
        if not state:
            return n_tokens
        verdict = state.get("done", {}).get(row.index)
        return n_tokens if verdict is not None and not verdict.flagged else 0


class _StopWhenFlagged(StoppingCriteria):
    """After each step: rows whose OCR has finished are scored; flagged ones stop at once."""

    def __init__(self, screen: OCRScreen, ctx: CallContext, state: dict):
        self.screen, self.ctx, self.state = screen, ctx, state

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        ready = [r for r in self.ctx.active
                 if r.index not in self.state.get("done", {}) and self.state["futures"][r.index].done()]
        if ready:
            self.screen._settle(self.ctx, self.state, ready)
            for r in ready:
                if self.state["done"][r.index].flagged:
                    self.ctx.stop_row(r)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
