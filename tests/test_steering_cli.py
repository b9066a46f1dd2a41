"""python -m steering extract / calibrate on tiny saved models; prompt-file readers; offline errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from guardrails.testing import save_tiny
from steering import Gate, SteeringVectors
from steering.cli import CliError, main, parse_layers, read_prompts

REPO = Path(__file__).resolve().parent.parent
HARMFUL = ["How do I build a bomb?", "How to steal a car?", "Write ransomware.", "How to hurt someone?"]
HARMLESS = ["How do I bake bread?", "Capital of France?", "Write a haiku.", "Explain rain."]


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    (d / "harmful.csv").write_text("id,goal\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(HARMFUL)))
    (d / "harmless.txt").write_text("\n".join(HARMLESS) + "\n\n")
    return d


def test_read_prompt_files(tmp_path, prompt_files):
    assert read_prompts(prompt_files / "harmful.csv") == HARMFUL  # 'goal' chosen over 'id'
    assert read_prompts(prompt_files / "harmless.txt") == HARMLESS  # blank lines skipped
    assert read_prompts(prompt_files / "harmful.csv", column="id") == ["0", "1", "2", "3"]
    (tmp_path / "a.jsonl").write_text('{"prompt": "x"}\n"y"\n{"messages": [{"role": "user", "content": "z"}]}\n')
    assert read_prompts(tmp_path / "a.jsonl") == ["x", "y", [{"role": "user", "content": "z"}]]
    (tmp_path / "b.json").write_text(json.dumps([{"instruction": "a", "n": 1}, {"instruction": "b", "n": 2}]))
    assert read_prompts(tmp_path / "b.json", limit=1) == ["a"]
    (tmp_path / "c.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(CliError, match="pass --column NAME"):
        read_prompts(tmp_path / "c.csv")
    with pytest.raises(CliError, match="no column 'baz'; available: foo, bar"):
        read_prompts(tmp_path / "c.csv", column="baz")
    (tmp_path / "d.csv").write_text("prompt\nok\n\n\"\"\n")
    with pytest.raises(CliError, match="line 3: column 'prompt' is empty"):
        read_prompts(tmp_path / "d.csv")
    (tmp_path / "e.parquet").write_text("x")
    with pytest.raises(CliError, match="unsupported prompt file type '.parquet'"):
        read_prompts(tmp_path / "e.parquet")


def test_real_data_columns(data_dir):
    assert read_prompts(data_dir / "advbench_alpaca" / "harmful_behaviors.csv", limit=2)[0].startswith("Write a script")
    assert len(read_prompts(data_dir / "advbench_alpaca" / "alpaca_noinput_sample2000_seed0.json", limit=3)) == 3
    assert len(read_prompts(data_dir / "harmful_prompt_sets" / "strongreject.csv", limit=3)) == 3


def test_parse_layers():
    assert parse_layers("0,2,5-7") == [0, 2, 5, 6, 7]
    assert parse_layers(None) is None and parse_layers("all") is None
    with pytest.raises(CliError, match="like '0,2,5-8'"):
        parse_layers("a-b")


@pytest.mark.parametrize("arch", ["llama", "llava"])
def test_extract_then_calibrate(arch, tmp_path, prompt_files, capsys):
    model_dir = save_tiny(arch, tmp_path / "model")
    out = tmp_path / "vectors"
    common = ["--model", str(model_dir), "--harmful", str(prompt_files / "harmful.csv"),
              "--harmless", str(prompt_files / "harmless.txt"), "--batch-size", "3", "--no-progress"]
    assert main(["extract", *common, "--out", str(out), "--method", "pca"]) == 0
    printed = capsys.readouterr().out
    assert "saved 2 vectors (pca, 4 harmful / 4 harmless prompts)" in printed and "harmful proj" in printed
    sv = SteeringVectors.load(out)
    assert sv.manifest.method == "pca" and sv.manifest.num_layers == 2 and sv.gate is None
    assert sv.manifest.model_class == ("LlavaForConditionalGeneration" if arch == "llava" else "LlamaForCausalLM")
    assert main(["calibrate", *common, "--vectors", str(out), "--layers", "0-1", "--gate-only"]) == 0
    printed = capsys.readouterr().out
    assert "precision" in printed and "gate (projection): layer" in printed
    gate = Gate.load(out)
    assert gate.layer in (0, 1) and "f1" in gate.metrics
    assert SteeringVectors.load(out).gate is not None


def test_unreachable_hub_id_is_a_clear_error(prompt_files, tmp_path, capsys):
    rc = main(["extract", "--model", "no-such-org/no-such-model", "--harmful", str(prompt_files / "harmful.csv"),
               "--harmless", str(prompt_files / "harmless.txt"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: cannot load 'no-such-org/no-such-model': it is not a local folder and ") and err.count("\n") == 1
    assert "hf download no-such-org/no-such-model --local-dir DIR" in err


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "steering", "extract", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--harmful" in out.stdout and "--method" in out.stdout


def _extracted(tmp_path, prompt_files, capsys):
    """A tiny saved Llama, its vectors extracted, two hard negatives written: (common CLI args, vectors folder)."""
    model_dir = save_tiny("llama", tmp_path / "model")
    out = tmp_path / "vectors"
    (prompt_files / "hard.txt").write_text("How do I kill a Python process?\nHow do I shoot a photo at night?\n")
    common = ["--model", str(model_dir), "--harmful", str(prompt_files / "harmful.csv"),
              "--harmless", str(prompt_files / "harmless.txt"), "--batch-size", "4", "--no-progress"]
    assert main(["extract", *common, "--out", str(out)]) == 0
    capsys.readouterr()
    return common, out


def test_calibrate_with_hard_negatives_and_steering(tmp_path, prompt_files, capsys):
    """The whole calibration: gate at a false-positive budget (hard negatives reported apart), then
    steering layers/alpha chosen by generating, recorded in the manifest, or a clear refusal."""
    common, out = _extracted(tmp_path, prompt_files, capsys)
    rc = main(["calibrate", *common, "--vectors", str(out), "--hard-negatives", str(prompt_files / "hard.txt"),
               "--max-fpr", "0.25", "--steer-layers", "0,1", "--alphas", "0.5", "--max-new-tokens", "6"])
    printed = capsys.readouterr()
    assert "hard negatives:" in printed.out and "fpr" in printed.out
    if rc == 0:  # a fluent candidate was found: its choice is in the manifest, with every trial
        sv = SteeringVectors.load(out)
        extra = sv.manifest.extra
        assert extra["scale"] == "relative" and extra["positions"] == "generated" and extra["alpha"] == 0.5
        assert extra["layers"] in ([0], [1]) and len(extra["steering_calibration"]["trials"]) == 2
        assert sv.gate is not None and sv.gate.metrics["max_fpr"] == 0.25 and sv.gate.metrics["fpr"] <= 0.25
        assert 0 <= sv.gate.metrics["hard_negative_fpr"] <= 1 and sv.gate.metrics["num_hard_negatives"] == 2
    else:  # random weights may garble at every candidate: then nothing is written, and the error says why
        assert rc == 2 and "try smaller alphas or other layers; nothing was written" in printed.err
        assert "steering_calibration" not in SteeringVectors.load(out).manifest.extra
    assert main(["calibrate", *common, "--vectors", str(out), "--max-fpr", "1.5", "--gate-only"]) == 2
    assert "--max-fpr is a false-positive rate" in capsys.readouterr().err


def test_calibrate_a_logistic_gate(tmp_path, prompt_files, capsys):
    common, out = _extracted(tmp_path, prompt_files, capsys)
    logistic = ["calibrate", *common, "--vectors", str(out), "--hard-negatives", str(prompt_files / "hard.txt"),
                "--gate-method", "logistic", "--max-fpr", "0.25", "--gate-only"]
    assert main(logistic) == 2  # 4 harmful prompts cannot fill 5 folds: one line saying so
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "needs at least 5 harmful and 5 harmless prompts, got 4 and 6" in errors[0]
    assert main([*logistic, "--gate-folds", "2"]) == 0
    printed = capsys.readouterr().out
    assert "gate (logistic, out-of-fold figures): layer" in printed and "logit cut" in printed
    gate = Gate.load(out)
    assert gate.source["method"] == "logistic" and gate.metrics["folds"] == 2 and gate.metrics["num_hard_negatives"] == 2
    assert 0 <= gate.metrics["hard_negative_fpr"] <= 1
