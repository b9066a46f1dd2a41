"""Steering vectors for transformers models: layer discovery, activation extraction, a per-row gate
and hooks that live exactly as long as one call. Standalone: it knows nothing of ``guardrails``.

>>> from steering import extract_steering_vectors, calibrate_gate_from_prompts, steer   # doctest: +SKIP
>>> sv = extract_steering_vectors(aligned, harmful, harmless, processor=tok)             # doctest: +SKIP
>>> own = extract_steering_vectors(target, harmful, harmless, processor=tok)             # doctest: +SKIP
>>> gate = calibrate_gate_from_prompts(target, own, held_harmful, held_harmless, processor=tok).gate  # doctest: +SKIP
>>> with steer(target, sv, alpha=4.0, gate=gate):                                        # doctest: +SKIP
...     out = target.generate(**inputs, max_new_tokens=64)
"""

__version__ = "0.1.0"

import importlib
from typing import TYPE_CHECKING, Any

# What type checkers see; at run time __getattr__ imports on first use. Keep in step with _EXPORTS.
if TYPE_CHECKING:
    from steering.extract import (
        METHODS,
        READ_POSITION,
        Activations,
        ChatPreparer,
        compute_directions,
        extract_activations,
        last_token_index,
        read_last_token,
        template_sha256,
    )
    from steering.gate import Gate, GateCalibration, GateLayerResult, calibrate_gate, calibrate_gate_from_prompts
    from steering.hooks import SteeringHandle, activation_norms, check_steerable, compute_gate, steer
    from steering.layers import LayerInfo, find_decoder_layers, layer_device, layer_dtype, module_path
    from steering.tune import SteeringCalibration, SteeringTrial, calibrate_steering
    from steering.vectors import Manifest, SteeringVectors, extract_steering_vectors

# Imported on first use (as guardrails does): the command lines and steering._cli / steering._files,
# which guardrails' CLI reuses, must not pay for torch + transformers at startup, and
# `python -m steering` must be able to set HF_HUB_OFFLINE before transformers reads it.
_EXPORTS = {
    **dict.fromkeys(("METHODS", "READ_POSITION", "Activations", "ChatPreparer", "compute_directions",
                     "extract_activations", "last_token_index", "read_last_token", "template_sha256"), "extract"),
    **dict.fromkeys(("Gate", "GateCalibration", "GateLayerResult", "calibrate_gate", "calibrate_gate_from_prompts"), "gate"),
    **dict.fromkeys(("SteeringHandle", "activation_norms", "check_steerable", "compute_gate", "steer"), "hooks"),
    **dict.fromkeys(("SteeringCalibration", "SteeringTrial", "calibrate_steering"), "tune"),
    **dict.fromkeys(("LayerInfo", "find_decoder_layers", "layer_device", "layer_dtype", "module_path"), "layers"),
    **dict.fromkeys(("Manifest", "SteeringVectors", "extract_steering_vectors"), "vectors"),
}
_SUBMODULES = ("extract", "gate", "hooks", "layers", "tune", "vectors")

__all__ = [
    "METHODS",
    "READ_POSITION",
    "Activations",
    "ChatPreparer",
    "Gate",
    "GateCalibration",
    "GateLayerResult",
    "LayerInfo",
    "Manifest",
    "SteeringCalibration",
    "SteeringHandle",
    "SteeringTrial",
    "SteeringVectors",
    "activation_norms",
    "calibrate_gate",
    "calibrate_gate_from_prompts",
    "calibrate_steering",
    "check_steerable",
    "compute_directions",
    "compute_gate",
    "extract_activations",
    "extract_steering_vectors",
    "find_decoder_layers",
    "last_token_index",
    "layer_device",
    "layer_dtype",
    "module_path",
    "read_last_token",
    "steer",
    "template_sha256",
]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'steering' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
