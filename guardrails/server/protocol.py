"""OpenAI's chat-completions protocol: request parsing and the response, chunk and trace shapes.

Parsing turns one request body into a :class:`ChatJob` (a conversation for ``GuardedModel`` and
its generate options) or raises :class:`~guardrails.server.errors.RequestError` with a one-line
reason. Options this server cannot honour (tools, logprobs, penalties, ``n > 1``) are refused,
never silently ignored; fields that change nothing about the answer (``user``, ``metadata``) are
accepted.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from guardrails.results import GuardedResult, Verdict
from guardrails.server.config import ServerConfig
from guardrails.server.errors import RequestError, bad_request
from guardrails.server.images import image_from_url, image_part_url

#: request fields with no effect on the answer: accepted, as OpenAI accepts them
_IGNORED = frozenset({"model", "messages", "stream", "stream_options", "user", "metadata", "store", "service_tier",
                      "safety_identifier", "prompt_cache_key"})
#: request fields honoured (see ChatJob.generate_kwargs)
_HONOURED = frozenset({"max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "n"})
#: fields that would change the answer in a way this server does not implement, with the values that mean "off"
_UNSUPPORTED_UNLESS: dict[str, tuple[Any, ...]] = {
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "logprobs": (None, False), "top_logprobs": (None, 0), "frequency_penalty": (None, 0), "presence_penalty": (None, 0),
    "logit_bias": (None, {}), "response_format": (None, {"type": "text"}), "parallel_tool_calls": (None, False, True),
    "reasoning_effort": (None,), "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,)}
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
MAX_STOP = 4
#: characters of one stop string (each is matched against the tail of every row at every token)
MAX_STOP_CHARS = 256
#: below this, sampling is numerically greedy (and a tiny temperature overflows the softmax)
_GREEDY_BELOW = 1e-5


@dataclass
class ChatJob:
    """One parsed chat request: what the guarded model gets, and how to answer."""

    conversation: list[dict[str, Any]]
    generate_kwargs: dict[str, Any]
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    seed: int | None = None
    id: str = field(default_factory=lambda: "chatcmpl-" + secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))

    def batch_key(self) -> tuple:
        """Requests with equal keys can share one guarded call: same options, same stop strings.
        A seeded request never shares (its samples must not depend on its batch neighbours)."""
        if self.seed is not None:
            return ("seeded", self.id)
        return (tuple(sorted(self.generate_kwargs.items())), self.stop)


def parse_chat(body: Any, config: ServerConfig, *, multimodal: bool) -> ChatJob:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object with 'model' and 'messages'")
    model = body.get("model")
    if model is not None and model != config.model_name:
        raise RequestError(404, f"model {model!r} is not served here; this server serves {config.model_name!r} "
                                "(GET /v1/models)", param="model", code="model_not_found")
    for name, off in _UNSUPPORTED_UNLESS.items():
        if name in body and not any(body[name] == v and type(body[name]) is type(v) for v in off):
            raise bad_request(f"{name} is not supported by this server; remove it from the request", name)
    unknown = sorted(set(body) - _IGNORED - _HONOURED - set(_UNSUPPORTED_UNLESS))
    if unknown:
        raise bad_request(f"unknown request field {unknown[0]!r}; see the OpenAI chat completions reference", unknown[0])
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise bad_request('stream_options must be an object like {"include_usage": true}', "stream_options")
    kwargs, stop, seed = _generate_options(body, config)
    return ChatJob(_conversation(body.get("messages"), config, multimodal), kwargs, stop, stream,
                   bool(options.get("include_usage", False)), seed)


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not low <= v <= high:
        raise bad_request(f"{name} must be a number from {low:g} to {high:g}, got {v!r}", name)
    return float(v)


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
        raise bad_request(f"{name} must be a whole number from {low} to {high}, got {v!r}", name)
    return v


def _generate_options(body: dict[str, Any], config: ServerConfig) -> tuple[dict[str, Any], tuple[str, ...], int | None]:
    """OpenAI sampling fields as ``generate`` options. temperature 0 is greedy decoding; absent
    temperature and top_p keep the model's own generation config, as transformers' generate does."""
    n = _integer(body, "n", 1, 1 << 30)
    if n is not None and n != 1:
        raise bad_request(f"n={n} is not supported: this server returns one choice per request; send n requests", "n")
    # max_completion_tokens is OpenAI's current name; max_tokens the deprecated one it replaces
    field = next((k for k in ("max_completion_tokens", "max_tokens") if body.get(k) is not None), None)
    max_new = config.default_max_tokens if field is None else _integer(body, field, 1, 1 << 30)
    assert max_new is not None
    if max_new > config.max_tokens_limit:
        raise bad_request(f"{field}={max_new} is above this server's limit of {config.max_tokens_limit}", field)
    kwargs: dict[str, Any] = {"max_new_tokens": max_new}
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    if temperature is not None and temperature < _GREEDY_BELOW:
        kwargs["do_sample"] = False
    elif temperature is not None or top_p is not None:
        kwargs["do_sample"] = True
        if temperature is not None:
            kwargs["temperature"] = temperature
        if top_p is not None:
            if top_p == 0.0:
                raise bad_request("top_p must be above 0 when sampling (use temperature 0 for greedy decoding)", "top_p")
            kwargs["top_p"] = top_p
    stop = body.get("stop")
    stops: tuple[str, ...] = ()
    if stop is not None:
        stops = (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else ()
        if not stops or len(stops) > MAX_STOP or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise bad_request(f"stop must be a non-empty string or a list of 1 to {MAX_STOP} strings of 1 to "
                              f"{MAX_STOP_CHARS} characters", "stop")
    seed = _integer(body, "seed", 0, (1 << 63) - 1)
    return kwargs, stops, seed


def _conversation(messages: Any, config: ServerConfig, multimodal: bool) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list of {role, content} objects", "messages")
    n_images = sum(isinstance(p, dict) and p.get("type") == "image_url"
                   for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list) for p in m["content"])
    if n_images > config.max_images:
        raise bad_request(f"the request holds {n_images} images, above this server's limit of {config.max_images}", "messages")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise bad_request(f"{where} must be an object with role and content", where)
        role = msg.get("role")
        if role not in _ROLES:
            raise bad_request(f"{where}.role must be one of system, developer, user, assistant; got {role!r}"
                              + (" (tool calls are not supported)" if role in ("tool", "function") else ""), f"{where}.role")
        content = msg.get("content")
        if isinstance(content, str):
            out.append({"role": _ROLES[role], "content": _text(content, f"{where}.content")})
            continue
        if not isinstance(content, list) or not content:
            raise bad_request(f"{where}.content must be a string or a non-empty list of content parts", f"{where}.content")
        parts = [_part(p, f"{where}.content[{j}]", config, multimodal, role) for j, p in enumerate(content)]
        out.append({"role": _ROLES[role], "content": parts})
    if out[-1]["role"] != "user":
        raise bad_request(f"the last message must come from the user, got {out[-1]['role']!r}", f"messages[{len(out) - 1}].role")
    return out


def _part(part: Any, where: str, config: ServerConfig, multimodal: bool, role: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        return {"type": "text", "text": _text(part.get("text"), f"{where}.text")}
    if kind == "image_url":
        if role != "user":
            raise bad_request(f"{where}: only user messages may hold images", where)
        if not multimodal:
            raise bad_request(f"{where} is an image but the model {config.model_name!r} reads text only; "
                              "send text, or serve an image-text-to-text model", where)
        image = image_from_url(image_part_url(part), max_pixels=config.max_image_pixels, max_bytes=config.max_request_bytes,
                               allow_remote=config.allow_remote_images, param=f"{where}.image_url.url")
        return {"type": "image", "image": image}
    raise bad_request(f"{where} must be a content part of type 'text' or 'image_url', got {kind!r}", where)


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise bad_request(f"{where} must be a string", where)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise bad_request(f"{where} holds a lone surrogate (invalid UTF-16 in the JSON); send valid Unicode text", where) from None
    return value


# -- responses --------------------------------------------------------------------------------
def finish_reason(result: GuardedResult, max_new_tokens: int, stopped_by_string: bool) -> str:
    if result.refused:
        return "content_filter"
    if stopped_by_string:
        return "stop"
    return "length" if len(result.token_ids) >= max_new_tokens else "stop"


def refusal_reason(v: Verdict) -> str:
    """One line on why a verdict's defense refused: what it judged, its score against its threshold."""
    what = {"before": "the request before generation", "during": "the answer while it was generated",
            "after": "the answer"}.get(v.stage, v.stage)
    why = f"{v.defense} flagged {what}" if v.flagged else f"{v.defense} replaced {what}"
    if v.score is not None:
        why += f" (score {v.score:.3f}" + (f" >= threshold {v.threshold:g}" if v.threshold is not None else "") + ")"
    if v.categories:
        why += f"; categories: {', '.join(v.categories)}"
    return why


