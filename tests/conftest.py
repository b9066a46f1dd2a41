"""Shared test fixtures: tiny offline models (built once per session) and the public data folder."""

from __future__ import annotations

import os

# Before anything imports transformers: a hub lookup made after import retries for minutes.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_VERBOSITY"] = "error"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)

from guardrails.data import shared_data_dir  # noqa: E402
from guardrails.testing import ARCHITECTURES, TinyModel, build_tiny  # noqa: E402


def pytest_sessionstart(session):
    """Print the versions this run tests, also under -q (CI runs against the lock and the newest releases)."""
    from importlib.metadata import version

    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        names = ("torch", "transformers", "tokenizers", "huggingface_hub")
        reporter.write_line("versions: " + ", ".join(f"{n} {version(n)}" for n in names))


@pytest.fixture(scope="session")
def tiny():
    """Factory ``tiny(arch) -> TinyModel``, cached per architecture for the whole session.

    The object is shared between tests: do not leave hooks, changed weights or changed tokenizer
    settings behind. A test that must mutate the model should call ``build_tiny(arch)`` itself.
    """
    cache: dict[str, TinyModel] = {}

    def get(arch: str) -> TinyModel:
        if arch not in cache:
            cache[arch] = build_tiny(arch)
        return cache[arch]

    return get


@pytest.fixture(params=ARCHITECTURES)
def tiny_any(request, tiny) -> TinyModel:
    """Each tiny architecture in turn (the test id names it)."""
    return tiny(request.param)


@pytest.fixture(scope="session")
def data_dir():
    """The public evaluation data folder, or skip the test when it is not there."""
    path = shared_data_dir()
    if path is None:
        pytest.skip("../shared/data not found; set GUARDRAILS_DATA")
    return path


class OCREngines:
    """Each OCR engine, or the error saying why it is unavailable (tests using it then skip with it)."""

    def __init__(self) -> None:
        from guardrails.ocr import OCRUnavailableError, get_engine

        self._found: dict = {}
        for name in ("rapidocr", "tesseract"):
            try:
                self._found[name] = get_engine(name)
            except OCRUnavailableError as exc:
                self._found[name] = exc

    def available(self, name: str) -> bool:
        return not isinstance(self._found[name], Exception)

    def get(self, name: str):
        if not self.available(name):
            pytest.skip(f"{name} OCR engine not installed: {self._found[name]}")
        return self._found[name]


@pytest.fixture(scope="session")
def engines() -> OCREngines:
    return OCREngines()
