"""Embedding probe: a frozen Hugging Face encoder plus a logistic-regression head.

Saved as ``head.safetensors`` (coefficients, intercept, standardisation) + ``manifest.json``
(encoder, pooling, input format, training data, metrics, library version). No pickle.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from typing_extensions import Self

from guardrails.classifiers._common import QA_FORMAT, TEXT_ONLY_FORMAT, check_format, encode, format_rows
from guardrails.classifiers.base import HarmClassifier, HarmScore
from guardrails.config import Config
from steering._files import load_tensors, naming, read_json, save_tensors, write_json

MANIFEST = "manifest.json"
HEAD_FILE = "head.safetensors"
FORMAT_VERSION = 1


def library_version() -> str:
    try:
        from importlib.metadata import version

        return version("mllm-guardrails")
    except Exception:  # running from a source checkout that is not installed
        return "0+source"


@dataclass(frozen=True)
class ProbeConfig(Config):
    """How text becomes features, and how the head is fitted.

    input: "joint" embeds one string per row (``format`` with a query, ``no_query_format``
      without); "pair" embeds response and query separately and concatenates
      ``[f(response), f(query) or 0, has_query]`` (plus ``f(query) * f(response)`` when
      ``interaction``), so a long query cannot push the response out of the encoder's window.
    layers: hidden states pooled and concatenated (0 = embeddings, -1 = last layer).
    """

    input: Literal["joint", "pair"] = "joint"
    format: str = QA_FORMAT
    no_query_format: str = TEXT_ONLY_FORMAT
    layers: tuple[int, ...] = (-1,)
    pooling: Literal["mean", "cls", "max"] = "mean"
    normalize: bool = True
    max_length: int = 256
    batch_size: int = 32
    interaction: bool = False
    standardize: bool = True
    C: float = 1.0
    class_weight: Literal["balanced"] | None = "balanced"
    max_iter: int = 5000
    threshold: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
        check_format(self.format, needs_query=True)
        check_format(self.no_query_format, needs_query=False, arg="no_query_format")
        if not self.layers:
            raise ValueError("layers must name at least one hidden state, e.g. (-1,)")
        if self.max_length < 1 or self.batch_size < 1 or self.max_iter < 1:
            raise ValueError("max_length, batch_size and max_iter must be >= 1")
        if not self.C > 0:
            raise ValueError(f"C must be > 0, got {self.C}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")
        if self.interaction and self.input != "pair":
            raise ValueError("interaction=True needs input='pair'")


@dataclass
class LinearHead:
    """Logistic regression on standardised features: P(unsafe) = sigmoid(((x - mean) / scale) . coef + b)."""

    coef: np.ndarray
    intercept: float
    mean: np.ndarray
    scale: np.ndarray

    def __post_init__(self) -> None:
        self.coef = np.asarray(self.coef, dtype=np.float64).reshape(-1)
        self.mean = np.asarray(self.mean, dtype=np.float64).reshape(-1)
        self.scale = np.asarray(self.scale, dtype=np.float64).reshape(-1)
        n = self.coef.shape[0]
        if self.mean.shape[0] != n or self.scale.shape[0] != n:
            raise ValueError(f"head shapes disagree: coef {n}, mean {self.mean.shape[0]}, scale {self.scale.shape[0]}")
        if np.any(self.scale <= 0) or not np.all(np.isfinite(self.coef)):
            raise ValueError("head has non-positive scales or non-finite coefficients; refit it")

    @property
    def n_features(self) -> int:
        return int(self.coef.shape[0])

    def logit(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise ValueError(f"features have shape {X.shape}; this head expects (n, {self.n_features}): was it fitted with another encoder or config?")
        return ((X - self.mean) / self.scale) @ self.coef + self.intercept

    def proba(self, X: np.ndarray) -> np.ndarray:
        z = self.logit(X)
        return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))

    def tensors(self, prefix: str = "") -> dict[str, np.ndarray]:
        return {
            prefix + "coef": self.coef,
            prefix + "intercept": np.array([self.intercept], dtype=np.float64),
            prefix + "mean": self.mean,
            prefix + "scale": self.scale,
        }

    @classmethod
    def from_tensors(cls, t: dict[str, np.ndarray], prefix: str = "") -> Self:
        missing = [k for k in ("coef", "intercept", "mean", "scale") if prefix + k not in t]
        if missing:
            raise ValueError(f"head file lacks tensors {[prefix + k for k in missing]}")
        return cls(t[prefix + "coef"], float(t[prefix + "intercept"][0]), t[prefix + "mean"], t[prefix + "scale"])


def fit_linear_head(X: np.ndarray, y: Sequence[int] | np.ndarray, config: ProbeConfig, sample_weight: np.ndarray | None = None) -> LinearHead:
    """Fit the logistic-regression head with scikit-learn (lbfgs, deterministic)."""
    from sklearn.linear_model import LogisticRegression

    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y)
    if X.ndim != 2 or X.shape[0] != y.shape[0]:
        raise ValueError(f"got {X.shape[0] if X.ndim == 2 else X.shape} feature rows for {y.shape[0]} labels")
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise ValueError(f"labels must be 0 (safe) or 1 (unsafe), got values {sorted(set(np.unique(y).tolist()))[:5]}")
    if len(np.unique(y)) < 2:
        raise ValueError("labels hold a single class; a probe needs both safe (0) and unsafe (1) examples")
    if config.standardize:
        mean, scale = X.mean(0), X.std(0)
        scale = np.where(scale > 1e-8, scale, 1.0)  # constant features: leave them, never divide by 0
    else:
        mean, scale = np.zeros(X.shape[1]), np.ones(X.shape[1])
    clf = LogisticRegression(C=config.C, class_weight=config.class_weight, max_iter=config.max_iter)
    clf.fit((X - mean) / scale, y, sample_weight=sample_weight)
    return LinearHead(clf.coef_[0], float(clf.intercept_[0]), mean, scale)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _encoder_name(encoder: Any) -> str:
    cfg = getattr(encoder, "config", None)
    return str(getattr(cfg, "_name_or_path", "") or type(encoder).__name__)


class EmbeddingProbe(HarmClassifier):
    """Frozen encoder -> pooled embedding -> logistic regression -> P(unsafe).

    >>> probe = EmbeddingProbe(encoder, tokenizer).fit(texts, labels, queries=queries)
    >>> probe.save("my_probe");  EmbeddingProbe.load("my_probe", encoder, tokenizer).predict(["..."])
    """

    version = "1"

    def __init__(
        self,
        encoder: Any,
        tokenizer: Any,
        head: LinearHead | None = None,
        *,
        config: ProbeConfig | None = None,
        encoder_name: str | None = None,
        name: str = "embedding-probe",
        metadata: dict[str, Any] | None = None,
        **config_overrides: Any,
    ) -> None:
        if config is not None and config_overrides:
            raise TypeError("pass either config=ProbeConfig(...) or keyword settings, not both")
        if config is not None and not isinstance(config, ProbeConfig):
            raise TypeError("config must be a ProbeConfig")
        if encoder is None or not callable(encoder):
            raise TypeError("encoder must be a Hugging Face model (AutoModel.from_pretrained(...))")
        if tokenizer is None or not callable(tokenizer):
            raise TypeError("tokenizer must be a Hugging Face tokenizer (AutoTokenizer.from_pretrained(...))")
        self.config = config or ProbeConfig(**config_overrides)
        self.encoder, self.tokenizer, self.head = encoder, tokenizer, head
        self.encoder_name = encoder_name or _encoder_name(encoder)
        self.name = name
        self.metadata: dict[str, Any] = dict(metadata or {})

    # -- features ---------------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """The pooled (per-layer normalised, concatenated) embedding of each text."""
        c = self.config
        return encode(self.encoder, self.tokenizer, list(texts), pooling=c.pooling, normalize=c.normalize,
                      max_length=c.max_length, batch_size=c.batch_size, layers=c.layers)

    def features(self, texts: Sequence[str], queries: Sequence[str | None] | None = None) -> np.ndarray:
        """Feature rows exactly as the head sees them."""
        texts = list(texts)
        if queries is not None and len(queries) != len(texts):
            raise ValueError(f"got {len(texts)} texts but {len(queries)} queries")
        c = self.config
        if c.input == "joint":
            return self.embed(format_rows(texts, queries, c.format, c.no_query_format))
        r = self.embed(texts)
        has_q = np.array([q is not None for q in (queries or [None] * len(texts))])
        q = np.zeros_like(r)
        if has_q.any():
            qs = [queries[i] for i in np.flatnonzero(has_q).tolist()]  # type: ignore[index]  # not None when has_q has a True
            for x in qs:
                if not isinstance(x, str):
                    raise TypeError(f"queries must be str or None, got {type(x).__name__}")
            q[has_q] = self.embed(qs)
        parts = [r, q, has_q[:, None].astype(np.float32)]
        if c.interaction:
            parts.append(r * q)
        return np.hstack(parts)

    # -- training ---------------------------------------------------------------------------
    def fit(
        self,
        texts: Sequence[str],
        labels: Sequence[int],
        queries: Sequence[str | None] | None = None,
        *,
        sample_weight: Sequence[float] | None = None,
    ) -> EmbeddingProbe:
        """Fit the head on labelled rows (1 = unsafe, 0 = safe); returns self."""
        if isinstance(texts, str):
            raise TypeError("texts must be a list of strings, not one string")
        texts, labels = list(texts), [int(x) for x in labels]
        if len(texts) != len(labels):
            raise ValueError(f"got {len(texts)} texts but {len(labels)} labels")
        return self.fit_features(self.features(texts, queries), labels, sample_weight=sample_weight)

    def fit_features(self, X: np.ndarray, labels: Sequence[int] | np.ndarray, *, sample_weight: Sequence[float] | None = None) -> EmbeddingProbe:
        """Fit from precomputed :meth:`features` (benchmarks cache them); returns self."""
        y = np.asarray(labels, dtype=int)
        sw = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        self.head = fit_linear_head(X, y, self.config, sw)
        self.metadata["n_train"] = int(len(y))
        self.metadata["n_train_unsafe"] = int(y.sum())
        return self

    # -- inference --------------------------------------------------------------------------
    def scores_from_features(self, X: np.ndarray) -> np.ndarray:
        if self.head is None:
            raise RuntimeError("this probe has no head yet: call fit(...) or EmbeddingProbe.load(dir, ...)")
        return self.head.proba(X)

    def _predict(self, texts: list[str], queries: list[str | None] | None) -> list[HarmScore]:
        if self.head is None:
            raise RuntimeError("this probe has no head yet: call fit(...) or EmbeddingProbe.load(dir, ...)")
        p = self.scores_from_features(self.features(texts, queries))
        t = self.config.threshold
        return [HarmScore(float(s), detail={"threshold": t, "flagged": bool(s >= t)}) for s in p]

    # -- persistence ------------------------------------------------------------------------
    def manifest(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": "embedding-probe",
            "name": self.name,
            "library_version": library_version(),
            "encoder": self.metadata.get("encoder", {"name": self.encoder_name}),
            "config": self.config.to_dict(),
            "head_file": HEAD_FILE,
            "n_features": self.head.n_features if self.head is not None else None,
            **{k: v for k, v in self.metadata.items() if k != "encoder"},
        }

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``head.safetensors`` + ``manifest.json`` (with the head's sha256) to ``directory``."""
        if self.head is None:
            raise RuntimeError("nothing to save: fit the probe first")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        save_tensors(self.head.tensors(), d / HEAD_FILE)
        man = self.manifest()
        man["head_sha256"] = sha256_file(d / HEAD_FILE)
        write_json(d / MANIFEST, man, indent=1)
        return d

    @classmethod
    def load(cls, directory: str | os.PathLike, encoder: Any, tokenizer: Any, *, threshold: float | None = None) -> EmbeddingProbe:
        """Load a saved probe onto ``encoder``/``tokenizer`` (the same encoder it was fitted with)."""
        with naming(directory):
            man, tensors = read_probe_dir(directory)
            if man.get("kind") != "embedding-probe":
                raise ValueError(f"{directory} holds a {man.get('kind')!r}, not an embedding probe")
            cfg = dict(man["config"])
            if threshold is not None:
                cfg["threshold"] = threshold
            head = LinearHead.from_tensors(tensors)
            check_n_features(directory, man.get("n_features"), head.n_features, "the head")
            meta = {k: v for k, v in man.items() if k not in ("format_version", "kind", "name", "library_version", "config", "head_file", "n_features", "head_sha256")}
            probe = cls(encoder, tokenizer, head, config=ProbeConfig.from_dict(cfg), name=man.get("name", "embedding-probe"), metadata=meta)
            probe.encoder_name = str(man.get("encoder", {}).get("name", probe.encoder_name))
            return probe


