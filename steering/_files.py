"""Artifact files (safetensors + JSON manifests): one way to write them, one clear error when reading fails.

Shared by steering vectors, gates and, in ``guardrails``, the harm detectors, so every artifact has
the same file modes and every corrupt file is reported the same way: its path, what is wrong and
what to do.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: Artifacts ship in packages and shared folders: readable by all. safetensors itself writes 0600.
ARTIFACT_MODE = 0o644


def expand_user(path: str | os.PathLike) -> Path:
    """``path`` with ``~`` / ``~user`` expanded; ``~name`` of no such user stays as written, so the caller
    reports a missing path instead of Path.expanduser's RuntimeError."""
    p = Path(path)
    try:
        return p.expanduser()
    except RuntimeError:  # "Could not determine home directory"
        return p


def save_tensors(tensors: dict[str, Any], path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> None:
    """Write torch tensors or numpy arrays (not mixed) to ``path`` with :data:`ARTIFACT_MODE`."""
    first = next(iter(tensors.values()), None)
    save_file: Callable[..., None]  # the torch or the numpy flavour, same call
    if type(first).__module__.startswith("torch"):
        from safetensors.torch import save_file
    else:
        from safetensors.numpy import save_file
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, ARTIFACT_MODE)


def write_json(path: str | os.PathLike, data: Any, **dumps: Any) -> None:
    """Write a manifest with :data:`ARTIFACT_MODE` (whatever the umask), like the tensors beside it."""
    Path(path).write_text(json.dumps(data, **dumps) + "\n", encoding="utf-8")
    os.chmod(path, ARTIFACT_MODE)


def load_tensors(path: str | os.PathLike, *, fix: str, numpy: bool = False) -> dict[str, Any]:
    """Tensors of a safetensors file; a corrupt or truncated file raises ValueError naming it and ``fix``."""
    load_file: Callable[..., dict[str, Any]]  # the numpy or the torch flavour, same call
    if numpy:
        from safetensors.numpy import load_file
    else:
        from safetensors.torch import load_file
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors' SafetensorError subclasses only Exception
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"{path} is not a readable safetensors file ({first}): it is corrupt or truncated; {fix}") from None


@contextlib.contextmanager
def naming(folder: str | os.PathLike) -> Iterator[None]:
    """Inside, a ValueError or TypeError about an artifact's contents becomes a ValueError naming ``folder``
    (unless it names it already): "layer_indices [] disagree ..." alone does not say which folder."""
    try:
        yield
    except (TypeError, ValueError) as e:
        if str(folder) in str(e):
            raise
        raise ValueError(f"{folder}: {e}") from None
    except (KeyError, AttributeError, IndexError) as e:  # a manifest field missing, or of the wrong type
        raise ValueError(f"{folder}: a manifest field is missing or of the wrong type ({type(e).__name__}: {e}); "
                         "write the artifact again with the library that reads it") from None


def read_json(path: str | os.PathLike, *, fix: str) -> dict[str, Any]:
    """The JSON object in ``path``; invalid JSON (or not an object) raises ValueError naming it and ``fix``."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds a JSON {type(data).__name__}, not an object; {fix}")
    return data
