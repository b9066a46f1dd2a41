"""Image clean-up before OCR (deskew, denoise, contrast, upscale), with a map back to input pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageFilter, ImageOps

_cv2: Any
try:  # OpenCV comes with rapidocr; without it the same steps run in PIL, only slower
    import cv2 as _cv2
except ImportError:  # pragma: no cover - the PIL path is exercised by the tests through use_cv2(False)
    _cv2 = None

Box = tuple[float, float, float, float]

# Measured (benchmarks/ocr_eval.py, issue 12 item 4) on 760x760 images, 2 shared cores: PIL's
# median filter costs 12 ms (3x3) on a clean image but 60 ms (3x3) and 200 ms (5x5) on a noisy
# one, and a bicubic rotation 40-70 ms; OpenCV does each in about 1 ms. OpenCV's median equals
# PIL's pixel for pixel; its bicubic rotation differs from PIL's by interpolation rounding only.
_USE_CV2 = _cv2 is not None


def use_cv2(enabled: bool) -> bool:
    """Turn the OpenCV fast path of the clean-up steps on or off (off = PIL only); returns the
    previous setting. On needs ``cv2`` importable; for tests and comparisons."""
    global _USE_CV2
    previous = _USE_CV2
    if enabled and _cv2 is None:
        raise RuntimeError("OpenCV (cv2) is not importable; the PIL path is the only one")
    _USE_CV2 = bool(enabled)
    return previous


def _median(g: Image.Image, size: int) -> Image.Image:
    """Median filter of a greyscale image (OpenCV's equals PIL's, pixel for pixel)."""
    if _USE_CV2 and g.mode == "L":
        return Image.fromarray(_cv2.medianBlur(np.asarray(g), size))
    return g.filter(ImageFilter.MedianFilter(size))


def _rotate(im: Image.Image, angle: float, fill: tuple[int, ...]) -> Image.Image:
    """``im.rotate(angle, BICUBIC, expand=True, fillcolor=fill)``: same canvas and geometry as
    PIL's (so ``Transform`` maps boxes back either way), through OpenCV when it is there."""
    if not (_USE_CV2 and im.mode in ("RGB", "L")):
        return im.rotate(angle, resample=Image.Resampling.BICUBIC, expand=True, fillcolor=fill)
    # PIL's own construction: an output-to-input affine map about the centre, canvas expanded
    # to the rotated corners (PIL.Image.rotate)
    w, h = im.size
    t = -math.radians(angle)
    a, b, d, e = round(math.cos(t), 15), round(math.sin(t), 15), round(-math.sin(t), 15), round(math.cos(t), 15)
    cx, cy = w / 2.0, h / 2.0
    c, f = a * -cx + b * -cy + cx, d * -cx + e * -cy + cy
    xs, ys = [], []
    for x, y in ((0, 0), (w, 0), (w, h), (0, h)):
        xs.append(a * x + b * y + c)
        ys.append(d * x + e * y + f)
    nw = math.ceil(max(xs)) - math.floor(min(xs))
    nh = math.ceil(max(ys)) - math.floor(min(ys))
    ox, oy = -(nw - w) / 2.0, -(nh - h) / 2.0
    c, f = a * ox + b * oy + c, d * ox + e * oy + f
    # PIL samples at pixel centres (x + 0.5); OpenCV indexes pixels at integers
    m = np.array([[a, b, c + 0.5 * (a + b) - 0.5], [d, e, f + 0.5 * (d + e) - 0.5]], dtype=np.float64)
    fill_value = tuple(float(v) for v in fill) if im.mode == "RGB" else float(fill[0])
    out = _cv2.warpAffine(np.asarray(im), m, (nw, nh), flags=_cv2.INTER_CUBIC | _cv2.WARP_INVERSE_MAP, borderMode=_cv2.BORDER_CONSTANT, borderValue=fill_value)
    return Image.fromarray(out, mode=im.mode)


