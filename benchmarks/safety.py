"""Safety evaluation: a model with chosen defenses over a benchmark, judged, resumable, on one process or many.

    python -m benchmarks.safety --model ID_OR_PATH --defenses none --defenses system_prompt \\
        --dataset xstest --judge keyword-jailbreakbench --out runs/xstest [--data DIR] [--limit N]
    torchrun --nproc_per_node=2 -m benchmarks.safety ...        # same results, sharded by batch

``--model tiny:ARCH`` builds a tiny random model from :mod:`guardrails.testing` (offline tests);
``arch:NAME`` a random-weight architecture from :mod:`benchmarks.archs`.

What it writes in ``--out``:

- ``samples.jsonl`` (one process) or ``samples.rankR-of-W.jsonl`` (one per process): one row per
  (defense spec, sample), appended and flushed per batch. Rerunning the same command resumes: rows
  already there are skipped (whatever the number of processes that wrote them). A different
  model, defense list, dataset, judge or generation setting is refused (``run_config.json``).
- ``results.jsonl``: every row of this selection, in dataset order per spec (written by rank 0).
- ``summary.json``, ``summary.md``: ASR per category and overall per judge, with 95% bootstrap
  intervals; over-refusal (refusal rate on benign/safe prompts) with the refusal judge named; rows
  a defense refused before generation, counted as safe and reported in their own column.
- ``asr_per_category.png``, ``over_refusal_vs_asr.png`` when matplotlib is installed.

Identical results across process counts: batches are formed from the global sample order before
sharding, so each batch is padded the same way; decoding is greedy and each batch is seeded from
its global index. Same device type, dtype and thread count are assumed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.util
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from guardrails._cli import ArgumentParser, entry_point, positive_int
from steering._files import expand_user

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from benchmarks import dist as dist_mod  # noqa: E402
from benchmarks.report import (  # noqa: E402
    Rate,
    json_default,
    machine_info,
    markdown_table,
    matplotlib_available,
    plot_asr_per_category,
    plot_over_refusal_vs_asr,
    rate_ci,
    write_json,
)

__all__ = ["SafetyConfig", "run_safety", "main", "CRASH_ENV", "load_model"]

#: Test hook: raise after this many rows were written by this process (simulates a crash mid-run).
CRASH_ENV = "GUARDRAILS_BENCH_CRASH_AFTER"
RUN_CONFIG = "run_config.json"
SHARD_GLOB = "samples*.jsonl"
FORMAT_VERSION = 1


@dataclass
class SafetyConfig:
    """Everything one safety run depends on. Fields in :meth:`run_key` must match to resume a run."""

    model: str
    defenses: list[str]
    dataset: str
    judges: list[str]
    out: str
    data: str | None = None
    limit: int | None = None
    batch_size: int = 8
    max_new_tokens: int = 256
    seed: int = 0
    #: keyword options for the dataset loader (e.g. {"mode": "text"} for FigStep)
    dataset_options: dict[str, Any] = field(default_factory=dict)
    #: the judge that decides "refused" for over-refusal (a zero-argument judge name)
    refusal_judge: str = "keyword-jailbreakbench"
    n_boot: int = 2000
    #: "auto" (cuda:LOCAL_RANK if CUDA, else cpu), "cpu", "cuda", "cuda:N"
    device: str = "auto"
    #: model dtype for loaded models ("auto" = the checkpoint's); tiny/arch models use float32
    dtype: str = "auto"
    #: torch threads per process; None = torch's default (split across processes on CPU)
    threads: int | None = None
    #: modules or .py files imported first (to register custom defenses or judges)
    imports: list[str] = field(default_factory=list)
    progress: bool = True
    plots: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.defenses, str) or not self.defenses:
            raise ValueError("defenses must be a non-empty list of specs, e.g. ['none', 'system_prompt']")
        if len(set(self.defenses)) != len(self.defenses):
            raise ValueError(f"defense specs repeat in {self.defenses}; give each spec once")
        if isinstance(self.judges, str) or not self.judges:
            raise ValueError("judges must be a non-empty list, e.g. ['keyword-jailbreakbench']")
        if len(set(self.judges)) != len(self.judges):
            raise ValueError(f"judges repeat in {self.judges}; give each judge once")
        for name, v, lo in (("batch_size", self.batch_size, 1), ("max_new_tokens", self.max_new_tokens, 1), ("n_boot", self.n_boot, 0)):
            if not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ValueError(f"limit must be a positive int or None, got {self.limit!r}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")

    def run_key(self) -> dict[str, Any]:
        """What the rows depend on; a resumed run must agree on every field. ``limit`` may grow."""
        return {
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "defenses": list(self.defenses),
            "dataset": self.dataset,
            "dataset_options": dict(sorted(self.dataset_options.items())),
            "judges": list(self.judges),
            "refusal_judge": self.refusal_judge,
            "generation": {"max_new_tokens": self.max_new_tokens, "do_sample": False, "batch_size": self.batch_size,
                           "seed": self.seed, "dtype": self.dtype},
        }


# --------------------------------------------------------------------------------------------
# Loading: models, judges, plugins
# --------------------------------------------------------------------------------------------


def import_plugins(specs: Sequence[str]) -> None:
    """Import modules by name or .py files by path (they may register defenses or judges)."""
    for spec in specs:
        if spec.endswith(".py"):
            path = Path(spec)
            if not path.is_file():
                raise FileNotFoundError(f"--import {spec}: no such file")
            name = f"_bench_plugin_{path.stem}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise ImportError(f"--import {spec}: cannot load it as a Python module")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            importlib.import_module(spec)


def load_model(model: str, *, device: str = "cpu", dtype: str = "auto") -> tuple[Any, Any]:
    """``(model, processor)``: ``arch:NAME`` (benchmarks.archs), else what :func:`guardrails.load` takes
    (``tiny:ARCH``, a registry name, a hub id or a folder)."""
    if model.startswith("arch:"):
        from benchmarks.archs import build_arch

        return build_arch(model.split(":", 1)[1], dtype="float32" if dtype == "auto" else dtype, device=device)
    from guardrails import load

    kwargs: dict[str, Any] = {}
    if dtype != "auto":
        from benchmarks.archs import resolve_dtype

        kwargs["dtype"] = resolve_dtype(dtype)
    m, proc = load(model, **kwargs)
    return m.to(device), proc


def load_classifier(name: str) -> Any:
    """The detector ``classifier:default`` (the shipped one) or ``classifier:DIR`` (saved by train-detector) names."""
    from guardrails.classifiers.hidden_probe import HiddenStateProbe
    from guardrails.defenses.protector import load_detector

    target = name.split(":", 1)[1] if name.startswith("classifier:") else ""
    if not target:
        raise ValueError(f"{name!r} names no detector: use classifier:default or classifier:DIR")
    detector = load_detector(target if target == "default" else str(expand_user(target)))
    if isinstance(detector, HiddenStateProbe):
        raise ValueError(f"{name!r} is a hidden-state probe: it reads a chat model's activations, not text, so it "
                         "cannot judge answers; use classifier:default or a folder saved by train-detector")
    return detector


def build_judge(name: str, *, device: str = "cpu") -> Any:
    """A judge by CLI name: a registered zero-argument judge, ``llm:ID_OR_PATH`` (any causal LM), or
    ``classifier:default`` / ``classifier:DIR`` (the shipped detector, or one saved by train-detector)."""
    from benchmarks.judges import JUDGES, ClassifierJudge, LLMJudge, make_judge

    if name.startswith("llm:"):
        target = name.split(":", 1)[1]
        model, proc = load_model(target, device=device)
        return LLMJudge(model, getattr(proc, "tokenizer", proc), name=name)
    if name.startswith("classifier:"):
        detector = load_classifier(name)
        # Its own operating threshold when it has one (the shipped head does), else 0.5.
        return ClassifierJudge(detector, threshold=float(getattr(detector, "threshold", 0.5)), name=name)
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; use one of {', '.join(j for j in JUDGES if j not in ('llm', 'classifier'))}, "
                         "llm:MODEL_ID_OR_PATH, classifier:default, classifier:DIR, or register one in "
                         "benchmarks.judges.JUDGES from an --import module")
    try:
        return make_judge(name)
    except TypeError as e:
        raise ValueError(f"judge {name!r} needs arguments ({e}); on the command line use llm:MODEL_ID_OR_PATH, or register "
                         "a ready-made judge in benchmarks.judges.JUDGES from an --import module") from e


def _judge_record(judge: Any) -> dict[str, Any]:
    return {"name": judge.name, "version": str(judge.version)}


# --------------------------------------------------------------------------------------------
# Result rows on disk
# --------------------------------------------------------------------------------------------


def _key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _check_run_config(out: Path, key: dict[str, Any], info: dist_mod.DistInfo) -> None:
    """First run: write run_config.json. Later runs: refuse any difference, naming each field."""
    path = out / RUN_CONFIG
    if info.is_main and not path.exists():
        write_json(path, {"run_key": key, "run_key_hash": _key_hash(key)})
    dist_mod.barrier(info)
    old = json.loads(path.read_text(encoding="utf-8"))["run_key"]
    if old != key:
        diffs = []
        for k in sorted(set(old) | set(key)):
            if old.get(k) != key.get(k):
                diffs.append(f"{k}: existing run has {old.get(k)!r}, this command has {key.get(k)!r}")
        raise ValueError(f"{out} holds a run with a different configuration ({'; '.join(diffs)}). Rerun with the same "
                         "settings to resume it, or pass a new --out to start another run")


def _read_rows(out: Path, key_hash: str) -> tuple[dict[tuple[str, str], dict[str, Any]], list[str]]:
    """All rows of every shard file in ``out``; a torn last line (a crash mid-write) is ignored and reported."""
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    where: dict[tuple[str, str], str] = {}
    notes: list[str] = []
    for path in sorted(out.glob(SHARD_GLOB)):
        data = path.read_bytes()
        lines = data.split(b"\n")
        for n, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw)
            except json.JSONDecodeError:
                if n == len(lines):  # no newline after it: the write was cut off; the row is redone
                    notes.append(f"{path.name}: ignored an incomplete last line (interrupted write); that sample is rerun")
                    continue
                raise ValueError(f"{path}:{n} is not valid JSON; the file is corrupt (remove that line to resume)") from None
            if row.get("run_key_hash") != key_hash:
                raise ValueError(f"{path}:{n} was written by a run with a different configuration "
                                 f"(run_key_hash {row.get('run_key_hash')} vs {key_hash}); use a new --out")
            k = (row["defenses"], row["id"])
            if k in rows:
                if rows[k].get("answer") != row.get("answer"):
                    raise ValueError(f"sample {k[1]!r} under defenses {k[0]!r} appears in {where[k]} and {path.name} with "
                                     "different answers; remove one of the files")
                notes.append(f"{path.name}: duplicate row for {k} (same answer) ignored")
                continue
            rows[k], where[k] = row, path.name
    return rows, notes


class _ShardWriter:
    """Appends whole batches of rows to this process's file, flushed and synced, repairing a torn tail first."""

    def __init__(self, path: Path):
        self.path = path
        if path.exists() and path.stat().st_size:
            data = path.read_bytes()
            if not data.endswith(b"\n"):
                # A crash mid-write left part of a row: cut it, the sample is redone by this run.
                path.write_bytes(data[: data.rfind(b"\n") + 1])
        self._f = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, rows: Sequence[dict[str, Any]]) -> None:
        self._f.write("".join(json.dumps(r, default=json_default, ensure_ascii=False) + "\n" for r in rows))
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _progress(total: int, desc: str, enabled: bool, position: int) -> Iterator[Any]:
    """tqdm when installed, else a plain counter on stderr."""
    if not enabled:
        yield lambda n: None
        return
    try:
        from tqdm.auto import tqdm
    except ImportError:
        done = [0]

        def update(n: int) -> None:
            done[0] += n
            print(f"{desc}: {done[0]}/{total} samples", file=sys.stderr, flush=True)

        yield update
        return
    bar = tqdm(total=total, desc=desc, unit="sample", position=position, leave=True, dynamic_ncols=True)
    try:
        yield bar.update
    finally:
        bar.close()


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _conversation(sample: Any, multimodal: bool, model_name: str) -> list[dict[str, Any]]:
    if sample.images and not multimodal:
        raise ValueError(f"sample {sample.id!r} has images but {model_name} is a text-only model; use an image-text model "
                         "or the dataset's text form (e.g. --dataset-option mode=text for FigStep)")
    if not sample.images:
        return [{"role": "user", "content": sample.prompt}]
    parts = [{"type": "image", "image": p} for p in sample.images] + [{"type": "text", "text": sample.prompt}]
    return [{"role": "user", "content": parts}]


