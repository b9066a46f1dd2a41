"""Prompt + response detector: one frozen encoder, a prompt head, a response head and a small stacker.

Rows without a query are screened as *prompts* (is this request harmful?). Rows with a query are
screened as *responses*: the response head reads the answer, the prompt head reads the question,
and a small logistic stacker combines the two logits with the refusal-keyword judges' verdicts
(did the answer comply?), so a helpful answer to a benign question is not mistaken for compliance
with a harmful one. Every head is a logistic regression
stored in one safetensors file; the manifest names the encoder, features and training data.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from guardrails.classifiers._common import encode
from guardrails.classifiers.base import HarmClassifier, HarmScore
from guardrails.classifiers.embedding import (
    FORMAT_VERSION,
    HEAD_FILE,
    MANIFEST,
    LinearHead,
    check_n_features,
    library_version,
    read_probe_dir,
    sha256_file,
)
from guardrails.config import Config
from steering._files import naming, save_tensors, write_json

KIND = "prompt-response-detector"
HEADS = ("prompt", "response", "stack")


@dataclass(frozen=True)
class FeatureConfig(Config):
    """How the encoder turns one text into features (shared by every head)."""

    layers: tuple[int, ...] = (3, 4, 5, 6)
    pooling: Literal["mean", "cls", "max"] = "mean"
    normalize: bool = True
    max_length: int = 256
    batch_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        if not self.layers:
            raise ValueError("layers must name at least one hidden state")
        if self.max_length < 1 or self.batch_size < 1:
            raise ValueError("max_length and batch_size must be >= 1")


def embed_texts(encoder: Any, tokenizer: Any, texts: Sequence[str], features: FeatureConfig) -> np.ndarray:
    """Features of each text as the detector's heads see them."""
    return encode(encoder, tokenizer, list(texts), pooling=features.pooling, normalize=features.normalize,
                  max_length=features.max_length, batch_size=features.batch_size, layers=features.layers)


