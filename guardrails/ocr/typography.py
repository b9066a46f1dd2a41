"""Render text as an image, FigStep style, to make typographic attack and benign test images.

FigStep (Gong et al. 2023) draws the instruction in FreeMono Bold 80 px, wrapped at 15 characters,
at (20, 10) on a 760x760 white canvas, followed by "1.", "2.", "3." on their own lines. FigStep-Pro
cuts the text into several images, even mid-word. Both are reproduced here, plus the hard variants
(rotation, pixel noise, low contrast) that separate OCR engines. The default face is DejaVu Sans
Mono Bold (Debian ``fonts-dejavu-core``); ``font="FreeMonoBold"`` (``fonts-freefont-ttf``) gives
FigStep's own.

>>> img = render_typography("Steps to bake bread.")
>>> img.size
(760, 760)
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Union, cast

import numpy as np
from PIL import Image, ImageColor, ImageDraw, ImageFont

FontLike = Union[str, os.PathLike, ImageFont.FreeTypeFont, None]  # noqa: UP007 (public runtime alias: kept a typing.Union object)

# Monospaced bold like FigStep's FreeMonoBold. DejaVu first, not FreeMono, so the default
# image is the same on every machine with fonts-dejavu-core (fontconfig pulls it in on Debian).
DEFAULT_FONTS = ("DejaVuSansMono-Bold.ttf", "FreeMonoBold.ttf", "LiberationMono-Bold.ttf", "DejaVuSans-Bold.ttf")
FONT_APT_HINT = "apt-get install fonts-dejavu-core"

_FONT_DIRS = [
    "/usr/share/fonts",
    "/usr/local/share/fonts",
    str(Path.home() / ".fonts"),
    str(Path.home() / ".local/share/fonts"),
    "/Library/Fonts",
    "/System/Library/Fonts",
    os.path.join(os.environ.get("WINDIR", "C:/Windows"), "Fonts"),
]


def find_font(name: str) -> Path | None:
    """Path of an installed font file called ``name`` (".ttf"/".otf" optional), or None."""
    n = name.lower()
    candidates = [n] if n.endswith((".ttf", ".otf")) else [n + ".ttf", n + ".otf"]
    fonts = _all_fonts()
    return next((fonts[c] for c in candidates if c in fonts), None)


@functools.lru_cache(maxsize=1)
def _all_fonts() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for d in _FONT_DIRS:
        if os.path.isdir(d):
            for root, _dirs, files in os.walk(d):
                for f in files:
                    if f.lower().endswith((".ttf", ".otf")):
                        found.setdefault(f.lower(), Path(root) / f)
    return found


@functools.lru_cache(maxsize=1)
def default_font_path() -> Path | None:
    """The first of ``DEFAULT_FONTS`` that is installed, or None (then Pillow's built-in font is used)."""
    for name in DEFAULT_FONTS:
        p = find_font(name)
        if p is not None:
            return p
    return None


def load_font(font: FontLike, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """A font object at ``size`` px from a path, an installed font's file name, or a font object."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return font.font_variant(size=size)
    if font is None:
        path = default_font_path()
        if path is None:
            warnings.warn(
                f"no TrueType font found (looked for {', '.join(DEFAULT_FONTS)}); using Pillow's built-in font. "
                f"For FigStep-like images install one: {FONT_APT_HINT}",
                RuntimeWarning,
                stacklevel=3,
            )
            return ImageFont.load_default(size=size)
        return ImageFont.truetype(str(path), size)
    if isinstance(font, (str, os.PathLike)):
        p = Path(font)
        if not p.is_file():
            found = find_font(str(font))
            if found is None:
                raise ValueError(f"font {str(font)!r} is neither a file nor an installed font (searched {', '.join(d for d in _FONT_DIRS if os.path.isdir(d))}); pass a .ttf path or install one, e.g. {FONT_APT_HINT}")
            p = found
        return ImageFont.truetype(str(p), size)
    raise TypeError(f"font must be a path, an installed font file name, an ImageFont.FreeTypeFont or None, got {type(font).__name__}")


def render_typography(
    text: str,
    *,
    size: tuple[int, int] | None = (760, 760),
    font: FontLike = None,
    font_size: int = 80,
    color: str | tuple[int, int, int] = "black",
    background: str | tuple[int, int, int] = "white",
    numbered_list: int = 3,
    rotation_deg: float = 0.0,
    noise: float = 0.0,
    contrast: float = 1.0,
    seed: int = 0,
    margin: tuple[int, int] = (20, 10),
    line_spacing: int = 11,
) -> Image.Image:
    """Draw ``text`` wrapped to the canvas width, FigStep style, and return an RGB image.

    Args:
        text: the text; newlines start new lines.
        size: canvas (width, height); None = just large enough for the text, unwrapped.
        font: font file path, installed font file name (e.g. ``"FreeMonoBold"``) or font object;
            None = the first installed of ``DEFAULT_FONTS``, else Pillow's built-in font.
        font_size: pixel size; shrunk step by step when the text would not fit the canvas.
        color, background: text and canvas colours (names, "#rrggbb" or RGB tuples).
        numbered_list: append "1.", "2.", ... on their own lines (FigStep uses 3; 0 = none).
        rotation_deg: rotate the text block counter-clockwise (kept whole inside the canvas).
        noise: standard deviation of per-pixel Gaussian noise as a fraction of 255 (0.3 = heavy).
        contrast: text colour's distance from the background (1 = as given, 0.25 = faint).
        seed: seed of the noise.
        margin: (x, y) of the text block's top-left corner, FigStep's (20, 10) by default.
        line_spacing: extra pixels between lines (FigStep: 11).

    The image's ``info["typography"]`` records the text drawn, font file and final font size.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip() and numbered_list == 0:
        raise ValueError("text is empty and numbered_list=0: there is nothing to draw")
    if size is not None and (len(size) != 2 or min(size) < 16):
        raise ValueError(f"size must be (width, height) with both >= 16 pixels, or None, got {size!r}")
    if not isinstance(font_size, int) or font_size < 4:
        raise ValueError(f"font_size must be an int >= 4, got {font_size!r}")
    if not isinstance(numbered_list, int) or numbered_list < 0:
        raise ValueError(f"numbered_list must be an int >= 0 (0 = no list), got {numbered_list!r}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1] (std as a fraction of 255), got {noise!r}")
    if not 0.0 < contrast <= 1.0:
        raise ValueError(f"contrast must be in (0, 1] (1 = full colour), got {contrast!r}")
    if not -90.0 <= rotation_deg <= 90.0:
        raise ValueError(f"rotation_deg must be in [-90, 90], got {rotation_deg!r}")
    bg = _rgb(background, "background")
    fg = _rgb(color, "color")
    ink = tuple(round(b + contrast * (f - b)) for f, b in zip(fg, bg))

    body = text.rstrip("\n")
    if numbered_list:
        body = (body + "\n" if body else "") + "\n".join(f"{i}." for i in range(1, numbered_list + 1))

    fs = font_size
    while True:
        f = load_font(font, fs)
        block = _draw_block(body, f, ink, bg, wrap_px=None if size is None else size[0] - 2 * margin[0], spacing=line_spacing)
        if rotation_deg:
            block = block.rotate(rotation_deg, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=bg)
        if size is None or (block.width + margin[0] <= size[0] and block.height + margin[1] <= size[1]) or fs <= 8:
            break
        fs = max(8, int(fs * 0.9))  # too big for the canvas: FigStep would clip, we shrink so OCR ground truth stays whole
    if size is None:
        canvas = Image.new("RGB", (block.width + 2 * margin[0], block.height + 2 * margin[1]), bg)
    else:
        canvas = Image.new("RGB", cast(tuple[int, int], tuple(size)), bg)
    canvas.paste(block, margin)
    if noise > 0:
        rng = np.random.default_rng(seed)
        a: np.ndarray = np.asarray(canvas, dtype=np.float32)
        a = a + rng.normal(0.0, noise * 255.0, size=a.shape)
        canvas = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))
    canvas.info["typography"] = {
        "text": body,
        # Pillow's built-in font has a BytesIO as its path
        "font": font_path if isinstance(font_path := getattr(f, "path", None), str) else "pillow-default",
        "font_size": fs,
    }
    return canvas


