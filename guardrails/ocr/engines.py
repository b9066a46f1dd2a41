"""The two supported OCR engines, imported lazily, and ``get_engine``."""

from __future__ import annotations

import contextlib
import importlib
import threading
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from .base import OCRConfig, OCREngine, OCRWord, RawLines
from .preprocess import PreprocessConfig, estimate_text_height

PIP_HINT = 'pip install "mllm-guardrails[ocr]"'
APT_HINT = "apt-get install tesseract-ocr"


_TESSERACT_CMD_LOCK = threading.Lock()


class OCRUnavailableError(ImportError, RuntimeError):
    """An OCR engine's package or program is missing; the message says how to install it."""


def _import(module: str, hint: str, engine: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise OCRUnavailableError(f"the {engine} OCR engine needs the Python package {module!r}, which is not importable ({exc}); install it with: {hint}") from exc


DEFAULT_DET_TEXT_HEIGHT = 18.0
"""Character height (pixels) the rapidocr detector reads at, by default. Measured (issue 12, item
4; benchmarks/RESULTS.md "OCR speed settings"): FigStep's type (37 px) read at half size keeps word
recall (0.997 on 100 images, 1.000 on 40 hard renderings) and cuts the detector from ~0.35 to ~0.07 s; a fixed
smaller detector input instead loses small type (16-px screenshot text: recall 0.73 at 384 px)."""

REC_MIN_WIDTH = 160
"""Width (pixels at height 48) each recognizer input is padded up to (rapidocr's default: 320)."""


class RapidOCREngine(OCREngine):
    """PP-OCR models through ``rapidocr`` 3.x on onnxruntime; the models ship in the wheel (offline).

    The most accurate engine here on FigStep and on rotated, noisy and faint typography (see
    ``benchmarks/ocr_eval.py``); with the defaults below, faster than Tesseract on 760x760 images.

    Args:
        config: shared OCR settings.
        use_cls: run the 0/180-degree text-direction classifier (upside-down text).
        threads: onnxruntime intra-op threads (None = onnxruntime's default, all cores). 1 by
            default: on 2 shared cores 2 threads cost 50% more CPU for 15% less wall time.
        params: extra ``RapidOCR(params=...)`` settings, e.g. ``{"Det.limit_side_len": 960}``.
        det_text_height: read each image's text detector input scaled so that characters are
            about this many pixels high (measured with ``estimate_text_height``; never enlarged,
            never shrunk more than ``det_min_scale``); None = at the image's own size.
        det_min_scale: the most the detector input is shrunk (0.5 = to half the side).
    """

    name = "rapidocr"
    # Measured on 40 hard renderings (benchmarks/ocr_eval.py): word recall 0.988 as given,
    # 0.964 with deskew alone (it resamples the noise), 0.997 with auto denoise, 1.000 with
    # both; FigStep images unchanged (0.991); about 0.1 s more CPU per image.
    default_preprocess = PreprocessConfig(deskew=True, denoise="auto")
    # The one word it scored under 0.5 on 140 images was not in the text
    default_min_confidence = 0.5

    def __init__(
        self,
        config: OCRConfig | None = None,
        *,
        use_cls: bool = False,
        threads: int | None = 1,
        params: dict[str, Any] | None = None,
        det_text_height: float | None = DEFAULT_DET_TEXT_HEIGHT,
        det_min_scale: float = 0.5,
    ) -> None:
        super().__init__(config)
        rapidocr = _import("rapidocr", PIP_HINT, "rapidocr")
        side = max(self.config.tile_above, self.config.tile_size) if self.config.tile_above else 2000
        _import("onnxruntime", PIP_HINT, "rapidocr")
        p: dict[str, Any] = {
            "Global.log_level": "error",
            # We filter by confidence ourselves, so low-confidence words are reported, not lost
            "Global.text_score": 0.0,
            "Global.return_word_box": True,
            "Global.use_cls": bool(use_cls),
            # rapidocr's default detector input ("min" side 736) blows small images up: a
            # 578x120 strip became 3545x736, took 12x longer and split "safely" into "safel y".
            # Read at the image's own size instead, up to the size above which we tile.
            "Det.limit_type": "max",
            "Det.limit_side_len": side,
            "Global.max_side_len": side,
            # One line per recognizer call, each at its own width (padded only up to
            # REC_MIN_WIDTH): batches of 6 were padded to their widest line and every line to 320
            # px, so FigStep's "1." "2." "3." (60 px) cost as much as a full line. Measured
            # (issue 12, item 4; benchmarks/RESULTS.md "OCR speed settings"), 100 FigStep images:
            # 0.53 s CPU per image -> 0.45 (batch 1) -> 0.37 (and 160 px); on 300 both miss the
            # same 16 of 3683 words.
            "Rec.rec_batch_num": 1,
            "Rec.rec_img_shape": [3, 48, REC_MIN_WIDTH],
        }
        if threads is not None:
            if not isinstance(threads, int) or threads < 1:
                raise ValueError(f"threads must be a positive int or None, got {threads!r}")
            p["EngineConfig.onnxruntime.intra_op_num_threads"] = threads
        if params:
            if not isinstance(params, dict):
                raise TypeError(f"params must be a dict of RapidOCR settings, got {type(params).__name__}")
            p.update(params)
        if det_text_height is not None and (isinstance(det_text_height, bool) or not isinstance(det_text_height, (int, float)) or det_text_height <= 0):
            raise ValueError(f"det_text_height must be a positive number of pixels or None (own size), got {det_text_height!r}")
        if isinstance(det_min_scale, bool) or not isinstance(det_min_scale, (int, float)) or not 0 < det_min_scale <= 1:
            raise ValueError(f"det_min_scale must be a number in (0, 1], got {det_min_scale!r}")
        self.det_text_height = det_text_height
        self.det_min_scale = float(det_min_scale)
        self._ocr = rapidocr.RapidOCR(params=p)
        self._det_side = int(self._ocr.cfg.Det.limit_side_len)
        self._version = _dist_version("rapidocr")

    def detector_side(self, image: Image.Image) -> int:
        """The longer side the text detector reads ``image`` at (``Det.limit_side_len``)."""
        side = min(self._det_side, max(image.size))
        if self.det_text_height is None:
            return side
        h = estimate_text_height(image)
        if h is None:  # no measurable text: as before, at the image's own size
            return side
        scale = min(1.0, max(self.det_min_scale, self.det_text_height / h))
        return max(32, min(side, round(max(image.size) * scale)))

    @property
    def version(self) -> str:
        return self._version

    def _recognize(self, image: Image.Image) -> RawLines:
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])  # rapidocr takes arrays as BGR
        if self.det_text_height is not None:
            # rapidocr builds the detector's resize from this attribute on every call; read()
            # holds the engine's lock, so no other image sees this one's size
            self._ocr._load_det_model().limit_side_len = self.detector_side(image)
        out = self._ocr(bgr)
        txts = getattr(out, "txts", None)
        if not txts:
            return []
        boxes, scores = out.boxes, out.scores
        word_lines = [wl for wl in (getattr(out, "word_results", ()) or ()) if wl]
        lines: RawLines = []
        j = 0
        for text, score, quad in zip(txts, scores, boxes):
            squeezed = text.replace(" ", "")
            pieces = None
            # rapidocr leaves out word lists for lines without word boxes, so match them to
            # lines by their text rather than by index
            if j < len(word_lines) and "".join(str(w[0]) for w in word_lines[j]).replace(" ", "") == squeezed:
                pieces = word_lines[j]
                j += 1
            lines.append(_words_from_line(text, float(score), _quad_box(quad), pieces))
        return lines


