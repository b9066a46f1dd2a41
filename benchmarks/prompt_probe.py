"""A hidden-state probe of the chat model as a prompt detector, against the shipped detector.

    python -m benchmarks.prompt_probe --model qwen2.5-coder-0.5b-instruct --layers 0-8 --out runs/gate-sweep

The probe is a logistic regression on the model's own decoder-layer output at the last prompt
token (``steering.calibrate_gate(method="logistic")``: balanced classes, L2, the layer and cut chosen
on out-of-fold scores at ``--budget`` false positives on the harmless training prompts), trained on
the InferAligner training prompts (``benchmarks.inferaligner_data``: StrongREJECT, HarmBench val,
authored prompts and hard negatives; no evaluation prompt or near-duplicate of one). It is what
InferAligner's gate computes, so on a white-box model it costs one dot product on activations the
prefill computes anyway. The shipped detector scores each prompt as a prompt (no query).

Both are measured on XSTest (unsafe vs safe), FigStep SafeBench's questions as text vs FigStep's
benign sentences, JailbreakBench and HarmBench test (the shipped detector was trained on these two:
in-sample for it, marked so), and Alpaca instructions (benign). Recall and false-positive rates at
each detector's own operating point; AUROC; recall at <= 10% false positives (the issue's XSTest
goal; that cut is chosen on the test set itself, so it is an upper bound). Activations are cached as
in ``benchmarks.gate_sweep`` (same ``OUT/activations`` layout).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks import datasets
from benchmarks.detector_eval import auroc, recall_at_fpr
from benchmarks.gate_sweep import EVALUATION, add_model_arguments, join, model_activations, training_sets
from benchmarks.report import machine_info, markdown_table, write_json
from guardrails._cli import ArgumentParser, entry_point

#: (harmful set, benign set, whether the shipped detector was trained on the harmful set)
COMPARISONS = (
    ("XSTest unsafe", "XSTest safe", False),
    ("FigStep questions", "FigStep benign sentences", False),
    ("JailbreakBench", "Alpaca (benign)", True),
    ("HarmBench test, standard", "Alpaca (benign)", True),
)
FIGSTEP: dict[str, Callable[[str | None], list[str]]] = {
    "FigStep questions": lambda d: [s.prompt for s in datasets.load_figstep(d, mode="text", check_images=False)],
    "FigStep benign sentences": lambda d: [s.prompt for s in datasets.load_figstep_benign(d)],
}


def compare(scores: Mapping[str, Mapping[str, np.ndarray]], cuts: Mapping[str, float]) -> list[dict[str, Any]]:
    """Per comparison and detector: recall and FPR at the detector's cut, AUROC, recall at <= 10% FPR."""
    rows = []
    for harmful, benign, in_sample in COMPARISONS:
        for name, s in scores.items():
            pos, neg = s[harmful], s[benign]
            y, both = [1] * len(pos) + [0] * len(neg), np.concatenate([pos, neg])
            rows.append({"harmful": harmful, "benign": benign, "detector": name, "n_harmful": len(pos), "n_benign": len(neg),
                         "recall": float(np.mean(pos >= cuts[name])), "fpr": float(np.mean(neg >= cuts[name])),
                         "auroc": auroc(y, both.tolist()), "recall_at_fpr_0.10": recall_at_fpr(y, both.tolist(), 0.10),
                         "trained_on_harmful_set": in_sample and name == "shipped detector"})
    return rows


def detector_cost(det: Any, prompts: Sequence[str], batches: Sequence[int] = (1, 16), repeats: int = 3) -> dict[str, float]:
    """The shipped detector's median ms per prompt at each batch size."""
    out = {}
    for b in batches:
        chunks = [list(prompts[i:i + b]) for i in range(0, len(prompts), b)]
        det.scores(chunks[0])  # warm-up
        per = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for c in chunks:
                det.scores(c)
            per.append((time.perf_counter() - t0) * 1e3 / len(prompts))
        out[f"batch_{b}_ms_per_prompt"] = statistics.median(per)
    return out


def probe_cost(gate: Any, hidden: int, batch: int = 16, repeats: int = 200) -> float:
    """Median ms of the gate's score on a batch of last-token activations (the probe's whole cost
    once the prefill has reached its layer)."""
    x = torch.randn(batch, hidden)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        gate.score(x)
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def table(rows: Sequence[dict[str, Any]]) -> str:
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    return markdown_table(
        ["harmful vs benign", "detector", "recall / FPR at its cut", "AUROC", "recall at FPR <= 10%"],
        [[f"{r['harmful']} ({r['n_harmful']}) vs {r['benign']} ({r['n_benign']})",
          r["detector"] + (" (trained on the harmful set)" if r["trained_on_harmful_set"] else ""),
          f"{pct(r['recall'])} / {pct(r['fpr'])}", "-" if r["auroc"] is None else f"{r['auroc']:.3f}", pct(r["recall_at_fpr_0.10"])]
         for r in rows])


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m benchmarks.prompt_probe", description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="folder for prompt_probe.json / .md and the activation cache")
    p.add_argument("--budget", type=float, default=0.05, help="false-positive budget on the harmless training prompts")
    args = p.parse_args(argv)
    from benchmarks.inferaligner_data import near_duplicates
    from guardrails.classifiers import load_default_detector
    from steering import calibrate_gate

    sets, dropped = training_sets(args.data)
    evaluation = {**{k: f(args.data) for k, f in EVALUATION.items()}, **{k: f(args.data) for k, f in FIGSTEP.items()}}
    # FigStep is not among inferaligner_data's evaluation sets: check here that no training prompt is close to it
    leaked = {k: len(near_duplicates(v, evaluation["FigStep questions"])) for k, v in sets.items()}
    if any(leaked.values()):
        raise RuntimeError(f"training prompts close to FigStep questions: {leaked}; add FigStep to inferaligner_data.EVALUATION_SETS")
    layers, acts = model_activations(args, {**sets, **evaluation}, Path(args.out))
    cal = calibrate_gate(None, join(acts, "extract_harmful", "calib_harmful"), join(acts, "extract_harmless", "calib_harmless", "hard_negatives"),
                         max_fpr=args.budget, method="logistic")
    gate = cal.gate
    det = load_default_detector()
    scores = {f"probe (layer {gate.layer})": {k: gate.score(acts[k].at(gate.layer)).numpy() for k in evaluation},
              "shipped detector": {k: det.scores(v) for k, v in evaluation.items()}}
    rows = compare(scores, {f"probe (layer {gate.layer})": 0.0, "shipped detector": float(getattr(det, "threshold", 0.5))})
    cost = {"detector": detector_cost(det, evaluation["XSTest safe"][:64]),
            "probe_ms_per_batch_of_16": probe_cost(gate, acts["XSTest safe"].values.shape[-1])}
    md = table(rows)
    out = Path(args.out)
    write_json(out / "prompt_probe.json", {"command": vars(args), "machine": machine_info(), "layers": layers,
                                           "training_sizes": {k: len(v) for k, v in sets.items()}, "dropped_near_duplicates": dropped,
                                           "probe": {"layer": gate.layer, "oof_recall": cal.best.recall, "oof_fpr": cal.best.fpr,
                                                     "per_layer": cal.as_dicts()},
                                           "detector": det.describe(), "results": rows, "cost": cost})
    (out / "prompt_probe.md").write_text(md + "\n", encoding="utf-8")
    print(cal.table())
    print(md)
    print(f"cost: {cost}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
