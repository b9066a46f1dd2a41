"""The server's settings, written once (the ``serve`` command line maps onto these fields)."""

from __future__ import annotations

from dataclasses import dataclass

from guardrails.config import Config


@dataclass(frozen=True)
class ServerConfig(Config):
    """Limits and options of one server. Defaults are those of ``python -m guardrails serve``."""

    #: the name clients send as ``model`` and ``/v1/models`` lists; None for ``--moderation-only``
    model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    #: when set, every /v1 route needs ``Authorization: Bearer <api_key>``
    api_key: str | None = None
    #: concurrent requests answered by one guarded call (1 turns batching off)
    max_batch: int = 8
    #: how long the first request of a batch waits for others to join it
    max_wait_ms: float = 10.0
    #: requests waiting for the model beyond the one running; more are answered 429
    max_queue: int = 64
    #: a request body above this is answered 413 before it is parsed
    max_request_bytes: int = 16 * 1024 * 1024
    #: width x height of each image, checked from its header before decoding
    max_image_pixels: int = 20_000_000
    #: images in one request (each is decoded before the request is queued)
    max_images: int = 8
    #: prompt tokens + max_tokens of one request; None: the model's max_position_embeddings
    max_context_tokens: int | None = None
    #: images given as http(s) URLs are fetched only when this is on
    allow_remote_images: bool = False
    #: the most new tokens a request may ask for; also the default when it asks for none
    max_tokens_limit: int = 1024
    default_max_tokens: int = 256
    #: a request not answered by then gets 503 (the model worker is stuck or overloaded)
    request_timeout_s: float = 600.0
    #: seconds a shutdown waits for requests in flight before failing the rest with 503
    shutdown_grace_s: float = 30.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("port", "max_batch", "max_queue", "max_request_bytes", "max_image_pixels", "max_images",
                     "max_tokens_limit", "default_max_tokens", "max_context_tokens"):
            v = getattr(self, name)
            low = 0 if name in ("port", "max_images") else 1
            if (v is not None or name != "max_context_tokens") and (isinstance(v, bool) or not isinstance(v, int) or v < low):
                raise ValueError(f"{name} must be an int >= {low}, got {v!r}")
        for name in ("max_wait_ms", "request_timeout_s", "shutdown_grace_s"):
            v = getattr(self, name)
            low_ok = v > 0 if name == "request_timeout_s" else v >= 0
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low_ok:
                raise ValueError(f"{name} must be a number {'> 0' if name == 'request_timeout_s' else '>= 0'}, got {v!r}")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(f"default_max_tokens ({self.default_max_tokens}) is above max_tokens_limit ({self.max_tokens_limit})")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("api_key is empty; omit it to serve without a key")