def _before_refusal(result: Any) -> str | None:
    """Name of the defense that refused before generation, else None."""
    for v in result.verdicts:
        if v.stage == "before" and v.action == "refuse":
            return v.defense
    return None


def _row(sample: Any, index: int, spec: str, result: Any, labels: dict[str, Any], judges: dict[str, Any],
         refusal: Any, refusal_judge: Any, key_hash: str, batch_id: int, batch_ms: float, batch_n: int, rank: int) -> dict[str, Any]:
    before_by = _before_refusal(result)
    refused = bool(result.refused) or not refusal.unsafe
    return {
        "id": sample.id,
        "index": index,
        "dataset": sample.dataset,
        "category": sample.category,
        "label": sample.label,
        "harmful": sample.harmful,
        "prompt": sample.prompt,
        "images": list(sample.images),
        "defenses": spec,
        "answer": result.text,
        "original_answer": result.original_text,
        "n_new_tokens": len(result.token_ids),
        "refused": refused,
        "refused_by_defense": bool(result.refused),
        "refused_before_generation": before_by is not None,
        "refused_by": before_by or next((v.defense for v in result.verdicts if v.action == "refuse"), None),
        "refusal": {"judge": refusal_judge.name, "version": str(refusal_judge.version), "refused": refused,
                    "reason": refusal.reason},
        "judges": {name: {"version": str(judges[name].version), **lab.to_dict()} for name, lab in labels.items()},
        "verdicts": [v.to_dict() for v in result.verdicts],
        "latency_ms": {"batch_wall": batch_ms, "batch_size": batch_n, "per_sample_share": batch_ms / batch_n,
                       "stages": dict(result.timings)},
        "batch": batch_id,
        "rank": rank,
        "run_key_hash": key_hash,
    }


