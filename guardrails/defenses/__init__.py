"""The defenses, one module each. Classes are imported lazily so a module that is missing or fails
to import (an optional dependency) breaks only its own defense, never ``import guardrails.defenses``.

>>> from guardrails.defenses import SafetySystemPrompt, SelfModeration, ECSO, AdaShield
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: class name -> module (under guardrails.defenses)
# What type checkers see (`X as X`: re-exported); at run time __getattr__ imports on first use. Keep in step with _EXPORTS.
if TYPE_CHECKING:
    from guardrails.defenses.adashield import AdaShield as AdaShield
    from guardrails.defenses.ecso import ECSO as ECSO
    from guardrails.defenses.inferaligner import InferAligner as InferAligner
    from guardrails.defenses.ocr_screen import OCRScreen as OCRScreen
    from guardrails.defenses.protector import Detoxifier as Detoxifier
    from guardrails.defenses.protector import Protector as Protector
    from guardrails.defenses.self_moderation import SelfModeration as SelfModeration
    from guardrails.defenses.system_prompt import SafetySystemPrompt as SafetySystemPrompt

_EXPORTS: dict[str, str] = {
    "SafetySystemPrompt": "system_prompt",
    "SelfModeration": "self_moderation",
    "ECSO": "ecso",
    "AdaShield": "adashield",
    "Protector": "protector",
    "Detoxifier": "protector",
    "InferAligner": "inferaligner",
    "OCRScreen": "ocr_screen",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        mod = importlib.import_module(f"{__name__}.{module}")
    except ModuleNotFoundError as e:
        if e.name == f"{__name__}.{module}":
            raise ImportError(f"{name} lives in guardrails/defenses/{module}.py, which is not in this installation") from e
        raise
    value = getattr(mod, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
