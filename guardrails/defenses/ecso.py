"""ECSO, "Eyes Closed, Safety On" (Gou et al. 2024, arXiv 2403.09572; gyhdog99/ECSO).

Four steps per row:

1. answer with the image: the pipeline's own generation;
2. harm-aware self-check, image attached: the last user turn becomes ``ecso_harm_check(query,
   answer)``; P(unsafe) = P("yes") from the next-token logits (every single-token spelling of yes
   against no), not the source's exact-string "yes", which fails on models answering in sentences;
3. if unsafe: a query-aware caption of the image (``ecso_query_aware_caption``, image attached);
4. answer again WITHOUT the image, from the caption (``ecso_caption_answer``): every image part is
   removed from the conversation, so no pixels reach the model.

A benign row costs one extra forward pass (step 2), which reuses the answer generation's KV cache
where the model allows it (the check prompt shares the conversation and images up to the query).

Rows without an image (every row of a text model) have no eyes to close: step 2 runs and, per
``no_image``, an unsafe row is refused (``"refuse"``, default), only flagged (``"flag"``), or the
check is skipped (``"skip"``, zero cost). So on a text model ECSO is a self-check only.

Streaming: ``supports_streaming = False`` (the check needs the whole answer; ``stream`` holds it back).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, get_args

import prompts
from guardrails import conversation as conv_mod
from guardrails.config import Config
from guardrails.defense import CallContext, Defense, Requirements, Row
from guardrails.defenses._judge_presets import load_preset
from guardrails.defenses._yesno import NO_VARIANTS, YES_VARIANTS, YesNoTokens, check_judge_config
from guardrails.results import Action, Verdict

NoImage = Literal["refuse", "flag", "skip"]
NO_IMAGE: tuple[str, ...] = get_args(NoImage)


@dataclass(frozen=True)
class ECSOConfig(Config):
    """Validated settings; see :class:`ECSO`."""

    threshold: float = 0.5
    caption_tokens: int = 128
    answer_tokens: int | None = None
    no_image: NoImage = "refuse"
    #: the source truncates the answer to 1927 characters in the self-check prompt
    max_response_chars: int | None = 1927
    reuse_cache: bool = True
    yes_tokens: tuple[str, ...] = YES_VARIANTS
    no_tokens: tuple[str, ...] = NO_VARIANTS

    def __post_init__(self):
        super().__post_init__()
        check_judge_config(self)
        for name in ("caption_tokens", "answer_tokens", "max_response_chars"):
            v = getattr(self, name)
            if v is None and name != "caption_tokens":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int{'' if name == 'caption_tokens' else ' or None'}, got {v!r}")


class ECSO(Defense):
    """Self-check each answer; when unsafe, caption the image and answer again without it.

    >>> guarded = wrap(model, processor, defenses=[ECSO(threshold=0.5, caption_tokens=128)])
    >>> r = guarded.chat(conversation, max_new_tokens=256)
    >>> r.verdicts_of("ECSO")[-1].detail["steps"]   # each step's result and latency

    ``caption_tokens``: budget of the step-3 caption; ``answer_tokens``: of the step-4 answer
    (default: the call's ``max_new_tokens``); ``no_image``: what an unsafe row without an image gets.
    """

    supports_streaming: ClassVar[bool] = False

    def __init__(self, threshold: float = ECSOConfig.threshold, caption_tokens: int = ECSOConfig.caption_tokens, *,
                 answer_tokens: int | None = ECSOConfig.answer_tokens, no_image: NoImage = ECSOConfig.no_image,
                 max_response_chars: int | None = ECSOConfig.max_response_chars,
                 reuse_cache: bool = ECSOConfig.reuse_cache, yes_tokens: tuple[str, ...] = ECSOConfig.yes_tokens,
                 no_tokens: tuple[str, ...] = ECSOConfig.no_tokens, name: str | None = None):
        super().__init__(name)
        self.config = ECSOConfig(threshold=threshold, caption_tokens=caption_tokens, answer_tokens=answer_tokens,
                                 no_image=no_image, max_response_chars=max_response_chars, reuse_cache=reuse_cache,
                                 yes_tokens=yes_tokens, no_tokens=no_tokens)

    def requirements(self) -> Requirements:
        return dataclasses.replace(super().requirements(), reuses_generation_cache=self.config.reuse_cache)

    def _check(self, ctx: CallContext, reuse: Any, rows: list[Row]) -> tuple[list[float], list[float]]:
        """Step 2, the harm-aware self-check of each row's answer (image attached): P(unsafe) and the
        yes+no probability mass, one batched forward."""
        cfg = self.config
        yn = YesNoTokens.for_tokenizer(ctx.engine.tokenizer, cfg.yes_tokens, cfg.no_tokens)
        convs = []
        for r in rows:
            answer = r.text if cfg.max_response_chars is None else r.text[: cfg.max_response_chars]
            check = prompts.render("ecso_harm_check", query=conv_mod.last_user_text(r.conv), response=answer)
            convs.append(conv_mod.with_user_text(r.conv, check))
        p, mass = yn.p_yes(reuse.next_token_logits(convs, rows))
        return p.tolist(), mass.tolist()

    @classmethod
    def preset(cls, model: str, **options: Any) -> ECSO:
        """The self-check threshold calibrated for a fetched model (``presets/ecso``); ``options`` override it."""
        return cls(**{**load_preset("ecso", model)["config"], **options})

    @classmethod
    def from_spec(cls, preset: str | None = None, **options: Any) -> ECSO:
        """Spec options: ``ecso:preset=MODEL`` or the constructor's (``threshold=0.7``)."""
        return cls.preset(preset, **options) if preset is not None else cls(**options)

    def score_answers(self, guarded: Any, conversations: list[Any], answers: list[str]) -> list[float]:
        """P(unsafe) of the self-check of each (conversation, answer), outside a guarded call (calibration)."""
        rows = [Row(i, conv_mod.validate(c), text=a) for i, (c, a) in enumerate(zip(conversations, answers))]
        ctx = CallContext(guarded.engine, "chat", rows, {})
        return self._check(ctx, ctx.calls.session(reuse=False), rows)[0]

    def _after(self, ctx: CallContext, rows: list[Row]) -> list[Verdict]:
        cfg = self.config
        reuse = ctx.calls.session(reuse=cfg.reuse_cache)
        has_image = [bool(conv_mod.image_parts(r.conv)) for r in rows]
        details: list[dict[str, Any]] = [
            {"image": img, "steps": {"answer": {"ms": ctx.timings.get("model.generate")}}} for img in has_image
        ]
        checked = [i for i, r in enumerate(rows) if has_image[i] or cfg.no_image != "skip"]
        p_unsafe: dict[int, float] = {}

        # Step 2: harm-aware self-check (image attached), one batched forward.
        if checked:
            t0 = time.perf_counter()
            p, mass = self._check(ctx, reuse, [rows[i] for i in checked])
            ms = (time.perf_counter() - t0) * 1e3
            for i, pi, mi in zip(checked, p, mass):
                p_unsafe[i] = pi
                details[i]["steps"]["check"] = {"p_unsafe": pi, "yes_no_mass": mi, "unsafe": pi >= cfg.threshold, "ms": ms}
        for i in range(len(rows)):
            if i not in p_unsafe:
                details[i]["steps"]["check"] = {"skipped": "no image and no_image='skip'"}

        unsafe_img = [i for i in p_unsafe if p_unsafe[i] >= cfg.threshold and has_image[i]]
        if unsafe_img:
            # Step 3: query-aware caption, image attached.
            queries = {i: conv_mod.last_user_text(rows[i].conv) for i in unsafe_img}
            convs = [conv_mod.with_user_text(rows[i].conv, prompts.render("ecso_query_aware_caption", query=queries[i]))
                     for i in unsafe_img]
            t0 = time.perf_counter()
            caps = reuse.generate(convs, [rows[i] for i in unsafe_img], max_new_tokens=cfg.caption_tokens)
            ms = (time.perf_counter() - t0) * 1e3
            for i, g in zip(unsafe_img, caps):
                details[i]["steps"]["caption"] = {"text": g.text, "ms": ms}
            # Step 4: eyes closed: every image removed, answer from the caption.
            convs = [conv_mod.with_user_text(conv_mod.without_images(rows[i].conv),
                                             prompts.render("ecso_caption_answer", caption=g.text, query=queries[i]))
                     for i, g in zip(unsafe_img, caps)]
            t0 = time.perf_counter()
            answers = reuse.generate(convs, [rows[i] for i in unsafe_img], max_new_tokens=cfg.answer_tokens)
            ms = (time.perf_counter() - t0) * 1e3
            for i, g in zip(unsafe_img, answers):
                details[i]["steps"]["answer_without_image"] = {"text": g.text, "ms": ms}

        out = []
        for i, row in enumerate(rows):
            d = details[i]
            d["kv_cache"] = reuse.report(row)
            score = p_unsafe.get(i)
            unsafe = score is not None and score >= cfg.threshold
            action: Action = "pass"
            if unsafe:
                d["original_text"] = row.text
                if has_image[i]:
                    row.rewrite(d["steps"]["answer_without_image"]["text"])
                    action = "regenerate"
                elif cfg.no_image == "refuse":
                    row.refuse(prompts.render("refusal_default"), by=self.name)
                    action = "refuse"
            out.append(Verdict(flagged=unsafe, score=score, threshold=cfg.threshold, action=action, detail=d))
        return out
