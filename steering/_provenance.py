"""Shared provenance record and the checks that compare it with a model (and its tokenizer)."""

from __future__ import annotations

import datetime as _dt
import warnings
from typing import Any

from torch import nn

from .extract import template_hashes, template_sha256
from .layers import find_decoder_layers

__all__ = ["check_against_model", "library_version", "model_record", "now_iso", "short_hash"]


def library_version() -> str:
    """The installed mllm-guardrails version (this package's own when not installed)."""
    try:
        from importlib.metadata import version

        return version("mllm-guardrails")
    except Exception:  # not installed (running from a checkout) or metadata unreadable
        from . import __version__

        return __version__


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def short_hash(h: str | None) -> str:
    return "none" if h is None else f"sha256 {h[:12]}"


def model_record(model: nn.Module, path: str | None = None, processor: Any = None) -> dict[str, Any]:
    """What a manifest records about the model (and template) a tensor was computed on."""
    info = find_decoder_layers(model, path)
    config = getattr(model, "config", None)
    return {
        "model_class": type(model).__name__,
        "name_or_path": str(getattr(config, "name_or_path", "") or ""),
        "model_type": str(getattr(config, "model_type", "") or ""),
        "hidden_size": info.hidden_size,
        "num_layers": info.num_layers,
        "layer_path": info.path,
        "chat_template_sha256": template_sha256(processor) if processor is not None else None,
    }


def check_against_model(
    what: str,
    record: dict[str, Any],
    model: nn.Module,
    tokenizer: Any = None,
    *,
    strict_template: bool = True,
    path: str | None = None,
) -> list[str]:
    """Raise ValueError listing every hard mismatch; return notes on tolerated differences.

    Hard: hidden size, number of layers; the chat-template hash when ``strict_template`` (otherwise
    a warning). Tolerated (cross-model guidance): model class, name, layer path.
    """
    info = find_decoder_layers(model, path)
    errors: list[str] = []
    notes: list[str] = []
    if record["hidden_size"] != info.hidden_size:
        errors.append(f"hidden size {record['hidden_size']} in {what} vs {info.hidden_size} in model")
    if record["num_layers"] != info.num_layers:
        errors.append(f"number of layers {record['num_layers']} in {what} vs {info.num_layers} in model")
    if tokenizer is not None and "chat_template_sha256" in record:  # absent: a hand-made gate, nothing to compare
        recorded = record.get("chat_template_sha256")
        have = template_hashes(tokenizer)
        if recorded not in have and not (recorded is None and not have):
            shown = short_hash(template_sha256(tokenizer))
            msg = f"chat template {short_hash(recorded)} in {what} vs {shown} in tokenizer"
            if strict_template:
                errors.append(msg)
            else:
                warnings.warn(f"{msg}: activations were read under a different prompt format", stacklevel=3)
                notes.append(msg)
    if errors:
        raise ValueError(f"{what} incompatible with {type(model).__name__}: " + "; ".join(errors)
                         + (". Pass strict_template=False to accept a different chat template"
                            if any(e.startswith("chat template") for e in errors) else ""))
    if record.get("model_class") and record["model_class"] != type(model).__name__:
        notes.append(f"model class {record['model_class']} in {what} vs {type(model).__name__} in model")
    if record.get("layer_path") and record["layer_path"] != info.path:
        notes.append(f"layer path {record['layer_path']} in {what} vs {info.path} in model")
    return notes
