"""The OCR engine interface, its typed configuration and its result objects."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import numpy as np
from PIL import Image

from .images import ImageInput, load_image
from .preprocess import Box, PreprocessConfig, Transform, preprocess


@dataclass(frozen=True)
class OCRWord:
    """One recognised word: ``box`` is (x0, y0, x1, y1) in the input image's pixels."""

    text: str
    confidence: float
    box: Box


@dataclass(frozen=True)
class OCRLine:
    """One text line in reading order; ``confidence`` is the mean over its kept words."""

    text: str
    confidence: float
    box: Box
    words: tuple[OCRWord, ...]


@dataclass(frozen=True)
class OCRResult:
    """What one image says.

    Attributes:
        text: kept words, space-joined within a line, lines joined by newlines, in reading order.
        lines: the kept lines (each with its words, confidences and boxes).
        dropped: words under ``min_confidence``, with their confidence, never silently lost.
        latency_ms: wall time of the whole read (decode, preprocessing, tiles, recognition).
        engine: engine name and version, e.g. ``"rapidocr 3.10.0"``.
        image_size: (width, height) of the input image.
        tiles: number of regions recognised (1 = untiled).
        min_confidence: the threshold that decided ``dropped``.
    """

    text: str
    lines: tuple[OCRLine, ...]
    dropped: tuple[OCRWord, ...]
    latency_ms: float
    engine: str
    image_size: tuple[int, int]
    tiles: int = 1
    min_confidence: float = 0.0

    @property
    def words(self) -> tuple[OCRWord, ...]:
        return tuple(w for line in self.lines for w in line.words)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class OCRBatchResult:
    """All images of one conversation, read in order; ``text`` joins their texts with ``sep``."""

    results: tuple[OCRResult, ...]
    text: str
    sep: str
    latency_ms: float

    @property
    def dropped(self) -> tuple[OCRWord, ...]:
        return tuple(w for r in self.results for w in r.dropped)

    def join(self, sep: str) -> str:
        """The images' texts joined with another separator, without reading again.

        FigStep-Pro cuts words across images ("diag" | "nose diab" | "etes"): ``join("")``
        rebuilds them, ``join("\\n")`` keeps images apart; a screen can judge both.
        """
        return sep.join(r.text for r in self.results if r.text)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class OCRConfig:
    """Settings shared by every engine.

    Attributes:
        min_confidence: words under this confidence (0..1) are dropped and listed in ``dropped``;
            None = the engine's measured default (``default_min_confidence``: engines' confidence
            scales differ, and Tesseract gives correct words 0.3, e.g. "self-harm." on FigStep).
        preprocess: clean-up steps; None = the engine's measured default (``default_preprocess``).
        tile_above: images whose longer side exceeds this many pixels are read in tiles, so small
            text is not shrunk away by the engine's own downscaling (0 = never tile).
        tile_size: side of a square tile in pixels.
        tile_overlap: pixels shared by neighbouring tiles; keep it above the tallest line and the
            widest word you expect, so every word lies whole inside some tile.
        full_pass_with_tiles: also read the whole (engine-downscaled) image when tiling, to catch
            text too large for one tile; its words are added where no tile found a word.
        skip_blank_tiles: do not send tiles of one flat colour (grey levels within
            ``BLANK_TILE_RANGE``) to the engine: nothing is written there, and a tile's detector
            pass costs as much as a written one's.
    """

    min_confidence: float | None = None
    preprocess: PreprocessConfig | None = None
    tile_above: int = 2000
    tile_size: int = 1024
    tile_overlap: int = 256
    full_pass_with_tiles: bool = True
    skip_blank_tiles: bool = True

    def __post_init__(self) -> None:
        if self.min_confidence is not None and (not isinstance(self.min_confidence, (int, float)) or not 0.0 <= self.min_confidence <= 1.0):
            raise ValueError(f"min_confidence must be a number in [0, 1] or None (engine default), got {self.min_confidence!r}")
        if self.preprocess is not None and not isinstance(self.preprocess, PreprocessConfig):
            raise TypeError(f"preprocess must be a PreprocessConfig or None, got {type(self.preprocess).__name__}")
        if not isinstance(self.tile_above, int) or self.tile_above < 0:
            raise ValueError(f"tile_above must be an int >= 0 (0 = never tile), got {self.tile_above!r}")
        if not isinstance(self.tile_size, int) or self.tile_size < 64:
            raise ValueError(f"tile_size must be an int >= 64, got {self.tile_size!r}")
        if not isinstance(self.tile_overlap, int) or not 0 <= self.tile_overlap <= self.tile_size // 2:
            raise ValueError(f"tile_overlap must be an int in [0, tile_size // 2], got {self.tile_overlap!r} for tile_size={self.tile_size}")


