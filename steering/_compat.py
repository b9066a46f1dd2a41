"""Every transformers name that moved between the oldest release we support and today, in one place.

No other module of ``steering`` or ``guardrails`` spells these names (``guardrails._compat``
re-exports this module). The test suite runs against both ends of the range declared in
pyproject.toml (the lock in ``constraints/ci.txt`` and the newest releases).

What moved:
- 5.24 renamed the KV-cache argument of ``generate`` and of every ``forward`` from
  ``past_key_values`` to ``cache`` (the old name still works there with a FutureWarning), and the
  model outputs' field with it. Forward hooks see whichever name the caller used, so they must
  look for both; code that only knew the old name silently stopped seeing the cache.
- The list of static (compileable) cache implementations grew and is exported under a name that
  may move again; it is read from transformers where it exists.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from transformers import DynamicCache
from transformers.generation import GenerationMixin

__all__ = [
    "CACHE_KWARG",
    "CACHE_KWARGS",
    "STATIC_CACHE_IMPLEMENTATIONS",
    "get_cache",
    "is_static_cache",
    "new_dynamic_cache",
    "output_cache",
    "text_config",
    "without_cache",
]

#: the keyword ``generate`` and ``forward`` take the KV cache by in the installed transformers
CACHE_KWARG: str = ("cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
                    else "past_key_values")
#: every keyword a cache may arrive under: a caller may still use the old name where it is deprecated
CACHE_KWARGS: tuple[str, ...] = tuple(dict.fromkeys((CACHE_KWARG, "cache", "past_key_values")))

try:  # the list transformers itself uses to decide on a static (compileable) cache
    from transformers.generation.configuration_utils import ALL_STATIC_CACHE_IMPLEMENTATIONS as _STATIC
except ImportError:  # pragma: no cover - a release that moved it again
    _STATIC = ("static", "offloaded_static", "sliding_window", "hybrid", "hybrid_chunked", "offloaded_hybrid",
               "offloaded_hybrid_chunked")
#: ``cache_implementation`` values that make ``generate`` use a static cache (and compile the decode step)
STATIC_CACHE_IMPLEMENTATIONS: tuple[str, ...] = tuple(_STATIC)


def get_cache(kwargs: Mapping[str, Any]) -> Any:
    """The KV cache in generate/forward keyword arguments, under either name, or None."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def without_cache(kwargs: Mapping[str, Any], *also: str) -> dict[str, Any]:
    """A copy of ``kwargs`` without the cache (under either name) and without the keys in ``also``."""
    drop = set(CACHE_KWARGS) | set(also)
    return {k: v for k, v in kwargs.items() if k not in drop}


def output_cache(output: Any) -> Any:
    """The cache a forward returned (``output.cache`` from 5.24, ``output.past_key_values`` before)."""
    for name in CACHE_KWARGS:
        value = output.get(name) if isinstance(output, Mapping) else getattr(output, name, None)
        if value is not None:
            return value
    return None


def is_static_cache(cache: Any) -> bool:
    """True for a compileable cache that ``generate`` compiles the decode step with (not a DynamicCache)."""
    return cache is not None and bool(getattr(cache, "is_compileable", False)) and not isinstance(cache, DynamicCache)


def text_config(config: Any) -> Any:
    """The decoder's text config of a (possibly multimodal) model config."""
    get = getattr(config, "get_text_config", None)
    return get(decoder=True) if get is not None else config


def new_dynamic_cache(config: Any, layers: Iterable[tuple[Any, Any]] | None = None) -> DynamicCache:
    """A ``DynamicCache`` like the one ``generate`` builds for ``config``, optionally filled with
    per-layer ``(keys, values)``."""
    if layers is None:
        return DynamicCache(config=text_config(config))
    return DynamicCache(ddp_cache_data=list(layers), config=text_config(config))
