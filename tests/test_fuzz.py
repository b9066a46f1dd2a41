"""Property-based fuzzing of every input surface (issue 14).

For every generated conversation, image input, spec string, defense config, JSONL batch row and
artifact folder, the library either answers every row or raises ValueError/TypeError (missing
files: FileNotFoundError) with a one-line message naming what was wrong; never another exception
type, never a hang, never a dropped row, and no hook or thread is left behind.

Bounded by the hypothesis profile "ci" (tests/conftest.py, the default); ``pytest
--hypothesis-profile=long tests/test_fuzz.py`` runs 25x more cases. The number of cases run is
printed at the end of the session ("fuzz: N generated cases ...").
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shutil
import signal
import struct
import tempfile
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis", reason="the fuzz suite needs hypothesis (pip install -e '.[test]')")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from PIL import Image  # noqa: E402

from guardrails.testing import make_image  # noqa: E402

# PIL warns about bomb-sized headers before our own cap refuses them with an ImageError.
pytestmark = pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")

ALLOWED = (ValueError, TypeError)
CI_EXAMPLES = 40  # the "ci" profile's max_examples (tests/conftest.py)


def budget(n: int) -> int:
    """``n`` cases under the ci profile, scaled with the profile in force (long: 25x)."""
    return max(1, n * settings().max_examples // CI_EXAMPLES)


@contextlib.contextmanager
def case(counter: dict[str, int], key: str, seconds: float = 60.0):
    """One generated case: counted (the session reports the totals) and bounded in time."""
    counter[key] = counter.get(key, 0) + 1
    with time_limit(seconds):
        yield


@contextlib.contextmanager
def time_limit(seconds: float = 60.0):
    """One generated case that runs this long hangs: fail it instead of stalling CI (hypothesis has
    no deadline here, since tiny-model timings vary with the machine's load)."""
    def timeout(signum, frame):
        raise TimeoutError(f"one case ran for {seconds:.0f} s: something hangs")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _one_line(e: BaseException) -> None:
    msg = str(e)
    assert msg and "\n" not in msg, f"{type(e).__name__} message is empty or spans lines: {msg!r}"


# -- shared material ---------------------------------------------------------------------------

_TMP = Path(tempfile.mkdtemp(prefix="guardrails-fuzz-"))
GOOD_PNG = _TMP / "good.png"
make_image(24, text="hi").save(GOOD_PNG)
FOLDER = _TMP / "a-folder"
FOLDER.mkdir()
NOT_IMAGE = _TMP / "notes.png"
NOT_IMAGE.write_text("not an image")


def _png_with_header(width: int, height: int) -> bytes:
    """A real small PNG whose IHDR claims ``width`` x ``height`` (CRC fixed): a decompression bomb's header."""
    buf = io.BytesIO()
    Image.new("L", (4, 4)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])) & 0xFFFFFFFF)
    return bytes(data)


texts = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
json_scalars = st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | texts
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(texts, inner, max_size=4),
                           max_leaves=12)

arrays = st.builds(
    lambda shape, dtype: np.zeros(shape, dtype=dtype),
    st.lists(st.integers(0, 40), min_size=1, max_size=4).map(tuple),
    st.sampled_from([np.uint8, np.uint8, np.float32, np.int64, np.bool_]),
)
pil_images = st.builds(lambda w, h, mode: Image.new(mode, (w, h)), st.integers(0, 48), st.integers(0, 48),
                       st.sampled_from(["RGB", "RGBA", "L", "1", "P", "I", "F", "LA"]))
image_values = st.one_of(
    pil_images,
    arrays,
    st.binary(max_size=64),
    st.builds(_png_with_header, st.integers(0, 120_000), st.integers(0, 120_000)),
    st.just(GOOD_PNG.read_bytes()),
    st.sampled_from([str(GOOD_PNG), GOOD_PNG, str(FOLDER), str(NOT_IMAGE), str(_TMP / "missing.png"), "~/no-such.png",
                     "https://example.com/cat.png", "file:///etc/passwd", "", "data:image/png;base64,AAAA"]),
    json_scalars,
)


