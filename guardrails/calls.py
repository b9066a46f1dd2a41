"""The model-call service: every model call a call's pipeline makes goes through here.

Three things live here, and nowhere else:

- **the per-model lock** (:func:`model_lock`): calls on one model object are serialised, whichever
  wrapper and thread they come from. A call holds it only while it uses the model (a stage, the
  generation), never while it waits for a consumer, so a stream stepped from any thread, or
  abandoned midway, cannot keep it. Re-entrant within one call's context: a defense's extra model
  calls inside a stage do not deadlock.
- **call scoping** (:func:`call_scope`, :func:`active_call`): forward hooks installed for a call act
  only while that call runs the model; another wrapper's call, or a plain ``model.generate`` in
  another thread, passes through them untouched.
- **:class:`ModelCalls`** (``ctx.calls``): batched, left-padded generation, next-token logits and
  forwards for defenses, decoded per row, with prefix KV-cache reuse built in.

Prefix reuse: self-moderation and ECSO send the model prompts that start like the one it just
answered (the conversation, often followed by the answer). When a defense declares it
(``Requirements.reuses_generation_cache``), the pipeline hands the answer's ``generate`` a ``DynamicCache``
of our own; :class:`ModelCalls` then lays each row's longest common token prefix out in the
left-padded layout of a new batch, so a judge forward or a revision only computes the new tokens.
Exactness rests on causal attention, mask-derived positions and comparing token ids (not strings).
Where those facts do not hold the batch is recomputed in full and the reason is reported:

- another defense's call-scoped hooks (steering) were active while the cache was being filled;
- a sliding-window cache already dropped tokens, or the call brought its own cache / beams;
- multimodal rotary positions (Qwen2-VL family) or processor outputs such as ``token_type_ids``;
- an image placeholder after the reusable prefix (its pixels would have to be encoded again).
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from guardrails._compat import CACHE_KWARG, CACHE_KWARGS, get_cache, new_dynamic_cache
from guardrails.conversation import Conversation
from guardrails.engine import Engine, Generation

__all__ = ["ModelCalls", "ModelLock", "active_call", "call_scope", "model_lock", "scoped_hook"]

# -- the per-model lock --------------------------------------------------------------------------

#: ids of the ModelLocks this context holds (contextvars: each thread, and each copied context, has its own)
_HELD: contextvars.ContextVar[frozenset[tuple[int, int]]] = contextvars.ContextVar("guardrails_held_locks",
                                                                                   default=frozenset())
_REGISTRY: weakref.WeakKeyDictionary[Any, ModelLock] = weakref.WeakKeyDictionary()
_REGISTRY_LOCK = threading.Lock()


class ModelLock:
    """Serialises the calls on one model; re-entrant for the context that holds it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        held = _HELD.get()
        # Keyed by thread too: a context copied into another thread (a stream's worker started inside
        # a stage, an executor) must take the lock itself, not inherit the holder's claim.
        key = (id(self), threading.get_ident())
        if key in held:  # this call already holds it (a defense's extra call inside a stage)
            yield
            return
        with self._lock:
            token = _HELD.set(held | {key})
            try:
                yield
            finally:
                _HELD.reset(token)

    def locked(self) -> bool:
        return self._lock.locked()


def model_lock(model: Any) -> ModelLock:
    """The one lock of ``model``, shared by every wrapper around it."""
    with _REGISTRY_LOCK:
        lock = _REGISTRY.get(model)
        if lock is None:
            lock = _REGISTRY[model] = ModelLock()
        return lock


# -- call scoping ----------------------------------------------------------------------------

_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("guardrails_active_call", default=None)


def active_call() -> Any:
    """The call context whose model calls run in this context right now, or None."""
    return _ACTIVE.get()


