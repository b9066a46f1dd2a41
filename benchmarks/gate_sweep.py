"""Where InferAligner's gates fire: each gate setting calibrated on the training prompts, then its
firing rate on every evaluation set, from the model's own last-prompt-token activations.

    python -m benchmarks.gate_sweep --model qwen2.5-coder-0.5b-instruct --layers 0-8 --out runs/gate-sweep

The gate reads the last prompt token only, so a firing rate here is exactly what the gate decides
on each prompt of a set (no generation needed). Rows (``--rows``, ``METHOD:DATA:BUDGET``):
``projection`` (the paper: the prompt's projection on the safety vector, the mean difference of the
extraction prompts) or ``logistic`` (``steering.calibrate_gate(method="logistic")``), on ``calib``
(the calibration split) or ``all`` (extraction + calibration prompts), at a false-positive budget
on the harmless calibration prompts, hard negatives included. ``--preset MODEL`` adds the shipped
gate as it is. Training prompts come from ``benchmarks.inferaligner_data`` (no evaluation prompt
or near-duplicate of one); activations are cached per prompt set in ``OUT/activations`` and reused
only for the same model, dtype, layers and prompts.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks import datasets
from benchmarks.report import machine_info, markdown_table, write_json
from guardrails._cli import ArgumentParser, entry_point

#: the evaluation sets and how each is loaded (Alpaca: its first 150 instructions)
EVALUATION = {
    "JailbreakBench": lambda d: [s.prompt for s in datasets.load_jailbreakbench(d)],
    "HarmBench test, standard": lambda d: [s.prompt for s in datasets.load_harmbench(d, split="test", functional_categories="standard")],
    "XSTest unsafe": lambda d: [s.prompt for s in datasets.load_xstest(d, label="unsafe")],
    "XSTest safe": lambda d: [s.prompt for s in datasets.load_xstest(d, label="safe")],
    "Alpaca (benign)": lambda d: [s.prompt for s in datasets.load_alpaca(d)][:150],
}
METHODS, DATA = ("projection", "logistic"), ("calib", "all")
#: the rows of RESULTS.md's table ("A logistic gate")
DEFAULT_ROWS = ("projection:calib:0.05", "logistic:calib:0.05", "logistic:calib:0.02",
                "logistic:all:0.05", "logistic:all:0.02", "logistic:all:0.01")


@dataclass(frozen=True)
class Row:
    """One gate setting of the sweep."""

    method: str
    data: str
    budget: float

    @classmethod
    def parse(cls, text: str) -> Row:
        parts = text.split(":")
        try:
            method, data, budget = parts
            row = cls(method, data, float(budget))
        except ValueError:
            raise ValueError(f"row {text!r} must be METHOD:DATA:BUDGET, e.g. logistic:all:0.02") from None
        if method not in METHODS or data not in DATA or not 0.0 < row.budget < 1.0:
            raise ValueError(f"row {text!r}: METHOD is one of {METHODS}, DATA one of {DATA}, BUDGET in (0, 1)")
        return row

    @property
    def name(self) -> str:
        return f"{self.method}:{self.data}:{self.budget:g}"


def _key(model_id: str, dtype: str, layers: Sequence[int], prompts: Sequence[str]) -> str:
    h = hashlib.sha256(json.dumps([model_id, dtype, list(layers), list(prompts)]).encode())
    return h.hexdigest()


def activations(load: Callable[[], tuple[Any, Any]], sets: Mapping[str, Sequence[str]], layers: Sequence[int], cache: Path, *,
                model_id: str, dtype: str, batch_size: int = 16) -> dict[str, Any]:
    """``steering.Activations`` per prompt set, read from ``cache`` when the model, dtype, layers and
    prompts are the same as when it was written; ``load()`` gives (model, tokenizer), called only
    when a set must be extracted."""
    from steering import Activations, extract_activations

    cache.mkdir(parents=True, exist_ok=True)
    out = {}
    loaded: list[tuple[Any, Any]] = []
    for name, prompts in sets.items():
        f = cache / f"{hashlib.sha256(name.encode()).hexdigest()[:16]}.pt"
        key = _key(model_id, dtype, layers, prompts)
        if f.is_file():
            saved = torch.load(f, weights_only=True)
            if saved.get("key") == key:
                out[name] = Activations(layer_indices=list(layers), values=saved["values"])
                continue
        if not loaded:
            loaded.append(load())
        model, tokenizer = loaded[0]
        t0 = time.perf_counter()
        out[name] = extract_activations(model, list(prompts), processor=tokenizer, layers=list(layers),
                                        batch_size=batch_size, progress=False)
        torch.save({"key": key, "name": name, "values": out[name].values}, f)
        print(f"activations: {name} ({len(prompts)} prompts) in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def join(acts: Mapping[str, Any], *names: str) -> Any:
    """The activations of several prompt sets, in order, as one ``steering.Activations``."""
    from steering import Activations

    return Activations(layer_indices=acts[names[0]].layer_indices, values=torch.cat([acts[n].values for n in names]))


def add_model_arguments(p: ArgumentParser) -> None:
    """The options of a command that reads a model's activations through :func:`model_activations`."""
    p.add_argument("--model", required=True, help="a fetched model name or a model folder (what guardrails.load takes)")
    p.add_argument("--data", help="the shared data folder (default: ../shared/data or $GUARDRAILS_DATA)")
    p.add_argument("--layers", default="0-8", help="decoder layers to extract, e.g. 0-8 or 2,4,6 (0-8: the gates' layers, "
                   "known before a steered layer)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, help="torch threads")


def training_sets(data: str | None) -> tuple[dict[str, list[str]], dict[str, int]]:
    """``benchmarks.inferaligner_data.splits()`` without its ``gate_*`` lists (extraction + calibration,
    which :func:`join` rebuilds from their activations)."""
    from benchmarks.inferaligner_data import splits

    train, dropped = splits(data)
    for side in ("harmful", "harmless"):
        if train.pop(f"gate_{side}") != train[f"extract_{side}"] + train[f"calib_{side}"]:
            raise RuntimeError(f"benchmarks.inferaligner_data: gate_{side} is no longer extract_{side} + calib_{side}")
    return train, dropped


def model_activations(args: Any, sets: Mapping[str, Sequence[str]], out: Path) -> tuple[list[int], dict[str, Any]]:
    """The layers of ``--layers`` and :func:`activations` of ``sets`` for the options of :func:`add_model_arguments`."""
    from benchmarks.safety import load_model
    from steering.cli import parse_layers

    layers = parse_layers(args.layers)
    if not layers:
        raise ValueError("--layers must name the layers, e.g. 0-8")
    if args.threads:
        torch.set_num_threads(args.threads)

    def load() -> tuple[Any, Any]:
        model, proc = load_model(args.model, dtype=args.dtype)
        return model.eval(), proc

    return layers, activations(load, sets, layers, out / "activations", model_id=args.model, dtype=args.dtype, batch_size=args.batch_size)


def sweep(acts: Mapping[str, Any], rows: Sequence[Row], evaluation: Sequence[str], *, preset_gate: Any = None,
          C: float = 0.1, folds: int = 5) -> list[dict[str, Any]]:
    """Calibrate each row's gate on the training activations and measure where it fires.

    ``acts`` holds the training sets of ``benchmarks.inferaligner_data.splits()`` (``extract_*``,
    ``calib_*``, ``hard_negatives``; its ``gate_*`` lists are extraction + calibration, in that
    order) and every name in ``evaluation``."""
    from steering import calibrate_gate

    cat = lambda *names: join(acts, *names)  # noqa: E731
    layers = acts["extract_harmful"].layer_indices
    vectors = {layer: acts["extract_harmful"].at(layer).mean(0) - acts["extract_harmless"].at(layer).mean(0) for layer in layers}
    n_hard = len(acts["hard_negatives"])
    out = []
    for row in rows:
        harmful = acts["calib_harmful"] if row.data == "calib" else cat("extract_harmful", "calib_harmful")
        harmless = cat("calib_harmless", "hard_negatives") if row.data == "calib" else \
            cat("extract_harmless", "calib_harmless", "hard_negatives")
        t0 = time.perf_counter()
        cal = calibrate_gate(vectors if row.method == "projection" else None, harmful, harmless, max_fpr=row.budget,
                             method=row.method, C=C, folds=folds)  # type: ignore[arg-type]
        out.append({"row": row.name, "method": row.method, "data": row.data, "budget": row.budget, "layer": cal.gate.layer,
                    "n_harmful": len(harmful), "n_harmless": len(harmless), "recall": cal.best.recall, "fpr": cal.best.fpr,
                    "hard_fpr": cal.fpr_on(slice(-n_hard, None)), "calibrate_s": time.perf_counter() - t0,
                    "fires": _fires(cal.gate, acts, evaluation), "per_layer": cal.as_dicts()})
    if preset_gate is not None:
        out.append({"row": "preset", "method": preset_gate.source.get("method", "projection"), "data": "shipped",
                    "budget": None, "layer": preset_gate.layer, "recall": None, "fpr": None, "hard_fpr": None,
                    "fires": _fires(preset_gate, acts, evaluation)})
    return out


def _fires(gate: Any, acts: Mapping[str, Any], evaluation: Sequence[str]) -> dict[str, dict[str, float | int]]:
    got = {}
    for name in evaluation:
        fired = gate.decide(acts[name].at(gate.layer))
        got[name] = {"n": len(fired), "fired": int(fired.sum()), "rate": float(fired.float().mean())}
    return got


def table(results: Sequence[dict[str, Any]], evaluation: Sequence[str]) -> str:
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"  # noqa: E731
    heads = ["gate", "budget", "layer", "calibration recall / FPR / hard-neg. FPR",
             *[f"{e} ({results[0]['fires'][e]['n']})" for e in evaluation]]
    body = [[r["row"], pct(r["budget"]), r["layer"], " / ".join(pct(r[k]) for k in ("recall", "fpr", "hard_fpr")),
             *[pct(r["fires"][e]["rate"]) for e in evaluation]] for r in results]
    return markdown_table(heads, body)


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m benchmarks.gate_sweep", description=__doc__.splitlines()[0])
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="folder for gate_sweep.json, gate_sweep.md and the activation cache")
    p.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), help="METHOD:DATA:BUDGET per gate (see above)")
    p.add_argument("--preset", help="also report the shipped InferAligner preset's gate for this model name")
    p.add_argument("--C", type=float, default=0.1, help="L2 strength 1/C of the logistic gates")
    p.add_argument("--folds", type=int, default=5)
    args = p.parse_args(argv)
    from steering.cli import parse_layers

    rows = [Row.parse(r) for r in args.rows]
    preset_gate = None
    if args.preset:  # checked before any activation is extracted
        from guardrails.defenses.inferaligner import InferAligner

        preset_gate = InferAligner.preset(args.preset).gate
        if preset_gate is None or preset_gate.layer not in (parse_layers(args.layers) or []):
            raise ValueError(f"the {args.preset} preset's gate (layer {getattr(preset_gate, 'layer', None)}) is not among --layers {args.layers}")
    train, dropped = training_sets(args.data)
    out = Path(args.out)
    _, acts = model_activations(args, {**train, **{name: load(args.data) for name, load in EVALUATION.items()}}, out)
    results = sweep(acts, rows, list(EVALUATION), preset_gate=preset_gate, C=args.C, folds=args.folds)
    md = table(results, list(EVALUATION))
    write_json(out / "gate_sweep.json", {"command": vars(args), "machine": machine_info(), "training_sizes": {k: len(v) for k, v in train.items()},
                                         "dropped_near_duplicates": dropped, "results": results})
    (out / "gate_sweep.md").write_text(md + "\n", encoding="utf-8")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
