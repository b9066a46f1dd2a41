"""Load a model and its processor by registry name, hub id or local path, with a clear error when offline."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def load(model_id: str, *, dtype: Any = "auto", device_map: Any = None, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model, processor) for a registry name, a hub id or a local folder saved with ``save_pretrained``.

    A registry name (``python -m guardrails models list``) loads its fetched folder; one not fetched
    yet raises ValueError naming the fetch command. Image-text-to-text models (config with a
    ``vision_config``) load with ``AutoModelForImageTextToText`` + ``AutoProcessor``; others with
    ``AutoModelForCausalLM`` + ``AutoTokenizer``.
    """
    from guardrails import models

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

    local = Path(model_id).expanduser()
    source = str(local) if local.exists() else model_id
    if local.exists() and not (local / "config.json").is_file():
        raise ValueError(f"{model_id!r} is a folder without config.json; point at a folder written by save_pretrained")
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ValueError(_unreachable(model_id, e)) from e
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
        raise ValueError(_unreachable(model_id, e)) from e
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


def _unreachable(model_id: str, err: Exception) -> str:
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    return (
        f"cannot load {model_id!r}: it is not a local folder and the Hugging Face Hub "
        f"{'is disabled (HF_HUB_OFFLINE=1)' if offline else 'could not be reached'} with no cached copy. "
        "Download it on a machine with internet (huggingface-cli download ID --local-dir DIR), copy DIR here "
        f"and pass the folder path instead. ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    )
