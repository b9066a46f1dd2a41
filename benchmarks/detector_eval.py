"""Detector quality: AUROC, accuracy, recall at 5% FPR, per category, keyword judges beside.

Two uses:

- library functions (metrics, tables) used by ``benchmarks/train_detector.py``, whose held-out
  evaluation (JailbreakBench responses held out by victim model, XSTest prompts) is the one that
  measures the shipped head;
- a command that scores any saved detector folder (or the shipped default) on the public sets as
  they are. Sets a detector was trained on are not held out there; the report says so.

    python -m benchmarks.detector_eval --detector default --out runs/detector_eval_default
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from guardrails._cli import ArgumentParser, entry_point

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
from numpy.typing import ArrayLike

# -- metrics --------------------------------------------------------------------------------------


def auroc(y: ArrayLike, s: ArrayLike) -> float | None:
    """Area under the ROC curve; None when only one class is present."""
    from sklearn.metrics import roc_auc_score

    ya = np.asarray(y)
    if len(np.unique(ya)) < 2:
        return None
    return float(roc_auc_score(ya, np.asarray(s, dtype=np.float64)))


def recall_at_fpr(y: ArrayLike, s: ArrayLike, fpr: float = 0.05) -> float | None:
    """Recall (TPR) at the strictest threshold whose false-positive rate is <= ``fpr``.

    Rows are flagged when their score is strictly above the ``floor(fpr * n_neg) + 1``-th highest
    negative score, so at most ``floor(fpr * n_neg)`` negatives are flagged (ties flag fewer).
    """
    ya, sa = np.asarray(y), np.asarray(s, dtype=np.float64)
    neg, pos = np.sort(sa[ya == 0])[::-1], sa[ya == 1]
    if len(neg) == 0 or len(pos) == 0:
        return None
    k = int(np.floor(fpr * len(neg)))
    t = neg[k] if k < len(neg) else -np.inf
    return float(np.mean(pos > t))


def at_threshold(y: ArrayLike, s: ArrayLike, threshold: float = 0.5) -> dict[str, float | None]:
    """Accuracy, recall (unsafe flagged) and false-positive rate (safe flagged) at ``threshold``."""
    ya, f = np.asarray(y), np.asarray(s, dtype=np.float64) >= threshold
    return {
        "accuracy": float(np.mean(f == (ya == 1))),
        "recall": float(np.mean(f[ya == 1])) if np.any(ya == 1) else None,
        "fpr": float(np.mean(f[ya == 0])) if np.any(ya == 0) else None,
    }


def summary(y: ArrayLike, s: ArrayLike, threshold: float = 0.5) -> dict[str, Any]:
    """Every headline figure for one set of scores (labels 0/1 and scores: sequences or arrays)."""
    ya = np.asarray(y)
    return {"n": int(len(ya)), "n_unsafe": int(np.sum(ya == 1)), "auroc": auroc(ya, s), "recall_at_5fpr": recall_at_fpr(ya, s, 0.05),
            **at_threshold(ya, s, threshold)}


def by_group(y: ArrayLike, s: ArrayLike, groups: Sequence[str], threshold: float = 0.5) -> dict[str, dict[str, Any]]:
    """:func:`summary` per group (category, XSTest type, ...)."""
    ya, sa, g = np.asarray(y), np.asarray(s, dtype=np.float64), np.asarray(groups)
    return {k: summary(ya[g == k], sa[g == k], threshold) for k in sorted(set(g.tolist()))}


# -- reporting ------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """Machine and versions, recorded beside every measured figure."""
    import sklearn
    import torch
    import transformers

    from guardrails.classifiers.default import MINILM_PACKAGE, package_version

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "scikit_learn": sklearn.__version__,
        MINILM_PACKAGE: package_version(MINILM_PACKAGE),
        "torch_threads": torch.get_num_threads(),
    }


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3f}"
    return str(x)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |\n" for r in rows)


def write_report(out: str | os.PathLike, report: dict[str, Any], markdown: str) -> Path:
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    (d / "detector_eval.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    (d / "detector_eval.md").write_text(markdown, encoding="utf-8")
    return d


# -- scoring a fixed detector on the public sets ------------------------------------------------


def evaluate_fixed(detector: Any, data_dir: Path, *, threshold: float = 0.5, limit: int | None = None) -> dict[str, Any]:
    """Score ``detector`` and both keyword judges on XSTest prompts and JailbreakBench responses."""
    from benchmarks.train_detector import load_jbb_artifacts, load_xstest_prompts
    from guardrails.classifiers import KeywordJudge

    out: dict[str, Any] = {"detector": detector.describe(), "threshold": threshold}
    xs = load_xstest_prompts(data_dir)[:limit]
    s = detector.scores([r["text"] for r in xs])
    y = [r["label"] for r in xs]
    out["xstest_prompts"] = {"all": summary(y, s, threshold), "by_type": by_group(y, s, [r["type"] for r in xs], threshold)}
    jbb = load_jbb_artifacts(data_dir)[:limit]
    y = [r["label"] for r in jbb]
    judges = {"detector": detector, "keyword-llm-attacks": KeywordJudge.llm_attacks(), "keyword-jailbreakbench": KeywordJudge.jailbreakbench()}
    res = {}
    for name, j in judges.items():
        s = j.scores([r["response"] for r in jbb], [r["query"] for r in jbb])
        res[name] = {"all": summary(y, s, threshold), "by_model": by_group(y, s, [r["model"] for r in jbb], threshold),
                     "by_category": by_group(y, s, [r["category"] for r in jbb], threshold)}
    out["jbb_responses"] = res
    return out


def _fixed_markdown(rep: dict[str, Any]) -> str:
    cols = ["set", "n", "n_unsafe", "auroc", "accuracy", "recall", "fpr", "recall_at_5fpr"]
    rows = [{"set": "XSTest prompts (detector)", **rep["xstest_prompts"]["all"]}]
    for name, r in rep["jbb_responses"].items():
        rows.append({"set": f"JBB responses ({name})", **r["all"]})
    return (f"# Detector evaluation: {rep['detector']['name']}\n\nCommand: `{rep['command']}`\n\n"
            "Scores of a fixed detector on the public sets as they are: sets it was trained on are NOT held out "
            "(the shipped head was trained on JailbreakBench responses; its held-out figures come from "
            "benchmarks/train_detector.py).\n\n" + markdown_table(rows, cols)
            + f"\nEnvironment: `{json.dumps(rep['environment'])}`; wall time {rep['wall_s']:.0f} s\n")


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m benchmarks.detector_eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--detector", default="default", help="'default' (the shipped head) or a folder written by train-detector")
    p.add_argument("--data", default=None, help="the public data folder (default: $GUARDRAILS_DATA or ../shared/data)")
    p.add_argument("--out", required=True, help="folder for detector_eval.json and detector_eval.md")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--limit", type=int, default=None, help="score only the first N rows of each set (smoke runs)")
    args = p.parse_args(argv)
    import torch

    from guardrails.classifiers.default import load_default_detector, load_detector
    from guardrails.data import shared_data_dir

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    data_dir = shared_data_dir(args.data)
    if data_dir is None:
        p.error("no data folder: pass --data or set GUARDRAILS_DATA")
    t0 = time.time()
    det = load_default_detector() if args.detector == "default" else load_detector(args.detector)
    rep = evaluate_fixed(det, data_dir, threshold=args.threshold, limit=args.limit)
    rep.update(command=" ".join(["python -m benchmarks.detector_eval", *(argv if argv is not None else sys.argv[1:])]),
               environment=environment(), wall_s=time.time() - t0)
    d = write_report(args.out, rep, _fixed_markdown(rep))
    print(f"wrote {d / 'detector_eval.json'} and {d / 'detector_eval.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
