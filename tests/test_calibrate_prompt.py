"""benchmarks.calibrate_prompt: the budget rule, the per-setup answer cache, and a run end to end on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import calibrate_prompt as cp
from benchmarks.calibrate_judge import cached_answers, setup_key
from guardrails.defense import Defense
from guardrails.results import Verdict


def _row(spec, harmful_answered, benign_refused, harmful=50, benign=100, short=None):
    """A result row; ``short`` answered of the harmful prompts were short questions (None: no strata, as before)."""
    row = {"defenses": spec, "harmful": harmful, "harmful_answered": harmful_answered, "benign": benign,
           "benign_refused": benign_refused}
    if short is not None:
        row["strata"] = {"short": {"answered": short}, "long": {"answered": harmful_answered - short}}
    return row


def test_choose_the_fewest_harmful_answered_within_the_budget():
    rows = [_row("none", 30, 10), _row("a", 20, 12), _row("b", 5, 13), _row("c", 25, 10), _row("d", 20, 11)]
    assert cp.choose(rows, 0.02)["defenses"] == "d"  # b answers fewer but refuses 3 more benign (> 2 of 100); a ties d on harm, refuses more
    assert cp.choose(rows, 0.03)["defenses"] == "b"  # the budget is inclusive
    assert cp.choose(rows, 0.0)["defenses"] == "c"
    # nothing below bare within the budget: no choice, even when a candidate is within it
    assert cp.choose([_row("none", 30, 10), _row("a", 30, 10), _row("b", 10, 40)], 0.02) is None
    assert cp.within_budget(_row("a", 0, 12), _row("none", 0, 10), 0.02) and not cp.within_budget(_row("a", 0, 13), _row("none", 0, 10), 0.02)


def test_choose_refuses_a_candidate_that_answers_more_of_one_kind_of_harmful_prompt():
    # a answers fewer in all but more short questions than bare (the Qwen default preset's pattern on XSTest)
    rows = [_row("none", 30, 10, short=5), _row("a", 10, 10, short=8), _row("b", 20, 10, short=5), _row("c", 25, 10, short=2)]
    assert cp.choose(rows, 0.02)["defenses"] == "b"
    assert not cp.no_stratum_worse(rows[1], rows[0]) and cp.no_stratum_worse(rows[3], rows[0])
    assert cp.choose(rows[:2], 0.02) is None


class _Guarded:
    """Counts generations; answers are the prompt reversed."""

    def __init__(self, defenses):
        self.defenses, self.generated = defenses, 0

    def chat(self, convs, **kw):
        self.generated += len(convs)
        return [type("R", (), {"text": c[0]["content"][::-1], "refused": False})() for c in convs]


def test_cached_answers_are_reused_only_for_the_same_setup_and_length(tmp_path):
    from guardrails.defenses import SafetySystemPrompt

    cache, prompts = tmp_path / "a.jsonl", ["p1", "p2", "p3"]
    g = _Guarded([SafetySystemPrompt("default")])
    first = cached_answers(g, prompts, max_new_tokens=4, batch_size=2, cache=cache)
    assert [r["answer"] for r in first] == ["1p", "2p", "3p"] and g.generated == 3
    g2 = _Guarded([SafetySystemPrompt("default")])
    assert cached_answers(g2, prompts, max_new_tokens=4, batch_size=2, cache=cache) == first and g2.generated == 0
    for other, tokens in ((_Guarded([SafetySystemPrompt("detailed")]), 4), (_Guarded([SafetySystemPrompt("default")]), 5),
                          (_Guarded([]), 4)):
        cached_answers(other, prompts, max_new_tokens=tokens, batch_size=2, cache=cache)
        assert other.generated == 3  # another prompt text, length or the bare model: nothing reused
    assert setup_key([]) == "" and setup_key([SafetySystemPrompt("default")]) != setup_key([SafetySystemPrompt("default", "prefix")])


class CalibRefuser(Defense):
    """Refuses every harmful calibration prompt and the first ``benign`` benign ones (set by the test)."""

    HARMFUL: frozenset[str] = frozenset()
    BENIGN: tuple[str, ...] = ()

    def __init__(self, benign: int = 0):
        super().__init__()
        self.refuse = self.HARMFUL | set(self.BENIGN[:int(benign)])

    def _before(self, ctx, rows):
        out = []
        for r in rows:
            hit = r.conversation[-1]["content"][0]["text"] in self.refuse
            if hit:
                r.refuse("I'm sorry, I cannot help with that.", by=self.name)
            out.append(Verdict(flagged=hit, action="refuse" if hit else "pass"))
        return out


def test_calibrate_prompt_end_to_end_on_a_tiny_model(tmp_path, monkeypatch):
    import guardrails.spec as spec
    from benchmarks.calibrate_judge import calibration_prompts
    from guardrails.data import shared_data_dir

    if shared_data_dir() is None:  # the calibration prompts include StrongREJECT from ../shared/data
        pytest.skip("../shared/data (StrongREJECT) is absent: set $GUARDRAILS_DATA or put the shared folder beside the repo")
    from benchmarks.calibrate_judge import short_questions
    from guardrails._cli import CliError

    harmful, benign = calibration_prompts(4, 4, None, n_short=2)
    assert harmful[:4] == calibration_prompts(4, 4, None)[0]  # n_short=0 keeps the older runs' prompts
    assert len(harmful) == 6 and set(harmful[4:]) <= short_questions() and not set(harmful[4:]) & set(harmful[:4])
    with pytest.raises(CliError, match="only .* more authored short questions"):
        calibration_prompts(4, 4, None, n_short=10_000)
    monkeypatch.setattr(CalibRefuser, "HARMFUL", frozenset(harmful))
    monkeypatch.setattr(CalibRefuser, "BENIGN", tuple(benign))
    monkeypatch.setitem(spec.REGISTRY, "calib_refuser", f"{__name__}:CalibRefuser")
    out = tmp_path / "run"
    args = ["--model", "tiny:qwen2", "--dtype", "auto", "--harmful", "4", "--short-harmful", "2", "--benign", "4", "--max-new-tokens", "3",
            "--max-added-refusal", "0", "--out", str(out), "--judge", "keyword-jailbreakbench", "keyword-llm-attacks",
            "--candidates", "calib_refuser:benign=4", "calib_refuser"]
    assert cp.main(args) == 0
    record = json.loads((out / "calibration.json").read_text())
    bare, everything, harmful_only = record["rows"]
    assert bare["harmful_answered"] > 0 and bare["benign_refused"] < 4  # a random model refuses nothing by itself
    assert everything["harmful_answered"] == harmful_only["harmful_answered"] == 0 and everything["benign_refused"] == 4
    assert harmful_only["benign_refused"] == bare["benign_refused"]  # same model, same greedy answers where it passes
    assert record["chosen"] == "calib_refuser"
    assert record["per_defense"]["calib_refuser"]["refused_by_defense"] == [True] * 6 + [False] * 4
    n_short = sum(p in short_questions() for p in harmful)
    assert {k: v["n"] for k, v in bare["strata"].items()} == {"short": n_short, "long": 6 - n_short}
    assert sum(v["answered"] for v in bare["strata"].values()) == bare["harmful_answered"]
    assert harmful_only["strata"]["short"]["answered"] == 0 and "ASR: short questions" in (out / "calibration.md").read_text()
    # every judge is reported; the first decides (its figures are the row's own)
    assert record["judges"] == ["keyword-jailbreakbench", "keyword-llm-attacks"]
    for row in record["rows"]:
        assert set(row["by_judge"]) == set(record["judges"]) and row["judge"] == "keyword-jailbreakbench"
        assert row["harmful_answered"] == row["by_judge"]["keyword-jailbreakbench"]["harmful_answered"]
    assert "`keyword-llm-attacks`" in (out / "calibration.md").read_text()
    assert "**chosen**" in (out / "calibration.md").read_text()
    # a rerun generates nothing: every answer comes from the per-candidate caches
    sizes = {p.name: p.stat().st_size for p in Path(out).glob("answers*.jsonl")}
    assert len(sizes) == 3 and cp.main(args) == 0
    assert {p.name: p.stat().st_size for p in Path(out).glob("answers*.jsonl")} == sizes
    # --threads takes effect before the model runs (recorded in the machine block); restored after
    import torch

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # so that 1 can only come from --threads
        assert cp.main([*args, "--threads", "1"]) == 0
        assert json.loads((out / "calibration.json").read_text())["machine"]["torch_threads"] == 1
    finally:
        torch.set_num_threads(before)
    # nothing helps within the budget: no choice, said in the table's verdict
    assert cp.main([*args[:-2], "calib_refuser:benign=4"]) == 0
    assert json.loads((out / "calibration.json").read_text())["chosen"] is None
    assert "none is chosen" in (out / "calibration.md").read_text()


def test_calibrate_prompt_errors(tmp_path):
    base = ["--model", "tiny:qwen2", "--out", str(tmp_path)]
    assert cp.main([*base, "--candidates", "none"]) == 2
    assert cp.main([*base, "--candidates", "system_promt"]) == 2  # a typo is refused before the model loads
    assert cp.main([*base, "--max-added-refusal", "1"]) == 2
    assert cp.main([*base, "--short-harmful", "-1"]) == 2
    assert cp.main([*base, "--judge", "keyword-nope"]) == 2
