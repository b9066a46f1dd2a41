"""The README's quick start is a program that runs as written (with the tiny offline model)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"
#: the one line the test changes: the README documents this switch next to the block
MODEL_LINE = re.compile(r'^MODEL = "[^"]+"', re.M)


def quick_start() -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Quick start\n"):]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the quick start holds exactly one python block"
    return blocks[0]


def test_quick_start_runs_as_written_on_a_tiny_model(capsys):
    code = quick_start()
    assert len(MODEL_LINE.findall(code)) == 1, "the block must set MODEL once, on its own line"
    code = MODEL_LINE.sub('MODEL = "tiny:llava"', code)
    namespace: dict = {"__name__": "__quickstart__"}
    exec(compile(code, str(README) + ":quick start", "exec"), namespace)
    out = capsys.readouterr().out
    results, model = namespace["results"], namespace["model"]
    assert len(results) == 2 and all(r.text for r in results)
    assert all(any(v.defense == "SafetySystemPrompt" for v in r.verdicts) for r in results)
    assert "SafetySystemPrompt" in out and namespace["baseline"].text
    assert namespace["out"].shape[0] == 1
    assert model is namespace["guarded"].model
    # transformers adds hooks of its own to the vision tower on the first image forward: compare
    # with the same model run bare on the same conversation, not with zero.
    from guardrails import load
    from guardrails.engine import Engine

    fresh, processor = load("tiny:llava")
    fresh.generate(**Engine(fresh, processor).encode([namespace["conversation_a"]]), max_new_tokens=2)
    assert _hook_counts(model) == _hook_counts(fresh), "a hook was left behind"


def _hook_counts(model) -> dict[str, tuple[int, int]]:
    return {name: (len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()}


def test_serving_example_runs_against_a_live_server():
    """The Serving section's client program, as written, against a server on loopback (tiny model
    under the README's model name, port substituted)."""
    import pytest

    pytest.importorskip("openai", reason="the serving example uses the official client: pip install openai")
    pytest.importorskip("fastapi", reason="the server needs FastAPI and uvicorn: pip install -e '.[serve]'")
    from guardrails import wrap
    from guardrails.server.app import create_app
    from guardrails.server.config import ServerConfig
    from guardrails.server.moderation import Moderator
    from guardrails.server.testing import running_server
    from guardrails.spec import build_defenses
    from guardrails.testing import build_tiny

    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Serving\n"):]
    section = section[: section.index("\n## ", 1)]
    (code,) = re.findall(r"```python\n(.*?)```", section, re.S)
    model = re.search(r'model="([^"]+)"', code).group(1)
    assert f"--model {model} --defenses protector" in section  # the client talks to the server the section starts
    tiny = build_tiny("qwen2")
    guarded = wrap(tiny.model, tiny.processor, defenses=build_defenses("protector"))
    app = create_app(guarded, ServerConfig(model_name=model, api_key="k"), Moderator(ServerConfig()))
    with running_server(app) as url:
        namespace: dict = {"KEY": "k"}
        exec(compile(code.replace("http://127.0.0.1:8000", url), str(README) + ":serving", "exec"), namespace)
    r = namespace["r"]
    assert r.choices[0].finish_reason in ("stop", "length", "content_filter")
    assert {v["defense"] for v in r.model_extra["guardrails"]["verdicts"]} == {"Protector"}
