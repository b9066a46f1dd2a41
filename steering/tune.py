"""Choose where and how strongly to steer by generating, not by a proxy.

:func:`calibrate_steering` steers every calibration prompt (no gate: this measures what steering
does to a row the gate lets through) for each candidate (layers, alpha), generates greedily, and
scores three things per candidate:

- **refusal of harmful prompts** (higher is better), with a refusal predicate you pass;
- **over-refusal of benign prompts** (lower is better): what a gate false positive costs;
- **fluency**: the bare (unsteered) model's mean negative log-likelihood per token of the steered
  answer, and the share of *garbled* answers (a word repeated until the end: fewer than half of
  the words distinct, or a bare-model NLL above ``max_nll`` nats per token).

The choice: among candidates whose garbled share is at most ``max_garbled`` and whose mean NLL is at
most the bare answers' plus ``max_nll_increase``, the one with the highest harmful refusal, then
the lowest benign refusal, then the smallest alpha. When no candidate is fluent enough,
:class:`SteeringCalibration` has ``best = None`` and :meth:`SteeringVectors.with_choice` refuses to
record it: a configuration that garbles is never written.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .extract import ChatPreparer, Prompt, _to_model, _with_generation_positions
from .hooks import POSITIONS, SCALES, steer

__all__ = ["SteeringCalibration", "SteeringTrial", "calibrate_steering", "choose", "distinct_ratio", "is_garbled"]


def distinct_ratio(text: str) -> float:
    """Distinct words / words (1.0 for fewer than 8 words): "contacting contacting ..." scores near 0."""
    words = text.split()
    return 1.0 if len(words) < 8 else len(set(words)) / len(words)


def is_garbled(text: str, nll: float, max_nll: float = 3.0) -> bool:
    """Repetition (fewer than half the words distinct) or text the bare model finds implausible."""
    return distinct_ratio(text) < 0.5 or nll > max_nll


@dataclass(frozen=True)
class SteeringTrial:
    """One candidate's measurements on the calibration prompts (rates in [0, 1])."""

    layers: tuple[int, ...]
    alpha: float
    scale: str
    positions: str
    harmful_refusal: float
    benign_refusal: float
    mean_nll: float
    garbled: float
    examples: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


@dataclass
class SteeringCalibration:
    """Every trial, the bare model's figures, and the chosen trial (None when every candidate garbles)."""

    trials: list[SteeringTrial]
    bare: SteeringTrial
    best: SteeringTrial | None
    settings: dict[str, Any]

    def table(self) -> str:
        head = f"{'layers':>12} {'alpha':>6} {'harmful refused':>15} {'benign refused':>14} {'NLL':>5} {'garbled':>7}"
        lines = [head, "-" * len(head)]
        for t in [self.bare, *self.trials]:
            mark = "*" if t is self.best else " "
            layers = "bare" if t is self.bare else _layers_text(t.layers)
            lines.append(f"{layers:>11}{mark} {t.alpha:>6.3g} {t.harmful_refusal:>15.1%} {t.benign_refusal:>14.1%} "
                         f"{t.mean_nll:>5.2f} {t.garbled:>7.1%}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"settings": self.settings, "bare": self.bare.to_dict(), "trials": [t.to_dict() for t in self.trials],
                "best": None if self.best is None else self.best.to_dict()}


def _layers_text(layers: Sequence[int]) -> str:
    ls = list(layers)
    if len(ls) > 2 and ls == list(range(ls[0], ls[-1] + 1)):
        return f"{ls[0]}-{ls[-1]}"
    return ";".join(map(str, ls))


