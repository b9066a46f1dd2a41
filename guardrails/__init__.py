"""Inference-time safety defenses for multimodal and text LLMs, around any transformers model.

>>> from guardrails import wrap
>>> guarded = wrap(model, processor, defenses=[...])
>>> guarded.chat(conversation, max_new_tokens=64).text
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# What type checkers see (`X as X`: re-exported); at run time __getattr__ imports on first use. Keep in step with _EXPORTS.
if TYPE_CHECKING:
    from guardrails.calls import ModelCalls as ModelCalls
    from guardrails.defense import CallContext as CallContext
    from guardrails.defense import Defense as Defense
    from guardrails.defense import Refusal as Refusal
    from guardrails.defense import Requirements as Requirements
    from guardrails.defense import Row as Row
    from guardrails.guarded import CallRecord as CallRecord
    from guardrails.guarded import GuardedModel as GuardedModel
    from guardrails.guarded import GuardedStream as GuardedStream
    from guardrails.guarded import wrap as wrap
    from guardrails.loading import load as load
    from guardrails.results import GuardedResult as GuardedResult
    from guardrails.results import Verdict as Verdict

# Imported on first use: `import guardrails.ocr` or the CLI should not pay for torch + transformers.
_EXPORTS = {
    "wrap": "guardrails.guarded",
    "GuardedModel": "guardrails.guarded",
    "GuardedStream": "guardrails.guarded",
    "CallRecord": "guardrails.guarded",
    "ModelCalls": "guardrails.calls",
    "load": "guardrails.loading",
    "GuardedResult": "guardrails.results",
    "Verdict": "guardrails.results",
    "Defense": "guardrails.defense",
    "CallContext": "guardrails.defense",
    "Row": "guardrails.defense",
    "Refusal": "guardrails.defense",
    "Requirements": "guardrails.defense",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'guardrails' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