class TesseractEngine(OCREngine):
    """Tesseract 5 (Debian ``tesseract-ocr``) through ``pytesseract``: small and fast on clean text.

    Args:
        config: shared OCR settings.
        lang: Tesseract language(s), e.g. ``"eng"`` or ``"eng+deu"`` (data must be installed).
        psm: page segmentation mode (3 = automatic, Tesseract's default).
        tesseract_cmd: path to the ``tesseract`` program if it is not on PATH.
        extra_config: further command-line options passed to Tesseract.
    """

    name = "tesseract"
    # Measured on 40 hard renderings (benchmarks/ocr_eval.py): word recall 0.25 as given (no
    # text at all from rotated or noisy images), 0.98 with deskew + auto denoise; FigStep
    # images unchanged (0.99). Clean images skip both steps (no tilt, no noise measured).
    default_preprocess = PreprocessConfig(deskew=True, denoise="auto")
    # All 5 words it scored under 0.5 on 140 images were right ("self-harm." at 0.34): a
    # lost word hides harm, a stray one rarely adds any; 0.1 still drops noise fragments
    default_min_confidence = 0.1

    def __init__(self, config: OCRConfig | None = None, *, lang: str = "eng", psm: int = 3, tesseract_cmd: str | None = None, extra_config: str = "") -> None:
        super().__init__(config)
        pt = _import("pytesseract", PIP_HINT, "tesseract")
        self._pt = pt
        self._cmd = tesseract_cmd
        if not isinstance(psm, int) or not 0 <= psm <= 13:
            raise ValueError(f"psm must be a Tesseract page segmentation mode 0..13, got {psm!r}")
        try:
            with self._program():
                self._version = str(pt.get_tesseract_version()).split()[0]
                langs = set(pt.get_languages(config=""))
        except (pt.TesseractNotFoundError, OSError) as exc:
            raise OCRUnavailableError(f"the tesseract program was not found ({exc}); install it with: {APT_HINT} (or pass tesseract_cmd=PATH)") from exc
        missing = [l for l in lang.split("+") if l not in langs]
        if missing:
            raise ValueError(f"Tesseract has no data for {missing} (installed: {sorted(langs)}); install e.g. apt-get install tesseract-ocr-{missing[0]}")
        self._lang = lang
        self._config = f"--psm {psm} {extra_config}".strip()

    @property
    def version(self) -> str:
        return self._version

    @contextlib.contextmanager
    def _program(self) -> Iterator[None]:
        # pytesseract reads the program path from a module global: swap it only for this call,
        # under a lock, so one engine's tesseract_cmd never leaks into another's
        if self._cmd is None:
            yield
            return
        with _TESSERACT_CMD_LOCK:
            saved = self._pt.pytesseract.tesseract_cmd
            self._pt.pytesseract.tesseract_cmd = self._cmd
            try:
                yield
            finally:
                self._pt.pytesseract.tesseract_cmd = saved

    def _recognize(self, image: Image.Image) -> RawLines:
        with self._program():
            d = self._pt.image_to_data(image, lang=self._lang, config=self._config, output_type=self._pt.Output.DICT)
        lines: dict[tuple[int, int, int, int], list[OCRWord]] = {}
        for i, text in enumerate(d["text"]):
            conf = float(d["conf"][i])
            if conf < 0 or not str(text).strip():  # -1 marks page/block/line rows, not words
                continue
            x, y, w, h = (float(d[k][i]) for k in ("left", "top", "width", "height"))
            key = (d["page_num"][i], d["block_num"][i], d["par_num"][i], d["line_num"][i])
            lines.setdefault(key, []).append(OCRWord(str(text), conf / 100.0, (x, y, x + w, y + h)))
        return list(lines.values())  # Tesseract lists words in its reading order