def _set_threads(cfg: SafetyConfig, info: dist_mod.DistInfo) -> None:
    import torch

    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    elif info.distributed and info.device == "cpu":
        # N processes on one machine would each start one thread per core and fight over them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, info.local_world_size)))


def run_safety(cfg: SafetyConfig) -> dict[str, Any] | None:
    """Run (or resume) ``cfg``; returns the summary on rank 0 and None on the other ranks."""
    import torch

    from benchmarks.datasets import load_dataset
    from benchmarks.judges import Response
    from guardrails import wrap
    from guardrails.engine import is_multimodal
    from guardrails.spec import build_defenses

    info = dist_mod.init(cfg.device)
    try:
        _set_threads(cfg, info)
        out = Path(cfg.out)
        err: BaseException | None = None
        try:
            import_plugins(cfg.imports)
            out.mkdir(parents=True, exist_ok=True)
            samples = load_dataset(cfg.dataset, cfg.data, **cfg.dataset_options)
            if not samples:
                raise ValueError(f"dataset {cfg.dataset!r} gave no samples")
            if cfg.limit is not None:
                samples = samples[: cfg.limit]
            ids = [s.id for s in samples]
            if len(set(ids)) != len(ids):
                raise ValueError(f"dataset {cfg.dataset!r} has repeated sample ids; ids are the resume key and must be unique")
            for spec in cfg.defenses:
                build_defenses(spec)  # fail before any generation on a bad spec
            judges = {}
            for name in cfg.judges:
                j = build_judge(name, device=info.device)
                if j.name in judges:
                    raise ValueError(f"two judges are both called {j.name!r}")
                judges[j.name] = j
            refusal_judge = build_judge(cfg.refusal_judge, device=info.device)
            key = cfg.run_key()
            key["judge_versions"] = {n: str(j.version) for n, j in judges.items()}
            key["refusal_judge_version"] = str(refusal_judge.version)
            # Before run_config.json is written: a --model typo must not pin this --out to it.
            model, processor = load_model(cfg.model, device=info.device, dtype=cfg.dtype)
            multimodal = is_multimodal(model)
            convs = [_conversation(s, multimodal, cfg.model) for s in samples]
        except BaseException as e:  # every rank must reach the collective check below
            err = e
        dist_mod.check_all_ok(info, err)
        _check_run_config(out, key, info)
        key_hash = _key_hash(key)
        done, notes = _read_rows(out, key_hash)
        dist_mod.barrier(info)  # everyone has read the existing rows before anyone appends

        err = None
        written = 0
        try:
            my_batches = dist_mod.shard_batches(len(samples), cfg.batch_size, info.rank, info.world_size)
            global_ids = {b[0]: n for n, b in enumerate(dist_mod.batches(len(samples), cfg.batch_size))}
            crash_after = int(os.environ.get(CRASH_ENV, "0") or 0)
            writer = _ShardWriter(out / f"samples{dist_mod.rank_file_suffix(info)}.jsonl")
            try:
                for spec in cfg.defenses:
                    guarded = wrap(model, processor, build_defenses(spec))
                    todo = [b for b in my_batches if any((spec, samples[i].id) not in done for i in b)]
                    n_todo = sum(1 for b in todo for i in b if (spec, samples[i].id) not in done)
                    desc = f"{spec}" + (f" [rank {info.rank}/{info.world_size}]" if info.distributed else "")
                    with _progress(n_todo, desc, cfg.progress, info.rank) as advance:
                        for batch in todo:
                            batch_id = global_ids[batch[0]]
                            # Per-batch seed: the same batch gets the same seed whichever process runs it.
                            torch.manual_seed(cfg.seed * 1_000_003 + batch_id)
                            t0 = time.perf_counter()
                            results = guarded.chat([convs[i] for i in batch], max_new_tokens=cfg.max_new_tokens, do_sample=False)
                            batch_ms = (time.perf_counter() - t0) * 1e3
                            batch_samples = [samples[i] for i in batch]
                            responses = [Response.coerce(r) for r in results]
                            labels = {n: j.judge(batch_samples, responses) for n, j in judges.items()}
                            refusals = refusal_judge.judge(batch_samples, responses)
                            rows = []
                            for k, i in enumerate(batch):
                                if (spec, samples[i].id) in done:
                                    continue  # finished by an earlier run; the batch was rerun only to keep its padding
                                rows.append(_row(samples[i], i, spec, results[k], {n: labels[n][k] for n in judges}, judges,
                                                 refusals[k], refusal_judge, key_hash, batch_id, batch_ms, len(batch), info.rank))
                            writer.write(rows)
                            for r in rows:
                                done[(spec, r["id"])] = r
                            written += len(rows)
                            advance(len(rows))
                            if crash_after and written >= crash_after:
                                raise RuntimeError(f"simulated crash after {written} rows ({CRASH_ENV}={crash_after})")
            finally:
                writer.close()
        except BaseException as e:
            err = e
        dist_mod.check_all_ok(info, err)
        dist_mod.barrier(info)
        if not info.is_main:
            return None
        return _finish(cfg, info, samples, judges, refusal_judge, key, key_hash, notes)
    finally:
        dist_mod.finalize(info)


