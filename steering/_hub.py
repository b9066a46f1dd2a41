"""Local folder or Hugging Face Hub id? The checks and messages every model loader here shares.

They run before transformers is imported: ``HF_HUB_OFFLINE`` only counts if it is set by then, and
without it a hub id with no network costs half a minute of retries before the error.
"""

from __future__ import annotations

import os
import socket

from ._files import expand_user

HUB_HOST = "huggingface.co"
#: the download command of the installed huggingface_hub (>= 1.0 ships `hf`; `huggingface-cli` is gone)
DOWNLOAD_HINT = "hf download {model_id} --local-dir DIR"

#: True once go_offline_if_unreachable set HF_HUB_OFFLINE (the env var is process-wide, so is this)
_set_by_us = False


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the Hub (a failed DNS lookup returns at once)."""
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")


def is_path(model_id: str) -> bool:
    """True when ``model_id`` can only be a filesystem path: a hub id is ``name`` or ``owner/name``."""
    return (model_id.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in model_id
            or model_id.count("/") > 1 or model_id in (".", ".."))


def missing_path_message(model_id: str) -> str | None:
    """The error for a path that does not exist (never reported as an unreachable hub id), else None."""
    if is_path(model_id) and not expand_user(model_id).exists():
        return f"model folder {model_id!r} does not exist; pass a folder written by save_pretrained (or a hub id owner/name)"
    return None


def go_offline_if_unreachable(model_id: str) -> bool:
    """Set HF_HUB_OFFLINE=1 when ``model_id`` is a hub id and the Hub cannot be reached; True if set here.

    Only a local cache can serve the model then, and transformers fails at once instead of retrying.
    """
    global _set_by_us
    if offline() or expand_user(model_id).exists() or hub_reachable():
        return False
    os.environ["HF_HUB_OFFLINE"] = "1"
    _set_by_us = True
    return True


def unreachable_message(model_id: str, err: BaseException | None = None) -> str:
    """The error for a hub id that cannot be loaded: why, and how to bring the model here.

    It says HF_HUB_OFFLINE is set only when the user set it, not when a command set it on finding
    the Hub unreachable.
    """
    if offline() and _set_by_us:
        why = "the Hugging Face Hub cannot be reached from here and there is no cached copy"
    elif offline():
        why = "HF_HUB_OFFLINE is set in the environment and there is no cached copy"
    else:
        why = "the Hugging Face Hub could not serve it (no network, a typo in the id, or a gated model) and there is no cached copy"
    first = (str(err).splitlines() or [""])[0] if err is not None else ""
    detail = f" ({type(err).__name__}: {first})" if err is not None else ""
    return (f"cannot load {model_id!r}: it is not a local folder and {why}. Download it on a machine with internet "
            f"({DOWNLOAD_HINT.format(model_id=model_id)}), copy DIR here and pass the folder instead.{detail}")
