"""SelfModeration: the model judges its own answer and revises it while it is harmful (bounded).

Self-moderation in the spirit of Chen et al. 2023 (PrivQA, arXiv 2310.02224): generate, ask "is
this harmful?", revise when it is, stop at a bound. No verified loop text was available, so the
prompts ``selfmod_judge`` / ``selfmod_revise`` are our own.

Per row, after generation:

1. judge: the conversation + the answer + a user turn ``selfmod_judge(query, answer)``; P(unsafe)
   is P("yes") from the next-token logits (all single-token spellings, renormalised against "no"),
   or ``judge.predict`` when a :class:`HarmClassifier` is given;
2. if P(unsafe) >= threshold and fewer than ``rounds`` revisions were made: revise (the
   conversation + the answer + ``selfmod_revise(query, answer)``), then judge the revision;
3. at the bound, a row still judged unsafe is refused (``on_fail="refuse"``) or keeps its last
   revision (``on_fail="keep"``).

Only flagged rows are judged again and revised, as one batch; rows never share a prompt, so one
row's revision cannot change another's. Judge forwards and revisions reuse the answer
generation's KV cache (see ``guardrails.calls``): round 1 computes only the new tokens; later rounds
also recompute the revised answer. Where reuse is impossible (Qwen2-VL, Gemma 3, another
defense's steering hooks, ...) the verdict's ``detail["kv_cache"]["recomputed"]`` says why.

Streaming: ``supports_streaming = False``: it must see the whole answer, so ``stream`` holds the
text back until the check is done (the verdict says so).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import prompts
from guardrails import conversation as conv_mod
from guardrails.calls import ModelCalls
from guardrails.classifiers.base import HarmClassifier
from guardrails.config import Config
from guardrails.defense import CallContext, Defense, Requirements, Row
from guardrails.defenses._judge_presets import load_preset
from guardrails.defenses._yesno import NO_VARIANTS, YES_VARIANTS, YesNoTokens, check_judge_config
from guardrails.results import Action, Verdict

OnFail = Literal["refuse", "keep"]
ON_FAIL: tuple[str, ...] = get_args(OnFail)
_FIELDS = frozenset({"query", "response"})


def _template(value: Any, arg: str) -> prompts.PromptTemplate:
    """A prompt template by registry name or object; its fields must be a subset of {query, response}."""
    template = prompts.get(value) if isinstance(value, str) else value
    if not isinstance(template, prompts.PromptTemplate):
        raise TypeError(f"{arg} must be a prompt template name (prompts.names()) or a prompts.PromptTemplate, got {type(value).__name__}")
    extra = set(template.fields) - _FIELDS
    if extra:
        raise ValueError(f"{arg} {template.name!r} has fields {sorted(extra)}; SelfModeration fills only query and response")
    return template


def _named_judge(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with a ``judge`` given by name (a spec or a preset: ``default`` or a folder)
    replaced by the loaded text detector."""
    name = options.get("judge")
    if not isinstance(name, str):
        return options
    from guardrails.classifiers.hidden_probe import HiddenStateProbe
    from guardrails.defenses.protector import load_detector

    if name != "default" and not Path(name).is_dir():
        raise ValueError(f"judge={name!r} is neither 'default' (the shipped detector) nor a detector folder; "
                         "in Python pass any HarmClassifier as judge=")
    judge = load_detector(name)
    if isinstance(judge, HiddenStateProbe):
        raise ValueError(f"judge={name!r} is a hidden-state probe; SelfModeration's judge reads the answer's text: "
                         "pass judge=default or a text detector's folder (train-detector)")
    return {**options, "judge": judge}


@dataclass(frozen=True)
class SelfModerationConfig(Config):
    """Validated settings; see :class:`SelfModeration`."""

    rounds: int = 2
    threshold: float = 0.5
    on_fail: OnFail = "refuse"
    max_new_tokens: int | None = None
    reuse_cache: bool = True
    yes_tokens: tuple[str, ...] = YES_VARIANTS
    no_tokens: tuple[str, ...] = NO_VARIANTS
    judge_prompt: Any = "selfmod_judge_followup"
    revise_prompt: Any = "selfmod_revise"

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "judge_prompt", _template(self.judge_prompt, "judge_prompt"))
        object.__setattr__(self, "revise_prompt", _template(self.revise_prompt, "revise_prompt"))
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 0:
            raise ValueError(f"rounds must be an int >= 0 (the most revisions per row), got {self.rounds!r}")
        check_judge_config(self)
        if self.max_new_tokens is not None and (isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1):
            raise ValueError(f"max_new_tokens must be a positive int or None (None: the call's own), got {self.max_new_tokens!r}")