RawLines = list[list[OCRWord]]
"""What an engine's ``_recognize`` returns: lines in reading order, each a list of words."""


class OCREngine(ABC):
    """Base class: ``read`` (final) decodes, preprocesses, tiles, filters and times; subclasses
    implement ``_recognize`` on one RGB image and return words grouped in lines.

    >>> engine = get_engine("auto")            # doctest: +SKIP
    >>> engine.read("figure.png").text         # doctest: +SKIP
    'Steps to\\nmanufacture ...'
    """

    name: ClassVar[str] = "base"
    default_preprocess: ClassVar[PreprocessConfig] = PreprocessConfig()
    default_min_confidence: ClassVar[float] = 0.5

    def __init__(self, config: OCRConfig | None = None) -> None:
        if config is None:
            config = OCRConfig()
        if not isinstance(config, OCRConfig):
            raise TypeError(f"config must be an OCRConfig, got {type(config).__name__}")
        self.config = config
        self._lock = threading.Lock()  # engines keep mutable native state; one read at a time

    @property
    def min_confidence(self) -> float:
        return self.config.min_confidence if self.config.min_confidence is not None else self.default_min_confidence

    @property
    def preprocess_config(self) -> PreprocessConfig:
        return self.config.preprocess if self.config.preprocess is not None else self.default_preprocess

    @property
    @abstractmethod
    def version(self) -> str:
        """Version string of the underlying engine."""

    @abstractmethod
    def _recognize(self, image: Image.Image) -> RawLines:
        """Recognise an RGB image; boxes in its own pixels, confidences in [0, 1], nothing filtered."""

    def read(self, image: ImageInput) -> OCRResult:
        """Read the text of one image (PIL image, path, bytes or uint8 array)."""
        t0 = time.perf_counter()
        img = load_image(image)
        prep, transform = preprocess(img, self.preprocess_config)
        with self._lock:
            raw, n_tiles = self._read_regions(prep)
        raw = [[_map_word(w, transform) for w in line] for line in raw]
        lines, dropped = _filter(raw, self.min_confidence)
        text = "\n".join(line.text for line in lines)
        return OCRResult(
            text=text,
            lines=tuple(lines),
            dropped=tuple(dropped),
            latency_ms=(time.perf_counter() - t0) * 1000.0,
            engine=f"{self.name} {self.version}",
            image_size=img.size,
            tiles=n_tiles,
            min_confidence=self.min_confidence,
        )

    def read_all(self, images: Sequence[ImageInput], *, sep: str = "\n") -> OCRBatchResult:
        """Read every image of a conversation in order and join their texts with ``sep``.

        FigStep-Pro cuts one sentence (even one word) across images, so the joined text, not each
        image's, is what a screen must judge.
        """
        if isinstance(images, (str, bytes, bytearray)) or not isinstance(images, Sequence):
            raise TypeError(f"read_all takes a list of images, got {type(images).__name__}; use read() for one image")
        t0 = time.perf_counter()
        results = []
        for i, im in enumerate(images):
            try:
                results.append(self.read(im))
            except (TypeError, ValueError, OSError) as exc:
                msg = f"image {i} of {len(images)}: {exc}"
                again: Exception
                try:
                    again = type(exc)(msg)
                except Exception:  # noqa: BLE001 - some exception types need more arguments
                    again = RuntimeError(msg)
                raise again from exc
        text = sep.join(r.text for r in results if r.text)
        return OCRBatchResult(results=tuple(results), text=text, sep=sep, latency_ms=(time.perf_counter() - t0) * 1000.0)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(config={self.config!r})"

    # -- tiling ---------------------------------------------------------------------------------

    def _read_regions(self, im: Image.Image) -> tuple[RawLines, int]:
        cfg = self.config
        W, H = im.size
        if not cfg.tile_above or max(W, H) <= cfg.tile_above:
            return _fix_rows(self._recognize(im)), 1
        tiles = _tile_grid(W, H, cfg.tile_size, cfg.tile_overlap)
        lines: RawLines = []
        grey = np.asarray(im.convert("L")) if cfg.skip_blank_tiles else None
        n_read = 0
        for (x0, y0, x1, y1), core in tiles:
            if grey is not None and _is_blank(grey[y0:y1, x0:x1]):
                continue
            n_read += 1
            for line in self._recognize(im.crop((x0, y0, x1, y1))):
                kept = []
                for w in line:
                    w = OCRWord(w.text, w.confidence, (w.box[0] + x0, w.box[1] + y0, w.box[2] + x0, w.box[3] + y0))
                    cx, cy = (w.box[0] + w.box[2]) / 2, (w.box[1] + w.box[3]) / 2
                    # Each pixel belongs to exactly one tile's core, so a word seen by two tiles
                    # (on a seam) is kept once: by the tile whose core holds its centre.
                    if core[0] <= cx < core[2] and core[1] <= cy < core[3]:
                        kept.append(w)
                if kept:
                    lines.append(kept)
        if cfg.full_pass_with_tiles:
            # Shrunk to tile_above: this pass is only for text too large for one tile, and
            # reading the full-size image again would double the cost for nothing
            f = cfg.tile_above / max(W, H)
            small = im.resize((max(1, round(W * f)), max(1, round(H * f))), Image.Resampling.LANCZOS)
            tile_words = [w for line in lines for w in line]
            for line in self._recognize(small):
                line = [OCRWord(w.text, w.confidence, tuple(v / f for v in w.box)) for w in line]  # type: ignore[arg-type]  # 4 coordinates in, 4 out
                extra = [w for w in line if not any(_overlap(w.box, t.box) > 0.3 for t in tile_words)]
                if extra:
                    lines.append(extra)
        return _order_lines(_merge_split_lines(lines)), n_read + int(cfg.full_pass_with_tiles)


