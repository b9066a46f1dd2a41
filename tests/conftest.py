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

# Property-based tests (tests/test_fuzz.py). "ci", the default, is bounded so the whole fuzz suite
# stays well under 3 minutes on 2 cores; `pytest --hypothesis-profile=long` runs 25x more cases.
# derandomize: CI runs the same cases every time (a failure is reproducible); long explores anew.
try:
    from hypothesis import HealthCheck, settings

    _FUZZ_HEALTH = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
    settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, suppress_health_check=_FUZZ_HEALTH,
                              print_blob=True)
    settings.register_profile("long", max_examples=1000, deadline=None, suppress_health_check=_FUZZ_HEALTH, print_blob=True)
    settings.load_profile("ci")
except ImportError:  # hypothesis is in the `test` extra; tests/test_fuzz.py skips without it
    pass

#: generated cases per fuzz test in this session (reported at the end of the run)
FUZZ_CASES: dict[str, int] = {}


def pytest_terminal_summary(terminalreporter):
    if FUZZ_CASES:
        from hypothesis import settings

        total = sum(FUZZ_CASES.values())
        per = ", ".join(f"{k} {v}" for k, v in FUZZ_CASES.items())
        terminalreporter.write_line(f"fuzz: {total} generated cases under hypothesis profile "
                                    f"{settings.get_current_profile_name()!r} ({per})")


@pytest.fixture(scope="session")
def fuzz_cases() -> dict[str, int]:
    """Counter the fuzz tests add to, one key per test."""
    return FUZZ_CASES


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