@contextlib.contextmanager
def call_scope(ctx: Any) -> Iterator[None]:
    """Mark ``ctx`` as the call running the model in this context (hooks of other calls stay idle)."""
    token = _ACTIVE.set(ctx)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def scoped_hook(ctx: Any, hook: Callable[..., Any]) -> Callable[..., Any]:
    """``hook`` acting only while ``ctx`` runs the model; elsewhere it returns None (changes nothing)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if _ACTIVE.get() is not ctx:
            return None
        return hook(*args, **kwargs)

    return wrapper


# -- forwards --------------------------------------------------------------------------------

# Processor outputs that only carry images: dropped when every image token is inside the reused prefix.
_PIXEL_KEYS = frozenset({
    "pixel_values", "image_sizes", "pixel_attention_mask", "image_grid_thw", "batch_num_images",
    "num_crops", "aspect_ratio_ids", "aspect_ratio_mask",
})
# Objects bound to the main call's batch, clock or cache: never passed on to a defense's generation.
# (max_length counts the main prompt; the prefix function and negative prompt are indexed by its rows.)
_CALL_BOUND = ("streamer", "stopping_criteria", "logits_processor", "num_return_sequences", "max_length",
               "prefix_allowed_tokens_fn", "negative_prompt_ids", "negative_prompt_attention_mask", *CACHE_KWARGS)


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _uses_mrope(model: Any) -> bool:
    inner = getattr(model, "model", None)
    return any(hasattr(m, "get_rope_index") for m in (model, inner) if m is not None)


def image_token_ids(engine: Engine) -> set[int]:
    """Placeholder ids that the model replaces with image features."""
    ids = set()
    for owner in (engine.processor, engine.tokenizer, getattr(engine.model, "config", None)):
        for attr in ("image_token_id", "image_token_index"):
            v = getattr(owner, attr, None)
            if isinstance(v, int):
                ids.add(v)
    return ids


def model_forward(model: Any, inputs: dict[str, torch.Tensor], *, start: int = 0, cache: Any = None,
                  last_only: bool = True, **kwargs: Any) -> Any:
    """One forward over ``inputs[:, start:]`` (the rest in ``cache``), positions from the attention mask.

    Mask-derived positions make a padded row compute what it would alone, as ``generate`` does;
    without them, absolute-position models (GPT-2) shift with the padding.
    """
    args: dict[str, Any] = dict(inputs)
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


def _hook_ids(model: torch.nn.Module) -> set[tuple[int, str, int]]:
    out: set[tuple[int, str, int]] = set()
    for m in model.modules():
        out.update((id(m), "fwd", k) for k in m._forward_hooks)
        out.update((id(m), "pre", k) for k in m._forward_pre_hooks)
    return out


def _lcp(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for k in range(n):
        if a[k] != b[k]:
            return k
    return n


def cache_blocker(model: Any, mode: str, kw: dict[str, Any]) -> str | None:
    """Why the answer's KV cache cannot be kept for reuse in this call (None: it can)."""
    gen_cfg = kw.get("generation_config") or getattr(model, "generation_config", None)
    if mode not in ("chat", "stream"):
        return f"mode {mode!r} has no conversation to reuse"
    if get_cache(kw) is not None:
        return "the call passed its own KV cache"
    if kw.get("use_cache", getattr(gen_cfg, "use_cache", True)) is False:
        return "use_cache=False"
    if (impl := kw.get("cache_implementation", getattr(gen_cfg, "cache_implementation", None))) is not None:
        return f"cache_implementation={impl!r} is not a dynamic cache"
    if (kw.get("num_beams") or getattr(gen_cfg, "num_beams", 1) or 1) > 1:
        return "beam search"
    return None


@dataclass
class _KeptCache:
    """The answer generation's cache, shared by every session of one call."""

    cache: Any = None
    blocked: str | None = "not requested"
    hooks: set[tuple[int, str, int]] | None = None
    own_hook: tuple[int, str, int] | None = None
    #: row index -> (row in the main batch, first real column, prompt + generated ids), set on first use
    ref: dict[int, tuple[int, int, list[int]]] | None = None
    layers: list[Any] = field(default_factory=list)
    attach_error: str | None = None