#: what to do about a detector folder that cannot be read
REDO = "retrain it (python -m guardrails train-detector, or the probe's save()); for the shipped detector, reinstall mllm-guardrails"


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The manifest of a saved probe or detector folder (any kind), with a clear error when it is not one."""
    d = Path(directory)
    if not (d / MANIFEST).is_file():
        raise FileNotFoundError(f"{d / MANIFEST} not found: pass the folder written by save() / train-detector")
    man = read_json(d / MANIFEST, fix=REDO)
    if man.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{d} has format_version {man.get('format_version')!r}; this library reads {FORMAT_VERSION}")
    if not isinstance(man.get("head_file", HEAD_FILE), str):
        raise ValueError(f"{d / MANIFEST}: head_file must be a file name, got {man['head_file']!r}; {REDO}")
    return man


def read_probe_dir(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Manifest and tensors of a saved probe/detector; checks the head's sha256 when recorded."""
    d = Path(directory)
    man = read_manifest(d)
    head_path = d / man.get("head_file", HEAD_FILE)
    if not head_path.is_file():
        raise FileNotFoundError(f"{head_path} is missing (named in {d / MANIFEST})")
    want = man.get("head_sha256")
    if want and sha256_file(head_path) != want:
        raise ValueError(f"{head_path} does not match the sha256 in its manifest: the files are from different runs")
    return man, load_tensors(head_path, fix=REDO, numpy=True)


def check_n_features(directory: str | os.PathLike, declared: Any, actual: int, what: str) -> None:
    """A manifest's ``n_features`` must match the head file it describes (a mix of two runs otherwise)."""
    if declared != actual:
        raise ValueError(f"{Path(directory) / MANIFEST} says {what} takes n_features={declared!r} but its head file holds "
                         f"{actual} weights: the files are from different runs; {REDO}")
