"""Find the language model's decoder layers in any transformers model, never the vision tower.

>>> info = find_decoder_layers(model)            # doctest: +SKIP
>>> info.path, info.num_layers, info.hidden_size  # doctest: +SKIP
('model.language_model.layers', 32, 4096)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ._compat import text_config

__all__ = ["LayerInfo", "find_decoder_layers", "layer_device", "layer_dtype", "module_path", "resolve_path"]

# Attribute names that hold the decoder blocks inside a decoder module (Llama-style, GPT-2-style).
_LAYER_ATTRS = ("layers", "h")

# Known absolute paths, tried only when get_decoder() did not lead to the layers. transformers 5
# puts VLM language models under model.language_model / model.text_model.
_KNOWN_PATHS = (
    "model.language_model.layers",  # LLaVA, LLaVA-NeXT/OneVision, Qwen2-VL, Qwen2.5-VL, Gemma 3
    "model.text_model.layers",  # Idefics3 / SmolVLM
    "language_model.model.layers",  # transformers 4-style VLMs
    "language_model.layers",
    "text_model.layers",
    "model.layers",  # Llama, Qwen2, Mistral, Gemma
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon
    "gpt_neox.layers",
    "transformer.blocks",  # MPT
    "layers",
    "h",
)

# Path segments that mark a vision/audio encoder: a ModuleList under one of these is never a candidate.
_ENCODER_MARKERS = ("vision", "visual", "image", "audio", "encoder", "vit", "perceiver", "connector", "projector")


@dataclass(frozen=True)
class LayerInfo:
    """The decoder blocks of a model's language model.

    ``path`` is the dotted attribute path from the model (``model.language_model.layers``).
    """

    layers: nn.ModuleList
    path: str
    num_layers: int
    hidden_size: int

    def __getitem__(self, index: int) -> nn.Module:
        return self.layers[index]


def resolve_path(root: nn.Module, path: str) -> object:
    """Follow a dotted attribute path (``model.layers``; integers index into ModuleLists)."""
    obj: object = root
    for part in path.split("."):
        if part.isdigit() and isinstance(obj, (nn.ModuleList, nn.Sequential)):
            obj = obj[int(part)]
        else:
            if not hasattr(obj, part):
                raise AttributeError(part)
            obj = getattr(obj, part)
    return obj


def module_path(root: nn.Module, module: nn.Module) -> str:
    """The dotted path of ``module`` inside ``root`` ('' for root itself).

    Raises ValueError when ``module`` is not a submodule of ``root``.
    """
    if module is root:
        return ""
    for name, sub in root.named_modules(remove_duplicate=False):
        if sub is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(root).__name__}")


def layer_device(layer: nn.Module) -> torch.device:
    """The device of a layer's first parameter (or buffer); CPU for a layer without either.

    With ``device_map`` splits each layer can sit on its own device; steering vectors follow it.
    """
    t: torch.Tensor
    for t in layer.parameters():
        return t.device
    for t in layer.buffers():
        return t.device
    return torch.device("cpu")


def layer_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype of a layer's first floating-point parameter (float32 when it has none)."""
    for t in layer.parameters():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _hidden_size(model: nn.Module, layers: nn.ModuleList) -> int:
    config = getattr(model, "config", None)
    if config is not None:
        text = text_config(config)
        for name in ("hidden_size", "n_embd", "d_model"):
            value = getattr(text, name, None)
            if isinstance(value, int):
                return value
    # No config (a plain nn.Module): the token embedding width is the residual-stream width.
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if not isinstance(emb, nn.Embedding):
        emb = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if isinstance(emb, nn.Embedding):
        return int(emb.embedding_dim)
    linears = [m for m in layers[0].modules() if isinstance(m, nn.Linear)]
    if linears:
        return int(linears[-1].out_features)
    raise ValueError(
        f"cannot tell the hidden size of {type(model).__name__}: it has no config.hidden_size; "
        "give the model a config or pass vectors whose size you know"
    )


