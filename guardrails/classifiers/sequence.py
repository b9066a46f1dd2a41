"""Any Hugging Face sequence-classification model as a harm judge (MLLM-Protector's detector shape)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from guardrails.classifiers._common import (
    QA_FORMAT,
    TEXT_ONLY_FORMAT,
    check_format,
    format_rows,
    length_sorted_batches,
    max_length_of,
    model_device,
)
from guardrails.classifiers.base import HarmClassifier, HarmScore
from guardrails.engine import tokenizer_lock

# Label names that say "this is the unsafe class" / "this is the safe class" in config.id2label.
_UNSAFE_NAMES = re.compile(r"^(unsafe|harmful|toxic|jailbreak|jailbroken|injection|malicious)$", re.I)
_SAFE_NAMES = re.compile(r"^(safe|harmless|benign|non[-_ ]?toxic|not[-_ ]?harmful)$", re.I)

LabelRef = int | str


@dataclass(frozen=True)
class SequenceJudgeConfig:
    """How inputs are built and logits read.

    ``format`` renders a row with a query; ``no_query_format`` a row whose query is None.
    ``scalar_positive`` says what sigmoid(logit) of a one-logit head means: "unsafe" (default,
    sigmoid = P(unsafe)) or "safe" (sigmoid = P(safe); we report 1 - it).
    """

    format: str = QA_FORMAT
    no_query_format: str = TEXT_ONLY_FORMAT
    scalar_positive: Literal["unsafe", "safe"] = "unsafe"
    batch_size: int = 16
    max_length: int | None = None
    threshold: float = 0.5

    def __post_init__(self) -> None:
        check_format(self.format, needs_query=True)
        check_format(self.no_query_format, needs_query=False, arg="no_query_format")
        if self.scalar_positive not in ("unsafe", "safe"):
            raise ValueError(f"scalar_positive must be 'unsafe' or 'safe', got {self.scalar_positive!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")


class SequenceClassifierJudge(HarmClassifier):
    """P(unsafe) from an ``AutoModelForSequenceClassification``.

    Input per row: ``format`` (default ``"Question: {query} Answer: {response}"``, the format
    MLLM-Protector trains its detector on) or, when the row's query is None, ``no_query_format``
    (default the response alone). When an input is too long, the query is shortened from its
    start first (the response is what is judged), then the whole input is cut from the right.

    Heads: one logit -> sigmoid (see ``scalar_positive``); two or more -> softmax, P(unsafe) =
    the summed probability of the unsafe label(s). The unsafe label is read from
    ``config.id2label`` when it names one (``unsafe``, ``harmful``, ``toxic``, ...); otherwise pass
    ``unsafe_label`` (an index, a label name, or a list of them). Multi-label heads
    (``problem_type="multi_label_classification"``) use a sigmoid per label and the max over the
    unsafe labels; every unsafe label above ``threshold`` is reported as a category.

    >>> judge = SequenceClassifierJudge(model, tokenizer, unsafe_label="LABEL_1")
    >>> judge.predict(["Sure, here is how..."], queries=["How do I pick a lock?"])
    """

    version = "1"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        format: str = QA_FORMAT,
        unsafe_label: LabelRef | Sequence[LabelRef] | None = None,
        *,
        no_query_format: str = TEXT_ONLY_FORMAT,
        scalar_positive: Literal["unsafe", "safe"] = "unsafe",
        batch_size: int = 16,
        max_length: int | None = None,
        threshold: float = 0.5,
        name: str | None = None,
    ) -> None:
        if not callable(getattr(tokenizer, "__call__", None)) or not hasattr(tokenizer, "decode"):  # noqa: B004 (as written: callable() would refuse an instance-level __call__)
            raise TypeError("tokenizer must be a Hugging Face tokenizer (AutoTokenizer.from_pretrained(...))")
        config = getattr(model, "config", None)
        if config is None or not hasattr(config, "num_labels"):
            raise TypeError("model must be a transformers AutoModelForSequenceClassification (it has no config.num_labels)")
        self.config = SequenceJudgeConfig(format, no_query_format, scalar_positive, batch_size, max_length, threshold)
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or f"seqcls:{getattr(config, '_name_or_path', '') or type(model).__name__}"
        self.num_labels = int(config.num_labels)
        self.multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
        self.id2label = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
        self.unsafe_ids = self._resolve_unsafe(unsafe_label)
        if getattr(tokenizer, "pad_token", None) is None and batch_size > 1:
            # Decoder-based classifiers (Llama, GPT-2) often ship without a pad token; padding a batch
            # would fail, and the model must know the pad id to find each row's last real token.
            raise ValueError(
                "the tokenizer has no pad token, so rows cannot be batched; set tokenizer.pad_token = tokenizer.eos_token "
                "and model.config.pad_token_id = tokenizer.eos_token_id, or pass batch_size=1"
            )

    def _resolve_unsafe(self, unsafe_label) -> list[int]:
        if self.num_labels == 1 and not self.multi_label:
            if unsafe_label not in (None, 0):
                raise ValueError("the model has a scalar (one-logit) head: set scalar_positive='unsafe'|'safe' instead of unsafe_label")
            return [0]
        if unsafe_label is None:
            named = [i for i, n in self.id2label.items() if _UNSAFE_NAMES.match(n.strip())]
            safe = [i for i, n in self.id2label.items() if _SAFE_NAMES.match(n.strip())]
            if self.num_labels == 2 and len(named) == 1:
                return named
            if self.num_labels == 2 and len(safe) == 1:
                return [1 - safe[0]]
            raise ValueError(
                f"cannot tell which label is unsafe from config.id2label={self.id2label}; "
                "pass unsafe_label=<index or label name> (or a list of them)"
            )
        refs = [unsafe_label] if isinstance(unsafe_label, (int, str)) else list(unsafe_label)
        if not refs:
            raise ValueError("unsafe_label is empty; name at least one label")
        ids = []
        names = {v: k for k, v in self.id2label.items()}
        for r in refs:
            if isinstance(r, bool) or not isinstance(r, (int, str)):
                raise TypeError(f"unsafe_label entries must be int indices or label names, got {r!r}")
            if isinstance(r, str):
                if r not in names:
                    raise ValueError(f"unsafe_label {r!r} is not one of the model's labels {sorted(names)}")
                r = names[r]
            if not 0 <= r < self.num_labels:
                raise ValueError(f"unsafe_label index {r} is out of range for a {self.num_labels}-label head")
            ids.append(int(r))
        if len(set(ids)) == self.num_labels and not self.multi_label:
            raise ValueError("every label is marked unsafe, so P(unsafe) would always be 1; leave at least one safe label")
        return sorted(set(ids))

    def _inputs(self, texts: list[str], queries: list[str | None] | None, max_len: int) -> list[str]:
        tok = self.tokenizer
        # Room left for the response plus template words and special tokens.
        rows = format_rows(texts, queries, self.config.format, self.config.no_query_format)
        if queries is None:
            return rows
        out = []
        for row, t, q in zip(rows, texts, queries):
            if q is None:
                out.append(row)
                continue
            with tokenizer_lock(tok):
                n = len(tok(row, add_special_tokens=True)["input_ids"])
                if n > max_len:
                    q_ids = tok(q, add_special_tokens=False)["input_ids"]
                    keep = max(0, len(q_ids) - (n - max_len))
                    q = tok.decode(q_ids[len(q_ids) - keep :]) if keep else ""
                row = self.config.format.format(query=q, response=t)
            out.append(row)
        return out

    def _predict(self, texts: list[str], queries: list[str | None] | None) -> list[HarmScore]:
        import torch

        max_len = max_length_of(self.tokenizer, self.model, self.config.max_length)
        rows = self._inputs(texts, queries, max_len)
        device = model_device(self.model)
        out: list[HarmScore | None] = [None] * len(rows)
        with torch.inference_mode():
            for idx in length_sorted_batches(rows, self.config.batch_size):
                with tokenizer_lock(self.tokenizer):
                    enc = self.tokenizer([rows[i] for i in idx], padding=len(idx) > 1, truncation=True,
                                         max_length=max_len, return_tensors="pt")
                enc = {k: v.to(device) for k, v in enc.items()}
                logits = self.model(**enc).logits.float().cpu()
                if logits.ndim != 2 or logits.shape[1] != self.num_labels:
                    raise RuntimeError(f"expected logits of shape (batch, {self.num_labels}), got {tuple(logits.shape)}")
                for j, i in enumerate(idx):
                    out[i] = self._score(logits[j])
        return out  # type: ignore[return-value]

    def _score(self, logit) -> HarmScore:
        import torch

        if self.num_labels == 1 and not self.multi_label:
            p = float(torch.sigmoid(logit[0]))
            return HarmScore(p if self.config.scalar_positive == "unsafe" else 1.0 - p, detail={"logit": float(logit[0])})
        probs = torch.sigmoid(logit) if self.multi_label else torch.softmax(logit, -1)
        unsafe = probs[self.unsafe_ids]
        score = float(unsafe.max() if self.multi_label else unsafe.sum())
        score = min(max(score, 0.0), 1.0)  # float error can leave a softmax sum a hair above 1
        cats: list[str] = []
        if len(self.unsafe_ids) > 1 or self.multi_label:
            if self.multi_label:
                cats = [self.id2label.get(i, str(i)) for i, p in zip(self.unsafe_ids, unsafe.tolist()) if p >= self.config.threshold]
            elif score >= self.config.threshold:
                cats = [self.id2label.get(self.unsafe_ids[int(unsafe.argmax())], "")]
        probs_by_label = {self.id2label.get(i, str(i)): round(float(p), 6) for i, p in enumerate(probs.tolist())}
        return HarmScore(score, categories=cats, detail={"probs": probs_by_label})
