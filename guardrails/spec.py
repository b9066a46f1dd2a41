r"""Defense specs for command lines and benchmarks: ``"system_prompt+protector:mode=stream,every=16"``.

Each ``+``-separated item is ``name`` or ``name:key=value,...``; values are read as JSON where
they parse (numbers, true/false, null) and as strings otherwise. A value holding ``,`` or ``+``
is quoted, ``detector="runs/a,b"`` (JSON string escapes apply) or ``refusal_text='No, sorry.'``
(taken as written), or escaped with a backslash, ``refusal_text=No\, sorry``. A defense class may define
``from_spec(**options)`` to turn strings (paths, preset names) into objects; otherwise the
options go to its constructor.
"""

from __future__ import annotations

import difflib
import importlib
import json
import re
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


#: what a backslash escapes in a spec; any other backslash is kept as written (Windows paths)
_ESCAPABLE = ",+=\\\"'"
_ESCAPE = re.compile(r"\\([,+=\\\"'])")


def _split(text: str, sep: str, spec: str) -> list[str]:
    """``text`` cut at every ``sep`` outside quotes and not escaped; pieces keep their quotes and escapes."""
    pieces, cur, quote, i = [], [], None, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text) and text[i + 1] in _ESCAPABLE:
            cur.append(text[i:i + 2])
            i += 2
            continue
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'" and "".join(cur).rstrip().endswith("="):  # only a value can be quoted: "can't" is text
            quote = ch
        elif ch == sep:
            pieces.append("".join(cur))
            cur = []
            i += 1
            continue
        cur.append(ch)
        i += 1
    if quote:
        raise ValueError(f"defense spec {spec!r} has an unclosed {quote} quote")
    pieces.append("".join(cur))
    return pieces


def _value(raw: str, spec: str) -> Any:
    """A quoted value is a string (double quotes: JSON escapes), else JSON where it parses, else the text."""
    raw = raw.strip()
    if len(raw) >= 2 and raw[0] == raw[-1] == '"':
        try:
            return json.loads(raw)
        except json.JSONDecodeError as e:
            raise ValueError(f"defense option value {raw} in {spec!r} is not a valid quoted string ({e.msg})") from None
    if len(raw) >= 2 and raw[0] == raw[-1] == "'":
        return raw[1:-1]
    if _ESCAPE.search(raw):  # escaped separators: the value is text, with the escapes removed
        return _ESCAPE.sub(r"\1", raw)
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_spec(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """``"a+b:x=1,y=foo"`` -> ``[("a", {}), ("b", {"x": 1, "y": "foo"})]``; ``"none"`` -> ``[]``.

    ``b:y="1,2"`` or ``b:y=1\\,2`` gives ``{"y": "1,2"}`` (quote or escape ``,`` and ``+`` in values).
    """
    if not isinstance(spec, str):
        raise TypeError(f"a defense spec is a string like 'system_prompt+protector:mode=stream', got {type(spec).__name__}")
    spec = spec.strip()
    if spec in ("", "none", "bare"):
        return []
    out = []
    for item in _split(spec, "+", spec):
        name, _, opts = item.strip().partition(":")
        if not name.strip():
            raise ValueError(f"defense spec {spec!r} has an empty item; join names with one '+', e.g. system_prompt+ocr")
        options: dict[str, Any] = {}
        for pair in filter(None, (p.strip() for p in _split(opts, ",", spec))):
            key, eq, value = pair.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"defense option {pair!r} in {item!r} must look like key=value")
            if key.strip() in options:
                raise ValueError(f"defense option {key.strip()!r} is given twice in {item!r}")
            options[key.strip()] = _value(value, spec)
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
        except (TypeError, ValueError, OSError) as e:
            # Name the defense: "steering vectors folder 'x' does not exist" alone does not say which option.
            raise ValueError(f"defense {name!r}: {e}") from e
    return defenses
