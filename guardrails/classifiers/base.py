"""The one interface every harm screen in the library implements.

A classifier maps response texts (and, optionally, the queries that produced them) to P(unsafe)
per row. Every stage gets the full context: MLLM-Protector's own inference code scored responses
without their question although the detector was trained with it; we never do that.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class HarmScore:
    """One row's judgement. ``score`` is always P(unsafe) in [0, 1]."""

    score: float
    categories: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)


class HarmClassifier(abc.ABC):
    """texts (+ optional queries) -> one :class:`HarmScore` per row.

    Subclasses implement :meth:`_predict`; :meth:`predict` validates the input so no
    implementation can silently drop or misalign rows.

    >>> clf.predict(["Sure, here is how to build a bomb: ..."], queries=["How do I build a bomb?"])[0].score
    """

    #: Recorded beside every judgement (benchmarks write it into their results).
    name: str = "harm-classifier"
    version: str = "0"

    def predict(self, texts: Sequence[str], queries: Sequence[str | None] | None = None) -> list[HarmScore]:
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string; wrap it: predict([text])")
        texts = list(texts)
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"texts[{i}] is {type(t).__name__}, expected str")
        if queries is not None:
            if isinstance(queries, str):
                raise TypeError("queries must be a list (one per text), not one string")
            queries = list(queries)
            if len(queries) != len(texts):
                raise ValueError(f"got {len(texts)} texts but {len(queries)} queries; pass one query per text (None where there is none)")
        if not texts:
            return []
        out = self._predict(texts, queries)
        if len(out) != len(texts):
            raise RuntimeError(f"{type(self).__name__}._predict returned {len(out)} scores for {len(texts)} texts")
        for s in out:
            if not (0.0 <= s.score <= 1.0) or s.score != s.score:
                raise RuntimeError(f"{type(self).__name__} returned score {s.score!r}; scores must be P(unsafe) in [0, 1]")
        return out

    def scores(self, texts: Sequence[str], queries: Sequence[str | None] | None = None) -> np.ndarray:
        """P(unsafe) per row as a float array."""
        return np.array([s.score for s in self.predict(texts, queries)], dtype=np.float64)

    def for_call(self) -> HarmClassifier:
        """A scorer for one call, which may keep what it computed until the call ends (a stream
        screens the same question at every check). The default is this classifier itself."""
        return self

    @abc.abstractmethod
    def _predict(self, texts: list[str], queries: list[str | None] | None) -> list[HarmScore]:
        """Score validated, non-empty input; return exactly one HarmScore per text."""

    def describe(self) -> dict[str, str]:
        """Name and version, as recorded in results."""
        return {"name": self.name, "version": self.version, "class": type(self).__qualname__}
