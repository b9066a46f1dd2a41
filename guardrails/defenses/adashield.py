"""AdaShield (Wang et al. 2024, arXiv 2403.09513; SaFoLab-WISC/AdaShield).

- AdaShield-S (no pool): the static shield ``adashield_static`` is added to every row as the
  source places it: query + shield + query.
- AdaShield-A (a pool): defense prompts per scenario. Each input (the last user turn: text and
  images) is embedded, compared by cosine similarity with the pool's keys, and the prompt of the
  best key is added only when the similarity is above ``threshold``; benign inputs (low
  similarity) go through untouched. :meth:`AdaShield.calibrate` sets the threshold from held-out
  benign inputs: the (1 - target_fpr) quantile of their best similarities, so at most
  ``target_fpr`` of them would get a shield.

Pool format (a dict, or a JSON file holding one)::

    {"scenario": ["defense prompt", ...]}                          # the prompt text is its own key
    {"scenario": [{"prompt": "...", "keys": ["example attack query", ...]}, ...]}

Keys are what an input is compared with: example inputs of the scenario retrieve far better than
the defense prompt's own text. Every entry is kept as given: two prompts for one scenario are two
entries, and nothing here rewrites the pool (the released AdaShield training loop overwrites its
own refined prompts; there is no such loop here).

Embedders: ``"hidden"`` uses the wrapped model itself (one forward over the last user turn;
``hidden_states[layer]``: 0 = embeddings, k = output of decoder layer k, -1 = last; default the
middle one; at the last prompt token, or mean-pooled over the prompt), or any callable
``embedder(texts: list[str], images: list[list[PIL.Image]]) -> array [N, D]`` (e.g. a CLIP model).

Streaming: works unchanged (it only edits the prompt before generation).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import numpy as np

import prompts
from guardrails import conversation as conv_mod
from guardrails.calls import ModelCalls
from guardrails.config import Config
from guardrails.conversation import Conversation
from guardrails.defense import CallContext, Defense, Row
from guardrails.defenses._placement import Placement, place
from guardrails.results import Verdict

Pooling = Literal["last", "mean"]
POOLINGS: tuple[str, ...] = get_args(Pooling)


@dataclass(frozen=True)
class PoolEntry:
    scenario: str
    prompt: str
    keys: tuple[str, ...]


def load_pool(pool: dict[str, Any] | str | Path) -> list[PoolEntry]:
    """Validate a pool (dict or JSON path) into entries, keeping every prompt in order."""
    if isinstance(pool, (str, Path)):
        path = Path(pool)
        if not path.is_file():
            raise ValueError(f"AdaShield pool file {str(path)!r} does not exist")
        try:
            pool = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"AdaShield pool file {str(path)!r} is not valid JSON: {e}") from e
    if not isinstance(pool, dict) or not pool:
        raise TypeError("pool must be a non-empty dict {scenario: [prompt or {'prompt': ..., 'keys': [...]}, ...]} or a JSON file of one")
    entries = []
    for scenario, items in pool.items():
        if not isinstance(scenario, str) or not scenario:
            raise ValueError(f"pool scenario names must be non-empty strings, got {scenario!r}")
        if isinstance(items, (str, dict)):
            items = [items]
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError(f"pool[{scenario!r}] must be a non-empty list of prompts")
        prompt: Any  # checked below, whichever form the item has
        for k, item in enumerate(items):
            where = f"pool[{scenario!r}][{k}]"
            if isinstance(item, str):
                prompt, keys = item, [item]
            elif isinstance(item, dict):
                unknown = set(item) - {"prompt", "keys"}
                if unknown:
                    raise ValueError(f"{where} has unknown field(s) {sorted(unknown)}; use 'prompt' and 'keys'")
                prompt, keys = item.get("prompt"), item.get("keys", [item.get("prompt")])
                if isinstance(keys, str):
                    keys = [keys]
            else:
                raise TypeError(f"{where} must be a prompt string or {{'prompt': ..., 'keys': [...]}}, got {type(item).__name__}")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{where}: the prompt must be a non-empty string")
            if not isinstance(keys, (list, tuple)) or not keys or not all(isinstance(x, str) and x.strip() for x in keys):
                raise ValueError(f"{where}: keys must be a non-empty list of non-empty strings")
            entries.append(PoolEntry(scenario, prompt, tuple(keys)))
    return entries


@dataclass(frozen=True)
class AdaShieldConfig(Config):
    """Validated settings; see :class:`AdaShield`. ``threshold`` is the one in use: :meth:`AdaShield.calibrate` writes it here."""

    threshold: float | None = None
    embedder: str | Callable[..., Any] = "hidden"
    layer: int | None = None
    pooling: Pooling = "last"
    placement: Placement = "sandwich"
    separator: str = "\n"
    static_prompt: str = field(default_factory=lambda: prompts.render("adashield_static"))

    def __post_init__(self):
        super().__post_init__()
        if self.threshold is not None and (isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float))
                                           or not math.isfinite(self.threshold) or not -1.0 <= self.threshold <= 1.0):
            raise ValueError(f"threshold is a cosine similarity in [-1, 1] (or None to calibrate), got {self.threshold!r}")
        if not (self.embedder == "hidden" or callable(self.embedder)):
            raise ValueError(f"embedder must be 'hidden' or a callable (texts, images) -> array [N, D], got {self.embedder!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise TypeError(f"layer must be an int (a decoder layer; negative counts from the end) or None (middle layer), got {self.layer!r}")
        if not isinstance(self.separator, str):
            raise TypeError(f"separator must be a str, got {type(self.separator).__name__}")


class AdaShield(Defense):
    """AdaShield-S (``pool=None``) or AdaShield-A (retrieval from ``pool`` above ``threshold``).

    >>> AdaShield()                                               # static shield, every row
    >>> shield = AdaShield(pool={"bomb": [{"prompt": "...", "keys": ["How do I build a bomb?"]}]})
    >>> shield.calibrate(benign_conversations, target_fpr=0.05, model=guarded)
    >>> guarded = wrap(model, processor, defenses=[shield])

    Similarity rule: a shield is applied when the best cosine similarity is strictly above the
    threshold. The verdict's detail has scenario, similarity, threshold and applied.
    """

    supports_streaming: ClassVar[bool] = True

    def __init__(self, pool: dict[str, Any] | str | Path | None = None, threshold: float | None = AdaShieldConfig.threshold,
                 embedder: str | Callable[..., Any] = AdaShieldConfig.embedder, *, layer: int | None = AdaShieldConfig.layer,
                 pooling: Pooling = AdaShieldConfig.pooling, placement: Placement = AdaShieldConfig.placement,
                 separator: str = AdaShieldConfig.separator, name: str | None = None):
        super().__init__(name)
        self.config = AdaShieldConfig(threshold=threshold, embedder=embedder, layer=layer, pooling=pooling,
                                      placement=placement, separator=separator)
        self.entries: list[PoolEntry] | None = None if pool is None else load_pool(pool)
        if self.entries is None and threshold is not None:
            raise ValueError("threshold applies to retrieval from a pool; AdaShield-S (pool=None) shields every row")
        #: set by calibrate(): the data behind ``config.threshold``
        self.calibration: dict[str, Any] | None = None
        self._key_cache: dict[Any, np.ndarray] = {}

    @classmethod
    def from_spec(cls, pool: str | None = None, **options: Any) -> AdaShield:
        """Spec options: ``pool=PATH.json``, ``threshold=0.8``, ``layer=``, ``pooling=``, ``placement=``."""
        return cls(pool=pool, **options)

    # -- embeddings ----------------------------------------------------------------------------
    def _embed(self, calls: ModelCalls | None, convs: Sequence[Conversation]) -> np.ndarray:
        """One L2-normalised embedding per single-turn conversation (the turn's text and images)."""
        cfg = self.config
        if callable(cfg.embedder):
            texts = [conv_mod.last_user_text(c) for c in convs]
            images = [[conv_mod.to_pil(x) for x in conv_mod.images(c)] for c in convs]
            emb = np.asarray(cfg.embedder(texts, images), dtype=np.float64)
            if emb.ndim != 2 or emb.shape[0] != len(convs):
                raise ValueError(f"the embedder returned shape {emb.shape} for {len(convs)} inputs; it must return [N, D]")
        else:
            if calls is None:
                raise ValueError("embedder='hidden' needs the wrapped model; pass model=guarded")
            rows = []
            # Small batches bound the memory of output_hidden_states (all layers, all positions).
            for k in range(0, len(convs), 8):
                inputs = calls.engine.encode(list(convs[k:k + 8]))
                out = calls.forward(inputs, last_only=True, output_hidden_states=True)
                hs = out.hidden_states
                layer = cfg.layer if cfg.layer is not None else (len(hs) - 1) // 2
                if not -len(hs) <= layer < len(hs):
                    raise ValueError(f"layer={cfg.layer} is out of range: hidden_states has {len(hs)} entries (embeddings + {len(hs) - 1} layers)")
                h = hs[layer].float()
                mask = inputs["attention_mask"].to(h.device).unsqueeze(-1).float()
                if cfg.pooling == "last":
                    vec = h[:, -1, :]  # left padding: the last column is every row's last prompt token
                else:
                    vec = (h * mask).sum(1) / mask.sum(1).clamp_min(1.0)
                rows.append(vec.cpu().numpy().astype(np.float64))
            emb = np.concatenate(rows, axis=0)
        norms = np.linalg.norm(emb, axis=1, keepdims=True)
        if not np.all(np.isfinite(emb)) or np.any(norms == 0):
            raise ValueError("an embedding is zero or not finite; cosine similarity is undefined for it")
        return emb / norms

    @staticmethod
    def _single_turn(conversation: Conversation) -> Conversation:
        """What is embedded: the last user turn alone (text and images, in place)."""
        return [conv_mod.copy_conversation([conversation[conv_mod.last_user_index(conversation)]])[0]]

    def _keys(self, calls: ModelCalls | None) -> tuple[np.ndarray, list[int]]:
        """Key embeddings (cached per model) and the pool entry of each key."""
        if callable(self.config.embedder):
            owner = ("callable", id(self.config.embedder))
        elif calls is None:
            raise ValueError("embedder='hidden' needs the wrapped model; pass model=guarded")
        else:
            owner = ("hidden", id(calls.model))
        if self.entries is None:
            raise ValueError("AdaShield-S (pool=None) has no pool to retrieve from")
        owner_of = [k for k, e in enumerate(self.entries) for _ in e.keys]
        if owner not in self._key_cache:
            convs = [[{"role": "user", "content": [{"type": "text", "text": key}]}] for e in self.entries for key in e.keys]
            self._key_cache[owner] = self._embed(calls, convs)
        return self._key_cache[owner], owner_of

    def similarities(self, model: Any, conversations: Sequence[Conversation]) -> tuple[np.ndarray, np.ndarray]:
        """(best cosine similarity, index of its pool entry) per conversation; ``model``: the GuardedModel
        (or a call's ``ctx.calls``), None for a callable embedder."""
        calls = ModelCalls.of(model)
        conversations = [conv_mod.validate(c, k) for k, c in enumerate(conversations)]
        keys, owner_of = self._keys(calls)
        emb = self._embed(calls, [self._single_turn(c) for c in conversations])
        sims = np.clip(emb @ keys.T, -1.0, 1.0)  # rounding can leave |cos| a hair above 1
        best = sims.argmax(axis=1)
        return sims[np.arange(len(conversations)), best], np.asarray(owner_of)[best]

    # -- calibration ---------------------------------------------------------------------------
    def calibrate(self, benign_conversations: Sequence[Any], target_fpr: float = 0.05, *, model: Any = None) -> float:
        """Set the threshold so at most ``target_fpr`` of these benign inputs would be shielded.

        threshold = the (1 - target_fpr) quantile ("higher" method) of their best similarities; a
        shield applies when the similarity is strictly above it. Written to ``self.config.threshold``;
        the data behind it, with the config, to ``self.calibration``.
        ``model``: the GuardedModel (needed for embedder="hidden").
        """
        if self.entries is None:
            raise ValueError("calibrate() sets the retrieval threshold; AdaShield-S (pool=None) has none")
        if isinstance(target_fpr, bool) or not isinstance(target_fpr, (int, float)) or not 0.0 <= target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr!r}")
        batch, _ = conv_mod.validate_batch(benign_conversations)
        if model is not None and not hasattr(model, "engine"):
            raise TypeError(f"model must be the GuardedModel from wrap(...), got {type(model).__name__}")
        sims, _ = self.similarities(model, batch)
        threshold = float(np.quantile(sims, 1.0 - target_fpr, method="higher"))
        observed = float(np.mean(sims > threshold))
        if len(batch) < math.ceil(1.0 / max(target_fpr, 1e-12)):
            warnings.warn(
                f"calibrating target_fpr={target_fpr} on {len(batch)} benign inputs: too few to resolve that rate, "
                f"the threshold is their maximum similarity; use at least {math.ceil(1 / max(target_fpr, 1e-12))}",
                stacklevel=2,
            )
        self.config = self.config.replace(threshold=threshold)
        self.calibration = {
            "target_fpr": float(target_fpr), "n_benign": len(batch), "threshold": threshold,
            "observed_fpr": observed, "quantile": 1.0 - target_fpr, "method": "higher",
            "similarity": {"min": float(sims.min()), "median": float(np.median(sims)), "max": float(sims.max())},
            "embedder": "hidden" if self.config.embedder == "hidden" else getattr(self.config.embedder, "__name__", "callable"),
            "layer": self.config.layer, "pooling": self.config.pooling, "config": self.config.to_dict(),
        }
        return threshold

    # -- before ------------------------------------------------------------------------------
    def _before(self, ctx: CallContext, rows: list[Row]) -> list[Verdict]:
        cfg = self.config
        if self.entries is None:
            out = []
            for row in rows:
                row.conversation, detail = place(row.conv, cfg.static_prompt, cfg.placement, cfg.separator, ctx.engine)
                detail.update(mode="static", applied=True)
                out.append(Verdict(action="edit", detail=detail))
            return out
        if cfg.threshold is None:
            raise ValueError(
                f"{self.name} has a pool but no threshold: pass AdaShield(pool, threshold=...) or call "
                "shield.calibrate(benign_conversations, target_fpr=0.05, model=guarded) first"
            )
        sims, best = self.similarities(ctx.calls, [r.conv for r in rows])
        out = []
        for row, sim, k in zip(rows, sims.tolist(), best.tolist()):
            entry = self.entries[k]
            applied = sim > cfg.threshold
            detail = {"mode": "retrieval", "scenario": entry.scenario, "similarity": sim,
                                      "threshold": cfg.threshold, "applied": applied, "prompt_index": k}
            if applied:
                row.conversation, where = place(row.conv, entry.prompt, cfg.placement, cfg.separator, ctx.engine)
                detail.update(where)
            out.append(Verdict(flagged=applied, score=sim, threshold=cfg.threshold,
                               action="edit" if applied else "pass", detail=detail))
        return out
