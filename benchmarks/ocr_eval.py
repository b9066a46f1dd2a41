"""OCR accuracy and speed on real FigStep images and on hard renderings, per engine.

Measures word recall, character error rate (CER) and time per image (median, p95) on
(1) FigStep SafeBench's typographic images (ground truth: what FigStep drew, i.e.
``textwrap.fill(instruction, 15)`` then "1.\\n2.\\n3."; the wrap cuts long words, e.g.
"hospita" / "lization.", so the reference holds those pieces too) and (2) our own hard
renderings of benign and harmful texts (rotated 7-10 degrees, heavy pixel noise, light-grey
on white, and all three at once).

    python benchmarks/ocr_eval.py --engine rapidocr tesseract --limit 100 --hard 40 --out runs/ocr_eval
    python benchmarks/ocr_eval.py --engine tesseract --preprocess deskew,denoise --figstep 0 --hard 40
    python benchmarks/ocr_eval.py --limit 100 --hard 40 --out runs/ocr_speed \
        --config "now:engine=rapidocr" --config "det480:engine=rapidocr,Det.limit_side_len=480,threads=1" \
        --config "tess:engine=tesseract,psm=6"

With ``--config`` (repeatable) each named setting is its own engine, and all of them read image 1,
then image 2, ... (the order rotating per image), so a busy shared machine slows them alike;
CPU s is this process's own work (Tesseract's subprocess included), wall s includes waiting.

``ocr_cases`` returns the per-image OCR text, so the detection evaluation (a classifier on OCR
text vs. on ground-truth text) reuses exactly these reads.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import re
import statistics
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from guardrails._cli import ArgumentParser, entry_point

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image

from guardrails.data import shared_data_dir
from guardrails.ocr import OCRConfig, OCREngine, PreprocessConfig, char_error_rate, get_engine, word_recall
from guardrails.ocr.typography import default_font_path, render_typography

FIGSTEP_LIST = "\n1.\n2.\n3."
HARD_CONDITIONS = ("rotated", "noisy", "low_contrast", "combined")


@dataclass
class Case:
    """One image with the text it shows."""

    id: str
    set: str  # "figstep" or "hard:<condition>"
    label: str  # "harmful" / "benign"
    category: str
    reference: str  # everything drawn, numbered list included
    image: Image.Image | str = field(repr=False)
    text: str = ""  # the instruction or prompt alone: what a harm screen needs to see


@dataclass
class CaseOCR:
    """What an engine read from one case: the hook the detection evaluation reuses."""

    id: str
    set: str
    label: str
    category: str
    reference: str
    ocr_text: str
    word_recall: float
    text_recall: float  # word recall of the instruction alone (the "1. 2. 3." list left out)
    cer: float
    latency_ms: float
    cpu_ms: float  # CPU time of this process and its children (Tesseract runs as a subprocess)
    dropped: list[tuple[str, float]]
    engine: str
    error: str | None = None


def figstep_cases(data_dir: Path, limit: int | None = None, seed: int = 0) -> list[Case]:
    """FigStep SafeBench images with their drawn text; ``limit`` takes an even spread over categories."""
    root = data_dir / "figstep_safebench"
    rows = list(csv.DictReader(open(root / "safebench.csv", newline="", encoding="utf-8")))
    if limit is not None and limit < len(rows):
        # Round-robin over categories so a subset still covers all ten
        by_cat: dict[str, list[dict]] = {}
        for r in rows:
            by_cat.setdefault(r["category_name"], []).append(r)
        picked: list[dict] = []
        i = 0
        while len(picked) < limit:
            for cat_rows in by_cat.values():
                if i < len(cat_rows) and len(picked) < limit:
                    picked.append(cat_rows[i])
            i += 1
        rows = picked
    cases = []
    for r in rows:
        path = root / "images" / "SafeBench" / f"query_ForbidQI_{r['category_id']}_{r['task_id']}_6.png"
        cases.append(Case(id=path.stem, set="figstep", label="harmful", category=r["category_name"], reference=textwrap.fill(r["instruction"], width=15) + FIGSTEP_LIST, image=str(path), text=textwrap.fill(r["instruction"], width=15)))
    return cases


def hard_texts(data_dir: Path, n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """``n`` (label, category, text) picks, half harmful (SafeBench instructions), half benign
    (XSTest safe prompts), shuffled with ``seed``."""
    rng = random.Random(seed)
    harm = list(csv.DictReader(open(data_dir / "figstep_safebench" / "safebench.csv", newline="", encoding="utf-8")))
    xs = [r for r in csv.DictReader(open(data_dir / "xstest" / "xstest_prompts.csv", newline="", encoding="utf-8")) if r["label"] == "safe"]
    rng.shuffle(harm)
    rng.shuffle(xs)
    n_h = n // 2
    out = [("harmful", r["category_name"], r["instruction"]) for r in harm[:n_h]]
    out += [("benign", "xstest:" + r["type"], r["prompt"]) for r in xs[: n - n_h]]
    rng.shuffle(out)
    return out


def hard_cases(data_dir: Path, n: int, seed: int = 0) -> list[Case]:
    """``n`` hard renderings, conditions cycling through ``HARD_CONDITIONS``."""
    rng = random.Random(seed + 1)
    cases = []
    for i, (label, cat, text) in enumerate(hard_texts(data_dir, n, seed)):
        cond = HARD_CONDITIONS[i % len(HARD_CONDITIONS)]
        angle = rng.uniform(7.0, 10.0) * rng.choice((-1, 1))
        kw: dict = {
            "rotated": dict(rotation_deg=angle),
            "noisy": dict(noise=0.35),
            "low_contrast": dict(contrast=0.25),
            "combined": dict(rotation_deg=angle, noise=0.25, contrast=0.4),
        }[cond]
        img = render_typography(text, seed=seed + i, **kw)
        cases.append(Case(id=f"hard{i:03d}", set=f"hard:{cond}", label=label, category=cat, reference=img.info["typography"]["text"], image=img, text=text))
    return cases


def read_case(engine: OCREngine, c: Case) -> CaseOCR:
    """Read one case with ``engine``, timed (wall and CPU); a failing image is recorded with its error."""
    c0, w0 = _cpu(), time.perf_counter()
    try:
        r = engine.read(c.image)
        text, dropped, err = r.text, [(w.text, round(w.confidence, 4)) for w in r.dropped], None
    except Exception as exc:  # noqa: BLE001 - one bad image must not end a 500-image run
        text, dropped, err = "", [], f"{type(exc).__name__}: {exc}"
    ms = (time.perf_counter() - w0) * 1000.0 if err is None else float("nan")
    cpu_ms = (_cpu() - c0) * 1000.0
    return CaseOCR(
        id=c.id, set=c.set, label=c.label, category=c.category, reference=c.reference, ocr_text=text,
        word_recall=word_recall(c.reference, text), text_recall=word_recall(c.text or c.reference, text), cer=char_error_rate(c.reference, text),
        latency_ms=ms, cpu_ms=cpu_ms, dropped=dropped, engine=f"{engine.name} {engine.version}", error=err,
    )


def small_cases(data_dir: Path, n: int, seed: int = 0) -> list[Case]:
    """``n`` screenshot-like renderings: small type (16-28 px, cycling) on a 1280x720 canvas,
    three texts per image. Large FigStep type can be read at a lower resolution; this set shows
    whether a faster setting loses small text."""
    texts = hard_texts(data_dir, 3 * n, seed + 7)
    sizes = (16, 20, 24, 28)
    cases = []
    for i in range(n):
        picked = texts[3 * i : 3 * i + 3]
        text = "\n".join(t for _l, _c, t in picked)
        img = render_typography(text, size=(1280, 720), font_size=sizes[i % len(sizes)], numbered_list=0, seed=seed + i)
        label = "harmful" if any(l == "harmful" for l, _c, _t in picked) else "benign"
        cases.append(Case(id=f"small{i:03d}", set=f"small:{sizes[i % len(sizes)]}px", label=label, category=picked[0][1], reference=img.info["typography"]["text"], image=img, text=text))
    return cases


def ocr_cases(engine: OCREngine, cases: Sequence[Case], *, progress: bool = False) -> list[CaseOCR]:
    """Read every case once with ``engine``; a failing image is recorded with its error, not skipped."""
    out = []
    for k, c in enumerate(cases):
        out.append(read_case(engine, c))
        if progress and (k + 1) % 20 == 0:
            print(f"  {engine.name}: {k + 1}/{len(cases)}", file=sys.stderr, flush=True)
    return out


def ocr_cases_interleaved(engines: dict[str, OCREngine], cases: Sequence[Case], *, progress: bool = False) -> dict[str, list[CaseOCR]]:
    """Every engine reads image 1, then every engine image 2, ...; the engines' order rotates by
    one per image, so none always goes first (cold caches) or last. On a shared, noisy machine
    this spreads other jobs' load over all settings alike, unlike one setting's whole run after
    another's."""
    names = list(engines)
    out: dict[str, list[CaseOCR]] = {n: [] for n in names}
    for k, c in enumerate(cases):
        for j in range(len(names)):
            n = names[(k + j) % len(names)]
            out[n].append(read_case(engines[n], c))
        if progress and (k + 1) % 20 == 0:
            print(f"  {k + 1}/{len(cases)} images x {len(names)} settings, load {_load()}", file=sys.stderr, flush=True)
    return out