# -- images ------------------------------------------------------------------------------------


@settings(max_examples=budget(400))
@given(image=image_values)
def test_load_image_accepts_or_refuses_clearly(image, fuzz_cases):
    from guardrails.ocr.images import load_image, pixel_cap

    with case(fuzz_cases, "images"):
        try:
            im = load_image(image)
        except ALLOWED as e:
            _one_line(e)
            return
        assert im.mode == "RGB" and im.width * im.height <= pixel_cap() and im.width > 0 and im.height > 0


# -- conversations -------------------------------------------------------------------------------

image_parts = st.builds(lambda key, value: {"type": "image", key: value},
                        st.sampled_from(["image", "image", "path", "url", "picture"]), image_values)
text_parts = st.builds(lambda t: {"type": "text", "text": t}, texts | json_scalars)
parts = st.one_of(text_parts, text_parts, image_parts, st.dictionaries(texts, json_scalars, max_size=3), json_scalars)
roles = st.sampled_from(["user", "user", "assistant", "system", "tool", "", None])
messages = st.one_of(
    st.builds(lambda r, c: {"role": r, "content": c}, roles, texts | st.lists(parts, max_size=3) | json_scalars),
    st.dictionaries(st.sampled_from(["role", "content", "name"]), json_values, max_size=3),
    json_scalars,
)
conversations = st.one_of(st.lists(messages, min_size=0, max_size=4), json_values)


@settings(max_examples=budget(400))
@given(value=conversations | st.lists(conversations, max_size=3))
def test_validation_keeps_every_message_or_refuses_clearly(value, fuzz_cases):
    from guardrails.conversation import validate_batch

    with case(fuzz_cases, "conversations"):
        try:
            batch, single = validate_batch(value)
        except ALLOWED as e:
            _one_line(e)
            return
        given_batch = [value] if single else list(value)
        assert len(batch) == len(given_batch)
        assert [len(c) for c in batch] == [len(c) for c in given_batch]  # no message dropped


def _hooks(model) -> dict[str, tuple[int, int]]:
    return {n: (len(m._forward_hooks), len(m._forward_pre_hooks)) for n, m in model.named_modules()}


def _threads_settle(before: set[threading.Thread]) -> set[str]:
    """Names of threads started during the call that are still alive after a short grace period."""
    deadline = time.monotonic() + 2.0
    while True:
        extra = {t for t in threading.enumerate() if t not in before and t.is_alive()}
        if not extra or time.monotonic() > deadline:
            return {t.name for t in extra}
        time.sleep(0.02)


# Mostly plausible turns (usable images, some text, an earlier exchange), so most cases reach the
# model and every defense stage; the rest are anything at all.
usable_images = st.one_of(
    st.sampled_from([str(GOOD_PNG), GOOD_PNG, GOOD_PNG.read_bytes()]),
    st.builds(lambda w, h, mode: Image.new(mode, (w, h)), st.integers(1, 64), st.integers(1, 64), st.sampled_from(["RGB", "L", "RGBA"])),
    st.builds(lambda h, w: np.zeros((h, w, 3), np.uint8), st.integers(1, 40), st.integers(1, 40)),
)
usable_parts = st.one_of(st.builds(lambda t: {"type": "text", "text": t}, texts),
                         st.builds(lambda im: {"type": "image", "image": im}, usable_images))
histories = st.sampled_from([[], [{"role": "system", "content": "Be brief."}],
                             [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]])


def _turns(content):
    return st.builds(lambda history, c: history + [{"role": "user", "content": c}], histories, content)


text_turns = _turns(texts.filter(str.strip))
image_turns = _turns(st.lists(usable_parts, min_size=1, max_size=3))


def batches(multimodal: bool):
    turn = st.one_of(text_turns, image_turns) if multimodal else text_turns
    return st.one_of(st.lists(turn, min_size=1, max_size=3), st.lists(turn, min_size=1, max_size=3),
                     st.lists(st.one_of(turn, conversations), min_size=1, max_size=3))