@dataclass(frozen=True)
class PreprocessConfig:
    """Which clean-up steps run before recognition (all off = the image as given).

    The engines' defaults come from measurements on hard renderings (see ``benchmarks/ocr_eval.py``).

    Attributes:
        autocontrast: stretch grey levels so light-grey text on white becomes dark.
        contrast: extra contrast factor after autocontrast (1.0 = unchanged).
        denoise: median filter size (0 = off, else odd >= 3), or ``"auto"``: measure the pixel
            noise and, only where there is some, median-filter (3, or 5 when heavy) and binarize.
        deskew: estimate the text's tilt (up to ``max_skew_deg``) and rotate it level.
        max_skew_deg: largest tilt ``deskew`` searches for.
        upscale_min_side: enlarge images whose shorter side is below this many pixels (0 = off).
        binarize: threshold to black and white (Otsu) after the other steps.
    """

    autocontrast: bool = False
    contrast: float = 1.0
    denoise: int | Literal["auto"] = 0
    deskew: bool = False
    max_skew_deg: float = 15.0
    upscale_min_side: int = 0
    binarize: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.contrast, (int, float)) or self.contrast <= 0:
            raise ValueError(f"contrast must be a positive number (1.0 = unchanged), got {self.contrast!r}")
        if self.denoise != "auto" and (
            not isinstance(self.denoise, int) or isinstance(self.denoise, bool) or (self.denoise != 0 and (self.denoise < 3 or self.denoise % 2 == 0))
        ):
            raise ValueError(f"denoise must be 0 (off), an odd median-filter size >= 3, or 'auto', got {self.denoise!r}")
        if not 0 < self.max_skew_deg <= 45:
            raise ValueError(f"max_skew_deg must be in (0, 45], got {self.max_skew_deg!r}")
        if not isinstance(self.upscale_min_side, int) or self.upscale_min_side < 0:
            raise ValueError(f"upscale_min_side must be an int >= 0 (0 = off), got {self.upscale_min_side!r}")


@dataclass(frozen=True)
class Transform:
    """How a preprocessed image relates to its input: ``input = unrotate(prep / scale)``."""

    scale: float = 1.0
    angle_deg: float = 0.0  # counter-clockwise rotation applied (PIL convention)
    in_size: tuple[int, int] = (0, 0)
    out_size: tuple[int, int] = (0, 0)  # after rotation, before scaling

    def to_input(self, box: Box) -> Box:
        """Map a box in preprocessed pixels to the axis-aligned box in input pixels."""
        x0, y0, x1, y1 = (v / self.scale for v in box)
        if self.angle_deg == 0.0:
            return (x0, y0, x1, y1)
        t = math.radians(self.angle_deg)
        c, s = math.cos(t), math.sin(t)
        ocx, ocy = self.out_size[0] / 2, self.out_size[1] / 2
        icx, icy = self.in_size[0] / 2, self.in_size[1] / 2
        xs, ys = [], []
        for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1)):
            dx, dy = x - ocx, y - ocy
            # inverse of PIL's counter-clockwise rotation in y-down coordinates
            xs.append(icx + dx * c - dy * s)
            ys.append(icy + dx * s + dy * c)
        W, H = self.in_size
        return (max(0.0, min(xs)), max(0.0, min(ys)), min(float(W), max(xs)), min(float(H), max(ys)))


def preprocess(image: Image.Image, cfg: PreprocessConfig) -> tuple[Image.Image, Transform]:
    """Apply ``cfg`` to an RGB image; returns the new image and the map back to input pixels."""
    im = image
    angle = 0.0
    rotated_size = im.size
    if cfg.autocontrast:
        im = ImageOps.autocontrast(im, cutoff=1)
    if cfg.contrast != 1.0:
        from PIL import ImageEnhance

        im = ImageEnhance.Contrast(im).enhance(cfg.contrast)
    binarize = cfg.binarize
    if cfg.denoise == "auto":
        sigma = noise_level(im)
        if sigma >= NOISE_THRESHOLD:
            # Measured on hard renderings: a median filter alone leaves Tesseract blind on heavy
            # noise; median + Otsu threshold gives it clean strokes back
            # (greyscale first: the Otsu step drops colour anyway, and it filters 3x faster)
            im = _median(im.convert("L"), 3 if sigma < 2 * NOISE_THRESHOLD else 5).convert("RGB")
            binarize = True
    elif cfg.denoise:
        im = im.filter(ImageFilter.MedianFilter(cfg.denoise))
    if cfg.deskew:
        angle = estimate_skew(im, max_deg=cfg.max_skew_deg)
        # Below 1 degree both engines read fine and resampling only blurs the strokes
        if abs(angle) >= 1.0:
            im = _rotate(im, angle, _background(im))
            rotated_size = im.size
        else:
            angle = 0.0
    scale = 1.0
    if cfg.upscale_min_side and min(im.size) < cfg.upscale_min_side:
        scale = cfg.upscale_min_side / min(im.size)
        im = im.resize((round(im.width * scale), round(im.height * scale)), Image.Resampling.LANCZOS)
    if binarize:
        im = _otsu(im)
    return im, Transform(scale=scale, angle_deg=angle, in_size=image.size, out_size=rotated_size)


NOISE_THRESHOLD = 6.0
"""Noise sigma (grey levels) above which ``denoise="auto"`` acts; clean renders and JPEGs measure ~0."""


