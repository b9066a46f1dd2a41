"""Metrics, bootstrap intervals, Markdown tables, plots and the machine record of every benchmark.

>>> r = rate_ci([True, False, False, True], seed=0, key="demo")
>>> r.value, r.low <= r.value <= r.high
(0.5, True)
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "Rate",
    "rate_ci",
    "percentile",
    "summarize",
    "markdown_table",
    "machine_info",
    "write_json",
    "plot_asr_per_category",
    "plot_over_refusal_vs_asr",
    "matplotlib_available",
    "json_default",
    "fmt_ms",
]


@dataclass(frozen=True)
class Rate:
    """A proportion ``k / n`` with a percentile-bootstrap interval (None values when ``n == 0``)."""

    value: float | None
    low: float | None
    high: float | None
    k: int
    n: int
    level: float = 0.95
    n_boot: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def _bounds(self) -> tuple[float, float, float] | None:
        """``(value, low, high)``, or None when there are no samples (the three are None together)."""
        if self.value is None or self.low is None or self.high is None:
            return None
        return self.value, self.low, self.high

    def fmt(self, pct: bool = True) -> str:
        """"12.5% [3.1, 25.0] (4/32)" or "n/a (0 samples)"."""
        b = self._bounds()
        if self.n == 0 or b is None:
            return "n/a (0)"
        v, lo, hi = b
        s = 100.0 if pct else 1.0
        unit = "%" if pct else ""
        return f"{v * s:.1f}{unit} [{lo * s:.1f}, {hi * s:.1f}] ({self.k}/{self.n})"


def _rng(seed: int, key: str) -> np.random.Generator:
    # One stream per (seed, key): adding a category or a defense never changes another cell's interval.
    return np.random.default_rng([int(seed), zlib.crc32(key.encode("utf-8"))])


def rate_ci(values: Sequence[bool] | Iterable[bool], *, n_boot: int = 2000, seed: int = 0, key: str = "",
            level: float = 0.95) -> Rate:
    """Proportion of True in ``values`` with a ``level`` percentile-bootstrap interval.

    Resampling n binary outcomes with replacement and taking the mean is the same distribution as
    Binomial(n, k/n) / n, so that is how the bootstrap replicates are drawn (exact, and fast). The
    interval always contains the point estimate; ``seed`` and ``key`` make it reproducible.
    """
    vals = [bool(v) for v in values]
    n, k = len(vals), sum(vals)
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n == 0:
        return Rate(None, None, None, 0, 0, level, n_boot)
    p = k / n
    if n_boot <= 0:
        return Rate(p, p, p, k, n, level, 0)
    reps = _rng(seed, key).binomial(n, p, size=n_boot) / n
    alpha = (1 - level) / 2
    low, high = np.quantile(reps, [alpha, 1 - alpha])
    # Quantile interpolation can land a hair off p for degenerate draws; the interval must hold p.
    return Rate(p, float(min(low, p)), float(max(high, p)), k, n, level, n_boot)


def percentile(values: Sequence[float], q: float) -> float | None:
    """``q``-th percentile (0-100, linear interpolation); None for no values."""
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=float), q))


def summarize(values: Sequence[float]) -> dict[str, float | int | None]:
    """median, p95, mean, min, max and n of ``values``."""
    if len(values) == 0:
        return {"median": None, "p95": None, "mean": None, "min": None, "max": None, "n": 0}
    a = np.asarray(values, dtype=float)
    return {"median": float(np.median(a)), "p95": float(np.percentile(a, 95)), "mean": float(a.mean()),
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; ``|`` inside cells is escaped."""
    def cell(x: Any) -> str:
        return ("" if x is None else str(x)).replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(cell(h) for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON via a temporary file, so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def json_default(o: Any) -> Any:
    """``json.dumps(default=...)`` for result rows: objects with to_dict, numpy scalars, paths; repr otherwise."""
    if hasattr(o, "to_dict"):
        return o.to_dict()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, Path):
        return str(o)
    return repr(o)


