"""Turn any accepted image input into an RGB ``PIL.Image`` (the one place inputs are checked).

Every problem with an image of an accepted type raises :class:`ImageError` (a ``ValueError``)
whose message names the input and the fix; an input of another type raises ``TypeError``.

Images above :data:`DEFAULT_MAX_PIXELS` pixels are refused from their header, before they are
decoded: a 20000x20000 PNG is a few KB on disk and 1.2 GB once decoded. Set
``$GUARDRAILS_MAX_IMAGE_PIXELS`` for the process or pass ``max_pixels=`` to :func:`load_image` to
change the cap. PIL's own limit (``PIL.Image.MAX_IMAGE_PIXELS``, process-wide) still applies
above it; it is never changed here, since other code in the process relies on it too.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from steering._files import expand_user

ImageInput = Union[Image.Image, str, os.PathLike, bytes, bytearray, memoryview, np.ndarray]  # noqa: UP007 (public runtime alias: kept a typing.Union object)
"""PIL image, file path, encoded file bytes, or a uint8 array (HxW, HxWx1, HxWx3 RGB, HxWx4 RGBA)."""

ACCEPTED = "PIL.Image.Image, a file path (str or pathlib.Path), encoded image bytes, or a uint8 numpy array (HxW or HxWxC, C in 1/3/4, RGB order)"
IMAGE_TYPES = (Image.Image, str, os.PathLike, bytes, bytearray, memoryview, np.ndarray)

#: The largest image accepted, in pixels: 50 million covers 8K frames (33 Mpx) and 48 Mpx phone
#: photos; every VLM processor shrinks far below it. Override: $GUARDRAILS_MAX_IMAGE_PIXELS.
DEFAULT_MAX_PIXELS = 50_000_000
MAX_PIXELS_ENV = "GUARDRAILS_MAX_IMAGE_PIXELS"

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class ImageError(ValueError):
    """An image that cannot be used (unreadable, missing, empty, too large, a URL); the message says why."""


class ImageNotFoundError(ImageError, FileNotFoundError):
    """An image path that does not exist (also a FileNotFoundError, for code that catches that)."""


class ImageIsFolderError(ImageError, IsADirectoryError):
    """An image path that is a folder (also an IsADirectoryError)."""


def pixel_cap() -> int:
    """The pixel cap in force: ``$GUARDRAILS_MAX_IMAGE_PIXELS`` when set, else :data:`DEFAULT_MAX_PIXELS`."""
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise ImageError(f"${MAX_PIXELS_ENV}={raw!r} is not a positive whole number of pixels; e.g. {MAX_PIXELS_ENV}=100000000")
    return value


def url_error(value: str) -> str | None:
    """The message for an image given as a URL (never fetched here), or None for anything else."""
    if not _URL.match(value):
        return None
    return (f"image {value[:100]!r} is a URL; images are never downloaded here (no network access is assumed): "
            "fetch it yourself and pass the file path, the bytes or a PIL.Image")


def load_image(image: ImageInput, *, max_pixels: int | None = None) -> Image.Image:
    """Return ``image`` as an RGB PIL image; transparent pixels become white.

    ``max_pixels`` (default :func:`pixel_cap`) caps width x height, checked before decoding.
    Raises :class:`ImageError` (a ValueError) for an unusable image, TypeError for another type.

    >>> load_image(np.zeros((4, 5), dtype=np.uint8)).size
    (5, 4)
    """
    cap = pixel_cap() if max_pixels is None else max_pixels
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if isinstance(image, Image.Image):
        _check_size(image.size, "PIL image", cap)
        return _to_rgb(image, what="PIL image")
    if isinstance(image, (str, os.PathLike)):
        if isinstance(image, str) and (msg := url_error(image)):
            raise ImageError(msg)
        return _open_path(expand_user(image), cap)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return _open_bytes(bytes(image), cap)
    if isinstance(image, np.ndarray):
        return _from_array(image, cap)
    raise TypeError(f"cannot read an image from {type(image).__name__}; pass {ACCEPTED}")


def _check_size(size: tuple[int, int], what: str, cap: int) -> None:
    w, h = size
    if w * h > cap:
        raise ImageError(
            f"{what} is {w}x{h} = {w * h:,} pixels, above the cap of {cap:,}; downscale it first, or raise the cap "
            f"with ${MAX_PIXELS_ENV} (or load_image(..., max_pixels=N))"
        )


def _decode(source: Any, what: str, cap: int) -> Image.Image:
    """Open lazily (header only), check the size, then decode, so a bomb is refused before it costs memory."""
    try:
        with Image.open(source) as im:
            _check_size(im.size, what, cap)
            im.load()  # decode now, so a truncated file fails here with its name
            return _to_rgb(im, what=what)
    except Image.DecompressionBombError as exc:  # above PIL's own process-wide limit, checked in open()
        raise ImageError(f"{what} is too large to decode ({exc}); downscale it first") from exc


def _open_path(path: Path, cap: int) -> Image.Image:
    if not path.exists():
        raise ImageNotFoundError(f"image file not found: {str(path)!r}")
    if path.is_dir():
        raise ImageIsFolderError(f"expected an image file, got the folder {str(path)!r}")
    what = f"image file {str(path)!r}"
    try:
        return _decode(path, what, cap)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageError(f"cannot read {what}: {exc}; is it a PNG/JPEG/WebP/... image?") from exc


def _open_bytes(data: bytes, cap: int) -> Image.Image:
    if not data:
        raise ImageError("image bytes are empty; pass the encoded file contents (e.g. Path('x.png').read_bytes())")
    try:
        return _decode(io.BytesIO(data), f"{len(data)} image bytes", cap)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ImageError(
            f"cannot decode {len(data)} image bytes starting {data[:16]!r}: {exc}; "
            "bytes must be an encoded image file (PNG, JPEG, ...), not raw pixels (pass a numpy array for those)"
        ) from exc


def _from_array(arr: np.ndarray, cap: int) -> Image.Image:
    if arr.dtype != np.uint8:
        raise TypeError(
            f"numpy image must have dtype uint8, got {arr.dtype}; "
            "convert floats in [0, 1] with (arr * 255).round().astype(np.uint8)"
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        mode = "L"
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        mode = "RGB" if arr.shape[2] == 3 else "RGBA"
    else:
        raise ImageError(f"numpy image must be HxW or HxWxC with C in 1/3/4, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"numpy image is empty (shape {arr.shape})")
    _check_size((arr.shape[1], arr.shape[0]), "numpy image", cap)
    return _to_rgb(Image.fromarray(np.ascontiguousarray(arr), mode=mode), what="numpy image")


def _to_rgb(im: Image.Image, *, what: str) -> Image.Image:
    if im.width == 0 or im.height == 0:
        raise ImageError(f"{what} is empty ({im.width}x{im.height})")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit / float greyscale: stretch to 8 bits, or convert() clips almost everything to white
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        im = Image.fromarray(a.round().astype(np.uint8), mode="L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # Text drawn on a transparent canvas is often black-on-transparent: put it on white, not black
        rgba = im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return im.convert("RGB") if im.mode != "RGB" else im.copy()
