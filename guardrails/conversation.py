"""Conversations: the list-of-messages format transformers' chat templates take.

    [{"role": "system", "content": "..."},
     {"role": "user", "content": [{"type": "image", "image": PIL.Image | path}, {"type": "text", "text": "..."}]}]

Helpers here never mutate their input: defenses edit copies, so the caller's conversation is
exactly what they passed in, and the result records what the model really saw.
"""

from __future__ import annotations

import copy
from typing import Any

ROLES = ("system", "user", "assistant")
Conversation = list[dict[str, Any]]
_IMAGE_KEYS = ("image", "path", "url")


def validate(conversation: Any, index: int | None = None, *, allow_assistant_last: bool = False) -> Conversation:
    """Check one conversation and return a normalised copy (content always a list of parts).

    ``allow_assistant_last`` admits an open assistant turn to be continued (answer prefixes).

    Raises TypeError/ValueError naming the message and the fix.
    """
    where = "conversation" if index is None else f"conversation {index}"
    if not isinstance(conversation, (list, tuple)):
        raise TypeError(f"{where} must be a list of messages like [{{'role': 'user', 'content': 'Hi'}}], got {type(conversation).__name__}")
    if not conversation:
        raise ValueError(f"{where} is empty; give at least one user message")
    out: Conversation = []
    for i, msg in enumerate(conversation):
        if not isinstance(msg, dict):
            raise TypeError(f"{where}, message {i}: expected a dict with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}, message {i}: role {role!r} is not one of {ROLES}")
        if "content" not in msg:
            raise ValueError(f"{where}, message {i}: missing 'content' (a string or a list of text/image parts)")
        content = msg["content"]
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, (list, tuple)):
            parts = [_validate_part(p, where, i, j) for j, p in enumerate(content)]
        else:
            raise TypeError(f"{where}, message {i}: content must be a string or a list of parts, got {type(content).__name__}")
        extra = {k: v for k, v in msg.items() if k not in ("role", "content")}
        out.append({"role": role, "content": parts, **copy.deepcopy(extra)})
    if not any(m["role"] == "user" for m in out):
        raise ValueError(f"{where} has no user message; the model needs something to answer")
    if out[-1]["role"] == "assistant" and not allow_assistant_last:
        raise ValueError(f"{where} ends with an assistant message; end it with the user turn to be answered")
    return out


def _validate_part(part: Any, where: str, i: int, j: int) -> dict[str, Any]:
    if not isinstance(part, dict) or "type" not in part:
        raise TypeError(f"{where}, message {i}, part {j}: expected {{'type': 'text', 'text': ...}} or {{'type': 'image', 'image': ...}}, got {part!r:.80}")
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise TypeError(f"{where}, message {i}, part {j}: a text part needs a string under 'text'")
        return dict(part)
    if kind == "image":
        if not any(k in part for k in _IMAGE_KEYS):
            raise ValueError(f"{where}, message {i}, part {j}: an image part needs 'image' (PIL.Image, path, bytes or array), 'path' or 'url'")
        from guardrails.ocr.images import ACCEPTED, IMAGE_TYPES, url_error

        key = next(k for k in _IMAGE_KEYS if k in part)
        value = part[key]
        # Checked here, not when the batch is encoded, so the error names the message and part.
        if not isinstance(value, IMAGE_TYPES):
            raise TypeError(f"{where}, message {i}, part {j}: {key!r} is {type(value).__name__}; pass {ACCEPTED}")
        if isinstance(value, str) and (msg := url_error(value)):
            raise ValueError(f"{where}, message {i}, part {j}: {msg}")
        return dict(part)  # the image object itself is shared, never copied
    raise ValueError(f"{where}, message {i}, part {j}: part type {kind!r} is not supported; use 'text' or 'image'")


