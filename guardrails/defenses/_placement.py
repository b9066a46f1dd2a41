"""Where a safety text goes in a conversation: system message, user-turn prefix, or sandwich.

Shared by SafetySystemPrompt and AdaShield. Edits return copies (the caller's conversation is
never changed) and keep image parts exactly where they were.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, get_args

from guardrails import conversation as conv_mod
from guardrails.conversation import Conversation

Placement = Literal["system", "prefix", "sandwich"]
PLACEMENTS: tuple[str, ...] = get_args(Placement)

_SYS_PROBE = "GRSYSPROBE system text 7Q"
_USER_PROBE = "GRUSERPROBE user text 3K"
_MERGE_SEP = "\n\n"  # how chat templates that merge a system message into the user turn join them


@dataclass(frozen=True)
class SystemSupport:
    """How one chat template treats a system message.

    ``kind``: "turn" (its own turn), "template_merges" (the template itself puts the system text into
    a user turn: Gemma 3, Mistral) or "absent" (raises or drops it; we merge into the first user turn).
    """

    kind: str
    reason: str = ""
    #: the system text the template writes when a conversation has none (Qwen2: "You are Qwen, ...")
    default_system: str | None = None


_SUPPORT_CACHE: dict[tuple[int, str], SystemSupport] = {}


def system_support(engine: Any) -> SystemSupport:
    """Probe the chat template once per processor/template: render a conversation with a system message."""
    template = getattr(engine.processor, "chat_template", None) or getattr(engine.tokenizer, "chat_template", None)
    key = (id(engine.processor), str(template))
    if key in _SUPPORT_CACHE:
        return _SUPPORT_CACHE[key]
    probe = conv_mod.validate([{"role": "system", "content": _SYS_PROBE}, {"role": "user", "content": _USER_PROBE}])
    merged = conv_mod.validate([{"role": "user", "content": _SYS_PROBE + _MERGE_SEP + _USER_PROBE}])
    try:
        with_system = engine.render([probe])[0]
    except Exception as e:  # templates signal "no system role" with raise_exception (TemplateError) or others
        support = SystemSupport("absent", f"the chat template raises on a system message ({type(e).__name__}: {e})")
    else:
        if _SYS_PROBE not in with_system:
            support = SystemSupport("absent", "the chat template drops system messages")
        else:
            try:
                same = engine.render([merged])[0] == with_system
            except Exception:
                same = False
            support = SystemSupport("template_merges", "the chat template merges the system message into a user turn") if same else SystemSupport("turn")
            default = _default_system(engine, with_system)
            if default:
                support = SystemSupport(support.kind, support.reason, default)
    _SUPPORT_CACHE[key] = support
    return support


def _default_system(engine: Any, with_system: str) -> str | None:
    """The template's own system text for conversations without one, or None.

    Rendered with a probe system message the prompt reads ``head + probe + tail``; rendered without
    one, a template with a default reads ``head + default + tail`` (Qwen2, SmolLM2).
    """
    head, _, tail = with_system.partition(_SYS_PROBE)
    try:
        without = engine.render([conv_mod.validate([{"role": "user", "content": _USER_PROBE}])])[0]
    except Exception:
        return None
    if len(without) <= len(head) + len(tail) or not (without.startswith(head) and without.endswith(tail)):
        return None
    default = without[len(head):len(without) - len(tail)]
    return default if default.strip() else None


def _text_indices(msg: dict[str, Any]) -> list[int]:
    return [k for k, p in enumerate(msg["content"]) if p["type"] == "text"]


def prefix_turn(conversation: Conversation, index: int, text: str, separator: str) -> Conversation:
    """``text`` before the text of message ``index`` (images stay in place)."""
    conv = conv_mod.copy_conversation(conversation)
    msg = conv[index]
    idx = _text_indices(msg)
    if idx:
        part = msg["content"][idx[0]]
        part["text"] = text + separator + part["text"] if part["text"] else text
    else:
        msg["content"].append({"type": "text", "text": text})
    return conv


def sandwich_turn(conversation: Conversation, index: int, text: str, separator: str) -> Conversation:
    """AdaShield's query + shield + query in message ``index``: the shield and a repeat of the whole
    query follow the turn's last text part, so images and the original text stay where they were."""
    conv = conv_mod.copy_conversation(conversation)
    msg = conv[index]
    query = conv_mod.message_text(msg)
    idx = _text_indices(msg)
    tail = separator.join(x for x in (text, query) if x)
    if idx:
        part = msg["content"][idx[-1]]
        part["text"] = part["text"] + separator + tail if part["text"] else tail
    else:
        msg["content"].append({"type": "text", "text": tail})
    return conv


def place(conversation: Conversation, text: str, placement: str, separator: str, engine: Any) -> tuple[Conversation, dict[str, Any]]:
    """Put ``text`` into a copy of ``conversation``; the dict says where it really went."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement must be one of {PLACEMENTS}, got {placement!r}")
    detail: dict[str, Any] = {"placement": placement, "merged_into_user": False}
    if placement == "prefix":
        return prefix_turn(conversation, conv_mod.last_user_index(conversation), text, separator), detail
    if placement == "sandwich":
        return sandwich_turn(conversation, conv_mod.last_user_index(conversation), text, separator), detail

    conv = conv_mod.copy_conversation(conversation)
    existing = conv[0]["role"] == "system"
    support = system_support(engine)
    if support.kind == "absent":
        # Our text, then the caller's own system text (which the template could not show either), then the turn.
        texts = [text] + ([conv_mod.message_text(conv[0])] if existing else [])
        if existing:
            conv = conv[1:]
            detail["existing_system"] = "merged into the first user turn after ours"
        first_user = next(k for k, m in enumerate(conv) if m["role"] == "user")
        conv = prefix_turn(conv, first_user, _MERGE_SEP.join(t for t in texts if t), _MERGE_SEP)
        detail.update(merged_into_user=True, merged_by="SafetySystemPrompt", reason=support.reason)
        return conv, detail
    if existing:
        conv = prefix_turn(conv, 0, text, _MERGE_SEP)
        detail["existing_system"] = "ours prepended to it"
    elif support.default_system:
        # Keep what the model would have seen without us (its template's default system prompt,
        # which instruction tuning relied on) and add the safety text after it.
        conv.insert(0, {"role": "system", "content": [{"type": "text", "text": support.default_system + _MERGE_SEP + text}]})
        detail["template_default_system"] = support.default_system  # kept; ours follows it
    else:
        conv.insert(0, {"role": "system", "content": [{"type": "text", "text": text}]})
    if support.kind == "template_merges":
        detail.update(merged_into_user=True, merged_by="chat template", reason=support.reason)
    return conv, detail