def noise_level(image: Image.Image) -> float:
    """Robust estimate of per-pixel noise (grey levels): scaled median of |image - median3(image)|.

    Clean text images score about 0 (strokes survive a 3x3 median); Gaussian noise of std s
    scores about 0.7 s.
    """
    g = image.convert("L")
    g.thumbnail((800, 800))
    a = np.asarray(g, dtype=np.float32)
    m = np.asarray(_median(g, 3), dtype=np.float32)
    return float(np.median(np.abs(a - m)) * 1.4826)


def estimate_skew(image: Image.Image, *, max_deg: float = 15.0) -> float:
    """Angle (degrees, counter-clockwise) that levels the text lines: PIL ``rotate(angle)`` fixes it.

    Projection-profile search: the rotation that makes row sums of the ink mask most peaked.
    Needs only numpy and PIL, so it works for every engine.
    """
    g = image.convert("L")
    g.thumbnail((600, 600))
    g = _median(g, 3)  # noise would otherwise flatten every profile
    a = np.asarray(g, dtype=np.float32)
    bg = float(np.median(a))
    ink_level = float(np.percentile(a, 1)) if bg > 127 else float(np.percentile(a, 99))
    if abs(bg - ink_level) < 8:  # no visible ink: nothing to level
        return 0.0
    mask = np.abs(a - bg) > abs(bg - ink_level) / 2
    if mask.mean() < 1e-3:
        return 0.0
    # Row sums of the mask rotated by ``deg``, computed from the ink pixels' coordinates rather
    # than by rotating the mask 42 times (measured: 60-100 ms per image that way, a few ms this
    # way). PIL's counter-clockwise rotation moves (x, y), y down, about the centre to the row
    # -x sin + y cos.
    ys, xs = np.nonzero(mask)
    xs = xs.astype(np.float64) - mask.shape[1] / 2.0
    ys = ys.astype(np.float64) - mask.shape[0] / 2.0

    def score(deg: float) -> float:
        t = math.radians(deg)
        r = np.rint(ys * math.cos(t) - xs * math.sin(t)).astype(np.int64)
        rows = np.bincount(r - r.min() + 1, minlength=int(r.max() - r.min()) + 3).astype(np.float64)  # a zero row each side, as on a canvas
        return float(np.square(np.diff(rows)).sum())

    coarse = np.arange(-max_deg, max_deg + 1e-9, 1.0)
    best = max(coarse, key=score)
    fine = np.arange(best - 1.0, best + 1.0 + 1e-9, 0.2)
    return float(max(fine, key=score))


def estimate_text_height(image: Image.Image) -> float | None:
    """Median height in pixels of the ink's connected components (about a character's height:
    x-height to cap height), or None where it cannot tell (no ink, too few marks, no OpenCV).

    FigStep's 80-px font measures 37. Engines use it to read large text at a lower resolution.
    """
    if _cv2 is None:
        return None
    g = np.asarray(image.convert("L"))
    f = 1.0
    if max(g.shape) > 1000:  # enough resolution to see 8-px text; a few ms at most
        f = 1000.0 / max(g.shape)
        g = _cv2.resize(g, (max(1, round(g.shape[1] * f)), max(1, round(g.shape[0] * f))), interpolation=_cv2.INTER_AREA)
    bg = float(np.median(g))
    ink = float(np.percentile(g, 1)) if bg > 127 else float(np.percentile(g, 99))
    if abs(bg - ink) < 8:
        return None
    mask = (np.abs(g.astype(np.int16) - bg) > abs(bg - ink) / 2).astype(np.uint8)
    _n, _labels, stats, _c = _cv2.connectedComponentsWithStats(mask, connectivity=8)
    h, area = stats[1:, _cv2.CC_STAT_HEIGHT], stats[1:, _cv2.CC_STAT_AREA]
    keep = (h >= 4) & (area >= 8)  # specks of noise and dots of i's are not characters
    if int(keep.sum()) < 3:
        return None
    return float(np.median(h[keep])) / f


def _background(im: Image.Image) -> tuple[int, ...]:
    # The border's median colour: rotation fills the new corners with it, not with black
    a = np.asarray(im)
    border = np.concatenate([a[0], a[-1], a[:, 0], a[:, -1]])
    return tuple(int(v) for v in np.median(border, axis=0))


def _otsu(im: Image.Image) -> Image.Image:
    g = np.asarray(im.convert("L"))
    hist = np.bincount(g.ravel(), minlength=256).astype(np.float64)
    p = hist / hist.sum()
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1 - omega))
    t = int(np.nanargmax(between))
    return Image.fromarray(np.where(g > t, 255, 0).astype(np.uint8)).convert("RGB")