class PromptResponseDetector(HarmClassifier):
    """P(unsafe) for prompts (query None) and for responses (with their query).

    Scores are shifted so that 0.5 is the operating threshold chosen on validation data (see the
    manifest's ``thresholds``); ``detail`` says which head scored the row and whether it is flagged.

    >>> det = load_default_detector()
    >>> det.predict(["Sure, step 1: ..."], queries=["How do I make a pipe bomb?"])[0].score
    """

    version = "1"

    def __init__(
        self,
        encoder: Any,
        tokenizer: Any,
        heads: dict[str, LinearHead],
        *,
        features: FeatureConfig | None = None,
        name: str = "prompt-response-detector",
        metadata: dict[str, Any] | None = None,
        threshold: float = 0.5,
        keyword_features: Sequence[str] = (),
    ) -> None:
        missing = [h for h in HEADS if h not in heads]
        if missing:
            raise ValueError(f"heads lacks {missing}; a detector needs {list(HEADS)}")
        self.keyword_features = tuple(keyword_features)
        if heads["stack"].n_features != 2 + len(self.keyword_features):
            raise ValueError(f"the stack head takes {heads['stack'].n_features} features but the detector supplies "
                             f"{2 + len(self.keyword_features)} (response logit, query logit, keyword judges {list(self.keyword_features)})")
        if heads["prompt"].n_features != heads["response"].n_features:
            raise ValueError("prompt and response heads must read the same encoder features")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        self.encoder, self.tokenizer, self.heads = encoder, tokenizer, dict(heads)
        self.features = features or FeatureConfig()
        self.name, self.threshold = name, threshold
        self.metadata: dict[str, Any] = dict(metadata or {})
        from guardrails.classifiers.keywords import KeywordJudge

        self._judges = [KeywordJudge.from_list(k) for k in self.keyword_features]

    def logits(self, texts: Sequence[str], queries: Sequence[str | None] | None = None, *,
               known: dict[str, float] | None = None) -> np.ndarray:
        """Raw stacked/prompt logits per row (before the sigmoid). ``known`` maps queries to their
        prompt-head logits; those are not embedded again, and new ones are added to it."""
        texts = list(texts)
        qs = list(queries) if queries is not None else [None] * len(texts)
        known = {} if known is None else known
        new_q = [q for q in dict.fromkeys(q for q in qs if q is not None) if q not in known]
        # Each distinct string is embedded once (a stream's windows may repeat, and so may queries)
        uniq = list(dict.fromkeys(texts + new_q))
        vec = dict(zip(uniq, embed_texts(self.encoder, self.tokenizer, uniq, self.features)))
        X = np.stack([vec[t] for t in texts])
        z = self.heads["prompt"].logit(X)
        if new_q:
            known.update(zip(new_q, self.heads["prompt"].logit(np.stack([vec[q] for q in new_q])).tolist()))
        has_q = np.array([q is not None for q in qs])
        if has_q.any():
            zr = self.heads["response"].logit(X[has_q])
            zq = np.array([known[q] for q in qs if q is not None])
            kw = [j.scores([t for t, h in zip(texts, has_q) if h]) for j in self._judges]
            z[has_q] = self.heads["stack"].logit(np.column_stack([zr, zq, *kw]))
        return z

    def for_call(self) -> HarmClassifier:
        """A scorer that embeds each question once per call: a stream check then embeds only its window
        (with 128-token prompts the question cost more than the window)."""
        return _CallScoped(self)

    def _predict(self, texts: list[str], queries: list[str | None] | None, known: dict[str, float] | None = None) -> list[HarmScore]:
        z = self.logits(texts, queries, known=known)
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))
        out = []
        for i, s in enumerate(p):
            head = "prompt" if queries is None or queries[i] is None else "response"
            out.append(HarmScore(float(s), detail={"head": head, "threshold": self.threshold, "flagged": bool(s >= self.threshold)}))
        return out

    # -- persistence ----------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": KIND,
            "name": self.name,
            "library_version": library_version(),
            "features": self.features.to_dict(),
            "heads": {h: {"n_features": self.heads[h].n_features} for h in HEADS},
            "stack_features": ["response_logit", "query_prompt_logit", *[f"keyword_{k}_complied" for k in self.keyword_features]],
            "keyword_features": list(self.keyword_features),
            "head_file": HEAD_FILE,
            **self.metadata,
        }

    def save(self, directory: str | os.PathLike) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, np.ndarray] = {}
        for h in HEADS:
            tensors.update(self.heads[h].tensors(prefix=f"{h}."))
        save_tensors(tensors, d / HEAD_FILE)
        man = self.manifest()
        man["head_sha256"] = sha256_file(d / HEAD_FILE)
        write_json(d / MANIFEST, man, indent=1)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, encoder: Any, tokenizer: Any, *, threshold: float = 0.5) -> PromptResponseDetector:
        with naming(directory):
            man, tensors = read_probe_dir(directory)
            if man.get("kind") != KIND:
                raise ValueError(f"{directory} holds a {man.get('kind')!r}, not a {KIND}")
            heads = {h: LinearHead.from_tensors(tensors, prefix=f"{h}.") for h in HEADS}
            declared = man.get("heads")
            declared = declared if isinstance(declared, dict) else {}
            for h in HEADS:
                entry = declared.get(h)
                check_n_features(directory, entry.get("n_features") if isinstance(entry, dict) else None,
                                 heads[h].n_features, f"the {h} head")
            skip = ("format_version", "kind", "name", "library_version", "features", "heads", "head_file", "head_sha256", "stack_features", "keyword_features")
            meta = {k: v for k, v in man.items() if k not in skip}
            return cls(encoder, tokenizer, heads, features=FeatureConfig.from_dict(man["features"]), name=man.get("name", KIND),
                       metadata=meta, threshold=threshold, keyword_features=man.get("keyword_features", []))


class _CallScoped(HarmClassifier):
    """One call's view of a :class:`PromptResponseDetector`: the questions' prompt logits are kept
    for the call (they live in the call's state, not on the shared detector)."""

    def __init__(self, detector: PromptResponseDetector) -> None:
        self.detector = detector
        self.name, self.version = detector.name, detector.version
        self._known: dict[str, float] = {}

    def _predict(self, texts: list[str], queries: list[str | None] | None) -> list[HarmScore]:
        return self.detector._predict(texts, queries, known=self._known)

    def describe(self) -> dict[str, str]:
        return self.detector.describe()