# --------------------------------------------------------------------------------------------
# Machine and versions
# --------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True,
                               text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("+uncommitted-changes" if dirty else "")) if sha else None


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return None
    try:
        return version(module)
    except PackageNotFoundError:
        return None


def machine_info(device: str | None = None) -> dict[str, Any]:
    """What a reader needs to judge a number: machine, load, library versions, commit."""
    import torch

    info: dict[str, Any] = {
        "hostname_hash": format(zlib.crc32(platform.node().encode()), "08x"),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "numpy": np.__version__,
            "mllm-guardrails": _version("mllm-guardrails") or _local_version("guardrails"),
            "steering": _local_version("steering"),
        },
        "git_commit": _git_commit(),
    }
    try:
        info["load_average_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load_average_1_5_15"] = None
    try:
        pages, page = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["ram_gib"] = round(pages * page / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        info["ram_gib"] = None
    if torch.cuda.is_available():
        idx = torch.device(device).index if device and device.startswith("cuda") else torch.cuda.current_device()
        idx = 0 if idx is None else idx
        props = torch.cuda.get_device_properties(idx)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "cuda": torch.version.cuda, "count": torch.cuda.device_count()}
    else:
        info["gpu"] = None
    info["device"] = device
    return info


def _local_version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return getattr(mod, "__version__", None)


# --------------------------------------------------------------------------------------------
# Plots (optional: matplotlib may be missing)
# --------------------------------------------------------------------------------------------


def matplotlib_available() -> tuple[bool, str]:
    """(True, "") or (False, why): plots are optional and their absence is reported, never fatal."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only; never needs a display
        import matplotlib.pyplot  # noqa: F401
    except Exception as e:  # ImportError, or a broken backend
        return False, f"matplotlib not available ({type(e).__name__}: {e}); install it with `pip install matplotlib` for plots"
    return True, ""


def plot_asr_per_category(asr: Mapping[str, Mapping[str, Rate]], path: str | os.PathLike, *, title: str) -> Path:
    """Grouped bars: for each category, one bar per defense spec with its 95% interval.

    ``asr``: defense spec -> category -> Rate.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    specs = list(asr)
    cats = sorted({c for d in asr.values() for c in d})
    width = 0.8 / max(1, len(specs))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(cats) * max(1, len(specs)) ** 0.5 + 2), 4.5))
    x = np.arange(len(cats))
    for j, spec in enumerate(specs):
        vals, lo, hi = [], [], []
        for c in cats:
            r = asr[spec].get(c)
            v = r.value if r is not None and r.value is not None else float("nan")
            vals.append(100 * v)
            lo.append(100 * (v - r.low) if r is not None and r.low is not None else 0)
            hi.append(100 * (r.high - v) if r is not None and r.high is not None else 0)
        ax.bar(x + (j - (len(specs) - 1) / 2) * width, vals, width, yerr=[lo, hi], capsize=2, label=spec)
    ax.set_xticks(x, cats, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("attack success rate (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_over_refusal_vs_asr(points: Mapping[str, tuple[Rate, Rate]], path: str | os.PathLike, *, title: str) -> Path:
    """One point per defense: x = over-refusal, y = ASR, each with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for spec, (refusal, asr) in points.items():
        rb, ab = refusal._bounds(), asr._bounds()
        if rb is None or ab is None:
            continue
        (rv, rlo, rhi), (av, alo, ahi) = rb, ab
        x, y = 100 * rv, 100 * av
        ax.errorbar(x, y, xerr=[[x - 100 * rlo], [100 * rhi - x]],
                    yerr=[[y - 100 * alo], [100 * ahi - y]], fmt="o", capsize=3, label=spec)
    ax.set_xlabel("over-refusal on benign prompts (%)")
    ax.set_ylabel("attack success rate (%)")
    ax.set_xlim(-5, 105)
    ax.set_ylim(-5, 105)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def fmt_ms(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else (f"{x:.1f}" if x >= 10 else f"{x:.2f}")