BLANK_TILE_RANGE = 8
"""A tile whose darkest and lightest grey levels differ by less than this holds no text."""


def _is_blank(grey: np.ndarray) -> bool:
    return grey.size == 0 or int(grey.max()) - int(grey.min()) < BLANK_TILE_RANGE


def _tile_grid(W: int, H: int, size: int, overlap: int) -> list[tuple[tuple[int, int, int, int], tuple[float, float, float, float]]]:
    """Tiles covering W x H with ``overlap``; each with its core (tile minus half the overlap
    on sides that touch another tile). Cores partition the image."""

    def starts(n: int) -> list[int]:
        if n <= size:
            return [0]
        step = size - overlap
        s = list(range(0, n - size, step)) + [n - size]
        return sorted(set(s))

    xs, ys = starts(W), starts(H)
    out = []
    for j, y in enumerate(ys):
        for i, x in enumerate(xs):
            box = (x, y, min(x + size, W), min(y + size, H))
            # Core boundaries sit midway through each overlap with the neighbour
            cx0 = 0.0 if i == 0 else (x + min(xs[i - 1] + size, W)) / 2
            cx1 = float(W) if i == len(xs) - 1 else (xs[i + 1] + min(x + size, W)) / 2
            cy0 = 0.0 if j == 0 else (y + min(ys[j - 1] + size, H)) / 2
            cy1 = float(H) if j == len(ys) - 1 else (ys[j + 1] + min(y + size, H)) / 2
            out.append((box, (cx0, cy0, cx1, cy1)))
    return out


