"""Names of the direction methods, apart from :mod:`steering.extract` so the command line can list
them without importing torch and transformers (``python -m steering`` decides on HF_HUB_OFFLINE first)."""

from __future__ import annotations

from typing import Literal

Method = Literal["mean_diff", "paired_mean_diff", "pca"]
METHODS: tuple[str, ...] = ("mean_diff", "paired_mean_diff", "pca")
