"""OCR engines behind one small interface, plus a FigStep-style typography renderer.

>>> from guardrails.ocr import get_engine       # doctest: +SKIP
>>> get_engine().read("figure.png").text        # doctest: +SKIP
"""

from __future__ import annotations

from .base import OCRBatchResult, OCRConfig, OCREngine, OCRLine, OCRResult, OCRWord
from .engines import APT_HINT, ENGINES, PIP_HINT, OCRUnavailableError, RapidOCREngine, TesseractEngine, get_engine
from .images import DEFAULT_MAX_PIXELS, ImageError, ImageInput, load_image
from .metrics import char_error_rate, normalize_text, word_recall
from .preprocess import PreprocessConfig, estimate_skew, noise_level
from .typography import render_typography, split_across_images

__all__ = [
    "APT_HINT",
    "DEFAULT_MAX_PIXELS",
    "ENGINES",
    "PIP_HINT",
    "ImageError",
    "ImageInput",
    "OCRBatchResult",
    "OCRConfig",
    "OCREngine",
    "OCRLine",
    "OCRResult",
    "OCRUnavailableError",
    "OCRWord",
    "PreprocessConfig",
    "RapidOCREngine",
    "TesseractEngine",
    "char_error_rate",
    "estimate_skew",
    "get_engine",
    "load_image",
    "noise_level",
    "normalize_text",
    "render_typography",
    "split_across_images",
    "word_recall",
]