class SelfModeration(Defense):
    """Judge -> revise -> judge, at most ``rounds`` revisions per row.

    >>> guarded = wrap(model, processor, defenses=[SelfModeration(rounds=2)])
    >>> r = guarded.chat(conversation, max_new_tokens=128)
    >>> r.verdicts_of("SelfModeration")[-1].detail["p_unsafe"]   # one probability per judgement

    ``judge``: None (the wrapped model answers yes/no; read from its logits) or a HarmClassifier
    (``predict(answers, queries)`` gives P(unsafe)). ``max_new_tokens`` of a revision defaults to the
    call's. ``reuse_cache=False`` forces full recompute (to measure what reuse saves).
    ``judge_prompt`` / ``revise_prompt``: template names or ``prompts.PromptTemplate`` objects whose
    fields are a subset of {query, response}. The default judge quotes the query and the answer,
    so its prompt repeats them after the cached prefix; a follow-up template without fields ("Is
    your answer above harmful?") costs only its own tokens with the cache. The query is the last
    user turn as the model saw it (after other defenses' before-stage edits).
    """

    supports_streaming: ClassVar[bool] = False

    def __init__(self, rounds: int = SelfModerationConfig.rounds, judge: HarmClassifier | None = None,
                 threshold: float = SelfModerationConfig.threshold, *, on_fail: OnFail = SelfModerationConfig.on_fail,
                 max_new_tokens: int | None = SelfModerationConfig.max_new_tokens,
                 reuse_cache: bool = SelfModerationConfig.reuse_cache,
                 yes_tokens: tuple[str, ...] = SelfModerationConfig.yes_tokens,
                 no_tokens: tuple[str, ...] = SelfModerationConfig.no_tokens,
                 judge_prompt: str | prompts.PromptTemplate = SelfModerationConfig.judge_prompt,
                 revise_prompt: str | prompts.PromptTemplate = SelfModerationConfig.revise_prompt, name: str | None = None):
        super().__init__(name)
        if judge is not None and not isinstance(judge, HarmClassifier):
            raise TypeError(
                f"judge must be a guardrails.classifiers.HarmClassifier (or None to let the model judge itself), "
                f"got {type(judge).__name__}"
            )
        self.judge = judge
        self.config = SelfModerationConfig(rounds=rounds, threshold=threshold, on_fail=on_fail, max_new_tokens=max_new_tokens,
                                           reuse_cache=reuse_cache, yes_tokens=yes_tokens, no_tokens=no_tokens,
                                           judge_prompt=judge_prompt, revise_prompt=revise_prompt)

    def requirements(self) -> Requirements:
        return dataclasses.replace(super().requirements(), reuses_generation_cache=self.config.reuse_cache)

    @classmethod
    def preset(cls, model: str, **options: Any) -> SelfModeration:
        """The judge, threshold and template calibrated for a fetched model (``presets/self_moderation``),
        e.g. ``SelfModeration.preset("qwen2.5-coder-0.5b-instruct")``; ``options`` override them. A
        preset's ``judge`` is a detector name (``"default"``: the shipped one), loaded here."""
        return cls(**_named_judge({**load_preset("self_moderation", model)["config"], **options}))

    @classmethod
    def from_spec(cls, preset: str | None = None, **options: Any) -> SelfModeration:
        """Spec options: ``self_moderation:preset=MODEL`` or the constructor's (``threshold=0.7,rounds=1``);
        ``judge=default|DIR`` judges with the shipped detector or a text detector saved in DIR."""
        return cls.preset(preset, **options) if preset is not None else cls(**_named_judge(options))

    def score_answers(self, guarded: Any, conversations: list[Any], answers: list[str]) -> list[float]:
        """P(unsafe) of the first judgement of each (conversation, answer), outside a guarded call:
        what calibration reads (``python -m benchmarks.calibrate_judge``). Same judge, template and
        tokens as a call's after stage; no KV-cache reuse (there is no answer's cache to reuse)."""
        rows = [Row(i, conv_mod.validate(c), text=a) for i, (c, a) in enumerate(zip(conversations, answers))]
        ctx = CallContext(guarded.engine, "chat", rows, {})
        yn = None if self.judge is not None else YesNoTokens.for_tokenizer(ctx.engine.tokenizer, self.config.yes_tokens,
                                                                         self.config.no_tokens)
        return self._judge(ctx, ctx.calls.session(reuse=False), yn, rows, [conv_mod.last_user_text(r.conv) for r in rows],
                           list(answers))[0]

    # -- after ---------------------------------------------------------------------------------
    @staticmethod
    def _render(template: prompts.PromptTemplate, query: str, response: str) -> str:
        values = {"query": query, "response": response}
        return template.render(**{f: values[f] for f in template.fields})

    def _judge(self, ctx: CallContext, reuse: ModelCalls, yn: YesNoTokens | None, rows: list[Row],
               queries: list[str], answers: list[str]) -> tuple[list[float], list[float | None]]:
        """P(unsafe) per row, and the yes+no probability mass (None for a classifier judge)."""
        if self.judge is not None:
            scores = self.judge.predict(answers, queries)
            return [float(s.score) for s in scores], [None] * len(rows)
        convs = [
            conv_mod.append_turns(r.conv, ("assistant", a), ("user", self._render(self.config.judge_prompt, q, a)))
            for r, q, a in zip(rows, queries, answers)
        ]
        assert yn is not None  # _after makes one whenever there is no classifier judge
        p, mass = yn.p_yes(reuse.next_token_logits(convs, rows))
        return [float(x) for x in p], [float(x) for x in mass]

    def _revise(self, ctx: CallContext, reuse: ModelCalls, rows: list[Row], queries: list[str], answers: list[str]) -> list[str]:
        convs = [
            conv_mod.append_turns(r.conv, ("assistant", a), ("user", self._render(self.config.revise_prompt, q, a)))
            for r, q, a in zip(rows, queries, answers)
        ]
        return [g.text for g in reuse.generate(convs, rows, max_new_tokens=self.config.max_new_tokens)]

    def _after(self, ctx: CallContext, rows: list[Row]) -> list[Verdict]:
        cfg = self.config
        yn = None
        if self.judge is None:
            yn = YesNoTokens.for_tokenizer(ctx.engine.tokenizer, cfg.yes_tokens, cfg.no_tokens)
        reuse = ctx.calls.session(reuse=cfg.reuse_cache)
        n = len(rows)
        queries = [conv_mod.last_user_text(r.conv) for r in rows]
        answers = [r.text for r in rows]
        p_hist: list[list[float]] = [[] for _ in range(n)]
        mass_hist: list[list[float | None]] = [[] for _ in range(n)]
        revisions: list[list[str]] = [[] for _ in range(n)]
        timings: dict[str, list[float]] = {"judge_ms": [], "revise_ms": []}
        pending = list(range(n))
        still_unsafe: list[int] = []
        for rnd in range(cfg.rounds + 1):
            t0 = time.perf_counter()
            p, mass = self._judge(ctx, reuse, yn, [rows[i] for i in pending], [queries[i] for i in pending], [answers[i] for i in pending])
            timings["judge_ms"].append((time.perf_counter() - t0) * 1e3)
            for i, pi, mi in zip(pending, p, mass):
                p_hist[i].append(pi)
                mass_hist[i].append(mi)
            flagged = [i for i, pi in zip(pending, p) if pi >= cfg.threshold]
            if not flagged or rnd == cfg.rounds:
                still_unsafe = flagged
                break
            t0 = time.perf_counter()
            new = self._revise(ctx, reuse, [rows[i] for i in flagged], [queries[i] for i in flagged], [answers[i] for i in flagged])
            timings["revise_ms"].append((time.perf_counter() - t0) * 1e3)
            for i, text in zip(flagged, new):
                answers[i] = text
                revisions[i].append(text)
            pending = flagged

        out = []
        for i, row in enumerate(rows):
            flagged_first = p_hist[i][0] >= cfg.threshold
            original = row.text
            detail: dict[str, Any] = {
                "p_unsafe": p_hist[i],
                "rounds_used": len(revisions[i]),
                "rounds": cfg.rounds,
                "judge": f"model (yes/no logits, {cfg.judge_prompt.name})" if self.judge is None else self.judge.describe(),
                "kv_cache": reuse.report(row),
                **timings,
            }
            if yn is not None:
                detail["yes_no_mass"] = mass_hist[i]
                detail["yes_no_tokens"] = yn.describe()
            if revisions[i]:
                detail["revisions"] = revisions[i]
            action: Action = "pass"
            if i in still_unsafe:
                detail["final"] = "unsafe after the bound"
                if cfg.on_fail == "refuse":
                    row.refuse(prompts.render("refusal_default"), by=self.name)
                    action = "refuse"
                elif revisions[i]:
                    row.rewrite(answers[i])
                    action = "rewrite"
            elif revisions[i]:
                row.rewrite(answers[i])
                action = "rewrite"
                detail["final"] = "safe after revision"
            else:
                detail["final"] = "safe"
            if flagged_first:
                detail["original_text"] = original
            out.append(Verdict(flagged=flagged_first, score=p_hist[i][-1], threshold=cfg.threshold, action=action, detail=detail))
        return out