@pytest.fixture(scope="module")
def pipelines(tiny):
    """Wrapped tiny models (image and text) with defenses of every stage, OCR overlap threads included."""
    from guardrails import wrap
    from guardrails.classifiers import HarmClassifier, HarmScore
    from guardrails.defenses import OCRScreen, Protector, SafetySystemPrompt
    from guardrails.ocr import get_engine

    class Words(HarmClassifier):
        name = "words"

        def _predict(self, texts, queries):
            return [HarmScore(1.0 if "bomb" in t.lower() else 0.0) for t in texts]

    try:
        engine = get_engine("tesseract")
    except ImportError:
        engine = None
    out = {}
    for arch in ("llava", "llama"):
        t = tiny(arch)
        defenses = [[], [SafetySystemPrompt()], [Protector(Words(), detoxifier="refuse", mode="stream", every=2)]]
        if engine is not None and arch == "llava":
            defenses.append([OCRScreen("classify", Words(), engine=engine, overlap=True)])
            defenses.append([OCRScreen("reveal", engine=engine), SafetySystemPrompt("vision")])
        out[arch] = [wrap(t.model, t.processor, d) for d in defenses]
    return out


@settings(max_examples=budget(300))
@given(arch=st.sampled_from(["llava", "llama"]), which=st.integers(0, 4), stream=st.booleans(), data=st.data())
def test_chat_answers_every_row_or_refuses_clearly(pipelines, arch, which, stream, data, fuzz_cases):
    with case(fuzz_cases, "chat"):
        batch = data.draw(batches(arch == "llava"), label="batch")
        guarded = pipelines[arch][which % len(pipelines[arch])]
        hooks, threads = _hooks(guarded.model), set(threading.enumerate())
        try:
            if stream:
                s = guarded.stream(batch[0], max_new_tokens=3, do_sample=False)
                text = "".join(s)
                assert s.result is not None and isinstance(text, str)
            else:
                results = guarded.chat(batch, max_new_tokens=3, do_sample=False)
                assert len(results) == len(batch) and all(isinstance(r.text, str) for r in results)
            fuzz_cases["chat answered"] = fuzz_cases.get("chat answered", 0) + 1
        except ALLOWED as e:
            _one_line(e)
        # transformers adds its own vision-tower hooks on the first image forward: only ours must go.
        after = _hooks(guarded.model)
        ours = {n for n in after if after[n] != hooks[n] and "vision_tower" not in n}
        assert not ours, f"hooks left on {sorted(ours)[:3]}"
        assert not _threads_settle(threads), "a thread outlived the call"


# -- spec strings and defense configs --------------------------------------------------------------

NAMES = ["system_prompt", "self_moderation", "ecso", "adashield", "inferaligner", "ocr", "protector", "nope", ""]
spec_chars = st.text(alphabet=list("abcdemoprtvxy_019.:,=+\"'\\ -/"), max_size=30)
spec_items = st.builds(lambda n, opts: n + (":" + opts if opts else ""), st.sampled_from(NAMES), spec_chars)
specs = st.one_of(st.lists(spec_items, min_size=1, max_size=3).map("+".join), spec_chars, json_scalars)


@settings(max_examples=budget(400))
@given(spec=specs)
def test_spec_strings_parse_or_refuse_clearly(spec, fuzz_cases):
    from guardrails.spec import build_defenses, parse_spec

    with case(fuzz_cases, "specs"):
        try:
            parsed = parse_spec(spec)
        except ALLOWED as e:
            _one_line(e)
            return
        assert all(isinstance(n, str) and isinstance(o, dict) for n, o in parsed)
        # Building loads artifacts; the shipped detector (a second or two each time) stays out.
        if any(n == "protector" and o.get("detector", "default") == "default" for n, o in parsed):
            return
        try:
            built = build_defenses(spec)
        except ALLOWED as e:
            _one_line(e)
            return
        assert len(built) == len(parsed)


option_values = st.one_of(json_scalars, st.floats(-2, 2), st.sampled_from(["post", "stream", "classify", "reveal", "gate",
                                                                           "default", "vision", "refuse", "self"]))
