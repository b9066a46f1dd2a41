"""Calibrated settings of the yes/no self-judges (SelfModeration, ECSO), shipped per model.

A preset is ``presets/<defense>/<model>/config.json``: the constructor options it sets (the
threshold, the judge template) and how they were chosen (``calibration``: data, counts, rates,
command), written by ``python -m benchmarks.calibrate_judge``. :func:`threshold_at_budget` is
the choice: the threshold that flags the most answers to harmful prompts while flagging at most a
budget of the benign prompts' answers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

PRESET_ROOT = Path(__file__).resolve().parent / "presets"


def preset_names(defense: str) -> list[str]:
    folder = PRESET_ROOT / defense
    return sorted(p.name for p in folder.glob("*") if (p / "config.json").is_file()) if folder.is_dir() else []


def load_preset(defense: str, model: str) -> dict[str, Any]:
    """The preset's record; ValueError naming the presets there are when ``model`` has none."""
    path = PRESET_ROOT / defense / model / "config.json"
    if not path.is_file():
        raise ValueError(f"no {defense} preset for {model!r}; presets: {', '.join(preset_names(defense)) or 'none'} "
                         f"(calibrate one: python -m benchmarks.calibrate_judge --defense {defense} --model MODEL)")
    record = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(record.get("config"), dict):
        raise ValueError(f"{path} has no 'config' object; rewrite it with python -m benchmarks.calibrate_judge")
    return record


def write_preset(defense: str, model: str, record: dict[str, Any], root: Path | None = None) -> Path:
    folder = (root or PRESET_ROOT) / defense / model
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.json"
    path.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


@dataclass(frozen=True)
class BudgetChoice:
    """A threshold and what it does on the calibration answers."""

    threshold: float
    #: answers to harmful prompts that the model gave (not refused), and how many the judge flags
    harmful: int
    harmful_flagged: int
    #: benign prompts, and how many of their (not refused) answers the judge flags: added refusals
    benign: int
    benign_flagged: int

    @property
    def recall(self) -> float:
        return self.harmful_flagged / self.harmful if self.harmful else 0.0

    @property
    def added_refusal(self) -> float:
        return self.benign_flagged / self.benign if self.benign else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "recall": self.recall, "added_refusal": self.added_refusal}


def threshold_at_budget(harmful: Sequence[float], benign: Sequence[float], n_benign: int, max_added: float) -> BudgetChoice:
    """The threshold (``score >= threshold`` flags) that flags the most ``harmful`` scores while
    flagging at most ``floor(max_added * n_benign)`` of the ``benign`` ones; ties go to fewer benign
    flags, then to the higher threshold.

    ``harmful``: judge scores of the answers the model gave to harmful prompts (what a flag would
    stop); ``benign``: scores of its non-refused answers to benign prompts (a flag there is a new
    refusal); ``n_benign``: all benign prompts, refused ones included (over-refusal's denominator).
    """
    if not 0 <= max_added < 1:
        raise ValueError(f"max_added is a share of the benign prompts in [0, 1), got {max_added!r}")
    if n_benign < len(benign):
        raise ValueError(f"n_benign ({n_benign}) is below the number of benign scores ({len(benign)})")
    allowed = math.floor(max_added * n_benign + 1e-9)  # 0.02 * 150 is 2.9999...: allow 3
    best: tuple[tuple[int, int, float], BudgetChoice] | None = None
    # Each realisable cut flags the scores at or above one observed score; 1.0 flags (almost) nothing.
    for t in sorted({*harmful, *benign, 1.0}):
        if not 0 < t <= 1:
            continue
        fp = sum(s >= t for s in benign)
        if fp > allowed:
            continue
        tp = sum(s >= t for s in harmful)
        key = (tp, -fp, t)
        if best is None or key > best[0]:
            best = (key, BudgetChoice(float(t), len(harmful), tp, n_benign, fp))
    if best is None:  # only when more benign answers than allowed score exactly 1.0
        raise ValueError(f"no threshold flags at most {allowed} of the benign answers: {sum(s >= 1.0 for s in benign)} score 1.0")
    return best[1]