def trace(result: GuardedResult) -> dict[str, Any]:
    """The guard trace: every verdict of the call and who refused the answer, and why."""
    refusing = next((v for v in result.verdicts if v.action == "refuse" or (result.refused and v.flagged)), None)
    return {
        "refused": result.refused,
        "refused_by": refusing.defense if result.refused and refusing else None,
        "reason": refusal_reason(refusing) if result.refused and refusing else None,
        "flagged": result.flagged,
        "original_text": result.original_text,
        "verdicts": [{"defense": v.defense, "stage": v.stage, "flagged": v.flagged, "score": v.score,
                      "threshold": v.threshold, "action": v.action, "ms": round(v.latency_ms, 3),
                      "categories": list(v.categories), "detail": _jsonable(v.detail)} for v in result.verdicts],
        "timings": {k: round(t, 3) for k, t in result.timings.items()},
    }


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        try:
            return _jsonable(value.item())
        except (TypeError, ValueError):
            pass
    return repr(value)[:200]


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion(job: ChatJob, model: str, text: str, reason: str, guard: dict[str, Any], use: dict[str, int]) -> dict[str, Any]:
    return {"id": job.id, "object": "chat.completion", "created": job.created, "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                         "logprobs": None}],
            "usage": use, "guardrails": guard}


def chunk(job: ChatJob, model: str, delta: dict[str, Any] | None, reason: str | None = None, **extra: Any) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]
    return {"id": job.id, "object": "chat.completion.chunk", "created": job.created, "model": model, "choices": choices, **extra}