def validate_batch(conversations: Any) -> tuple[list[Conversation], bool]:
    """Accept one conversation or a list of them; return (normalised list, was_single)."""
    if isinstance(conversations, (list, tuple)) and conversations and isinstance(conversations[0], dict):
        return [validate(conversations)], True
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise TypeError("pass a conversation (a list of messages) or a non-empty list of conversations")
    return [validate(c, k) for k, c in enumerate(conversations)], False


def image_parts(conversation: Conversation) -> list[dict[str, Any]]:
    return [p for m in conversation for p in m["content"] if p["type"] == "image"]


def images(conversation: Conversation) -> list[Any]:
    """Every image of a conversation in order, as given (PIL, path, bytes, array...)."""
    return [next(p[k] for k in _IMAGE_KEYS if k in p) for p in image_parts(conversation)]


def message_text(message: dict[str, Any]) -> str:
    return "\n".join(p["text"] for p in message["content"] if p["type"] == "text")


def last_user_text(conversation: Conversation) -> str:
    """The text of the last user turn (the query the answer responds to)."""
    for m in reversed(conversation):
        if m["role"] == "user":
            return message_text(m)
    raise ValueError("conversation has no user message")


def last_user_index(conversation: Conversation) -> int:
    return max(i for i, m in enumerate(conversation) if m["role"] == "user")


def without_images(conversation: Conversation) -> Conversation:
    """A copy with every image part removed (ECSO's 'eyes closed' step)."""
    return [{**m, "content": [p for p in m["content"] if p["type"] != "image"]} for m in conversation]


def with_user_text(conversation: Conversation, text: str, *, position: str = "replace") -> Conversation:
    """A copy whose last user turn's text is replaced, or gets ``text`` as prefix/suffix.

    Image parts stay where they were; the text goes into the first text part (a new part is
    added after the images when the turn has none).
    """
    if position not in ("replace", "prefix", "suffix"):
        raise ValueError(f"position must be 'replace', 'prefix' or 'suffix', got {position!r}")
    conv = copy_conversation(conversation)
    msg = conv[last_user_index(conv)]
    old = message_text(msg)
    new = text if position == "replace" else (f"{text}\n{old}" if position == "prefix" else f"{old}\n{text}")
    parts = [p for p in msg["content"] if p["type"] != "text"]
    msg["content"] = parts + [{"type": "text", "text": new}]
    return conv


def append_turns(conversation: Conversation, *turns: tuple[str, str]) -> Conversation:
    """A copy with (role, text) turns appended."""
    conv = copy_conversation(conversation)
    conv.extend({"role": r, "content": [{"type": "text", "text": t}]} for r, t in turns)
    return conv


def copy_conversation(conversation: Conversation) -> Conversation:
    """Copy messages and parts but share image objects (they can be large)."""
    return [{**m, "content": [dict(p) for p in m["content"]]} for m in conversation]


def to_pil(image: Any):
    """Load an image given as PIL.Image, path, bytes or a uint8 array (one loader for the library)."""
    from guardrails.ocr.images import load_image

    return load_image(image)


def to_template_form(conversation: Conversation, multimodal: bool, where: str = "conversation") -> Conversation:
    """What the chat template gets: text-only templates want string content, processors want parts.

    Images are loaded to PIL here so every processor sees the same input type; a load error names
    the conversation (``where``), message and part.
    """
    out = []
    for i, m in enumerate(conversation):
        if multimodal:
            parts = []
            for j, p in enumerate(m["content"]):
                if p["type"] == "image":
                    img = next(p[k] for k in _IMAGE_KEYS if k in p)
                    try:
                        pil = to_pil(img)
                    except (TypeError, ValueError) as e:
                        raise type(e)(f"{where}, message {i}, part {j}: {e}") from e
                    parts.append({"type": "image", "image": pil})
                else:
                    parts.append({"type": "text", "text": p["text"]})
            out.append({"role": m["role"], "content": parts})
        else:
            out.append({"role": m["role"], "content": message_text(m)})
    return out