CONFIGS = {
    "SafetySystemPrompt": ("preset", "placement", "text", "separator"),
    "SelfModeration": ("rounds", "threshold", "on_fail", "max_new_tokens", "reuse_cache"),
    "ECSO": ("threshold", "caption_tokens", "no_image", "reuse_cache"),
    "AdaShield": ("pool", "threshold", "placement", "max_retrievals"),
    "OCRScreen": ("mode", "threshold", "engine", "overlap", "min_chars", "with_user_text", "refusal_text"),
    "Protector": ("detoxifier", "threshold", "mode", "every", "max_new_tokens", "refusal_text", "scan", "context", "final"),
}


@settings(max_examples=budget(300))
@given(cls=st.sampled_from(sorted(CONFIGS)), data=st.data())
def test_defense_configs_build_or_refuse_clearly(cls, data, fuzz_cases):
    import guardrails.defenses as defenses
    from guardrails.classifiers import KeywordJudge

    with case(fuzz_cases, "configs"):
        keys = data.draw(st.lists(st.sampled_from(CONFIGS[cls]), unique=True, max_size=4))
        kwargs = {k: data.draw(option_values, label=k) for k in keys}
        args = (KeywordJudge.llm_attacks(),) if cls == "Protector" else ()
        try:
            getattr(defenses, cls)(*args, **kwargs)
        except ALLOWED as e:
            _one_line(e)


# -- JSONL batch rows (python -m guardrails screen --batch) ----------------------------------------

rows = st.one_of(
    st.builds(lambda i, images, text: {k: v for k, v in (("id", i), ("images", images), ("text", text)) if v is not ...},
              json_scalars | st.just(...), st.lists(st.sampled_from(["good.png", "missing.png", "notes.png", "a-folder",
                                                                     "https://x.org/a.png", "~/x.png"]) | json_scalars,
                                                    max_size=3) | json_scalars | st.just(...),
              texts | json_scalars | st.just(...)),
    json_values,
)
lines = st.one_of(rows.map(json.dumps), rows.map(lambda r: json.dumps(r, ensure_ascii=False)), st.text(max_size=20),
                  st.just(""), st.just("{\"id\": \"a\u2028b\", \"images\": []}"))


@pytest.fixture(scope="module")
def screen():
    from guardrails.classifiers import HarmClassifier, HarmScore
    from guardrails.defenses import OCRScreen
    from guardrails.ocr import get_engine

    class Fixed(HarmClassifier):
        name = "fixed"

        def _predict(self, texts, queries):
            return [HarmScore(0.5) for _ in texts]

    try:
        return OCRScreen("classify", Fixed(), engine=get_engine("tesseract"))
    except ImportError as e:
        pytest.skip(f"tesseract not installed: {e}")


@settings(max_examples=budget(100))
@given(batch=st.lists(lines, min_size=1, max_size=6))
def test_screen_batch_gives_one_line_per_input(screen, batch, fuzz_cases):
    import argparse

    from guardrails.ocr.cli import _inputs, screen_item

    with case(fuzz_cases, "batch_rows"):
        path = _TMP / "in.jsonl"
        path.write_bytes("\n".join(batch).encode("utf-8", "surrogatepass") + b"\n\xff\xfe\n")  # and one line not UTF-8
        items = _inputs(argparse.Namespace(image=None, batch=str(path), text=""))
        outputs = [screen_item(screen, item, path.parent) for item in items]
        content = [line for line in path.read_bytes().split(b"\n") if line.strip()]
        assert len(outputs) == len(content), "an input line got no output line"
        for out in outputs:
            json.dumps(out)  # every output line can be written
            assert ("error" in out) != ("flagged" in out)
            if "error" in out:
                assert "\n" not in out["error"] and not out["error"].startswith(("RuntimeError", "AttributeError", "KeyError"))


# -- artifact folders --------------------------------------------------------------------------


