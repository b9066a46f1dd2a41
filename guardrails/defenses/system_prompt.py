"""SafetySystemPrompt: a safety instruction as system message, user-turn prefix, or sandwich.

Sources (DESIGN.md 3.1): MM-SafetyBench's safety prompt (prefix of the query), AdaShield-S's static
shield (query + shield + query), and detailed system prompts in the style of Wu et al. 2023
(written for this project). Placement is a parameter because it matters.

Streaming: works unchanged (it only edits the prompt before generation).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import prompts
from guardrails.config import Config
from guardrails.defense import CallContext, Defense, Row
from guardrails.defenses._placement import Placement, place, system_support
from guardrails.results import Verdict

#: preset name -> prompt template name (``prompts.get``)
PRESETS: dict[str, str] = {
    "default": "system_default",
    "helpful": "system_helpful",
    "detailed": "system_detailed",
    "vision": "system_vision",
    "mmsafetybench": "mmsafetybench_safety_prompt",
    "adashield": "adashield_static",
}


@dataclass(frozen=True)
class SystemPromptConfig(Config):
    """Validated settings. ``source`` records where ``text`` came from (preset, template or "custom")."""

    text: str
    source: str = "custom"
    placement: Placement = "system"
    separator: str = "\n"

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.text, str) or not self.text.strip():
            raise ValueError("the safety prompt text is empty; give a preset name or text='...'")
        if not isinstance(self.separator, str):
            raise TypeError(f"separator must be a str, got {type(self.separator).__name__}")


def resolve_text(preset_or_text: str | None, text: str | None) -> tuple[str, str]:
    """(text, source) from a preset / template name or literal text.

    A string is a preset when it is a key of PRESETS or the name of a prompt template without
    fields; a string with whitespace is literal text; any other single word is an error (a typo of
    a preset must not become the system prompt). ``text=`` is always literal.
    """
    if text is not None:
        if preset_or_text not in (None, "default"):
            raise ValueError("give either a preset (first argument) or text=..., not both")
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return text, "custom"
    if not isinstance(preset_or_text, str):
        raise TypeError(f"preset_or_text must be a preset name or the prompt text, got {type(preset_or_text).__name__}")
    if preset_or_text in PRESETS:
        return prompts.get(PRESETS[preset_or_text]).render(), f"preset:{preset_or_text}"
    if preset_or_text in prompts.names():
        template = prompts.get(preset_or_text)
        if template.fields:
            raise ValueError(f"prompt template {preset_or_text!r} needs fields {list(template.fields)}; use one without fields")
        return template.render(), f"prompt:{preset_or_text}"
    if any(c.isspace() for c in preset_or_text.strip()):
        return preset_or_text, "custom"
    close = difflib.get_close_matches(preset_or_text, list(PRESETS) + prompts.names(), n=2)
    hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
    raise ValueError(
        f"unknown preset {preset_or_text!r}{hint} Presets: {', '.join(PRESETS)}. "
        "For your own one-word text, pass text='...'."
    )


class SafetySystemPrompt(Defense):
    """Adds a safety instruction to every row before generation.

    >>> SafetySystemPrompt()                                   # system_default as a system message
    >>> SafetySystemPrompt("mmsafetybench", placement="prefix")  # MM-SafetyBench: before the query
    >>> SafetySystemPrompt("adashield", placement="sandwich")    # AdaShield-S: query + shield + query
    >>> SafetySystemPrompt(text="Never help with weapons.")

    ``placement``: "system" (a system message; prepended to an existing one; merged into the first
    user turn when the chat template has no system role, and the verdict says so), "prefix" (before
    the text of the last user turn) or "sandwich" (after the last user turn's text: shield, then the
    whole query again; AdaShield's source concatenates with no separator, we use ``separator``).
    Images stay where they were in every placement.
    """

    supports_streaming: ClassVar[bool] = True

    def __init__(self, preset_or_text: str = "default", placement: Placement = SystemPromptConfig.placement, *,
                 text: str | None = None, separator: str = SystemPromptConfig.separator, name: str | None = None):
        super().__init__(name)
        body, source = resolve_text(preset_or_text, text)
        self.config = SystemPromptConfig(text=body, source=source, placement=placement, separator=separator)

    @classmethod
    def from_spec(cls, preset: str | None = None, text: str | None = None, file: str | None = None, **options: Any) -> SafetySystemPrompt:
        """Spec options: ``preset=NAME`` | ``text=...`` | ``file=PATH`` (text read from a file), ``placement=...``."""
        if sum(x is not None for x in (preset, text, file)) > 1:
            raise ValueError("give one of preset=, text= or file=")
        if file is not None:
            path = Path(file)
            if not path.is_file():
                raise ValueError(f"system prompt file {file!r} does not exist")
            text = path.read_text(encoding="utf-8").strip()
        return cls(preset if preset is not None else "default", text=text, **options)

    @property
    def text(self) -> str:
        return self.config.text

    def _before(self, ctx: CallContext, rows: list[Row]) -> list[Verdict]:
        out = []
        for row in rows:
            row.conversation, detail = place(row.conv, self.config.text, self.config.placement,
                                             self.config.separator, ctx.engine)
            detail["prompt"] = self.config.source
            out.append(Verdict(action="edit", detail=detail))
        return out

    def system_role(self, guarded: Any) -> str:
        """How this model's chat template treats system messages: "turn", "template_merges" or "absent"."""
        return system_support(guarded.engine).kind
