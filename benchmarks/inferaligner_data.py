"""Prompt files for InferAligner's extraction and calibration, disjoint from every evaluation set.

    python -m benchmarks.inferaligner_data --out runs/ia-data [--data ../shared/data]

Writes (one JSON object {"prompt": ...} per line):

- ``extract_harmful.jsonl`` / ``extract_harmless.jsonl``: what the vectors are the mean difference of;
- ``calib_harmful.jsonl`` / ``calib_harmless.jsonl``: the gate's and steering calibration's prompts;
- ``hard_negatives.jsonl``: benign prompts that use dangerous words (the gate's false-positive test);
- ``gate_harmful.jsonl`` / ``gate_harmless.jsonl``: extraction + calibration prompts together, for a
  logistic gate (``--gate-method logistic`` fits its own direction, so it need not leave the
  vectors' prompts out).

Sources: StrongREJECT (harmful; MIT), HarmBench's validation split (harmful; MIT; its test split is
an evaluation set) and this project's authored prompts (``benchmarks/detector_data``: harmful,
benign, benign instructions phrased like AdvBench, hard negatives; Apache-2.0). None of
JailbreakBench, HarmBench test, XSTest, AdvBench or Alpaca is used: those are what InferAligner is
evaluated on, and a prompt close to one of theirs (``near_duplicates``: StrongREJECT repeats some
AdvBench goals, HarmBench val rephrases some test behaviours) is dropped and counted. Splits are
drawn with ``random.Random(0)``.
"""

from __future__ import annotations

import argparse
import difflib
import json
import random
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from benchmarks import datasets

#: the evaluation sets no training prompt may be close to (loaded from the shared data folder)
EVALUATION_SETS = ("jailbreakbench", "harmbench_test", "xstest", "advbench", "alpaca")
#: difflib similarity of the word sequences above which two prompts count as the same
NEAR_DUPLICATE = 0.8

AUTHORED = Path(__file__).resolve().parent / "detector_data" / "authored_prompts.jsonl"


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def near_duplicates(prompts: Sequence[str], against: Sequence[str], ratio: float = NEAR_DUPLICATE) -> list[int]:
    """Indices of ``prompts`` whose words (lower-cased, in order) are within ``ratio`` (difflib) of any of ``against``."""
    others = [(w, Counter(w)) for w in map(_words, against)]
    out = []
    for i, text in enumerate(prompts):
        words = _words(text)
        counts = Counter(words)
        for other, other_counts in others:
            # 2 * shared words / total words bounds difflib's ratio from above (and 2 * the shorter
            # length bounds that): most pairs stop at one of the two
            total = ratio * (len(words) + len(other))
            if 2 * min(len(words), len(other)) <= total or 2 * sum((counts & other_counts).values()) <= total:
                continue
            if difflib.SequenceMatcher(None, words, other, autojunk=False).ratio() > ratio:
                out.append(i)
                break
    return out


def evaluation_prompts(data_dir: str | None = None) -> list[str]:
    """Every prompt of :data:`EVALUATION_SETS`."""
    return [s.prompt for name in EVALUATION_SETS for s in datasets.load_dataset(name, data_dir)]


def authored() -> dict[str, list[str]]:
    """This project's authored prompts by group (harmful, benign, benign_instruction, hard_negative), in file order."""
    by_group: dict[str, list[str]] = {}
    for line in AUTHORED.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            by_group.setdefault(r["group"], []).append(r["text"])
    return by_group


def splits(data_dir: str | None = None) -> tuple[dict[str, list[str]], dict[str, int]]:
    """The prompt lists (see the module docstring) and how many near-duplicates each source lost."""
    by_group = authored()
    sources = {
        "strongreject": [s.prompt for s in datasets.load_strongreject(data_dir)],
        "harmbench_val": [s.prompt for s in datasets.load_harmbench(data_dir, split="val")],
        **{f"authored_{g}": by_group[g] for g in ("harmful", "benign", "benign_instruction", "hard_negative")},
    }
    evaluation = evaluation_prompts(data_dir)
    dropped = {}
    for name, prompts in sources.items():
        bad = set(near_duplicates(prompts, evaluation))
        sources[name] = [t for i, t in enumerate(prompts) if i not in bad]
        dropped[name] = len(bad)
    rng = random.Random(0)
    harmful = sources["strongreject"] + sources["harmbench_val"] + sources["authored_harmful"]
    harmless = sources["authored_benign"] + sources["authored_benign_instruction"]
    hard = list(sources["authored_hard_negative"])
    for lst in (harmful, harmless, hard):
        rng.shuffle(lst)
    # Vectors from about 60% of each side; the rest calibrates (hard negatives only calibrate the gate).
    nh, nb = int(0.6 * len(harmful)), int(0.6 * len(harmless))
    # A logistic gate fits its own direction, so it may learn from the extraction prompts as well.
    return {"extract_harmful": harmful[:nh], "extract_harmless": harmless[:nb], "calib_harmful": harmful[nh:],
            "calib_harmless": harmless[nb:], "hard_negatives": hard, "gate_harmful": harmful,
            "gate_harmless": harmless}, dropped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inferaligner_data", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the .jsonl files")
    p.add_argument("--data", help="the shared data folder (default: ../shared/data or $GUARDRAILS_DATA)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lists, dropped = splits(args.data)
    for name, prompts in lists.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in prompts), encoding="utf-8")
        print(f"{name}: {len(prompts)}")
    print("dropped as near-duplicates of evaluation prompts: " + ", ".join(f"{k} {v}" for k, v in dropped.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