class ModelCalls:
    """A call's door to the model: ``ctx.calls`` (or ``ModelCalls(engine)`` outside a call).

    ``generate``, ``next_token_logits`` and ``forward`` are batched, left-padded and run under the
    model's lock and this call's scope. Pass the call's ``rows`` (one per conversation) to reuse the
    answer's KV cache; :meth:`session` gives a defense its own reuse report.
    """

    def __init__(self, engine: Engine, ctx: Any = None, *, reuse: bool = True, _kept: _KeptCache | None = None):
        self.engine = engine
        self.model = engine.model
        self.ctx = ctx
        #: what this service's model calls run as: the call, or (outside a call) a scope of its own
        self.scope: Any = ctx if ctx is not None else object()
        self.reuse = reuse
        self._kept = _kept if _kept is not None else _KeptCache()
        self._img_ids = image_token_ids(engine)
        self.info: dict[int, dict[str, Any]] = {}

    @classmethod
    def of(cls, owner: Any) -> ModelCalls | None:
        """The calls of a GuardedModel, an Engine or a ModelCalls (None stays None); for APIs used outside a call."""
        if owner is None or isinstance(owner, ModelCalls):
            return owner
        engine = owner if isinstance(owner, Engine) else getattr(owner, "engine", None)
        if not isinstance(engine, Engine):
            raise TypeError(f"expected the GuardedModel from wrap(...), got {type(owner).__name__}")
        return cls(engine)

    def session(self, reuse: bool = True) -> ModelCalls:
        """Same call, same kept cache, a fresh per-row reuse report (one per defense)."""
        return ModelCalls(self.engine, self.ctx, reuse=reuse, _kept=self._kept)

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        """Run model code of your own in the block: the model's lock, this call's scope, inference mode."""
        with model_lock(self.model).hold(), call_scope(self.scope), torch.inference_mode():
            yield

    def scoped(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        """``hook`` acting only inside this service's model calls (see :func:`scoped_hook`)."""
        return scoped_hook(self.scope, hook)

    # -- the pipeline's side: keep the answer's cache ----------------------------------------
    def keep_cache(self, kw: dict[str, Any], stack: contextlib.ExitStack) -> None:
        """Give the answer's ``generate`` (its kwargs ``kw``) a cache that later model calls reuse."""
        kept = self._kept
        kept.blocked = cache_blocker(self.model, self.ctx.mode, kw)
        if kept.blocked:
            return
        kept.cache = kw[CACHE_KWARG] = new_dynamic_cache(self.model.config)

        def snapshot(module: Any, args: Any, kwargs: Any) -> None:
            # Hooks present while the cache is filled; those gone afterwards were call-scoped (steering).
            if kept.hooks is None:
                kept.hooks = _hook_ids(self.model)

        handle = self.model.register_forward_pre_hook(self.scoped(snapshot), with_kwargs=True)
        kept.own_hook = (id(self.model), "pre", handle.id)
        stack.callback(handle.remove)

    def cache_note(self) -> str:
        if self._kept.cache is not None:
            return "kept the generation's KV cache for after-stage reuse"
        return f"generation's KV cache not kept: {self._kept.blocked}"

    # -- generation ------------------------------------------------------------------------
    def generate_kwargs(self, **overrides: Any) -> dict[str, Any]:
        """The call's generation options for a defense's own generation (overrides given as None keep the call's)."""
        base = {} if self.ctx is None else self.ctx.generate_kwargs
        kw = {k: v for k, v in base.items() if k not in _CALL_BOUND}
        kw.update({k: v for k, v in overrides.items() if v is not None})
        if kw.get("min_new_tokens", 0) > kw.get("max_new_tokens", float("inf")):
            kw["min_new_tokens"] = kw["max_new_tokens"]  # the call's minimum cannot exceed a shorter limit
        return kw

    def generate(self, conversations: Sequence[Conversation], rows: Sequence[Any] | None = None, **overrides: Any) -> list[Generation]:
        """One answer per conversation, generated as one batch with the call's options plus ``overrides``."""
        if not conversations:
            return []
        kw = self.generate_kwargs(**overrides)

        def fn(inputs: dict[str, torch.Tensor], s: int, cache: Any) -> list[Generation]:
            call = dict(inputs) if cache is None else {**inputs, CACHE_KWARG: cache}
            with self.using():
                sequences = self.engine.run_generate(call, kw)
            return self.engine.generations(sequences, inputs["input_ids"].shape[1], self.engine.stop_token_ids_for(kw))

        return self._run(rows, conversations, fn)

    def generate_texts(self, texts: Sequence[str], **overrides: Any) -> list[Generation]:
        """Like :meth:`generate` for raw prompt strings (no chat template)."""
        if not texts:
            return []
        kw = self.generate_kwargs(**overrides)
        inputs = self.engine.encode_texts(texts)
        with self.using():
            sequences = self.engine.run_generate(inputs, kw)
        return self.engine.generations(sequences, inputs["input_ids"].shape[1], self.engine.stop_token_ids_for(kw))

    def next_token_logits(self, conversations: Sequence[Conversation], rows: Sequence[Any] | None = None, *,
                          continue_final_message: bool = False) -> torch.Tensor:
        """Next-token logits [B, vocab] (float32, CPU) for each conversation."""
        if not conversations:
            return torch.empty(0)

        def fn(inputs: dict[str, torch.Tensor], s: int, cache: Any) -> list[torch.Tensor]:
            out = self.forward(inputs, start=s, cache=cache)
            return list(out.logits[:, -1, :].float().cpu())

        return torch.stack(self._run(rows, conversations, fn, continue_final_message=continue_final_message))

    def forward(self, inputs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        """One forward pass (positions from the attention mask), e.g. ``output_hidden_states=True``."""
        with self.using():
            return model_forward(self.model, inputs, **kwargs)

    def report(self, row: Any) -> dict[str, Any]:
        """What reuse saved for ``row`` in this session (for a verdict's detail)."""
        d = self.info.get(row.index, {"reused_tokens": 0, "prompt_tokens": 0, "recomputed": []})
        out = {"reused_tokens": d["reused_tokens"], "prompt_tokens": d["prompt_tokens"], "generation": self.cache_note()}
        if d["recomputed"]:
            out["recomputed"] = "; ".join(d["recomputed"])
        return out

    # -- reuse -----------------------------------------------------------------------------
    def _blocked(self) -> str | None:
        """Why nothing can be reused (None: reuse is possible), working out the layout once per call."""
        if not self.reuse:
            return "reuse_cache=False"
        kept = self._kept
        if kept.blocked:
            return kept.blocked
        if kept.ref is None and kept.attach_error is None:
            kept.attach_error = self._attach()
        return kept.attach_error

    def _attach(self) -> str | None:
        kept, ctx = self._kept, self.ctx
        if _uses_mrope(self.model):
            return "multimodal rotary positions (Qwen2-VL family) are computed from state the model keeps between calls"
        if kept.hooks is None:
            return "the generation ran no forward pass"
        gone = kept.hooks - _hook_ids(self.model) - {kept.own_hook}
        if gone:
            return (f"{len(gone)} call-scoped hook(s) of another defense were active while the cache was filled "
                    "(they may have changed its activations)")
        inputs = ctx.inputs
        extra = sorted(k for k in inputs if k not in ("input_ids", "attention_mask") and k not in _PIXEL_KEYS)
        if extra:
            return f"the processor returns {', '.join(extra)}, which prefix reuse does not handle"
        layers = list(getattr(kept.cache, "layers", []))
        if not layers:
            return "the cache has no layers"
        total = layers[0].get_seq_length()
        for k, layer in enumerate(layers):
            keys = getattr(layer, "keys", None)
            if not getattr(layer, "is_initialized", False) or not isinstance(keys, torch.Tensor) or keys.dim() != 4:
                return f"cache layer {k} ({type(layer).__name__}) holds no plain key/value tensors"
            if keys.shape[-2] != layer.get_seq_length() or layer.get_seq_length() != total:
                return f"cache layer {k} ({type(layer).__name__}) dropped tokens (sliding window)"
        assert isinstance(keys, torch.Tensor)  # the last layer's, checked in the loop
        active = ctx.active
        if keys.shape[0] != len(active):
            return f"the cache holds {keys.shape[0]} rows for {len(active)} generated rows"
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        prompt_len = ids.shape[1]
        n_generated = max(0, total - prompt_len)
        ref = {}
        for row in active:
            b = row.batch_index
            prompt = ids[b][mask[b].bool()].tolist()
            ref[row.index] = (b, prompt_len - len(prompt), prompt + list(row.token_ids[:n_generated]))
        kept.ref, kept.layers = ref, layers
        return None

    def _common(self, rows: Sequence[Any] | None, inputs: dict[str, torch.Tensor]) -> tuple[list[list[int]], list[int]] | str:
        """Per row: its unpadded ids and how many leading ids the cache holds; or why none can be reused."""
        if rows is None:
            return "no rows of the call were given"
        blocked = self._blocked()
        if blocked:
            return blocked
        ref = self._kept.ref or {}
        if any(r.index not in ref for r in rows):
            return "a row was not part of the generation"
        extra = sorted(k for k in inputs if k not in ("input_ids", "attention_mask") and k not in _PIXEL_KEYS)
        if extra:
            return f"the processor returns {', '.join(extra)}, which prefix reuse does not handle"
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        full = [ids[j][mask[j].bool()].tolist() for j in range(len(rows))]
        # At least one token per row stays new: its logits are what the caller wants.
        common = [min(_lcp(f, ref[r.index][2]), len(f) - 1) for r, f in zip(rows, full)]
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

    def _plan(self, rows: Sequence[Any], inputs: dict[str, torch.Tensor], full: list[list[int]],
              common: list[int]) -> tuple[int, Any, str | None]:
        """(split column s, cache for columns [0, s) or None, reason when nothing is reused)."""
        ids = inputs["input_ids"]
        T = ids.shape[1]
        s = T - max(len(f) - c for f, c in zip(full, common))
        if s <= 0:
            return 0, None, "no common prefix with the generation"
        if self._img_ids and bool(torch.isin(ids[:, s:], torch.tensor(sorted(self._img_ids), device=ids.device)).any()):
            return 0, None, "an image placeholder follows the reusable prefix"
        kept = [max(0, s - (T - len(f))) for f in full]
        ref = self._kept.ref or {}
        data = []
        for layer in self._kept.layers:
            K, V = layer.keys, layer.values
            nk = K.new_zeros((len(rows), K.shape[1], s, K.shape[3]))
            nv = V.new_zeros((len(rows), V.shape[1], s, V.shape[3]))
            for j, (r, m) in enumerate(zip(rows, kept)):
                if m:
                    b, first, _ = ref[r.index]
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

    def _run(self, rows: Sequence[Any] | None, convs: Sequence[Conversation], fn: Any, split: bool = True,
             **encode_kw: Any) -> list[Any]:
        """Encode, plan reuse, call ``fn(inputs, s, cache)`` -> one result per conversation."""
        if rows is not None and len(rows) != len(convs):
            raise ValueError(f"got {len(rows)} rows for {len(convs)} conversations")
        inputs = self.engine.encode(convs, **encode_kw)
        got = self._common(rows, inputs)
        if isinstance(got, str):
            for r, m in zip(rows or (), inputs["attention_mask"]):
                self._note(r, 0, int(m.sum()), got)
            return fn(inputs, 0, None)
        assert rows is not None
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
        return fn({k: v for k, v in inputs.items() if k not in _PIXEL_KEYS}, s, cache)
