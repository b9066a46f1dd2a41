"""Calibrate a self-judge's threshold (and template) on a real model, for an over-refusal budget.

    python -m benchmarks.calibrate_judge --model qwen2.5-coder-0.5b-instruct --defense self_moderation \\
        --templates selfmod_judge_followup selfmod_judge --max-added-refusal 0.02 --out runs/judge-cal [--write-preset]

SelfModeration and ECSO flag an answer when the model's own yes/no judgement gives P(unsafe) >=
threshold. The default 0.5 was never measured; on Qwen2.5-Coder-0.5B it turned a third of the
benign answers into refusals (issue 17). This command:

1. answers calibration prompts with the bare model (greedy): harmful ones (StrongREJECT, HarmBench
   val and the project's authored harmful prompts) and benign ones (authored benign prompts and hard
   negatives: benign prompts with dangerous words), all disjoint from the evaluation sets
   (JailbreakBench, HarmBench test, XSTest, AdvBench are not used; see benchmarks/inferaligner_data.py);
2. marks which answers the model itself refused (refusal keywords, JailbreakBench's list);
3. scores every answer with the judge, per template; ``--classifier-judge classifier:default`` adds
   SelfModeration with that detector as its judge instead of the model (the judge that does not
   depend on the model's own yes/no). The shipped detector was trained on these calibration
   prompts (not on these answers): its separation here is optimistic, the test sets tell;
4. chooses the threshold that flags the most answers the model gave to harmful prompts while
   flagging at most ``--max-added-refusal`` of the benign prompts (a flagged benign answer is a new
   refusal or a rewrite: counted as added over-refusal, the conservative reading), and the judge
   that does best at it (a template, or the shipped detector; a detector folder is only reported);
5. writes everything (answers, scores, the sweep) to ``--out``, and with ``--write-preset`` the
   choice to ``guardrails/defenses/presets/<defense>/<model>/config.json`` (``preset=MODEL`` in a spec).

The bare answers are cached in ``--out``: a rerun with other templates or budgets regenerates nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

from guardrails._cli import ArgumentParser, CliError, entry_point, positive_int

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFENSES = ("self_moderation", "ecso")
SHIPPED_DETECTOR = "classifier:default"  # the one classifier judge a preset can name (``"judge": "default"``)


class _Sweep(TypedDict):
    """One judge template's calibration: the chosen threshold and the figures around it."""

    template: str | None  # None: ECSO's fixed self-check, or a classifier judge
    judge: str  # what scored the answers: the template's name, ecso_harm_check, or classifier:...
    choice: dict[str, Any]  # BudgetChoice.to_dict()
    auroc: float | None
    at_default_threshold: dict[str, float]
    scores: list[float]


def calibration_prompts(n_harmful: int, n_benign: int, data: str | None, n_short: int = 0) -> tuple[list[str], list[str]]:
    """Harmful and benign prompts (half plain benign, half hard negatives), seeded, disjoint from the evaluation sets.

    ``n_short`` adds that many more harmful prompts taken only from the authored short questions
    (see :func:`short_questions`) among the rest of the calibration split, so a run sees enough of
    the kind of prompt XSTest's unsafe half is made of; 0 keeps the older runs' prompts exactly.
    """
    from benchmarks.inferaligner_data import splits

    s, _ = splits(data)
    harmful = s["calib_harmful"][:n_harmful]
    if n_short:
        short = short_questions()
        extra = [p for p in s["calib_harmful"][n_harmful:] if p in short][:n_short]
        if len(extra) < n_short:
            raise CliError(f"--short-harmful {n_short}: the calibration split has only {len(extra)} more authored "
                           f"short questions after the first {n_harmful} harmful prompts")
        harmful += extra
    half = n_benign // 2
    benign = s["calib_harmless"][: n_benign - half] + s["hard_negatives"][:half]
    random.Random(0).shuffle(benign)
    return harmful, benign


def short_questions() -> frozenset[str]:
    """The authored harmful prompts: one-line questions (4-18 words) like XSTest's unsafe half, not long requests."""
    from benchmarks.inferaligner_data import authored

    return frozenset(authored()["harmful"])


