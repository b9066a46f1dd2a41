"""Defense specs for command lines and benchmarks: ``"system_prompt+protector:mode=stream,every=16"``.

Each ``+``-separated item is ``name`` or ``name:key=value,...``; values are read as JSON where
they parse (numbers, true/false, null) and as strings otherwise. A defense class may define
``from_spec(**options)`` to turn strings (paths, preset names) into objects; otherwise the
options go to its constructor.
"""

from __future__ import annotations

import difflib
import importlib
import json
from typing import Any

from guardrails.defense import Defense

#: spec name -> "module:Class", imported only when used
REGISTRY: dict[str, str] = {
    "system_prompt": "guardrails.defenses.system_prompt:SafetySystemPrompt",
    "self_moderation": "guardrails.defenses.self_moderation:SelfModeration",
    "ecso": "guardrails.defenses.ecso:ECSO",
    "adashield": "guardrails.defenses.adashield:AdaShield",
    "inferaligner": "guardrails.defenses.inferaligner:InferAligner",
    "protector": "guardrails.defenses.protector:Protector",
    "ocr": "guardrails.defenses.ocr_screen:OCRScreen",
}


def defense_class(name: str) -> type[Defense]:
    if name not in REGISTRY:
        close = difflib.get_close_matches(name, REGISTRY, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ValueError(f"unknown defense {name!r}{hint}; known: {', '.join(sorted(REGISTRY))}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)


def parse_spec(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """``"a+b:x=1,y=foo"`` -> ``[("a", {}), ("b", {"x": 1, "y": "foo"})]``; ``"none"`` -> ``[]``."""
    spec = spec.strip()
    if spec in ("", "none", "bare"):
        return []
    out = []
    for item in spec.split("+"):
        name, _, opts = item.strip().partition(":")
        options: dict[str, Any] = {}
        for pair in filter(None, (p.strip() for p in opts.split(","))):
            key, eq, value = pair.partition("=")
            if not eq or not key:
                raise ValueError(f"defense option {pair!r} in {item!r} must look like key=value")
            try:
                options[key.strip()] = json.loads(value)
            except json.JSONDecodeError:
                options[key.strip()] = value.strip()
        out.append((name.strip(), options))
    return out


def build_defenses(spec: str) -> list[Defense]:
    """Instances for a spec string, in order."""
    defenses = []
    for name, options in parse_spec(spec):
        cls = defense_class(name)
        factory = getattr(cls, "from_spec", None) or cls
        try:
            defenses.append(factory(**options))
        except TypeError as e:
            raise ValueError(f"defense {name!r}: {e}") from e
    return defenses
