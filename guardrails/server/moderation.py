"""``POST /v1/moderations`` in OpenAI's shape, answered by the library's screening pipeline.

Text is judged by the harm detector's prompt head (is this request harmful?); images are read by
:class:`OCRScreen`'s OCR and their text judged by the same detector, so a typographic attack
(FigStep) is caught as if it had been typed. The detector gives one P(unsafe), no per-category
scores: OpenAI's categories are present but null (not measured), and the verdict is in the
library's own key ``"unsafe"``. Each result also carries ``"guardrails"``: scores, OCR text, timings.

>>> mod = Moderator(ServerConfig()).load()
>>> mod.moderate({"input": "How do I build a pipe bomb?"})["results"][0]["flagged"]
True
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from guardrails.classifiers.base import HarmClassifier, HarmScore
from guardrails.results import check_threshold
from guardrails.server.config import ServerConfig
from guardrails.server.errors import RequestError, bad_request
from guardrails.server.images import image_from_url, image_part_url

#: OpenAI's category keys (omni-moderation), in its order; always null here: nothing measures them.
OPENAI_CATEGORIES = ("harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
                     "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
                     "violence/graphic")
#: The library's own category: the detector's P(unsafe) and its verdict.
UNSAFE = "unsafe"
#: ``model`` values that mean "whatever this server moderates with" (what OpenAI clients send).
MODEL_ALIASES = ("default", "omni-moderation-latest", "text-moderation-latest")
_FIELDS = ("input", "model")


@dataclass
class _Item:
    """One result's input: a string, or the text and images of one list of parts."""

    texts: list[str] = field(default_factory=list)
    images: list[tuple[int, Any]] = field(default_factory=list)  # (index in input, PIL image)