def _load() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _pct(xs: Sequence[float], p: float) -> float:
    """Nearest-rank percentile of sorted ``xs`` (nan when empty)."""
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, round(p * (len(xs) - 1))))]


def summarize(rows: Sequence[CaseOCR]) -> dict:
    """Means of recall and CER, share of images read fully (recall 1.0), wall and CPU time median and p95."""
    times = sorted(r.latency_ms for r in rows if r.error is None)
    cpu = sorted(r.cpu_ms for r in rows if r.error is None)
    return {
        "n": len(rows),
        "errors": sum(r.error is not None for r in rows),
        "word_recall": statistics.fmean(r.word_recall for r in rows),
        "text_recall": statistics.fmean(r.text_recall for r in rows),
        "full_recall_share": sum(r.word_recall >= 1.0 for r in rows) / len(rows),
        "empty_share": sum(not r.ocr_text.strip() for r in rows) / len(rows),
        "cer": statistics.fmean(r.cer for r in rows),
        "median_ms": _pct(times, 0.5),
        "p95_ms": _pct(times, 0.95),
        "median_cpu_ms": _pct(cpu, 0.5),
        "p95_cpu_ms": _pct(cpu, 0.95),
        "mean_cpu_ms": statistics.fmean(cpu) if cpu else float("nan"),
    }


