"""Load a model and its processor by registry name, hub id or local path, with a clear error when offline."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steering._files import expand_user
from steering._hub import missing_path_message, unreachable_message


def load(model_id: str, *, dtype: Any = "auto", device_map: Any = None, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, processor) for a registry name, a hub id, a local folder saved with ``save_pretrained``,
    or ``tiny:ARCH`` (a tiny random-weight model from :mod:`guardrails.testing`, offline).

    A registry name (``python -m guardrails models list``) loads its fetched folder; one not fetched
    yet raises ValueError naming the fetch command. Image-text-to-text models (config with a
    ``vision_config``) load with ``AutoModelForImageTextToText`` + ``AutoProcessor``; others with
    ``AutoModelForCausalLM`` + ``AutoTokenizer``. A path that does not exist is reported as such,
    never as an unreachable hub id.
    """
    from guardrails import models

    if not isinstance(model_id, str) or not model_id.strip():
        raise TypeError(f"load() takes a model id, folder or registry name as a non-empty string, got {model_id!r}")
    if model_id.startswith("tiny:"):
        from guardrails.testing import build_tiny

        tiny = build_tiny(model_id.split(":", 1)[1])
        return tiny.model, tiny.processor
    if msg := missing_path_message(model_id):
        raise ValueError(msg)

    # Before importing transformers: a registry name not fetched yet fails at once.
    if model_id in models.REGISTRY and models.REGISTRY[model_id].kind != "chat" and not Path(model_id).exists():
        raise ValueError(
            f"{model_id!r} is not a chat model (kind: {models.REGISTRY[model_id].kind}); load its folder "
            f"guardrails.models.resolve({model_id!r}) with transformers.AutoModel instead"
        )
    model_id = models.resolve(model_id)
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoProcessor,
        AutoTokenizer,
    )

    from guardrails.engine import has_image_processor

    local = expand_user(model_id)
    source = str(local) if local.exists() else model_id
    if local.exists() and not (local / "config.json").is_file():
        raise ValueError(f"{model_id!r} is a folder without config.json; point at a folder written by save_pretrained")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ValueError(_cannot_load(model_id, local, e)) from e
    multimodal = getattr(config, "vision_config", None) is not None
    model_cls = AutoModelForImageTextToText if multimodal else AutoModelForCausalLM
    proc_cls = AutoProcessor if multimodal else AutoTokenizer
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = model_cls.from_pretrained(source, **kwargs)
        processor = proc_cls.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ValueError(_cannot_load(model_id, local, e)) from e
    if multimodal and not has_image_processor(processor):
        # AutoProcessor falls back to a bare tokenizer when the processor class cannot be built
        # (e.g. a video processor that needs torchvision); images would then never reach the model.
        raise ValueError(
            f"{model_id!r} is an image-text-to-text model but AutoProcessor returned {type(processor).__name__} "
            "without an image processor; install what its processor needs (often torchvision) or build the "
            "processor yourself and call wrap(model, processor)"
        )
    model.eval()
    return model, processor


def load_for_chat(name: str, *, dtype: str | None = None, progress: Any = None) -> tuple[Any, Any]:
    """:func:`load` as the demo and ``serve`` use it: a registry model not fetched yet is fetched first
    (``progress``: a callable taking each progress line), and ``dtype`` (a torch dtype name) defaults
    to float32 on CPU and bfloat16 on GPU for fetched models, "auto" for the others.

    The fetched models are saved in bfloat16. On a CPU without bfloat16 kernels float32 decodes
    about 2x faster (measured on the 2-core EPYC machines: 27 s vs 55 s for 4 x 32 tokens).
    """
    import torch

    from guardrails import models

    if name in models.REGISTRY and not models.is_fetched(name):
        models.fetch(name, progress=progress)
    if dtype is None:
        chosen: Any = (torch.bfloat16 if torch.cuda.is_available() else torch.float32) if name in models.REGISTRY else "auto"
    elif dtype == "auto":
        chosen = "auto"
    else:
        chosen = getattr(torch, dtype, None)
        if not isinstance(chosen, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    return load(name, dtype=chosen)


def _cannot_load(model_id: str, local: Path, err: Exception) -> str:
    if local.exists():  # a local folder that transformers cannot read: not a hub problem
        return f"cannot load the model in {str(local)!r}: {type(err).__name__}: {(str(err).splitlines() or [''])[0]}"
    return unreachable_message(model_id, err)
