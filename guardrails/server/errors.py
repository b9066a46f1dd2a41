"""The one error type a request can fail with, in OpenAI's error shape."""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """A request the server answers with ``status`` and OpenAI's ``{"error": {...}}`` body.

    ``type`` follows OpenAI's names: invalid_request_error (400/404/413/422), authentication_error
    (401), rate_limit_error (429), server_error (500/503).
    """

    def __init__(self, status: int, message: str, *, type: str | None = None, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error", 429: "rate_limit_error"}


def bad_request(message: str, param: str | None = None) -> RequestError:
    return RequestError(400, message, param=param)