ENGINES: dict[str, type[OCREngine]] = {"rapidocr": RapidOCREngine, "tesseract": TesseractEngine}
# "auto" tries these in order. rapidocr first: more accurate on FigStep and on hard typography
# (rotation, noise, low contrast), with or without preprocessing (benchmarks/ocr_eval.py);
# Tesseract as given reads no text from rotated or noisy images, and needs our deskew and
# denoise steps to come close.
AUTO_ORDER = ("rapidocr", "tesseract")


def get_engine(name: str = "auto", config: OCRConfig | None = None, **kwargs: Any) -> OCREngine:
    """Build an OCR engine by name: ``"auto"`` (rapidocr, else Tesseract), ``"rapidocr"`` or ``"tesseract"``.

    ``kwargs`` go to the engine class (e.g. ``threads=2`` for rapidocr, ``lang="eng"`` for Tesseract).

    >>> engine = get_engine("auto")   # doctest: +SKIP
    """
    if not isinstance(name, str):
        raise TypeError(f"engine name must be a string, one of {['auto', *ENGINES]}, got {type(name).__name__}")
    key = name.lower()
    if key in ENGINES:
        return ENGINES[key](config, **kwargs)
    if key != "auto":
        raise ValueError(f"unknown OCR engine {name!r}; choose one of {['auto', *ENGINES]}")
    if kwargs:
        raise TypeError(f"engine-specific options {sorted(kwargs)} need an explicit engine name, not 'auto'")
    errors = []
    for i, candidate in enumerate(AUTO_ORDER):
        try:
            engine = ENGINES[candidate](config)
        except OCRUnavailableError as exc:
            errors.append(str(exc))
            continue
        if i > 0:
            warnings.warn(
                f"OCR engine 'auto' fell back to {candidate}: {errors[0]}. Tesseract misses most rotated and noisy text; "
                f"install rapidocr for hard typography ({PIP_HINT})",
                RuntimeWarning,
                stacklevel=2,
            )
        return engine
    raise OCRUnavailableError("no OCR engine is available:\n  " + "\n  ".join(errors))