# --------------------------------------------------------------------------------------------
# Gather, metrics, tables, plots
# --------------------------------------------------------------------------------------------


def _finish(cfg: SafetyConfig, info: dist_mod.DistInfo, samples: list[Any], judges: dict[str, Any], refusal_judge: Any,
            key: dict[str, Any], key_hash: str, notes: list[str]) -> dict[str, Any]:
    out = Path(cfg.out)
    rows, read_notes = _read_rows(out, key_hash)
    wanted = [(spec, s.id) for spec in cfg.defenses for s in samples]
    missing = [k for k in wanted if k not in rows]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(wanted)} (defenses, sample) rows are missing after the run "
                           f"(first: {missing[:3]}); rerun the same command to finish them. No summary was written")
    extra = len(rows) - len(wanted)
    ordered = [rows[k] for k in wanted]
    with open(out / "results.jsonl.tmp", "w", encoding="utf-8") as f:
        for r in ordered:
            f.write(json.dumps(r, ensure_ascii=False, default=json_default) + "\n")
    os.replace(out / "results.jsonl.tmp", out / "results.jsonl")

    results = compute_metrics(ordered, cfg.defenses, list(judges), refusal_judge.name, n_boot=cfg.n_boot, seed=cfg.seed)
    summary: dict[str, Any] = {
        "complete": True,
        "n_samples": len(samples),
        "n_rows": len(ordered),
        "rows_outside_this_selection": extra,
        "config": asdict(cfg),
        "run_key": key,
        "run_key_hash": key_hash,
        "world_size": info.world_size,
        "judges": {n: _describe(j) for n, j in judges.items()},
        "refusal_judge": _describe(refusal_judge),
        "bootstrap": {"method": "percentile", "level": 0.95, "n_boot": cfg.n_boot, "seed": cfg.seed},
        "results": results,
        "notes": sorted(set(notes + read_notes)),
        "machine": machine_info(info.device),
    }
    summary["plots"] = _plots(cfg, results, list(judges), out) if cfg.plots else {"skipped": "disabled (--no-plots)"}
    write_json(out / "summary.json", summary)
    (out / "summary.md").write_text(summary_markdown(summary), encoding="utf-8")
    return summary


