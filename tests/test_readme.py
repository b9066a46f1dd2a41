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
