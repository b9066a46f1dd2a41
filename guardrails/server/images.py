"""Images in requests: ``data:`` URLs (always), http(s) URLs (only when the operator allows them)."""

from __future__ import annotations

import base64
import binascii
import re
import urllib.request
from typing import Any

from guardrails.ocr.images import ImageError, load_image
from guardrails.server.errors import bad_request

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?)(?P<b64>;base64)?,", re.IGNORECASE)
#: seconds a remote image may take to arrive (only with allow_remote_images)
REMOTE_TIMEOUT_S = 10.0


def image_part_url(part: dict[str, Any]) -> Any:
    """The URL of an ``image_url`` content part: ``{"image_url": {"url": ...}}`` or the bare string form."""
    spec = part.get("image_url")
    return spec.get("url") if isinstance(spec, dict) else spec


def image_from_url(url: Any, *, max_pixels: int, max_bytes: int, allow_remote: bool, param: str) -> Any:
    """The RGB PIL image of an ``image_url``; a one-line 400 naming ``param`` for anything unusable."""
    if not isinstance(url, str) or not url:
        raise bad_request(f"{param} must be a non-empty string (a data: URL such as data:image/png;base64,...)", param)
    if url[:5].lower() == "data:":
        data = _data_url_bytes(url, param)
    elif url[:7].lower() == "http://" or url[:8].lower() == "https://":
        if not allow_remote:
            raise bad_request(f"{param} is a remote URL; this server does not fetch images (send it inline as a "
                              "data:image/...;base64 URL, or start the server with --allow-remote-images)", param)
        data = _fetch(url, max_bytes, param)
    else:
        raise bad_request(f"{param} must be a data: URL (data:image/png;base64,...) or an http(s) URL, got {url[:40]!r}", param)
    try:
        return load_image(data, max_pixels=max_pixels)
    except ImageError as e:
        msg = str(e)
        if "above the cap" in msg:  # the library's advice (an environment variable) is for the operator, not the client
            msg = msg.split(";")[0] + " (this server's --max-image-pixels); send a smaller image"
        raise bad_request(f"{param}: {msg}", param) from None


def _data_url_bytes(url: str, param: str) -> bytes:
    m = _DATA_URL.match(url)
    if not m:
        raise bad_request(f"{param} is not a valid data: URL; expected data:image/png;base64,<base64 bytes>", param)
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise bad_request(f"{param} is a data: URL of type {mime!r}, not an image", param)
    if not m.group("b64"):
        raise bad_request(f"{param} must be base64-encoded (data:image/png;base64,...)", param)
    try:
        return base64.b64decode(url[m.end():], validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{param} holds invalid base64 data", param) from None


def _fetch(url: str, max_bytes: int, param: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=REMOTE_TIMEOUT_S) as resp:  # noqa: S310 - http(s) only, checked above
            data = resp.read(max_bytes + 1)
    except Exception as e:  # noqa: BLE001 - any network failure is the client's URL, reported as such
        raise bad_request(f"{param}: could not fetch the image ({type(e).__name__}: {e})", param) from None
    if len(data) > max_bytes:
        raise bad_request(f"{param}: the remote image is larger than {max_bytes} bytes", param)
    return data