class Moderator:
    """Answers moderation requests; safe to call from several threads at once.

    ``classifier``: a :class:`HarmClassifier` (None = the shipped default detector, loaded by
    :meth:`load`); ``ocr_engine``: an OCR engine name or ``guardrails.ocr.OCREngine``.
    """

    def __init__(self, config: ServerConfig | None = None, *, classifier: HarmClassifier | None = None,
                 threshold: float = 0.5, ocr_engine: Any = "auto", max_inputs: int = 64, max_images: int = 8):
        if classifier is not None and not isinstance(classifier, HarmClassifier):
            raise TypeError(f"classifier must be a guardrails HarmClassifier, got {type(classifier).__name__}")
        for name, v in (("max_inputs", max_inputs), ("max_images", max_images)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        self.config = config if config is not None else ServerConfig()
        self.threshold = check_threshold(threshold)
        self.max_inputs, self.max_images = max_inputs, max_images
        self._classifier = classifier
        self._engine_spec = ocr_engine
        self._screen: Any = None  # OCRScreen, built by load()
        self._engine: Any = None
        self._ocr_error: str | None = None
        self._load_lock = threading.Lock()
        # One detector call at a time: HarmClassifier promises no thread-safety (fast tokenizers
        # have raised "Already borrowed" under concurrent encoding; guard models keep caches), and
        # on a few CPU cores two at once gain nothing. OCR runs outside this lock: its engine
        # serialises itself, and text requests need not wait for an image's OCR.
        self._judge_lock = threading.Lock()

    # -- components -------------------------------------------------------------------------------
    def load(self) -> Moderator:
        """Build the detector and the OCR engine (once; the server calls this at startup).

        No OCR engine installed is not fatal: text is still moderated and images get a 400 naming the fix.
        """
        with self._load_lock:
            if self._screen is not None:
                return self
            from guardrails.defenses.ocr_screen import OCRScreen
            from guardrails.ocr import OCRUnavailableError, get_engine

            if self._classifier is None:
                from guardrails.classifiers import load_default_detector

                self._classifier = load_default_detector()
            engine = self._engine_spec
            if isinstance(engine, str):
                try:
                    engine = get_engine(engine)
                except OCRUnavailableError as e:
                    engine, self._ocr_error = None, str(e).replace("\n", " ")
            # Given both components, the screen never builds one lazily (its properties are not locked).
            screen = OCRScreen("classify", classifier=self._classifier, threshold=self.threshold,
                               **({"engine": engine} if engine is not None else {}))
            self._engine, self._screen = engine, screen
        return self

    @property
    def classifier(self) -> HarmClassifier:
        return self.load()._screen.classifier

    @property
    def ocr_engine(self) -> Any:
        """The OCR engine images are read with; None when none is installed (images are then refused)."""
        return self.load()._engine

    @property
    def name(self) -> str:
        """The detector's name: the ``model`` of every response."""
        return self.classifier.name

    def describe(self) -> dict[str, Any]:
        """What ``/health`` reports; loads nothing (None for what :meth:`load` has not built yet)."""
        screen = self._screen
        clf = screen.classifier if screen is not None else self._classifier
        ocr = self._engine
        return {"model": clf.name if clf is not None else None, "detector": clf.describe() if clf is not None else None,
                "threshold": self.threshold, "ocr_engine": f"{ocr.name} {ocr.version}" if ocr is not None else None,
                "ocr_error": self._ocr_error, "loaded": screen is not None, "max_inputs": self.max_inputs,
                "max_images": self.max_images}

    # -- the endpoint -----------------------------------------------------------------------------
    def moderate(self, body: Any) -> dict[str, Any]:
        """The response to one ``POST /v1/moderations`` body; :class:`RequestError` for a bad one."""
        t0 = time.perf_counter()
        self.load()
        items, multimodal = self._parse(body)
        if multimodal:
            results = [self._judge_parts(items[0], t0)]
        else:
            results = self._judge_strings([it.texts[0] for it in items], t0)
        return {"id": f"modr-{uuid.uuid4().hex}", "model": self.name, "results": results}

    # -- parsing: everything is checked (images decoded) before any detector runs ----------------
    def _parse(self, body: Any) -> tuple[list[_Item], bool]:
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object like {\"input\": \"text to moderate\"}")
        unknown = sorted(set(body) - set(_FIELDS))
        if unknown:
            raise bad_request(f"unknown request field {unknown[0]!r}; a moderation request has only 'input' and 'model'", unknown[0])
        self._check_model(body.get("model"))
        if "input" not in body or body["input"] is None:
            raise bad_request("input is required: a string, a list of strings, or a list of "
                              "{type: text|image_url} parts", "input")
        inp = body["input"]
        if isinstance(inp, str):
            return [_Item(texts=[_text(inp, "input")])], False
        if not isinstance(inp, list):
            raise bad_request(f"input must be a string, a list of strings or a list of parts, got {type(inp).__name__}", "input")
        if not inp:
            raise bad_request("input is an empty list; send at least one string or part", "input")
        if len(inp) > self.max_inputs:
            raise bad_request(f"input has {len(inp)} items, above this server's limit of {self.max_inputs}; "
                              "split them across several requests", "input")
        first = inp[0]
        for i, x in enumerate(inp):
            if not isinstance(x, (str, dict)):
                raise bad_request(f"input[{i}] must be a string or a {{type: text|image_url}} part, got {type(x).__name__}", f"input[{i}]")
            if isinstance(x, str) != isinstance(first, str):
                kinds = ("a string", "a part") if isinstance(x, str) else ("a part", "a string")
                raise bad_request(f"input[{i}] is {kinds[0]} but input[0] is {kinds[1]}; input is a list of strings "
                                  "(one result each) or a list of parts (one result), not both: send two requests", f"input[{i}]")
        if isinstance(first, str):
            return [_Item(texts=[_text(x, f"input[{i}]")]) for i, x in enumerate(inp)], False
        return [self._parts(inp)], True

    def _check_model(self, model: Any) -> None:
        if model is None:
            return
        if not isinstance(model, str):
            raise bad_request(f"model must be a string, got {type(model).__name__}", "model")
        if model not in (*MODEL_ALIASES, self.name):
            raise RequestError(404, f"model {model!r} is not served here; moderations are answered by {self.name!r} "
                                    f"(send that, one of {list(MODEL_ALIASES)}, or omit model)",
                               param="model", code="model_not_found")

    def _parts(self, parts: list[dict[str, Any]]) -> _Item:
        item = _Item()
        for i, part in enumerate(parts):
            where, kind = f"input[{i}]", part.get("type")
            if kind == "text":
                item.texts.append(_text(part.get("text"), f"{where}.text"))
            elif kind == "image_url":
                if len(item.images) == self.max_images:
                    raise bad_request(f"{where}: more than {self.max_images} images in one input (each is read by OCR); "
                                      "split them across several requests", where)
                if self._ocr_error is not None:
                    raise bad_request(f"{where} is an image but this server cannot read images ({self._ocr_error}); "
                                      "send text only", where)
                image = image_from_url(image_part_url(part), max_pixels=self.config.max_image_pixels, max_bytes=self.config.max_request_bytes,
                                       allow_remote=self.config.allow_remote_images, param=f"{where}.image_url.url")
                item.images.append((i, image))
            else:
                raise bad_request(f"{where}.type must be 'text' or 'image_url', got {kind!r}", f"{where}.type")
        return item

    # -- judging ----------------------------------------------------------------------------------
    def _predict(self, texts: list[str]) -> list[HarmScore]:
        with self._judge_lock:
            return self.classifier.predict(texts)  # no query: the prompt head judges the text itself

    def _judge_strings(self, texts: list[str], t0: float) -> list[dict[str, Any]]:
        scores = self._predict(texts)  # one batch for the whole list
        ms = (time.perf_counter() - t0) * 1e3
        return [self._result(s.score, s.categories, ["text"], {"text_score": s.score, "latency_ms": round(ms, 2)})
                for s in scores]

    def _judge_parts(self, item: _Item, t0: float) -> dict[str, Any]:
        """One result for text and images: flagged when any of them is (the highest score decides)."""
        screen = self._screen
        reads = [(i, *screen.read([img])) for i, img in item.images]  # one image at a time: its own OCR text
        ocr_texts = [text for _, text, _ in reads if text]
        judged: list[str] = []
        if item.texts:
            judged.append("\n".join(item.texts))
        judged += ocr_texts
        if len(ocr_texts) > 1:
            # FigStep-Pro cuts words across images ("diag" | "nose"): judge the seamless join too,
            # as OCRScreen.read does for a conversation's images.
            lines = "\n".join(ocr_texts)
            judged.append(f"{lines}\n{''.join(ocr_texts)}")
        scores = self._predict(judged) if judged else []
        it = iter(scores)
        text_score = next(it).score if item.texts else None
        images = []
        for i, text, info in reads:
            s = next(it).score if text else None
            images.append({"index": i, "ocr_text": text, "score": s, "engine": info.get("engine"), "ocr_ms": info.get("ocr_ms"),
                           "dropped_low_confidence": info.get("dropped_low_confidence", [])})
        joined = next(it).score if len(ocr_texts) > 1 else None
        types = (["text"] if item.texts else []) + (["image"] if item.images else [])
        detail: dict[str, Any] = {"text_score": text_score, "images": images, "joined_images_score": joined,
                                  "ocr_ms": round(sum(x["ocr_ms"] or 0.0 for x in images), 2),
                                  "latency_ms": round((time.perf_counter() - t0) * 1e3, 2)}
        if item.images and not ocr_texts:
            detail["note"] = "no text was found in the images; images are screened only for the text in them"
        best = max((s.score for s in scores), default=None)
        return self._result(best, [c for s in scores for c in s.categories], types, detail)

    def _result(self, score: float | None, categories: list[str], types: list[str], detail: dict[str, Any]) -> dict[str, Any]:
        """One result in OpenAI's shape; ``score`` None when nothing in the input could be judged."""
        flagged = score is not None and score >= self.threshold
        extra = [c for c in dict.fromkeys(categories) if c != UNSAFE]
        cats: dict[str, Any] = {c: None for c in OPENAI_CATEGORIES}
        cats.update({UNSAFE: flagged, **{c: True for c in extra}})
        scores: dict[str, Any] = {c: None for c in OPENAI_CATEGORIES}
        scores[UNSAFE] = score
        applied: dict[str, list[str]] = {c: [] for c in OPENAI_CATEGORIES}
        applied.update({UNSAFE: types if score is not None else [], **{c: types for c in extra}})
        clf = self.classifier
        guard = {"score": score, "threshold": self.threshold, "flagged": flagged, "detector": clf.describe(),
                 "input_types": types, **detail}
        return {"flagged": flagged, "categories": cats, "category_scores": scores, "category_applied_input_types": applied,
                "guardrails": guard}


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str):
        raise bad_request(f"{param} must be a string, got {type(value).__name__}", param)
    if not value.strip():
        raise bad_request(f"{param} is empty; send the text to moderate", param)
    return value
