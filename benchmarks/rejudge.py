"""Judge the answers of finished ``benchmarks.safety`` runs again, with other judges (no generation).

    python -m benchmarks.rejudge --runs runs/qwen05-jailbreakbench --judge llm:qwen2.5-coder-1.5b-instruct --out runs/rejudged

Reads every run's ``results.jsonl``, gives each judge the same samples and answers the run judged
(a row a defense refused before generation is an answer like any other: the judges' own rule,
"safe" for the shipped ones, applies), and writes ``judged.jsonl`` (one row per answer and judge)
and ``summary.json`` / ``summary.md``: per run and defense, attack success by each new judge with
a 95% bootstrap interval, and how often it agrees with each of the run's own judges.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.report import markdown_table, rate_ci, write_json
from guardrails._cli import ArgumentParser, entry_point, positive_int


def read_rows(run: Path) -> list[dict[str, Any]]:
    """A finished run's rows; an unfinished run is refused (its figures would be partial)."""
    summary = run / "summary.json"
    if not summary.is_file() or not json.loads(summary.read_text(encoding="utf-8")).get("complete"):
        raise ValueError(f"{run} is not a finished benchmarks.safety run (no complete summary.json); finish it first")
    return [json.loads(line) for line in (run / "results.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


def rejudge(rows: Sequence[dict[str, Any]], judges: Sequence[Any]) -> list[dict[str, Any]]:
    """``{"id", "defenses", "harmful", "judge", "unsafe", "score", "reason"}`` per row and judge."""
    from benchmarks.datasets import Sample
    from benchmarks.judges import Response

    samples = [Sample(id=r["id"], dataset=r["dataset"], category=r["category"], prompt=r["prompt"], images=list(r.get("images", [])),
                      label=r["label"]) for r in rows]
    answers = [Response.coerce(r, i) for i, r in enumerate(rows)]
    out = []
    for judge in judges:
        for r, lab in zip(rows, judge.judge(samples, answers)):
            out.append({"run": r.get("run"), "id": r["id"], "defenses": r["defenses"], "harmful": r["harmful"], "judge": judge.name,
                        "version": str(judge.version), "unsafe": bool(lab.unsafe), "score": float(lab.score), "reason": lab.reason})
    return out


def summarize(rows: Sequence[dict[str, Any]], judged: Sequence[dict[str, Any]], *, n_boot: int = 2000) -> list[dict[str, Any]]:
    """Per (run, defenses) and new judge: ASR on the harmful rows and agreement with the run's judges."""
    own = {(r.get("run"), r["id"], r["defenses"]): r for r in rows}
    groups: dict[tuple[Any, str, str], list[dict[str, Any]]] = {}
    for j in judged:
        if j["harmful"]:
            groups.setdefault((j["run"], j["defenses"], j["judge"]), []).append(j)
    out = []
    for (run, spec, judge), js in groups.items():
        theirs = [own[(run, j["id"], spec)]["judges"] for j in js]
        agree = {name: sum(t[name]["unsafe"] == j["unsafe"] for t, j in zip(theirs, js)) / len(js) for name in theirs[0]}
        out.append({"run": run, "defenses": spec, "judge": judge, "n": len(js),
                    "asr": rate_ci([j["unsafe"] for j in js], n_boot=n_boot, key=f"{run}|{spec}|{judge}").to_dict(),
                    "agreement_with_run_judges": agree})
    return out


def table(summary: Sequence[dict[str, Any]]) -> str:
    def cell(r: dict[str, Any]) -> str:
        a = r["asr"]
        return f"{100 * a['value']:.1f}% [{100 * a['low']:.1f}, {100 * a['high']:.1f}] ({a['k']}/{a['n']})"

    return markdown_table(["run", "defenses", "judge", "ASR (harmful rows)", "agrees with the run's judges"],
                          [[Path(r["run"]).name, f"`{r['defenses']}`", f"`{r['judge']}`", cell(r),
                            ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["agreement_with_run_judges"].items())] for r in summary])


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m benchmarks.rejudge", description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, help="folders of finished benchmarks.safety runs")
    p.add_argument("--judge", nargs="+", required=True, help="judges, as benchmarks.safety --judge (llm:MODEL, classifier:default, ...)")
    p.add_argument("--out", required=True, help="folder for judged.jsonl and summary.json / .md")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto", help="dtype of llm: judge models (float32 decodes 2x faster than bfloat16 on these CPUs)")
    p.add_argument("--batch-size", type=positive_int, default=8, help="rows per forward of an llm: judge")
    p.add_argument("--threads", type=positive_int, help="torch threads")
    args = p.parse_args(argv)
    import torch

    from benchmarks.judges import LLMJudge
    from benchmarks.safety import build_judge, load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [{**r, "run": str(run)} for run in args.runs for r in read_rows(Path(run))]

    def make(name: str) -> Any:
        if not name.startswith("llm:"):
            return build_judge(name, device=args.device)
        model, proc = load_model(name.split(":", 1)[1], device=args.device, dtype=args.dtype)
        return LLMJudge(model.eval(), getattr(proc, "tokenizer", proc), name=name, batch_size=args.batch_size)

    judges = [make(name) for name in args.judge]
    judged = rejudge(rows, judges)
    summary = summarize(rows, judged)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "judged.jsonl").write_text("".join(json.dumps(j) + "\n" for j in judged), encoding="utf-8")
    write_json(out / "summary.json", {"runs": args.runs, "judges": [getattr(j, "describe", dict)() for j in judges], "results": summary})
    md = table(summary)
    (out / "summary.md").write_text(md + "\n", encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
