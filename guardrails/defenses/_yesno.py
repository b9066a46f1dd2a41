"""Yes/no answers read from next-token logits instead of comparing generated strings.

ECSO's released code counts only an exact "yes" as unsafe, which breaks on models that answer
"Yes, the response is harmful." Here P(yes) is the probability mass of every single-token spelling
of "yes" (" yes", "yes", "Yes", " Yes"), renormalised against the same spellings of "no":

    P(yes) = sum p(yes variants) / (sum p(yes variants) + sum p(no variants))

``mass`` (the yes+no share of the whole distribution) says how much the model was answering
yes/no at all; a tiny mass means the prompt did not elicit a yes/no answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from guardrails.engine import tokenizer_lock
from guardrails.results import check_threshold

YES_VARIANTS: tuple[str, ...] = (" yes", "yes", "Yes", " Yes")
NO_VARIANTS: tuple[str, ...] = (" no", "no", "No", " No")


def check_judge_config(cfg: Any) -> None:
    """Checks shared by the yes/no-judging defenses' configs (ECSO, SelfModeration); frozen-safe."""
    check_threshold(cfg.threshold)
    if not isinstance(cfg.reuse_cache, bool):
        raise TypeError(f"reuse_cache must be True or False, got {cfg.reuse_cache!r}")
    for name in ("yes_tokens", "no_tokens"):
        v = getattr(cfg, name)
        if isinstance(v, str) or not v or not all(isinstance(x, str) and x for x in v):
            raise ValueError(f"{name} must be a non-empty sequence of non-empty strings, e.g. {list(YES_VARIANTS)}")
        object.__setattr__(cfg, name, tuple(v))


@dataclass(frozen=True)
class YesNoTokens:
    """The single-token spellings of yes and no for one tokenizer."""

    yes_ids: tuple[int, ...]
    no_ids: tuple[int, ...]
    yes_tokens: tuple[str, ...]
    no_tokens: tuple[str, ...]

    @classmethod
    def for_tokenizer(cls, tokenizer, yes: Sequence[str] = YES_VARIANTS, no: Sequence[str] = NO_VARIANTS) -> YesNoTokens:
        """Keep the spellings that are one token; a ValueError when none of yes (or no) is."""
        found: dict[str, tuple[list[int], list[str]]] = {"yes": ([], []), "no": ([], [])}
        for key, variants in (("yes", yes), ("no", no)):
            ids, toks = found[key]
            for v in variants:
                with tokenizer_lock(tokenizer):
                    enc = tokenizer.encode(v, add_special_tokens=False)
                if len(enc) == 1 and enc[0] not in ids:
                    ids.append(enc[0])
                    toks.append(v)
        for key, variants in (("yes", yes), ("no", no)):
            if not found[key][0]:
                raise ValueError(
                    f"none of {list(variants)} is a single token for {type(tokenizer).__name__}, so P({key}) cannot be "
                    f"read from next-token logits; pass {key}_tokens=[...] with spellings that are single tokens, "
                    "or use a HarmClassifier judge"
                )
        overlap = set(found["yes"][0]) & set(found["no"][0])
        if overlap:
            raise ValueError(f"yes and no spellings share token ids {sorted(overlap)}; give disjoint spellings")
        return cls(tuple(found["yes"][0]), tuple(found["no"][0]), tuple(found["yes"][1]), tuple(found["no"][1]))

    def p_yes(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(P(yes) renormalised over yes+no, yes+no probability mass), each of shape [B], from logits [B, V]."""
        probs = torch.softmax(logits.float(), dim=-1)
        py = probs[:, list(self.yes_ids)].sum(-1)
        pn = probs[:, list(self.no_ids)].sum(-1)
        mass = py + pn
        # Mass 0 happens only when every yes/no logit is -inf: then there is no evidence either way.
        p = torch.where(mass > 0, py / mass.clamp_min(torch.finfo(mass.dtype).tiny), torch.full_like(mass, 0.5))
        return p, mass

    def describe(self) -> dict[str, list[str]]:
        return {"yes": list(self.yes_tokens), "no": list(self.no_tokens)}