def _is_encoder_path(path: str) -> bool:
    return any(marker in part.lower() for part in path.split(".") for marker in _ENCODER_MARKERS)


def _info(model: nn.Module, layers: nn.ModuleList, path: str) -> LayerInfo:
    if len(layers) == 0:
        raise ValueError(f"{type(model).__name__}.{path} is an empty ModuleList; pass path= to the decoder layers")
    return LayerInfo(layers=layers, path=path, num_layers=len(layers), hidden_size=_hidden_size(model, layers))


def find_decoder_layers(model: nn.Module, path: str | None = None) -> LayerInfo:
    """The language model's decoder layers, found in a fixed order.

    1. ``path`` (dotted, from ``model``) when given;
    2. ``model.get_decoder()`` and its ``.layers`` or ``.h``;
    3. known paths (``model.language_model.layers``, ``model.text_model.layers``, ``model.layers``,
       ``transformer.h``, ...), which must agree on one ModuleList;
    4. any ModuleList named ``layers``/``h`` outside vision/audio encoders, which must be unique.

    Paths through a vision or audio encoder (Qwen2-VL ``visual.blocks``, ``vision_tower``) are never
    chosen. Raises ValueError naming the model class when nothing, or more than one distinct
    candidate, is found.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"find_decoder_layers needs a torch nn.Module, got {type(model).__name__}")
    name = type(model).__name__

    if path is not None:
        try:
            found = resolve_path(model, path)
        except AttributeError as e:
            raise ValueError(f"{name} has no attribute path {path!r} (missing {e.args[0]!r}); "
                             "pass the dotted path to the decoder's nn.ModuleList, e.g. 'model.layers'") from None
        if not isinstance(found, nn.ModuleList):
            raise TypeError(f"{name}.{path} is a {type(found).__name__}, not an nn.ModuleList of decoder layers")
        return _info(model, found, path)

    # 2. get_decoder(): transformers' own answer for which submodule is the text decoder.
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except Exception:  # exotic models raise here; the known paths below still apply
            decoder = None
        if isinstance(decoder, nn.Module):
            for attr in _LAYER_ATTRS:
                layers = getattr(decoder, attr, None)
                if isinstance(layers, nn.ModuleList) and len(layers) > 0:
                    prefix = module_path(model, decoder)
                    full = f"{prefix}.{attr}" if prefix else attr
                    if not _is_encoder_path(prefix):
                        return _info(model, layers, full)

    # 3. Known paths: several may name the same ModuleList (aliases); distinct ones are ambiguous.
    candidates: dict[int, tuple[str, nn.ModuleList]] = {}
    for known in _KNOWN_PATHS:
        try:
            found = resolve_path(model, known)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList) and len(found) > 0:
            candidates.setdefault(id(found), (known, found))
    if len(candidates) == 1:
        (known, found), = candidates.values()
        return _info(model, found, known)
    if len(candidates) > 1:
        paths = ", ".join(p for p, _ in candidates.values())
        raise ValueError(f"{name}: several decoder-layer candidates ({paths}); pass path= naming the language model's layers")

    # 4. Last resort: a unique ModuleList called layers/h that is not inside an encoder.
    scanned: dict[int, str] = {}
    for sub_name, sub in model.named_modules():
        last = sub_name.rsplit(".", 1)[-1]
        if isinstance(sub, nn.ModuleList) and last in _LAYER_ATTRS and len(sub) > 0 and not _is_encoder_path(sub_name):
            scanned.setdefault(id(sub), sub_name)
    if len(scanned) == 1:
        (found_path,) = scanned.values()
        return _info(model, resolve_path(model, found_path), found_path)  # type: ignore[arg-type]
    if len(scanned) > 1:
        raise ValueError(f"{name}: several decoder-layer candidates ({', '.join(scanned.values())}); "
                         "pass path= naming the language model's layers")
    raise ValueError(f"{name}: no decoder layers found (tried get_decoder() and {', '.join(_KNOWN_PATHS[:8])}, ...); "
                     "pass path= with the dotted path to the language model's nn.ModuleList of blocks")
