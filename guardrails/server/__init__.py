"""A guarded OpenAI-compatible HTTP server: ``python -m guardrails serve --model ID --defenses SPEC``.

- :mod:`.protocol`: OpenAI request parsing and response shapes (chat completions, chunks, errors);
- :mod:`.worker`: the one model worker that batches concurrent requests into guarded calls;
- :mod:`.moderation`: ``/v1/moderations`` on the screening pipeline (OCR + the harm detector);
- :mod:`.app`: the FastAPI application (routes, auth, limits, the web chat at ``/``);
- :mod:`.cli`: the ``serve`` command (uvicorn).
"""

from __future__ import annotations

from guardrails.server.config import ServerConfig
from guardrails.server.errors import RequestError

__all__ = ["RequestError", "ServerConfig", "create_app"]


def __getattr__(name: str):
    if name == "create_app":  # FastAPI is imported only by what serves
        from guardrails.server.app import create_app

        return create_app
    raise AttributeError(f"module 'guardrails.server' has no attribute {name!r}")
