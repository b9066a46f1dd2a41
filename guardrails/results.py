"""Result objects: one Verdict per defense, stage and row; one GuardedResult per conversation."""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Stage = Literal["before", "during", "after"]
#: What a defense did to a row. "pass" means it looked and changed nothing.
Action = Literal["pass", "edit", "refuse", "steer", "stop", "rewrite", "regenerate", "hold"]



def check_threshold(value: Any, name: str = "threshold") -> float:
    """A defense's P(unsafe) threshold: the same range (0, 1] for every defense and command line.

    0 is refused because ``score >= 0`` holds for every row: it would flag everything.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a probability in (0, 1] (P(unsafe) at or above it is flagged; "
                         f"0 would flag every row), got {value!r}")
    return float(value)


@dataclass
class Verdict:
    """One defense's decision on one row at one stage.

    ``latency_ms`` is the wall time of the whole stage call; stages run batched, so rows
    of one call share it (a per-row split of one batched forward would be invented).
    """

    #: set by the Defense base class when the verdict is recorded
    defense: str = ""
    stage: Stage = "before"
    flagged: bool = False
    score: float | None = None
    threshold: float | None = None
    action: Action = "pass"
    categories: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)
    latency_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class GuardedResult:
    """What ``GuardedModel.chat`` returns for one conversation."""

    text: str
    refused: bool
    verdicts: list[Verdict]
    #: milliseconds per ``"<defense>.<stage>"`` and for ``"model.generate"``
    timings: dict[str, float]
    #: generated token ids (no prompt, no padding); empty for a row refused before generation
    token_ids: list[int]
    #: the model's own answer when a defense rewrote or replaced it, else None
    original_text: str | None = None
    #: the conversation as it was sent to the model, after every before-stage edit
    conversation: list[dict[str, Any]] | None = None
    #: tokens of the prompt the model answered (padding excluded); 0 for a row refused before generation
    prompt_tokens: int = 0

    @property
    def flagged(self) -> bool:
        """True when any defense flagged this row."""
        return any(v.flagged for v in self.verdicts)

    def verdicts_of(self, defense: str) -> list[Verdict]:
        return [v for v in self.verdicts if v.defense == defense]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["conversation"] = None if self.conversation is None else _jsonable_conversation(self.conversation)
        return d


def _jsonable_conversation(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Images become a short description so results can be written as JSON."""
    out = []
    for msg in conversation:
        content = msg.get("content")
        if isinstance(content, list):
            parts = []
            for p in content:
                if p.get("type") == "image":
                    img = p.get("image", p.get("path", p.get("url")))
                    parts.append({"type": "image", "image": img if isinstance(img, str) else type(img).__name__})
                else:
                    parts.append(dict(p))
            content = parts
        out.append({**msg, "content": content})
    return out
