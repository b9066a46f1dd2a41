"""Prefix caching for after-stage prompts: reuse the answer generation's own KV cache.

Self-moderation and ECSO send the model prompts that start like the one it just answered (the
conversation, often followed by the answer itself). Recomputing that prefix costs a full prefill
per round. Instead, :func:`keep_generation_cache` (called in a defense's ``_during``) hands
``generate`` a ``DynamicCache`` of our own, which it fills with the prompt and answer of every row;
:class:`PrefixReuse` then lays each row's longest common token prefix out in the left-padded
layout of a new batch, so a judge forward or a revision ``generate`` only computes the new tokens.

Exactness rests on three facts: causal attention (a token's keys/values depend only on the tokens
before it), padding-free positions (``generate`` derives position ids from the attention mask, and
our own forwards do the same), and comparing token ids, not strings (a re-tokenised answer that
differs from the generated ids only shortens the reused prefix). Where those facts do not hold the
batch is recomputed in full and the reason is reported:

- another defense's call-scoped hooks (steering) were active while the cache was being filled;
- a sliding-window cache already dropped tokens, or the call brought its own cache / beams;
- multimodal rotary positions (Qwen2-VL family) or processor outputs such as ``token_type_ids``;
- an image placeholder after the reusable prefix (its pixels would have to be encoded again).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from typing import Any

import torch

from guardrails._compat import CACHE_KWARG, get_cache, new_dynamic_cache, without_cache
from guardrails.conversation import Conversation
from guardrails.engine import Generation

#: ctx.state key shared by every defense that reuses the generation cache (one cache per call)
STATE_KEY = "guardrails.prefix_cache"

# Processor outputs that only carry images: dropped when every image token is inside the reused prefix.
_PIXEL_KEYS = frozenset({
    "pixel_values", "image_sizes", "pixel_attention_mask", "image_grid_thw", "batch_num_images",
    "num_crops", "aspect_ratio_ids", "aspect_ratio_mask",
})


def _hook_ids(model: torch.nn.Module) -> set[tuple[int, str, int]]:
    out = set()
    for m in model.modules():
        out.update((id(m), "fwd", k) for k in m._forward_hooks)
        out.update((id(m), "pre", k) for k in m._forward_pre_hooks)
    return out


def keep_generation_cache(ctx: Any, stack: contextlib.ExitStack) -> None:
    """In ``_during``: make the answer's ``generate`` fill a cache that after stages can reuse.

    Idempotent per call (several defenses share one cache). Never changes what ``generate`` computes:
    the cache is the same ``DynamicCache`` that ``generate`` would create itself.
    """
    state = ctx.state.setdefault(STATE_KEY, {})
    if "cache" in state or "blocked" in state:
        return
    model = ctx.engine.model
    kw = ctx.generate_kwargs
    gen_cfg = getattr(model, "generation_config", None)
    reason = None
    if ctx.mode not in ("chat", "stream"):
        reason = f"mode {ctx.mode!r} has no conversation to reuse"
    elif get_cache(kw) is not None:
        reason = "the call passed its own KV cache"
    elif kw.get("use_cache", getattr(gen_cfg, "use_cache", True)) is False:
        reason = "use_cache=False"
    elif (impl := kw.get("cache_implementation", getattr(gen_cfg, "cache_implementation", None))) is not None:
        reason = f"cache_implementation={impl!r} is not a dynamic cache"
    elif (kw.get("num_beams") or getattr(gen_cfg, "num_beams", 1) or 1) > 1 or \
            (kw.get("num_return_sequences") or getattr(gen_cfg, "num_return_sequences", 1) or 1) > 1:
        reason = "beam search or several sequences per row"
    if reason:
        state["blocked"] = reason
        return
    cache = new_dynamic_cache(model.config)
    kw[CACHE_KWARG] = cache
    # Later stages may call generate with ctx.generate_kwargs: they must never see a filled cache.
    stack.callback(kw.pop, CACHE_KWARG, None)
    state["cache"] = cache

    def snapshot(module, args, kwargs):
        # Hooks present while the cache is filled; those gone afterwards were call-scoped (steering).
        if "hooks" not in state:
            state["hooks"] = _hook_ids(model)

    handle = model.register_forward_pre_hook(snapshot, with_kwargs=True)
    state["own_hook"] = (id(model), "pre", handle.id)
    stack.callback(handle.remove)


def kept_cache_note(ctx: Any) -> str:
    state = ctx.state.get(STATE_KEY, {})
    if "cache" in state:
        return "kept the generation's KV cache for after-stage reuse"
    return f"generation's KV cache not kept: {state.get('blocked', 'not requested')}"


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _uses_mrope(model: Any) -> bool:
    inner = getattr(model, "model", None)
    return any(hasattr(m, "get_rope_index") for m in (model, inner) if m is not None)


def image_token_ids(engine: Any) -> set[int]:
    """Placeholder ids that the model replaces with image features."""
    ids = set()
    for owner in (engine.processor, engine.tokenizer, getattr(engine.model, "config", None)):
        for attr in ("image_token_id", "image_token_index"):
            v = getattr(owner, attr, None)
            if isinstance(v, int):
                ids.add(v)
    return ids


def model_forward(
    model: Any,
    inputs: dict[str, torch.Tensor],
    *,
    start: int = 0,
    cache: Any = None,
    last_only: bool = True,
    **kwargs: Any,
) -> Any:
    """One forward over ``inputs[:, start:]`` (the rest in ``cache``), positions from the attention mask.

    Mask-derived positions make a left-padded row compute what it would alone, as ``generate``
    does; without them, absolute-position models (GPT-2) shift with the padding.
    """
    args = dict(inputs)
    mask = inputs["attention_mask"]
    args["input_ids"] = inputs["input_ids"][:, start:]
    if start:
        for k, v in inputs.items():
            if k not in ("input_ids", "attention_mask") and isinstance(v, torch.Tensor) and v.dim() >= 2 and v.shape[:2] == mask.shape:
                args[k] = v[:, start:]
    if _accepts(model.forward, "position_ids") and not _uses_mrope(model):
        pos = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 0)
        args["position_ids"] = pos[:, start:]
    if cache is not None:
        args[CACHE_KWARG] = cache
        args["use_cache"] = True
    else:
        args["use_cache"] = False
    if last_only and _accepts(model.forward, "logits_to_keep"):
        args["logits_to_keep"] = 1
    with torch.inference_mode():
        return model(**args, **kwargs)


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


class PrefixReuse:
    """After-stage forwards and generations that skip each row's already-computed prefix.

    ``PrefixReuse(ctx)`` reads the cache :func:`keep_generation_cache` kept; ``enabled=False`` (or
    any blocker) makes every call a full recompute with the same interface. Per-row reports are in
    ``info[row_index]`` ({"reused_tokens", "prompt_tokens", "recomputed"}).
    """

    def __init__(self, ctx: Any, enabled: bool = True, disabled_reason: str = "disabled"):
        self.engine = ctx.engine
        self.model = ctx.engine.model
        self.info: dict[int, dict[str, Any]] = {}
        self._img_ids = image_token_ids(self.engine)
        self._ref: dict[int, tuple[int, int, list[int]]] = {}  # row index -> (main batch row, first column, token ids)
        self.blocked: str | None = None if enabled else disabled_reason
        if self.blocked is None:
            self.blocked = self._attach(ctx)

    def _attach(self, ctx: Any) -> str | None:
        state = ctx.state.get(STATE_KEY, {})
        if "blocked" in state:
            return state["blocked"]
        cache = state.get("cache")
        if cache is None:
            return "the generation's cache was not kept (the defense's during stage did not run)"
        if _uses_mrope(self.model):
            return "multimodal rotary positions (Qwen2-VL family) are computed from state the model keeps between calls"
        if "hooks" not in state:
            return "the generation ran no forward pass"
        gone = state["hooks"] - _hook_ids(self.model) - {state.get("own_hook")}
        if gone:
            return (f"{len(gone)} call-scoped hook(s) of another defense were active while the cache was filled "
                    "(they may have changed its activations)")
        inputs = ctx.inputs
        extra = sorted(k for k in inputs if k not in ("input_ids", "attention_mask") and k not in _PIXEL_KEYS)
        if extra:
            return f"the processor returns {', '.join(extra)}, which prefix reuse does not handle"
        layers = list(getattr(cache, "layers", []))
        if not layers:
            return "the cache has no layers"
        total = layers[0].get_seq_length()
        for k, layer in enumerate(layers):
            keys = getattr(layer, "keys", None)
            if not getattr(layer, "is_initialized", False) or not isinstance(keys, torch.Tensor) or keys.dim() != 4:
                return f"cache layer {k} ({type(layer).__name__}) holds no plain key/value tensors"
            if keys.shape[-2] != layer.get_seq_length() or layer.get_seq_length() != total:
                return f"cache layer {k} ({type(layer).__name__}) dropped tokens (sliding window)"
        active = ctx.active
        if keys.shape[0] != len(active):
            return f"the cache holds {keys.shape[0]} rows for {len(active)} generated rows"
        self._cache, self._layers = cache, layers
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        prompt_len = ids.shape[1]
        n_generated = max(0, total - prompt_len)
        for row in active:
            b = row.batch_index
            real = mask[b].bool()
            prompt = ids[b][real].tolist()
            self._ref[row.index] = (b, prompt_len - len(prompt), prompt + list(row.token_ids[:n_generated]))
        return None

    # -- layout ----------------------------------------------------------------------------
    def _common(self, rows: Sequence[Any], inputs: dict[str, torch.Tensor]) -> tuple[list[list[int]], list[int]] | str:
        """Per row: its unpadded ids and how many leading ids the cache holds; or why none can be reused."""
        if self.blocked:
            return self.blocked
        if any(r.index not in self._ref for r in rows):
            return "a row was not part of the generation"
        extra = sorted(k for k in inputs if k not in ("input_ids", "attention_mask") and k not in _PIXEL_KEYS)
        if extra:
            return f"the processor returns {', '.join(extra)}, which prefix reuse does not handle"
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        full = [ids[j][mask[j].bool()].tolist() for j in range(len(rows))]
        # At least one token per row stays new: its logits are what the caller wants.
        common = [min(_lcp(f, self._ref[r.index][2]), len(f) - 1) for r, f in zip(rows, full)]
        return full, common

    @staticmethod
    def _split(full: list[list[int]], common: list[int]) -> list[list[int]] | None:
        """Two groups when one batch would waste much: a left-padded batch can only reuse columns
        before its longest new part, so one row with a long new part (e.g. a template that moves the
        system text to the last turn) would cost every row its reuse."""
        new = [len(f) - c for f, c in zip(full, common)]
        order = sorted(range(len(new)), key=new.__getitem__)
        one = len(new) * new[order[-1]]
        best = min(range(1, len(new)), key=lambda k: k * new[order[k - 1]] + (len(new) - k) * new[order[-1]], default=None)
        if best is None or best * new[order[best - 1]] + (len(new) - best) * new[order[-1]] > 0.75 * one:
            return None
        return [sorted(order[:best]), sorted(order[best:])]

    def _plan(self, rows: Sequence[Any], inputs: dict[str, torch.Tensor], full: list[list[int]], common: list[int]) -> tuple[int, Any, str | None]:
        """(split column s, cache for columns [0, s) or None, reason when nothing is reused)."""
        ids = inputs["input_ids"]
        T = ids.shape[1]
        s = T - max(len(f) - c for f, c in zip(full, common))
        if s <= 0:
            return 0, None, "no common prefix with the generation"
        if self._img_ids and bool(torch.isin(ids[:, s:], torch.tensor(sorted(self._img_ids), device=ids.device)).any()):
            return 0, None, "an image placeholder follows the reusable prefix"
        kept = [max(0, s - (T - len(f))) for f in full]
        data = []
        for layer in self._layers:
            K, V = layer.keys, layer.values
            nk = K.new_zeros((len(rows), K.shape[1], s, K.shape[3]))
            nv = V.new_zeros((len(rows), V.shape[1], s, V.shape[3]))
            for j, (r, m) in enumerate(zip(rows, kept)):
                if m:
                    b, first, _ = self._ref[r.index]
                    nk[j, :, s - m:] = K[b, :, first:first + m]
                    nv[j, :, s - m:] = V[b, :, first:first + m]
            data.append((nk, nv))
        for r, m, f in zip(rows, kept, full):
            self._note(r, m, len(f))
        return s, new_dynamic_cache(self.model.config, data), None

    def _note(self, row: Any, reused: int, total: int, reason: str | None = None) -> None:
        d = self.info.setdefault(row.index, {"reused_tokens": 0, "prompt_tokens": 0, "recomputed": []})
        d["reused_tokens"] += reused
        d["prompt_tokens"] += total
        if reason and reason not in d["recomputed"]:
            d["recomputed"].append(reason)

    @staticmethod
    def _without_pixels(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in inputs.items() if k not in _PIXEL_KEYS}

    def _run(self, rows: Sequence[Any], convs: Sequence[Conversation], fn: Any, split: bool = True, **encode_kw: Any) -> list[Any]:
        """Encode, plan reuse, call ``fn(inputs, s, cache)`` -> one result per row (in row order)."""
        inputs = self.engine.encode(convs, **encode_kw)
        got = self._common(rows, inputs)
        if isinstance(got, str):
            for r, m in zip(rows, inputs["attention_mask"]):
                self._note(r, 0, int(m.sum()), got)
            return fn(inputs, 0, None)
        full, common = got
        groups = self._split(full, common) if split and len(rows) > 1 else None
        if groups:
            out: list[Any] = [None] * len(rows)
            for g in groups:
                for k, res in zip(g, self._run([rows[k] for k in g], [convs[k] for k in g], fn, split=False, **encode_kw)):
                    out[k] = res
            return out
        s, cache, reason = self._plan(rows, inputs, full, common)
        if cache is None:
            for r, f in zip(rows, full):
                self._note(r, 0, len(f), reason)
            return fn(inputs, 0, None)
        return fn(self._without_pixels(inputs), s, cache)

    # -- public ----------------------------------------------------------------------------
    def last_logits(self, rows: Sequence[Any], convs: Sequence[Conversation], continue_final_message: bool = False) -> torch.Tensor:
        """Next-token logits [B, vocab] (float32, CPU) for each row's conversation."""
        if not rows:
            return torch.empty(0)

        def fn(inputs, s, cache):
            out = model_forward(self.model, inputs, start=s, cache=cache)
            return list(out.logits[:, -1, :].float().cpu())

        return torch.stack(self._run(rows, convs, fn, continue_final_message=continue_final_message))

    def generate(self, rows: Sequence[Any], convs: Sequence[Conversation], **generate_kwargs: Any) -> list[Generation]:
        """Batched generation per row (rows never share a prompt, so one row cannot change another's answer)."""
        if not rows:
            return []
        kw = without_cache(generate_kwargs, "streamer")
        kw.setdefault("pad_token_id", _pad_id(self.engine))

        def fn(inputs, s, cache):
            call = dict(inputs) if cache is None else {**inputs, CACHE_KWARG: cache}
            with torch.inference_mode():
                out = self.model.generate(**call, **kw)
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            new = self.engine.split_new_tokens(sequences, inputs["input_ids"].shape[1])
            return [Generation(self.engine.decode(ids), ids) for ids in new]

        return self._run(rows, convs, fn)

    def report(self, row: Any) -> dict[str, Any]:
        """What reuse saved for ``row`` over all calls so far (for the verdict detail)."""
        d = self.info.get(row.index, {"reused_tokens": 0, "prompt_tokens": 0, "recomputed": []})
        out = {"reused_tokens": d["reused_tokens"], "prompt_tokens": d["prompt_tokens"]}
        if d["recomputed"]:
            out["recomputed"] = "; ".join(d["recomputed"])
        return out


def _pad_id(engine: Any) -> int | None:
    pad = getattr(engine.tokenizer, "pad_token_id", None)
    if pad is None:
        eos = getattr(engine.model.generation_config, "eos_token_id", None)
        pad = eos[0] if isinstance(eos, (list, tuple)) else eos
    return pad


class KeepsGenerationCache:
    """Defense mixin: keep the answer's KV cache for after-stage rounds (when ``config.reuse_cache``)."""

    def _during(self, ctx: Any, stack: contextlib.ExitStack) -> None:
        if self.config.reuse_cache:
            keep_generation_cache(ctx, stack)

    def _during_verdicts(self, ctx: Any, rows: list) -> list:
        from guardrails.results import Verdict

        note = kept_cache_note(ctx)
        return [Verdict(stage="during", detail={"kv_cache": note}) for _ in rows]