def _steering_folder(d: Path) -> Path:
    import torch

    from steering import Gate
    from steering.vectors import Manifest, SteeringVectors

    m = Manifest(model_class="LlamaForCausalLM", name_or_path="x", hidden_size=4, num_layers=2, layer_path="model.layers",
                 layer_indices=[0, 1], method="mean_diff")
    SteeringVectors({0: torch.ones(4), 1: torch.arange(4.0)}, m, gate=Gate(layer=1, direction=torch.ones(4), bias=-0.5)).save(d)
    return d


_TOKENIZER = None


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from guardrails.testing import build_tokenizer

        _TOKENIZER = build_tokenizer("llama")
    return _TOKENIZER


def _encoder(*args, **kwargs):  # never called: loading only reads the folder
    raise AssertionError("the encoder is not run when a probe is loaded")


def _probe_folder(d: Path) -> Path:
    from guardrails.classifiers.embedding import EmbeddingProbe, LinearHead

    head = LinearHead(np.ones(3), 0.1, np.zeros(3), np.ones(3))
    return EmbeddingProbe(_encoder, _tokenizer(), head).save(d)


def _damage(path: Path, how: str, data) -> None:
    raw = path.read_bytes()
    if not raw and how in ("truncate", "flip"):
        how = "garbage"
    if how == "truncate":
        path.write_bytes(raw[: data.draw(st.integers(0, max(0, len(raw) - 1)), label="keep")])
    elif how == "flip":
        i = data.draw(st.integers(0, len(raw) - 1), label="at")
        path.write_bytes(raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255), label="xor")]) + raw[i + 1:])
    elif how == "delete":
        path.unlink()
    elif how == "garbage":
        path.write_bytes(data.draw(st.binary(max_size=40), label="bytes"))
    elif how == "json" and path.suffix == ".json":
        try:
            doc = json.loads(raw)
        except ValueError:  # already damaged by an earlier step
            return
        if isinstance(doc, dict) and doc:
            key = data.draw(st.sampled_from(sorted(doc)), label="key")
            doc[key] = data.draw(json_values, label="value")
        path.write_text(json.dumps(doc), encoding="utf-8")


@settings(max_examples=budget(300))
@given(kind=st.sampled_from(["steering", "probe"]), data=st.data())
def test_damaged_artifact_folders_load_or_name_the_file(kind, data, fuzz_cases):
    from guardrails.classifiers.embedding import EmbeddingProbe
    from steering import SteeringVectors

    with case(fuzz_cases, "artifacts"):
        d = Path(tempfile.mkdtemp(dir=_TMP))
        try:
            (_steering_folder if kind == "steering" else _probe_folder)(d)
            names = sorted(p.name for p in d.iterdir())
            for _ in range(data.draw(st.integers(1, 2), label="n_damages")):
                name = data.draw(st.sampled_from(names), label="file")
                if (d / name).exists():
                    _damage(d / name, data.draw(st.sampled_from(["truncate", "flip", "delete", "garbage", "json"]), label="how"), data)
            try:
                if kind == "steering":
                    sv = SteeringVectors.load(d)
                    assert all(bool(np.isfinite(v.numpy()).all()) for v in sv.vectors.values())
                else:
                    EmbeddingProbe.load(d, _encoder, _tokenizer())
            except (*ALLOWED, FileNotFoundError) as e:
                _one_line(e)
                assert str(d) in str(e), f"the message does not name the folder: {e}"
        finally:
            shutil.rmtree(d, ignore_errors=True)


def test_fuzz_material_is_what_it_claims():
    """The generators really produce the hard cases (a bomb header, a URL), or the suite proves little."""
    from guardrails.ocr.images import ImageError, load_image

    # PIL warns above its own 89 Mpx mark before our cap refuses: both say the same thing.
    with pytest.raises(ImageError, match="10000x10000 = 100,000,000 pixels, above the cap"), \
            pytest.warns(Image.DecompressionBombWarning):
        load_image(_png_with_header(10_000, 10_000))
    with pytest.raises(ImageError, match="too large to decode"):  # above PIL's own limit too
        load_image(_png_with_header(100_000, 100_000))
    assert load_image(_png_with_header(4, 4)).size == (4, 4)
    assert math.isnan(float("nan")) and os.path.isdir(FOLDER)