def environment() -> dict:
    """Machine and package versions the figures were measured with."""
    def v(dist: str) -> str:
        try:
            return version(dist)
        except PackageNotFoundError:
            return "absent"

    cpu = platform.processor()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import pytesseract

        tess = str(pytesseract.get_tesseract_version())
    except Exception:  # noqa: BLE001 - absent engine is a fact to record, not an error
        tess = "absent"
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "packages": {d: v(d) for d in ("rapidocr", "onnxruntime", "opencv-python-headless", "pytesseract", "pillow", "numpy")},
        "tesseract": tess,
        "font": str(default_font_path()),
    }


def parse_preprocess(spec: str | None) -> PreprocessConfig | None:
    """``"default"``/None = engine default, ``"none"`` = nothing, or a comma list of
    deskew, denoise (3x3 median), denoise5, denoise-auto, autocontrast, upscale (to 1200 px), binarize."""
    if spec in (None, "default"):
        return None
    if spec == "none":
        return PreprocessConfig()
    kw: dict = {}
    for step in (s.strip() for s in spec.split(",") if s.strip()):
        if step == "deskew":
            kw["deskew"] = True
        elif step in ("denoise", "denoise3", "denoise5"):
            kw["denoise"] = 5 if step == "denoise5" else 3
        elif step == "denoise-auto":
            kw["denoise"] = "auto"
        elif step == "autocontrast":
            kw["autocontrast"] = True
        elif step == "upscale":
            kw["upscale_min_side"] = 1200
        elif step == "binarize":
            kw["binarize"] = True
        else:
            raise ValueError(f"unknown preprocessing step {step!r}; use a comma list of deskew, denoise[3|5], denoise-auto, autocontrast, upscale, binarize, or 'none'/'default'")
    return PreprocessConfig(**kw)