def _generate(model: nn.Module, prepare: ChatPreparer, prompts: Sequence[Prompt], max_new_tokens: int,
              batch_size: int, pad_id: int | None, eos: set[int]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per prompt, greedy, in batches."""
    out = []
    for s in range(0, len(prompts), batch_size):
        inputs = _to_model(model, prepare(prompts[s:s + batch_size]))
        with torch.no_grad():
            seq = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,  # type: ignore[operator]
                                 pad_token_id=pad_id)  # nn.Module hides transformers' generate from mypy
        n = inputs["input_ids"].shape[1]
        for b in range(seq.shape[0]):
            prompt = inputs["input_ids"][b][inputs["attention_mask"][b].bool()].tolist()
            answer = []
            for t in seq[b, n:].tolist():
                if t in eos:
                    break
                answer.append(t)
            out.append((prompt, answer))
    return out


def _bare_nll(model: nn.Module, pairs: Sequence[tuple[list[int], list[int]]], pad_id: int, batch_size: int) -> list[float]:
    """Mean NLL per answer token under the bare model (teacher forcing; 0 for an empty answer)."""
    out: list[float] = []
    device = next(model.parameters()).device
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s:s + batch_size]
        T = max(len(p) + len(a) for p, a in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for b, (p, a) in enumerate(chunk):  # left padding, as generate saw it
            row = p + a
            ids[b, T - len(row):] = torch.tensor(row)
            mask[b, T - len(row):] = 1
        inputs = _with_generation_positions(model, {"input_ids": ids.to(device), "attention_mask": mask.to(device)})
        with torch.no_grad():
            logp = model(**inputs, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        for b, (_, a) in enumerate(chunk):
            if not a:
                out.append(0.0)
                continue
            tgt = torch.tensor(a, device=logp.device)
            pos = torch.arange(T - len(a) - 1, T - 1, device=logp.device)
            out.append(float(-logp[b, pos, tgt].mean()))
    return out


def choose(trials: Sequence[SteeringTrial], bare: SteeringTrial, *, max_garbled: float = 0.05,
           max_nll_increase: float = 0.75) -> SteeringTrial | None:
    """The fluent trial with the most harmful refusal, then the least benign refusal, then the
    smallest alpha; None when no trial is fluent (see the module docstring)."""
    fluent = [t for t in trials if t.garbled <= max_garbled and t.mean_nll <= bare.mean_nll + max_nll_increase]
    return max(fluent, key=lambda t: (t.harmful_refusal, -t.benign_refusal, -t.alpha), default=None)


def calibrate_steering(
    model: nn.Module,
    processor: Any,
    vectors: Any,
    harmful: Sequence[Prompt],
    benign: Sequence[Prompt],
    *,
    is_refusal: Callable[[str], bool],
    layer_sets: Iterable[Sequence[int]],
    alphas: Sequence[float],
    scale: str = "relative",
    positions: str = "generated",
    max_new_tokens: int = 32,
    batch_size: int = 8,
    max_garbled: float = 0.05,
    max_nll_increase: float = 0.75,
    max_nll: float = 3.0,
    path: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> SteeringCalibration:
    """Try every (layers, alpha), steering every prompt, and choose as the module docstring says."""
    if scale not in SCALES or positions not in POSITIONS:
        raise ValueError(f"scale must be one of {SCALES} and positions one of {POSITIONS}, got {scale!r}, {positions!r}")
    if not harmful or not benign:
        raise ValueError("steering calibration needs harmful and benign prompts")
    candidates = [tuple(sorted({int(i) for i in ls})) for ls in layer_sets]
    if not candidates or not alphas:
        raise ValueError("give at least one layer set and one alpha")
    tok = getattr(processor, "tokenizer", processor)
    prepare = ChatPreparer(processor)
    gen_cfg = getattr(model, "generation_config", None)
    eos_cfg = getattr(gen_cfg, "eos_token_id", None)
    eos = set(eos_cfg if isinstance(eos_cfg, (list, tuple)) else [] if eos_cfg is None else [eos_cfg])
    if tok.eos_token_id is not None:
        eos.add(tok.eos_token_id)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos), 0)
    prompts = list(harmful) + list(benign)
    n_h = len(harmful)

    def measure(layers: tuple[int, ...], alpha: float) -> SteeringTrial:
        if layers:
            with steer(model, vectors, alpha=alpha, layers=layers, scale=scale, positions=positions, path=path):
                pairs = _generate(model, prepare, prompts, max_new_tokens, batch_size, pad_id, eos)
        else:
            pairs = _generate(model, prepare, prompts, max_new_tokens, batch_size, pad_id, eos)
        texts = [tok.decode(a, skip_special_tokens=True) for _, a in pairs]
        nll = _bare_nll(model, pairs, pad_id, batch_size)
        refused = [bool(is_refusal(t)) for t in texts]
        trial = SteeringTrial(
            layers=layers, alpha=float(alpha), scale=scale, positions=positions,
            harmful_refusal=sum(refused[:n_h]) / n_h, benign_refusal=sum(refused[n_h:]) / (len(prompts) - n_h),
            mean_nll=sum(nll) / len(nll), garbled=sum(is_garbled(t, x, max_nll) for t, x in zip(texts, nll)) / len(texts),
            examples={"harmful": texts[0], "benign": texts[n_h]})
        if progress is not None:
            progress(f"layers {_layers_text(layers) or 'bare'} alpha {alpha:g}: harmful refused {trial.harmful_refusal:.0%}, "
                     f"benign refused {trial.benign_refusal:.0%}, NLL {trial.mean_nll:.2f}, garbled {trial.garbled:.0%}")
        return trial

    bare = measure((), 0.0)
    trials = [measure(ls, float(a)) for ls, a in itertools.product(candidates, alphas)]
    best = choose(trials, bare, max_garbled=max_garbled, max_nll_increase=max_nll_increase)
    settings = {"scale": scale, "positions": positions, "max_new_tokens": max_new_tokens, "num_harmful": n_h,
                "num_benign": len(prompts) - n_h, "max_garbled": max_garbled, "max_nll_increase": max_nll_increase,
                "max_nll": max_nll, "selection": "max harmful refusal among fluent trials, then min benign refusal, "
                                                  "then min alpha"}
    if not all(math.isfinite(t.mean_nll) for t in trials):
        raise RuntimeError("a steered answer has an infinite NLL under the bare model; the steering broke the model")
    return SteeringCalibration(trials=trials, bare=bare, best=best, settings=settings)