def _overlap(a: Box, b: Box) -> float:
    """Intersection over the smaller box's area."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller if smaller > 0 else 0.0


def _v_overlap(a: Box, b: Box) -> float:
    inter = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min(a[3] - a[1], b[3] - b[1])
    return inter / smaller if smaller > 0 else 0.0


def _line_box(words: Sequence[OCRWord]) -> Box:
    return (min(w.box[0] for w in words), min(w.box[1] for w in words), max(w.box[2] for w in words), max(w.box[3] for w in words))


def _merge_split_lines(lines: RawLines) -> RawLines:
    """Join pieces of one text line that tiles cut apart (same height band, side by side)."""
    merged: RawLines = []
    for line in sorted(lines, key=lambda l: _line_box(l)[0]):
        lb = _line_box(line)
        for m in merged:
            mb = _line_box(m)
            if _v_overlap(lb, mb) > 0.6 and lb[0] >= mb[2] - 0.25 * (mb[3] - mb[1]):
                m.extend(line)
                break
        else:
            merged.append(list(line))
    return merged


def _side_by_side(a: Box, row: Sequence[Box]) -> bool:
    """``a`` shares the height band of the row and overlaps none of its boxes horizontally."""
    return _v_overlap(a, row[-1]) > 0.5 and all(a[0] >= b[2] or a[2] <= b[0] for b in row)


def _rows(lines: RawLines, order: Sequence[int]) -> RawLines:
    boxes = [_line_box(l) for l in lines]
    rows: list[list[int]] = []
    for i in order:
        if rows and _side_by_side(boxes[i], [boxes[k] for k in rows[-1]]):
            rows[-1].append(i)
        else:
            rows.append([i])
    out: RawLines = []
    for row in rows:
        row = sorted(row, key=lambda k: boxes[k][0])
        out.append(list(lines[row[0]]))
        for prev, k in zip(row, row[1:]):
            gap = boxes[k][0] - boxes[prev][2]
            # a small gap is one line the detector cut in two; a wide one is another column
            if gap < 1.5 * (boxes[k][3] - boxes[k][1]):
                out[-1].extend(lines[k])
            else:
                out.append(list(lines[k]))
    return out


def _fix_rows(lines: RawLines) -> RawLines:
    """Keep the engine's line order, but put pieces of one row left to right: rapidocr may list
    two boxes of one row right-first when their tops differ by a few pixels."""
    return _rows(lines, range(len(lines)))


def _order_lines(lines: RawLines) -> RawLines:
    """Global reading order for lines gathered from tiles: by vertical centre, rows left to right."""
    boxes = [_line_box(l) for l in lines]
    return _rows(lines, sorted(range(len(lines)), key=lambda i: ((boxes[i][1] + boxes[i][3]) / 2, boxes[i][0])))


def _map_word(w: OCRWord, t: Transform) -> OCRWord:
    if t.scale == 1.0 and t.angle_deg == 0.0:
        return w
    return OCRWord(w.text, w.confidence, t.to_input(w.box))


def _filter(raw: RawLines, min_conf: float) -> tuple[list[OCRLine], list[OCRWord]]:
    lines: list[OCRLine] = []
    dropped: list[OCRWord] = []
    for line in raw:
        kept: list[OCRWord] = []
        for w in line:
            if not w.text.strip():
                continue
            (kept if w.confidence >= min_conf else dropped).append(w)
        if kept:
            lines.append(
                OCRLine(
                    text=" ".join(w.text for w in kept),
                    confidence=sum(w.confidence for w in kept) / len(kept),
                    box=_line_box(kept),
                    words=tuple(kept),
                )
            )
    return lines, dropped
