"""Prompt files for InferAligner's extraction and calibration, disjoint from every evaluation set.

    python -m benchmarks.inferaligner_data --out runs/ia-data [--data ../shared/data]

Writes (one JSON object {"prompt": ...} per line):

- ``extract_harmful.jsonl`` / ``extract_harmless.jsonl``: what the vectors are the mean difference of;
- ``calib_harmful.jsonl`` / ``calib_harmless.jsonl``: the gate's and steering calibration's prompts;
- ``hard_negatives.jsonl``: benign prompts that use dangerous words (the gate's false-positive test).

Sources: StrongREJECT (harmful; MIT) and this project's authored prompts
(``benchmarks/detector_data``: harmful, benign, benign instructions phrased like AdvBench, hard
negatives; Apache-2.0). None of JailbreakBench, HarmBench, XSTest or AdvBench is used: those are
what InferAligner is evaluated on. Splits are drawn with ``random.Random(0)``.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from benchmarks.datasets import load_strongreject

AUTHORED = Path(__file__).resolve().parent / "detector_data" / "authored_prompts.jsonl"


def splits(data_dir: str | None = None) -> dict[str, list[str]]:
    """The five prompt lists (see the module docstring)."""
    rows = [json.loads(line) for line in AUTHORED.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_group: dict[str, list[str]] = {}
    for r in rows:
        by_group.setdefault(r["group"], []).append(r["text"])
    rng = random.Random(0)
    harmful = [s.prompt for s in load_strongreject(data_dir)] + by_group["harmful"]
    harmless = by_group["benign"] + by_group["benign_instruction"]
    hard = list(by_group["hard_negative"])
    for lst in (harmful, harmless, hard):
        rng.shuffle(lst)
    # Vectors from about 60% of each side; the rest calibrates (hard negatives only calibrate the gate).
    nh, nb = int(0.6 * len(harmful)), int(0.6 * len(harmless))
    return {"extract_harmful": harmful[:nh], "extract_harmless": harmless[:nb], "calib_harmful": harmful[nh:],
            "calib_harmless": harmless[nb:], "hard_negatives": hard}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.inferaligner_data", description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for the five .jsonl files")
    p.add_argument("--data", help="the shared data folder (default: ../shared/data or $GUARDRAILS_DATA)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, prompts in splits(args.data).items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in prompts), encoding="utf-8")
        print(f"{name}: {len(prompts)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
