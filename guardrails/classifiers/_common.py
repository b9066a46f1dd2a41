"""Helpers shared by the classifier implementations (device, batching, pooling, input formats)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from guardrails.engine import tokenizer_lock

#: MLLM-Protector's training format (Pi et al. 2024); the detector sees the question with the answer.
QA_FORMAT = "Question: {query} Answer: {response}"
#: Used for a row whose query is None: the text alone, no dangling "Question:".
TEXT_ONLY_FORMAT = "{response}"


def check_format(fmt: str, *, needs_query: bool, arg: str = "format") -> str:
    """Validate a ``str.format`` template with ``{response}`` (and ``{query}`` when ``needs_query``)."""
    if not isinstance(fmt, str):
        raise TypeError(f"{arg} must be a str template such as {QA_FORMAT!r}, got {type(fmt).__name__}")
    try:
        fmt.format(query="q", response="r")
    except (KeyError, IndexError, ValueError) as e:
        raise ValueError(f"{arg}={fmt!r} is not a valid template: only {{query}} and {{response}} may be used ({e})") from None
    if "{response}" not in fmt:
        raise ValueError(f"{arg}={fmt!r} must contain {{response}}")
    if needs_query and "{query}" not in fmt:
        raise ValueError(f"{arg}={fmt!r} must contain {{query}}; use no_query_format for rows without a query")
    if not needs_query and "{query}" in fmt:
        raise ValueError(f"{arg}={fmt!r} is used for rows without a query, so it must not contain {{query}}")
    return fmt


def format_rows(texts: Sequence[str], queries: Sequence[str | None] | None, fmt: str, no_query_fmt: str) -> list[str]:
    """One input string per row; rows without a query use ``no_query_fmt``."""
    out = []
    for i, t in enumerate(texts):
        q = None if queries is None else queries[i]
        if q is not None and not isinstance(q, str):
            raise TypeError(f"queries[{i}] is {type(q).__name__}, expected str or None")
        out.append(no_query_fmt.format(response=t) if q is None else fmt.format(query=q, response=t))
    return out


def model_device(model: Any):
    """The device of a model's first parameter (CPU for a parameterless stub)."""
    import torch

    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def length_sorted_batches(texts: Sequence[str], batch_size: int) -> Iterator[list[int]]:
    """Index batches of similar length, so padding (and time) stays small; callers restore order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    for s in range(0, len(order), batch_size):
        yield order[s : s + batch_size]


def max_length_of(tokenizer: Any, model: Any, requested: int | None) -> int:
    """A truncation length the model can take: ``requested``, capped by the model's positions."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None) or 10**9
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and tok_limit < 10**7:
        limit = min(limit, tok_limit)
    if requested is None:
        return int(min(limit, 512))
    if requested < 1:
        raise ValueError(f"max_length must be >= 1, got {requested}")
    return int(min(requested, limit))


def pool(hidden, attention_mask, pooling: str):
    """Pool token states to one vector per row, ignoring padding."""
    import torch

    if pooling == "mean":
        m = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1.0)
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "max":
        m = attention_mask.unsqueeze(-1).bool()
        return hidden.masked_fill(~m, torch.finfo(hidden.dtype).min).max(1).values
    raise ValueError(f"pooling={pooling!r} is not supported; use 'mean', 'cls' or 'max'")


def encode(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    pooling: str = "mean",
    normalize: bool = True,
    max_length: int | None = 256,
    batch_size: int = 32,
    layers: Sequence[int] = (-1,),
) -> np.ndarray:
    """Embed texts with a Hugging Face encoder, float32 (n, hidden * len(layers)).

    Each requested hidden state (index into ``hidden_states``: 0 = embeddings, -1 = last layer) is
    pooled over the attention mask, L2-normalised when ``normalize``, and concatenated.
    """
    import torch

    layers = tuple(layers)
    if not layers:
        raise ValueError("layers must name at least one hidden state, e.g. (-1,) for the last layer")
    device = model_device(model)
    max_len = max_length_of(tokenizer, model, max_length)
    need_all = layers != (-1,)
    out: np.ndarray | None = None
    with torch.inference_mode():
        for idx in length_sorted_batches(texts, batch_size):
            with tokenizer_lock(tokenizer):
                enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            res = model(**enc, output_hidden_states=need_all)
            states = res.hidden_states if need_all else (res.last_hidden_state,)
            if need_all and not -len(states) <= min(layers) <= max(layers) < len(states):
                raise ValueError(f"layers={layers} is out of range: the encoder returns {len(states)} hidden states")
            parts = []
            for li in layers if need_all else (0,):
                vec = pool(states[li].float(), enc["attention_mask"], pooling)
                if normalize:
                    vec = torch.nn.functional.normalize(vec, dim=-1)
                parts.append(vec)
            vec = torch.cat(parts, -1).cpu().numpy().astype(np.float32)
            if out is None:
                out = np.zeros((len(texts), vec.shape[1]), dtype=np.float32)
            out[idx] = vec
    assert out is not None
    return out
