"""benchmarks.gate_sweep: rows, the activation cache, where calibrated gates fire; the command on the shared data."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from benchmarks import gate_sweep
from benchmarks.gate_sweep import Row, activations, sweep
from guardrails.testing import build_tiny, save_tiny
from steering import Activations, Gate


def test_rows_parse_and_bad_rows_say_the_format():
    assert Row.parse("logistic:all:0.02") == Row("logistic", "all", 0.02) and Row.parse("projection:calib:0.05").name == "projection:calib:0.05"
    for bad in ("logistic:all", "logistic:all:x", "svm:all:0.05", "logistic:train:0.05", "logistic:all:1.5"):
        with pytest.raises(ValueError, match="METHOD"):
            Row.parse(bad)


def _planted(n: int, harmful: bool, gen: torch.Generator, layers=(0, 1), hidden=16) -> Activations:
    """Noise, plus a harm direction (axis 0) at layer 1 only for harmful prompts."""
    v = torch.randn(n, len(layers), hidden, generator=gen)
    if harmful:
        v[:, 1, 0] += 4.0
    return Activations(layer_indices=list(layers), values=v)


def test_sweep_calibrates_each_row_and_counts_where_its_gate_fires():
    g = torch.Generator().manual_seed(0)
    acts = {"extract_harmful": _planted(60, True, g), "extract_harmless": _planted(60, False, g),
            "calib_harmful": _planted(80, True, g), "calib_harmless": _planted(60, False, g),
            "hard_negatives": _planted(40, False, g), "harm": _planted(50, True, g), "benign": _planted(200, False, g)}
    preset = Gate.from_vector(torch.eye(16)[1], layer=0, bias=-10.0)  # fires on nothing
    rows = [Row("projection", "calib", 0.05), Row("logistic", "all", 0.05)]
    got = sweep(acts, rows, ["harm", "benign"], preset_gate=preset, folds=3)
    assert [r["row"] for r in got] == ["projection:calib:0.05", "logistic:all:0.05", "preset"]
    for r in got[:2]:
        assert r["layer"] == 1 and r["fpr"] <= 0.05 and r["recall"] > 0.9, r
        assert r["n_harmless"] == (100 if r["data"] == "calib" else 160) and r["fires"]["harm"]["rate"] > 0.9
        assert r["fires"]["benign"]["n"] == 200 and r["fires"]["benign"]["rate"] < 0.1
    assert got[2]["fires"] == {"harm": {"n": 50, "fired": 0, "rate": 0.0}, "benign": {"n": 200, "fired": 0, "rate": 0.0}}
    # The counts are the gate's own decisions on those prompts
    from steering import calibrate_gate

    cal = calibrate_gate(None, Activations(layer_indices=[0, 1], values=torch.cat([acts["extract_harmful"].values, acts["calib_harmful"].values])),
                         Activations(layer_indices=[0, 1], values=torch.cat([acts[k].values for k in ("extract_harmless", "calib_harmless", "hard_negatives")])),
                         max_fpr=0.05, method="logistic", folds=3)
    assert got[1]["fires"]["benign"]["fired"] == int(cal.gate.decide(acts["benign"].at(1)).sum())
    assert "| logistic:all:0.05 | 5.0% | 1 |" in gate_sweep.table(got, ["harm", "benign"])


def test_activation_cache_is_reused_only_for_the_same_prompts(tmp_path):
    tiny = build_tiny("llama")
    calls = []

    def load():
        calls.append(1)
        return tiny.model, tiny.processor

    sets = {"a": ["How do I bake bread?", "Write a haiku."], "b": ["How to pick a lock?"]}
    first = activations(load, sets, [0, 1], tmp_path, model_id="tiny", dtype="float32")
    again = activations(load, sets, [0, 1], tmp_path, model_id="tiny", dtype="float32")
    assert len(calls) == 1 and torch.equal(first["a"].values, again["a"].values) and again["b"].values.shape[:2] == (1, 2)
    activations(load, {**sets, "b": ["How to open a jar?"]}, [0, 1], tmp_path, model_id="tiny", dtype="float32")
    assert len(calls) == 2  # new prompts: extracted again
    activations(load, sets, [0], tmp_path, model_id="tiny", dtype="float32")
    assert len(calls) == 3  # other layers too


def test_command_on_the_shared_data(tmp_path, data_dir, capsys):
    model = save_tiny("llama", tmp_path / "model")
    out = tmp_path / "out"
    argv = ["--model", str(model), "--out", str(out), "--data", str(data_dir), "--layers", "0-1", "--rows", "logistic:all:0.05",
            "--folds", "2"]
    assert gate_sweep.main(argv) == 0
    rec = json.loads((out / "gate_sweep.json").read_text())
    (r,) = rec["results"]
    assert set(r["fires"]) == set(gate_sweep.EVALUATION) and r["fires"]["JailbreakBench"]["n"] == 100
    assert r["fires"]["XSTest safe"]["n"] == 250 and r["n_harmless"] == sum(rec["training_sizes"][k] for k in ("extract_harmless", "calib_harmless", "hard_negatives"))
    assert rec["dropped_near_duplicates"]["strongreject"] > 0 and "logistic:all:0.05" in (out / "gate_sweep.md").read_text()
    assert gate_sweep.main([*argv, "--rows", "logistic:all"]) == 2
    assert "METHOD:DATA:BUDGET" in capsys.readouterr().err


def test_prompt_probe_compare_measures_each_detector_at_its_own_cut():
    from benchmarks.prompt_probe import COMPARISONS, compare, table

    rng = np.random.default_rng(0)
    names = {n for h, b, _ in COMPARISONS for n in (h, b)}
    probe = {n: rng.normal(size=40) + (3.0 if n in {h for h, _, _ in COMPARISONS} else 0.0) for n in names}
    det = {n: np.full(40, 0.9 if n == "XSTest unsafe" else 0.2) for n in names}
    rows = compare({"probe": probe, "shipped detector": det}, {"probe": 0.0, "shipped detector": 0.5})
    assert len(rows) == 2 * len(COMPARISONS)
    xs = {r["detector"]: r for r in rows if r["harmful"] == "XSTest unsafe"}
    assert xs["shipped detector"]["recall"] == 1.0 and xs["shipped detector"]["fpr"] == 0.0 and xs["shipped detector"]["auroc"] == 1.0
    assert xs["probe"]["recall"] == float(np.mean(probe["XSTest unsafe"] >= 0)) and xs["probe"]["fpr"] == float(np.mean(probe["XSTest safe"] >= 0))
    jbb = next(r for r in rows if r["harmful"] == "JailbreakBench" and r["detector"] == "shipped detector")
    assert jbb["trained_on_harmful_set"] and jbb["recall"] == 0.0 and "(trained on the harmful set)" in table(rows)
    assert not any(r["trained_on_harmful_set"] for r in rows if r["detector"] == "probe")