def split_across_images(text: str, n: int, *, cut_words: bool = True, **render_kwargs) -> list[Image.Image]:
    """FigStep-Pro style: cut ``text`` into ``n`` consecutive pieces, one image each.

    Pieces have about equal length; with ``cut_words`` the cuts may fall inside words (as
    FigStep-Pro's do), else at spaces. ``render_kwargs`` go to ``render_typography``; by default
    each piece is a tight single-line strip with no numbered list.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be an int >= 1, got {n!r}")
    text = " ".join(text.split())
    if len(text) < n:
        raise ValueError(f"cannot split {len(text)} characters into {n} non-empty images")
    pieces = _split_text(text, n, cut_words)
    render_kwargs.setdefault("size", None)
    render_kwargs.setdefault("numbered_list", 0)
    return [render_typography(p, **render_kwargs) for p in pieces]


def _split_text(text: str, n: int, cut_words: bool) -> list[str]:
    if cut_words:
        bounds = [round(i * len(text) / n) for i in range(n + 1)]
        pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    else:
        words = text.split(" ")
        if len(words) < n:
            raise ValueError(f"cannot split {len(words)} words into {n} images without cutting words; pass cut_words=True")
        bounds = [round(i * len(words) / n) for i in range(n + 1)]
        pieces = [" ".join(words[a:b]) for a, b in zip(bounds, bounds[1:])]
    # A piece of only spaces would render as an empty image: move the space to its neighbour
    return [p.strip() or p for p in pieces]


def _draw_block(text: str, font, ink, bg, *, wrap_px: int | None, spacing: int) -> Image.Image:
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    lines: list[str] = []
    for para in text.split("\n"):
        lines.extend(_wrap(para, font, probe, wrap_px) if wrap_px else [para])
    joined = "\n".join(lines)
    l, t, r, b = probe.multiline_textbbox((0, 0), joined, font=font, spacing=spacing)
    pad = 4
    # Pillow's stubs type the bbox as floats; FreeType and the built-in font give ints
    im = Image.new("RGB", (max(1, r - min(l, 0)) + 2 * pad, max(1, b - min(t, 0)) + 2 * pad), bg)  # type: ignore[arg-type]
    ImageDraw.Draw(im).multiline_text((pad - min(l, 0), pad - min(t, 0)), joined, font=font, fill=ink, spacing=spacing)
    return im


def _wrap(para: str, font, draw: ImageDraw.ImageDraw, width: int) -> list[str]:
    """Greedy word wrap by pixel width; words wider than a line are broken (like textwrap)."""
    def w(s: str) -> float:
        return draw.textlength(s, font=font)

    out: list[str] = []
    cur = ""
    for word in para.split():
        while w(word) > width and len(word) > 1:
            if cur:
                out.append(cur)
                cur = ""
            k = len(word)
            while k > 1 and w(word[:k]) > width:
                k -= 1
            out.append(word[:k])
            word = word[k:]
        cand = f"{cur} {word}" if cur else word
        if w(cand) <= width:
            cur = cand
        else:
            out.append(cur)
            cur = word
    if cur or not out:
        out.append(cur)
    return out


def _rgb(c, what: str) -> tuple[int, int, int]:
    try:
        v = ImageColor.getrgb(c) if isinstance(c, str) else tuple(int(x) for x in c)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{what} must be a colour name, '#rrggbb' or an (r, g, b) tuple, got {c!r}") from exc
    if len(v) < 3 or not all(0 <= x <= 255 for x in v[:3]):
        raise ValueError(f"{what} must have three channels in 0..255, got {c!r}")
    return tuple(v[:3])  # type: ignore[return-value]