@dataclass
class RunConfig:
    """One named setting to measure: an engine, its preprocessing, OCRConfig fields and engine options."""

    name: str
    engine: str = "rapidocr"
    preprocess: str = "default"
    ocr: dict = field(default_factory=dict)  # OCRConfig fields, e.g. tile_above
    kwargs: dict = field(default_factory=dict)  # engine options, e.g. threads, psm, params

    def build(self) -> OCREngine:
        return get_engine(self.engine, OCRConfig(preprocess=parse_preprocess(self.preprocess), **self.ocr), **self.kwargs)

    def describe(self) -> str:
        parts = [self.engine]
        if self.preprocess != "default":
            parts.append(f"preprocess={self.preprocess}")
        parts += [f"{k}={v}" for k, v in self.ocr.items()]
        for k, v in self.kwargs.items():
            if k == "params":
                parts += [f"{pk}={pv}" for pk, pv in v.items()]
            else:
                parts.append(f"{k}={v}")
        return " ".join(parts)


_OCR_FIELDS = ("min_confidence", "tile_above", "tile_size", "tile_overlap", "full_pass_with_tiles")


def _value(text: str) -> object:
    """A setting's value: JSON (numbers, true/false, null, lists) where it parses, else the string."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_config(spec: str) -> RunConfig:
    """``NAME:key=value,key=value``. Keys: ``engine`` (rapidocr | tesseract), ``preprocess`` (as
    ``--preprocess``, steps joined with ``+``), OCRConfig fields (tile_above, min_confidence, ...),
    dotted rapidocr settings (``Det.limit_side_len=480``, passed as ``params``), and any other
    engine option (``threads=1``, ``psm=6``, ``extra_config=--oem 1``, ``use_cls=true``)."""
    name, sep, body = spec.partition(":")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"--config {spec!r}: expected NAME:key=value,... (e.g. det480:engine=rapidocr,Det.limit_side_len=480)")
    cfg = RunConfig(name=name)
    params: dict = {}
    for item in (x.strip() for x in re.split(r",(?![^\[]*\])", body) if x.strip()):  # commas inside [...] belong to a list value
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise ValueError(f"--config {spec!r}: {item!r} is not key=value")
        raw = raw.strip()
        if key == "engine":
            cfg.engine = raw
        elif key == "preprocess":
            cfg.preprocess = raw.replace("+", ",")
            parse_preprocess(cfg.preprocess)  # fail now, not minutes later
        elif key in _OCR_FIELDS:
            cfg.ocr[key] = _value(raw)
        elif "." in key:
            params[key] = _value(raw)
        else:
            cfg.kwargs[key] = raw if key == "extra_config" else _value(raw)
    if params:
        if cfg.engine != "rapidocr":
            raise ValueError(f"--config {spec!r}: dotted settings {sorted(params)} are rapidocr's; this setting's engine is {cfg.engine}")
        cfg.kwargs["params"] = params
    return cfg


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        "# OCR evaluation",
        "",
        f"Command: `{report['command']}`",
        f"Machine: {env['cpu']}, {env['cpus_usable']} usable CPUs, {env['platform']}, Python {env['python']}",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in env["packages"].items()) + f", tesseract {env['tesseract']}",
        f"Settings: {json.dumps(report['settings'])}",
        "",
        f"Load average (1 min) at start / end: {report['load_start']} / {report['load_end']} (other jobs share these CPUs: wall times include waiting; CPU s is this process's own work)."
        + (" Settings were interleaved image by image." if report.get("interleaved") else ""),
        "",
    ]
    configs = report.get("configs") or {}
    if configs:
        lines += ["| setting | what |", "|---|---|"] + [f"| {k} | {v} |" for k, v in configs.items()] + [""]
    lines += [
        "| setting | engine | preprocess | set | n | word recall | instruction recall | full-recall share | empty share | CER | median s | p95 s | median CPU s | p95 CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in report["summary"]:
        lines.append(
            f"| {s.get('config', s['engine'])} | {s['engine']} | {s['preprocess']} | {s['set']} | {s['n']} | {s['word_recall']:.3f} | {s['text_recall']:.3f} | {s['full_recall_share']:.2f} | "
            f"{s['empty_share']:.2f} | {s['cer']:.3f} | {s['median_ms'] / 1000:.2f} | {s['p95_ms'] / 1000:.2f} | {s['median_cpu_ms'] / 1000:.2f} | {s.get('p95_cpu_ms', float('nan')) / 1000:.2f} |"
        )
    return "\n".join(lines) + "\n"


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    ap = ArgumentParser(prog="python -m benchmarks.ocr_eval", description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="data folder holding figstep_safebench/ and xstest/ (default: guardrails.data.shared_data_dir())")
    ap.add_argument("--engine", nargs="+", default=["rapidocr", "tesseract"], help="engines to compare")
    ap.add_argument("--limit", "--figstep", dest="limit", type=int, default=100, help="FigStep images per engine (0 = none; spread over categories)")
    ap.add_argument("--hard", type=int, default=40, help="hard renderings per engine (0 = none)")
    ap.add_argument("--small", type=int, default=0, help="small-type screenshot renderings (1280x720, 16-28 px type; 0 = none)")
    ap.add_argument("--preprocess", nargs="+", default=["default"], help="preprocessing configs to compare: default | none | comma list of deskew,denoise,denoise5,denoise-auto,autocontrast,upscale,binarize")
    ap.add_argument("--threads", type=int, default=None, help="rapidocr onnxruntime threads (default: the engine's)")
    ap.add_argument(
        "--config", action="append", default=[], metavar="NAME:KEY=VALUE,...",
        help="a named setting to measure (repeatable; replaces --engine/--preprocess): e.g. 'det480:engine=rapidocr,Det.limit_side_len=480,threads=1' "
        "or 'tess6:engine=tesseract,psm=6,extra_config=--oem 1'; settings are read interleaved, image by image",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write OUT.json (per-image rows and summary) and OUT.md")
    args = ap.parse_args(argv)

    try:
        for spec in args.preprocess:
            parse_preprocess(spec)  # fail before minutes of work
        if args.config:
            configs = [parse_config(spec) for spec in args.config]
        else:
            configs = [
                RunConfig(name=name if len(args.preprocess) == 1 else f"{name}[{spec}]", engine=name, preprocess=spec,
                          kwargs={"threads": args.threads} if name == "rapidocr" and args.threads else {})
                for name in args.engine for spec in args.preprocess
            ]
    except ValueError as exc:
        ap.error(str(exc))
    if len({c.name for c in configs}) != len(configs):
        ap.error("--config names must differ")
    data = shared_data_dir(args.data)
    if data is None or not (data / "figstep_safebench").is_dir():
        ap.error("data folder with figstep_safebench/ not found; pass --data DIR or set GUARDRAILS_DATA")
    cases: list[Case] = []
    if args.limit:
        cases += figstep_cases(data, args.limit)
    if args.hard:
        cases += hard_cases(data, args.hard, args.seed)
    if args.small:
        cases += small_cases(data, args.small, args.seed)
    if not cases:
        ap.error("nothing to evaluate: --limit and --hard are both 0")

    load_start = _load()
    engines: dict[str, OCREngine] = {}
    for c in configs:
        engine = c.build()
        engine.read(render_typography("warm up"))  # first call loads models: not a per-image cost
        engines[c.name] = engine
    t0 = time.perf_counter()
    results = ocr_cases_interleaved(engines, cases, progress=True)
    print(f"{len(cases)} images x {len(engines)} settings in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    rows_all: list[dict] = []
    summary: list[dict] = []
    for c in configs:
        rows = results[c.name]
        engine = engines[c.name]
        for r in rows:
            rows_all.append({**asdict(r), "preprocess": c.preprocess, "config": c.name})
        sets = sorted({r.set for r in rows}, key=lambda s: (s != "figstep", s))
        groups = [(s, [r for r in rows if r.set == s]) for s in sets]
        for prefix in ("hard", "small"):
            sub = [r for r in rows if r.set.startswith(prefix + ":")]
            if sub:
                groups.append((f"{prefix}:all", sub))
        for s, rs in groups:
            summary.append({"config": c.name, "engine": f"{engine.name} {engine.version}", "preprocess": c.preprocess, "set": s, **summarize(rs)})
    order = {s: i for i, s in enumerate(["figstep", "hard:all", "small:all"])}
    summary.sort(key=lambda s: (order.get(s["set"], 3), s["set"]))  # one block per image set: settings side by side

    report = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else " ".join(["ocr_eval.py", *argv]),
        "environment": environment(),
        "settings": {"limit": args.limit, "hard": args.hard, "small": args.small, "seed": args.seed, "threads": args.threads, "preprocess": args.preprocess},
        "configs": {c.name: c.describe() for c in configs},
        "interleaved": True,
        "load_start": load_start,
        "load_end": _load(),
        "summary": summary,
        "rows": rows_all,
    }
    md = markdown(report)
    print(md)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
        out.with_suffix(".md").write_text(md)
        print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