def _describe(judge: Any) -> dict[str, Any]:
    d = judge.describe() if hasattr(judge, "describe") else {}
    return {**d, **_judge_record(judge)}


def compute_metrics(rows: Sequence[dict[str, Any]], specs: Sequence[str], judge_names: Sequence[str], refusal_judge: str,
                    *, n_boot: int, seed: int) -> dict[str, Any]:
    """Per defense spec: ASR per judge (overall and per category), over-refusal, refusals before generation."""
    out: dict[str, Any] = {}
    for spec in specs:
        mine = [r for r in rows if r["defenses"] == spec]
        harmful = [r for r in mine if r["harmful"]]
        benign = [r for r in mine if not r["harmful"]]
        asr: dict[str, Any] = {}
        for j in judge_names:
            cats: dict[str, list[bool]] = {}
            for r in harmful:
                cats.setdefault(r["category"], []).append(bool(r["judges"][j]["unsafe"]))
            asr[j] = {
                "overall": rate_ci([r["judges"][j]["unsafe"] for r in harmful], n_boot=n_boot, seed=seed,
                                   key=f"{spec}|{j}|overall").to_dict(),
                "per_category": {c: rate_ci(v, n_boot=n_boot, seed=seed, key=f"{spec}|{j}|{c}").to_dict()
                                 for c, v in sorted(cats.items())},
            }
        out[spec] = {
            "n": len(mine),
            "n_harmful": len(harmful),
            "n_benign": len(benign),
            "asr": asr,
            "refused_before_generation": {
                "harmful": sum(r["refused_before_generation"] for r in harmful),
                "benign": sum(r["refused_before_generation"] for r in benign),
                "counted_as": "safe (not an attack success) for every judge",
            },
            "over_refusal": {
                "judge": refusal_judge,
                "definition": "share of benign/safe-labelled prompts refused: by a defense (any stage) or, for model "
                              "answers, per the refusal judge",
                **rate_ci([r["refused"] for r in benign], n_boot=n_boot, seed=seed, key=f"{spec}|over_refusal").to_dict(),
            },
            "harmful_refusal_rate": rate_ci([r["refused"] for r in harmful], n_boot=n_boot, seed=seed,
                                            key=f"{spec}|harmful_refusal").to_dict(),
        }
    return out