def setup_key(defenses: Sequence[Any]) -> str:
    """What a cached answer depends on besides prompt and length: the defenses' classes and settings ("" for bare)."""
    if not defenses:
        return ""
    desc = [[type(d).__name__, d.config.to_dict() if hasattr(d, "config") else None] for d in defenses]
    return hashlib.sha256(json.dumps(desc, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cached_answers(guarded: Any, prompts: list[str], *, max_new_tokens: int, batch_size: int, cache: Path,
                   label: str = "bare") -> list[dict[str, Any]]:
    """Greedy answers (``{"answer", "refused"}`` per prompt) of ``guarded``, cached per prompt in ``cache`` (JSON lines).

    A cached row is reused only for the same length and the same defenses and settings (``setup_key``).
    """
    setup = setup_key(guarded.defenses)
    done: dict[str, dict[str, Any]] = {}
    if cache.is_file():
        for line in cache.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            if row["max_new_tokens"] == max_new_tokens and row.get("setup", "") == setup:
                done[row["prompt"]] = {"answer": row["answer"], "refused": row.get("refused", False)}
    todo = [p for p in dict.fromkeys(prompts) if p not in done]
    with cache.open("a", encoding="utf-8") as f:
        for k in range(0, len(todo), batch_size):
            batch = todo[k:k + batch_size]
            results = guarded.chat([[{"role": "user", "content": p}] for p in batch], max_new_tokens=max_new_tokens, do_sample=False)
            for p, r in zip(batch, results):
                done[p] = {"answer": r.text, "refused": r.refused}
                f.write(json.dumps({"prompt": p, "answer": r.text, "refused": r.refused, "max_new_tokens": max_new_tokens,
                                    "setup": setup}) + "\n")
            f.flush()
            print(f"[{label}] answered {min(k + batch_size, len(todo))}/{len(todo)}", file=sys.stderr, flush=True)
    return [done[p] for p in prompts]


def judge_scores(defense: Any, guarded: Any, prompts: list[str], answers: list[str], batch_size: int) -> list[float]:
    out: list[float] = []
    for k in range(0, len(prompts), batch_size):
        convs = [[{"role": "user", "content": p}] for p in prompts[k:k + batch_size]]
        out += defense.score_answers(guarded, convs, answers[k:k + batch_size])
    return out


def add_calibration_args(p: ArgumentParser) -> None:
    """The calibration split's size, generation settings and output folder (shared with calibrate_prompt)."""
    p.add_argument("--harmful", type=positive_int, default=100, help="harmful calibration prompts")
    p.add_argument("--benign", type=positive_int, default=160, help="benign calibration prompts (half of them hard negatives)")
    p.add_argument("--short-harmful", type=int, default=0, metavar="N",
                   help="N more harmful prompts, all authored short questions (default 0: the --harmful ones only)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--data", help="the shared data folder (default: ../shared/data or $GUARDRAILS_DATA)")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=positive_int, default=None,
                   help="torch threads (default: torch's own; 1 when another job shares the cores: oversubscribed "
                        "threads ran about 4x slower here)")


def parse_calibration_args(p: ArgumentParser, argv: Sequence[str] | None) -> Any:
    """Parse the command line; ``--threads`` takes effect here, before a model is loaded."""
    args = p.parse_args(argv)
    if args.short_harmful < 0:
        raise CliError(f"--short-harmful is a count of prompts, 0 or more; got {args.short_harmful}")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    return args


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m benchmarks.calibrate_judge", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a fetched model name, folder or tiny:ARCH")
    p.add_argument("--defense", choices=DEFENSES, default="self_moderation")
    p.add_argument("--classifier-judge", action="append", default=[], metavar="classifier:default|classifier:DIR",
                   help="also calibrate SelfModeration(judge=<that detector>) on the same answers (repeatable)")
    p.add_argument("--templates", nargs="*", default=None,
                   help="SelfModeration judge templates to compare (default: selfmod_judge_followup selfmod_judge)")
    p.add_argument("--max-added-refusal", type=float, default=0.02, help="share of benign prompts the judge may flag (default 0.02)")
    add_calibration_args(p)
    p.add_argument("--write-preset", action="store_true", help="write the choice as the model's shipped preset")
    args = parse_calibration_args(p, argv)
    if not 0 <= args.max_added_refusal < 1:
        raise CliError(f"--max-added-refusal is a share in [0, 1), got {args.max_added_refusal}")
    if args.defense == "ecso" and args.templates:
        raise CliError("ECSO has one self-check template (ecso_harm_check); --templates is for self_moderation")
    if args.classifier_judge and args.defense == "ecso":
        raise CliError("--classifier-judge is for --defense self_moderation (ECSO judges with the model only)")
    if args.templates == [] and not args.classifier_judge:
        raise CliError("nothing to calibrate: --templates is empty and no --classifier-judge was given")

    from sklearn.metrics import roc_auc_score

    from benchmarks.judges import make_judge
    from benchmarks.report import machine_info, markdown_table, write_json
    from benchmarks.safety import load_classifier
    from guardrails import wrap
    from guardrails.defenses import ECSO, SelfModeration
    from guardrails.defenses._judge_presets import threshold_at_budget, write_preset
    from guardrails.loading import load_for_chat

    # built first, so a bad --classifier-judge fails before the model loads
    judges: list[tuple[str, str | None, Any]]  # (name, template, defense)
    if args.defense == "ecso":
        judges = [("ecso_harm_check", None, ECSO())]
    else:
        templates = ["selfmod_judge_followup", "selfmod_judge"] if args.templates is None else args.templates
        judges = [(t, t, SelfModeration(judge_prompt=t)) for t in templates]
        for spec in args.classifier_judge:
            try:
                judges.append((spec, None, SelfModeration(judge=load_classifier(spec))))
            except (ValueError, OSError) as e:
                raise CliError(f"--classifier-judge {spec}: {e}") from e
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    harmful, benign = calibration_prompts(args.harmful, args.benign, args.data, args.short_harmful)
    model, processor = load_for_chat(args.model, dtype=args.dtype, progress=lambda line: print(line, file=sys.stderr))
    bare = wrap(model, processor, [])
    prompts = harmful + benign
    answers = [r["answer"] for r in cached_answers(bare, prompts, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                                   cache=out / "answers.jsonl")]
    complied = [lab.unsafe for lab in make_judge("keyword-jailbreakbench").judge(prompts, answers)]
    nh = len(harmful)

    sweep: list[_Sweep] = []
    for name, template, defense in judges:
        scores = judge_scores(defense, bare, prompts, answers, args.batch_size)
        pos = [s for s, c in zip(scores[:nh], complied[:nh]) if c]  # harmful prompts the model answered
        neg = [s for s, c in zip(scores[nh:], complied[nh:]) if c]  # benign prompts it answered
        choice = threshold_at_budget(pos, neg, len(benign), args.max_added_refusal)
        # how well the judge separates the model's harmful answers from its benign ones, at any threshold
        auroc = float(roc_auc_score([1] * len(pos) + [0] * len(neg), pos + neg)) if pos and neg else None
        at_half = {"threshold": 0.5, "harmful_flagged": sum(s >= 0.5 for s in pos), "benign_flagged": sum(s >= 0.5 for s in neg)}
        sweep.append({"template": template, "judge": name, "choice": choice.to_dict(), "auroc": auroc, "at_default_threshold": at_half,
                      "scores": scores})
        print(f"[calibrate_judge] {name}: threshold {choice.threshold:.4g} flags "
              f"{choice.harmful_flagged}/{choice.harmful} answered harmful, {choice.benign_flagged}/{choice.benign} benign "
              f"(0.5 flags {at_half['harmful_flagged']} and {at_half['benign_flagged']}; AUROC {auroc})", file=sys.stderr)
    # a preset ships in the package: its judge is the model's own or the shipped detector, never a local folder
    shippable = [r for r in sweep if r["judge"] == SHIPPED_DETECTOR or not r["judge"].startswith("classifier:")]
    best = max(shippable or sweep, key=lambda r: (r["choice"]["harmful_flagged"], -r["choice"]["benign_flagged"]))
    rows = [[r["judge"], f"{r['choice']['threshold']:.4g}",
             f"{r['choice']['harmful_flagged']}/{r['choice']['harmful']}", f"{r['choice']['benign_flagged']}/{r['choice']['benign']}",
             f"{r['at_default_threshold']['harmful_flagged']}/{r['choice']['harmful']}",
             f"{r['at_default_threshold']['benign_flagged']}/{r['choice']['benign']}"] for r in sweep]
    for row, r in zip(rows, sweep):
        row.append("-" if r["auroc"] is None else f"{r['auroc']:.3f}")
    table = markdown_table(["judge", "chosen threshold", "answered harmful flagged", "benign flagged (added refusals)",
                            "harmful flagged at 0.5", "benign flagged at 0.5", "AUROC"], rows)
    command = "python -m benchmarks.calibrate_judge " + " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if a != "--write-preset")
    record: dict[str, Any] = {
        "defense": args.defense, "model": args.model, "judge": best["judge"],
        "config": {"threshold": best["choice"]["threshold"], **({"judge_prompt": best["template"]} if best["template"] else {}),
                   **({"judge": "default"} if best["judge"] == SHIPPED_DETECTOR else {})},
        "calibration": {
            "rule": f"most answered-harmful flagged with at most {args.max_added_refusal:g} of the benign prompts flagged",
            "choice": best["choice"], "sweep": [{k: v for k, v in r.items() if k != "scores"} for r in sweep],
            "prompts": {"harmful": nh, "benign": len(benign), "harmful_answered": sum(complied[:nh]),
                        "benign_answered": sum(complied[nh:])},
            "data": "benchmarks/inferaligner_data.py splits: calib_harmful (StrongREJECT, HarmBench val, MIT + authored), "
                    "calib_harmless (authored) and hard_negatives (authored); near-duplicates of evaluation prompts dropped",
            "refusal_judge": "keyword-jailbreakbench", "generation": {"max_new_tokens": args.max_new_tokens, "greedy": True,
                                                                     "dtype": args.dtype},
            "command": command, "machine": machine_info(),
        },
    }
    write_json(out / "calibration.json", {**record, "prompts": prompts, "answers": answers, "complied": complied,
                                          "scores": {r["judge"]: r["scores"] for r in sweep}})
    (out / "calibration.md").write_text(table)
    print(table)
    if args.write_preset:
        if not shippable:
            raise CliError("no preset is written: a preset ships in the package, so its judge is one of the model's templates "
                           f"or {SHIPPED_DETECTOR}, and this run calibrated only {', '.join(args.classifier_judge)}")
        if best["choice"]["harmful_flagged"] == 0:
            raise CliError(f"no threshold within the budget flags any harmful prompt the model answered (judge AUROC "
                           f"{best['auroc']}): this judge cannot tell them from benign answers on this model, so no "
                           "preset is written; see calibration.md in --out for the trade-off")
        name = Path(args.model).name
        print(f"preset written: {write_preset(args.defense, name, record)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