def _quad_box(quad: Any) -> tuple[float, float, float, float]:
    a = np.asarray(quad, dtype=np.float64).reshape(-1, 2)
    return (float(a[:, 0].min()), float(a[:, 1].min()), float(a[:, 0].max()), float(a[:, 1].max()))


def _words_from_line(text: str, score: float, line_box: tuple[float, float, float, float], pieces: Any) -> list[OCRWord]:
    """The line's space-separated words, each with the confidence (lowest) and box (union) of
    the rapidocr word pieces it overlaps. rapidocr's own word split is unreliable at tight
    image edges ("safely" -> "safel", "y"), so the line text decides what a word is."""
    if not pieces:
        return _split_line(text, score, line_box)
    spans = []  # (start, end) of each piece in the line's text without spaces
    pos = 0
    for t, _s, _b in pieces:
        n = len(str(t).replace(" ", ""))
        spans.append((pos, pos + n))
        pos += n
    out, pos = [], 0
    for token in text.split():
        a, b = pos, pos + len(token)
        pos = b
        hit = [k for k, (s0, s1) in enumerate(spans) if s0 < b and a < s1]
        if not hit:
            continue
        boxes = [_quad_box(pieces[k][2]) for k in hit]
        out.append(
            OCRWord(
                token,
                float(min(pieces[k][1] for k in hit)),
                (min(x[0] for x in boxes), min(x[1] for x in boxes), max(x[2] for x in boxes), max(x[3] for x in boxes)),
            )
        )
    return out


def _split_line(text: str, score: float, box: tuple[float, float, float, float]) -> list[OCRWord]:
    """Words of a line without word boxes: widths in proportion to character counts."""
    n = max(len(text), 1)
    x0, y0, x1, y1 = box
    out, pos = [], 0
    for token in text.split(" "):
        if token:
            a = x0 + (x1 - x0) * pos / n
            b = x0 + (x1 - x0) * (pos + len(token)) / n
            out.append(OCRWord(token, score, (a, y0, b, y1)))
        pos += len(token) + 1
    return out


def _dist_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "unknown"