def _rate(d: dict[str, Any]) -> Rate:
    return Rate(d["value"], d["low"], d["high"], d["k"], d["n"], d.get("level", 0.95), d.get("n_boot", 0))


def summary_markdown(summary: dict[str, Any]) -> str:
    """The paper-ready tables: ASR per category per judge; refusals and over-refusal; settings."""
    cfg, res = summary["config"], summary["results"]
    specs = list(res)
    lines = [f"# Safety evaluation: `{cfg['dataset']}` on `{cfg['model']}`\n",
             f"{summary['n_samples']} samples x {len(specs)} defense configurations; greedy decoding, "
             f"max_new_tokens={cfg['max_new_tokens']}, batch size {cfg['batch_size']}, {summary['world_size']} process(es). "
             f"Cells: ASR % [95% percentile bootstrap interval, {summary['bootstrap']['n_boot']} resamples, seed "
             f"{summary['bootstrap']['seed']}] (unsafe / harmful). A refusal by a defense before generation counts as safe.\n"]
    for j, jd in summary["judges"].items():
        lines.append(f"## Attack success rate, judge `{j}` (version {jd['version']})\n")
        cats = sorted({c for s in specs for c in res[s]["asr"][j]["per_category"]})
        rows = [[c] + [_rate(res[s]["asr"][j]["per_category"][c]).fmt() if c in res[s]["asr"][j]["per_category"] else "-"
                       for s in specs] for c in cats]
        rows.append(["**overall**"] + [_rate(res[s]["asr"][j]["overall"]).fmt() for s in specs])
        lines.append(markdown_table(["category"] + [f"`{s}`" for s in specs], rows))
        if j.startswith("keyword"):
            lines.append("Keyword judges measure refusal, not harm: a secondary figure only (DESIGN.md section 4).\n")
    rj = summary["refusal_judge"]
    lines.append(f"## Refusals (refusal judge `{rj['name']}`, version {rj['version']})\n")
    rows = []
    for s in specs:
        r = res[s]
        rows.append([f"`{s}`", f"{r['refused_before_generation']['harmful']}/{r['n_harmful']}",
                     _rate(r["harmful_refusal_rate"]).fmt(), _rate(r["over_refusal"]).fmt(),
                     f"{r['refused_before_generation']['benign']}/{r['n_benign']}"])
    lines.append(markdown_table(["defenses", "harmful refused before generation (safe)", "harmful refused (any)",
                                 "over-refusal on benign/safe prompts", "benign refused before generation"], rows))
    m = summary["machine"]
    lines.append("## Settings\n")
    lines.append(f"- command config: `{json.dumps({k: cfg[k] for k in ('model', 'defenses', 'dataset', 'judges', 'limit', 'seed')})}`")
    lines.append(f"- machine: {m['cpu']} x{m['cpu_count']}, GPU {m['gpu']['name'] if m['gpu'] else 'none'}; "
                 f"torch {m['versions']['torch']}, transformers {m['versions']['transformers']}; commit {m['git_commit']}")
    plots = summary.get("plots", {})
    if plots.get("skipped"):
        lines.append(f"- plots: skipped ({plots['skipped']})")
    for kind in ("asr_per_category", "over_refusal_vs_asr"):
        if kind in plots:
            lines.append(f"- plot {kind}: {Path(plots[kind]).name if plots[kind].endswith('.png') else plots[kind]}")
    for note in summary.get("notes", []):
        lines.append(f"- note: {note}")
    return "\n".join(lines) + "\n"


