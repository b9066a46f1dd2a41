"""Models x datasets x defenses in one command: ``benchmarks.safety`` per (model, dataset), then one table.

    python -m benchmarks.suite --models smollm2-135m-instruct qwen2.5-coder-0.5b-instruct qwen2.5-coder-1.5b-instruct \\
        --datasets jailbreakbench xstest --defenses none system_prompt self_moderation protector \\
        --judge keyword-llm-attacks keyword-jailbreakbench classifier:default --dtype float32 --max-new-tokens 64 --out runs/suite
    python -m benchmarks.suite --out runs/suite --table-only      # the table from the runs already there

Each (model, dataset) is an ordinary resumable ``benchmarks.safety`` run in ``OUT/MODEL/DATASET``
(rerun the command to resume; a run whose settings differ refuses to mix rows). The table
(``OUT/suite.md``, ``OUT/suite.json``) has, per model and defense: attack success on every
dataset with harmful rows by every judge, over-refusal on every dataset with benign rows (a
defense's refusal counts), with 95% bootstrap intervals, and the whole-call time against the bare
row of the same run (summed batch wall time: the rows of one run share the machine's load only
roughly, so read it as a coarse figure; interleaved ratios are ``benchmarks.latency``'s job).
Incomplete runs are listed as such, never as figures.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.report import markdown_table, write_json
from guardrails._cli import ArgumentParser, entry_point, positive_int

BARE = "none"


def run_dir(out: str | Path, model: str, dataset: str) -> Path:
    """Where one (model, dataset) run lives: a folder name from the model's last path part."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(model.rstrip("/")).name or model)
    return Path(out) / name / dataset


def _cell(rate: dict[str, Any] | None) -> str:
    if not rate or rate.get("value") is None:
        return "-"
    return f"{100 * rate['value']:.1f}% [{100 * rate['low']:.1f}, {100 * rate['high']:.1f}]"


def _call_seconds(run: Path) -> dict[str, float]:
    """Summed per-row share of batch wall time, per defense spec, from ``results.jsonl``."""
    total: dict[str, float] = {}
    with open(run / "results.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            share = (r.get("latency_ms") or {}).get("per_sample_share")
            if share is not None:
                total[r["defenses"]] = total.get(r["defenses"], 0.0) + share / 1e3
    return total


def collect(out: str | Path) -> dict[str, Any]:
    """Every run under ``out``: its model, dataset, completeness and figures per defense."""
    runs = []
    for summary in sorted(Path(out).glob("*/*/summary.json")):
        s = json.loads(summary.read_text(encoding="utf-8"))
        secs = _call_seconds(summary.parent) if s.get("complete") else {}
        runs.append({"path": str(summary.parent), "model": s["config"]["model"], "dataset": s["config"]["dataset"],
                     "complete": bool(s.get("complete")), "n_samples": s["n_samples"], "judges": list(s["judges"]),
                     "results": s["results"], "seconds": secs, "machine": s.get("machine")})
    return {"runs": runs}


def table(col: dict[str, Any]) -> str:
    """One row per model and defense; a column per (harmful dataset, judge) and per benign dataset."""
    done = [r for r in col["runs"] if r["complete"]]
    harmful = sorted({(r["dataset"], j) for r in done for j in r["judges"] if any(v["n_harmful"] for v in r["results"].values())})
    benign = sorted({r["dataset"] for r in done if any(v["n_benign"] for v in r["results"].values())})
    timed = sorted({r["dataset"] for r in done if BARE in r["seconds"]})
    rows = []
    for model in dict.fromkeys(r["model"] for r in done):
        mine = {r["dataset"]: r for r in done if r["model"] == model}
        for d in dict.fromkeys(d for r in mine.values() for d in r["results"]):
            row = [model, f"`{d}`"]
            for ds, j in harmful:
                res = mine.get(ds, {}).get("results", {}).get(d)
                row.append(_cell(res["asr"][j]["overall"]) if res and j in res["asr"] else "-")
            for ds in benign:
                res = mine.get(ds, {}).get("results", {}).get(d)
                row.append(_cell(res["over_refusal"]) if res else "-")
            for ds in timed:
                secs = mine.get(ds, {}).get("seconds", {})
                row.append(f"{secs[d] / secs[BARE]:.2f}" if d in secs and secs.get(BARE) else "-")
            rows.append(row)
    heads = ["model", "defenses", *[f"{ds} ASR `{j}`" for ds, j in harmful], *[f"{ds} over-refusal" for ds in benign],
             *[f"{ds} call time vs bare" for ds in timed]]
    md = markdown_table(heads, rows) if rows else "(no complete run yet)"
    missing = [f"- {r['path']}: incomplete ({r['n_samples']} samples so far); rerun the command to finish it" for r in col["runs"] if not r["complete"]]
    return md + ("\n\n" + "\n".join(missing) if missing else "")


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m benchmarks.suite", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="the suite's folder (one benchmarks.safety run per model and dataset inside)")
    p.add_argument("--table-only", action="store_true", help="only rebuild the table from the runs already in --out")
    p.add_argument("--models", nargs="+", default=[], help="fetched model names, folders or tiny:ARCH")
    p.add_argument("--datasets", nargs="+", default=[], help="dataset names (benchmarks.datasets.DATASETS)")
    p.add_argument("--defenses", nargs="+", default=[], help="defense specs; 'none' (the bare model) is added first when missing")
    p.add_argument("--judge", nargs="+", default=[], help="judges, as benchmarks.safety --judge")
    p.add_argument("--data", help="data folder (default: $GUARDRAILS_DATA or ../shared/data)")
    p.add_argument("--limit", type=positive_int, help="first N samples of each dataset (smoke runs)")
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=positive_int)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.table_only:
        if not (args.models and args.datasets and args.judge):
            p.error("give --models, --datasets and --judge (or --table-only)")
        from benchmarks.safety import SafetyConfig, run_safety

        defenses = list(dict.fromkeys([BARE, *args.defenses]))  # the bare row every ratio and comparison needs
        for model in args.models:
            for dataset in args.datasets:
                print(f"== {model} / {dataset}", flush=True)
                run_safety(SafetyConfig(model=model, defenses=defenses, dataset=dataset, judges=list(args.judge),
                                        out=str(run_dir(args.out, model, dataset)), data=args.data, limit=args.limit,
                                        batch_size=args.batch_size, max_new_tokens=args.max_new_tokens, seed=args.seed,
                                        dtype=args.dtype, threads=args.threads, progress=False, plots=False))
    col = collect(args.out)
    md = table(col)
    write_json(Path(args.out) / "suite.json", col)
    (Path(args.out) / "suite.md").write_text(md + "\n", encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