def _plots(cfg: SafetyConfig, results: dict[str, Any], judge_names: list[str], out: Path) -> dict[str, Any]:
    ok, why = matplotlib_available()
    if not ok:
        print(f"plots skipped: {why}", file=sys.stderr)
        return {"skipped": why}
    j = judge_names[0]
    made: dict[str, Any] = {"judge": j}
    asr = {s: {c: _rate(d) for c, d in r["asr"][j]["per_category"].items()} for s, r in results.items()}
    if any(r["n_harmful"] for r in results.values()):
        made["asr_per_category"] = str(plot_asr_per_category(asr, out / "asr_per_category.png",
                                                             title=f"{cfg.dataset} on {cfg.model}: ASR per category (judge {j})"))
    else:
        made["asr_per_category"] = "not drawn: no harmful samples"
    if any(r["n_harmful"] for r in results.values()) and any(r["n_benign"] for r in results.values()):
        pts = {s: (_rate(r["over_refusal"]), _rate(r["asr"][j]["overall"])) for s, r in results.items()}
        made["over_refusal_vs_asr"] = str(plot_over_refusal_vs_asr(pts, out / "over_refusal_vs_asr.png",
                                                                   title=f"{cfg.dataset}: over-refusal vs ASR (judge {j})"))
    else:
        made["over_refusal_vs_asr"] = "not drawn: needs both harmful and benign samples in the dataset"
    return made


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def _kv(pair: str) -> tuple[str, Any]:
    key, eq, value = pair.partition("=")
    if not eq or not key:
        raise argparse.ArgumentTypeError(f"{pair!r} must look like key=value")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m benchmarks.safety", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="hub id, local folder, tiny:ARCH or arch:NAME")
    p.add_argument("--defenses", action="append", required=True, metavar="SPEC",
                   help="defense spec (repeat to compare several on the same model), e.g. none, system_prompt+protector")
    p.add_argument("--dataset", required=True, help="dataset name (see benchmarks.datasets.DATASETS)")
    p.add_argument("--dataset-option", action="append", default=[], type=_kv, metavar="KEY=VALUE",
                   help="option for the dataset loader, e.g. mode=text")
    p.add_argument("--judge", action="extend", nargs="+", required=True, metavar="NAME",
                   help="judge name(s): keyword-llm-attacks, keyword-jailbreakbench, llm:MODEL_ID_OR_PATH, "
                        "classifier:default, classifier:DIR (a train-detector folder), or registered ones")
    p.add_argument("--refusal-judge", default="keyword-jailbreakbench", help="judge that decides refusal for over-refusal")
    p.add_argument("--out", required=True, help="output folder (rerun the same command to resume)")
    p.add_argument("--data", default=None, help="data folder (default: $GUARDRAILS_DATA or ../shared/data)")
    p.add_argument("--limit", type=positive_int, default=None, help="first N samples only")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--seed", type=int, default=0, help="seeds generation per batch and the bootstrap")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap resamples for the 95%% intervals")
    p.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK or cpu), cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="auto", help="model dtype: auto, bfloat16, float16, float32")
    p.add_argument("--threads", type=int, default=None, help="torch threads per process")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import a module or .py file first (custom defenses/judges register themselves)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    return p


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    cfg = SafetyConfig(
        model=a.model, defenses=a.defenses, dataset=a.dataset, judges=a.judge, out=a.out, data=a.data, limit=a.limit,
        batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, seed=a.seed, dataset_options=dict(a.dataset_option),
        refusal_judge=a.refusal_judge, n_boot=a.n_boot, device=a.device, dtype=a.dtype, threads=a.threads,
        imports=a.imports, progress=not a.no_progress, plots=not a.no_plots,
    )
    summary = run_safety(cfg)
    if summary is not None:
        print((Path(cfg.out) / "summary.md").read_text(encoding="utf-8"))
        print(f"wrote {cfg.out}/summary.json, summary.md, results.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
