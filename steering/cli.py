"""Command line: ``python -m steering extract ...`` and ``python -m steering calibrate ...``.

    python -m steering extract --model PATH --harmful harmful.csv --harmless harmless.txt --out vectors/
    python -m steering calibrate --model PATH --vectors vectors/ --harmful held_h.csv --harmless held_b.txt

Prompt files: ``.txt`` (one prompt per line; blank lines skipped), ``.csv`` (``--column``, else the
first of prompt/goal/behavior/forbidden_prompt/instruction/question/text), ``.jsonl`` and ``.json``
(strings, or objects read at ``--field`` with the same defaults, or ``{"messages": [...]}``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ._cli import ArgumentParser, CliError, entry_point, positive_int
from ._files import expand_user
from ._hub import go_offline_if_unreachable, missing_path_message, unreachable_message

__all__ = ["CliError", "load_model", "main", "parse_layers", "read_prompts"]

_DEFAULT_FIELDS = ("prompt", "goal", "behavior", "forbidden_prompt", "instruction", "question", "text")


# --------------------------------------------------------------------------------------------
# Prompt files
# --------------------------------------------------------------------------------------------


def _pick(keys: Sequence[str], wanted: str | None, where: str, flag: str) -> str:
    if wanted is not None:
        if wanted not in keys:
            raise CliError(f"{where} has no {flag.strip('-')} {wanted!r}; available: {', '.join(keys)}")
        return wanted
    lower = {k.lower(): k for k in keys}
    for name in _DEFAULT_FIELDS:
        if name in lower:
            return lower[name]
    if len(keys) == 1:
        return keys[0]
    raise CliError(f"{where}: cannot tell which of {', '.join(keys)} holds the prompt; pass {flag} NAME")


def _from_record(record: Any, where: str, field: str | None) -> Any:
    if isinstance(record, str):
        return record
    if isinstance(record, dict):
        if field is None and isinstance(record.get("messages"), list):
            return record["messages"]
        return record[_pick(list(record), field, where, "--field")]
    raise CliError(f"{where}: expected a string or an object, got {type(record).__name__}")


def read_prompts(path: str | os.PathLike, *, column: str | None = None, field: str | None = None,
                 limit: int | None = None) -> list[Any]:
    """Prompts (strings, or conversations from ``{"messages": [...]}`` records) from a file."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        # 0 once meant "all" and -3 "all but the last three": refuse both rather than guess.
        raise CliError(f"--limit must be a positive number of prompts (leave it out to use them all), got {limit!r}")
    p = expand_user(path)
    if not p.is_file():
        raise CliError(f"prompt file {str(p)!r} does not exist")
    suffix = p.suffix.lower()
    prompts: list[Any] = []
    if suffix == ".txt":
        prompts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
    elif suffix == ".csv":
        with p.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise CliError(f"{p} has no header row; the first row must name the columns")
            name = _pick([c for c in reader.fieldnames if c is not None], column, str(p), "--column")
            for row_no, row in enumerate(reader, start=2):
                value = (row.get(name) or "").strip()
                if not value:
                    raise CliError(f"{p}, line {row_no}: column {name!r} is empty; fix or remove that row")
                prompts.append(value)
    elif suffix in (".jsonl", ".json"):
        text = p.read_text(encoding="utf-8")
        try:
            records = (json.loads(text) if suffix == ".json"
                       else [json.loads(line) for line in text.splitlines() if line.strip()])
        except json.JSONDecodeError as e:
            raise CliError(f"{p} is not valid {suffix[1:].upper()}: {e}") from None
        if not isinstance(records, list):
            raise CliError(f"{p}: a .json prompt file must hold a list")
        for k, record in enumerate(records, start=1):
            value = _from_record(record, f"{p}, record {k}", field)
            if isinstance(value, str):
                value = value.strip()
                if not value:
                    raise CliError(f"{p}, record {k}: the prompt is empty; fix or remove it")
            prompts.append(value)
    else:
        raise CliError(f"{p}: unsupported prompt file type {suffix!r}; use .txt, .csv, .jsonl or .json")
    if not prompts:
        raise CliError(f"{p} holds no prompts")
    return prompts if limit is None else prompts[:limit]


def parse_layers(text: str | None) -> list[int] | None:
    """``"0,2,5-8"`` -> ``[0, 2, 5, 6, 7, 8]``; None/"all" -> None (every layer)."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-")
                out.update(range(int(lo), int(hi) + 1))
            else:
                out.add(int(part))
    except ValueError:
        raise CliError(f"--layers {text!r} is not a list like '0,2,5-8'") from None
    return sorted(out)


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def load_model(model_id: str, *, dtype: str = "auto", device: str = "auto", device_map: str | None = None
               ) -> tuple[Any, Any]:
    """``(model, processor)`` for a local folder or a hub id.

    A config with a ``vision_config`` loads with ``AutoModelForImageTextToText`` and
    ``AutoProcessor`` (falling back to ``AutoTokenizer``, with a notice, when the processor cannot
    be built); other models with ``AutoModelForCausalLM`` and ``AutoTokenizer``.
    """
    if msg := missing_path_message(model_id):
        raise CliError(msg)
    import torch
    import transformers as tf

    local = expand_user(model_id)
    source = str(local) if local.exists() else model_id
    if local.exists() and not (local / "config.json").is_file():
        raise CliError(f"{model_id!r} is a folder without config.json; point --model at a save_pretrained folder")

    def unreachable(err: Exception) -> CliError:
        return CliError(unreachable_message(model_id, err))

    try:
        config = tf.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as e:
        if local.exists():
            raise CliError(f"cannot read the config in {source}: {e}") from None
        raise unreachable(e) from None
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    else:
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    multimodal = getattr(config, "vision_config", None) is not None
    model_cls = tf.AutoModelForImageTextToText if multimodal else tf.AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if device_map:
        kwargs["device_map"] = device_map
    try:
        model = model_cls.from_pretrained(source, **kwargs)
    except OSError as e:
        raise (unreachable(e) if not local.exists() else CliError(f"cannot load the model in {source}: {e}")) from None
    if not device_map:
        model = model.to(device)  # type: ignore[arg-type]  # transformers' decorator on .to() loses self in its type
    model.eval()
    processor = None
    if multimodal:
        try:
            processor = tf.AutoProcessor.from_pretrained(source)
        except Exception as e:  # e.g. a processor needing torchvision: text prompts still work with the tokenizer
            print(f"note: AutoProcessor failed ({type(e).__name__}: {e}); using AutoTokenizer (text prompts only)",
                  file=sys.stderr)
    if processor is None:
        try:
            processor = tf.AutoTokenizer.from_pretrained(source)
        except OSError as e:
            raise (unreachable(e) if not local.exists() else CliError(f"cannot load the tokenizer in {source}: {e}")
                   ) from None
    return model, processor


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="local folder (save_pretrained) or hub id")
    p.add_argument("--harmful", required=True, help="harmful prompts (.txt/.csv/.jsonl/.json)")
    p.add_argument("--harmless", required=True, help="harmless prompts (.txt/.csv/.jsonl/.json)")
    p.add_argument("--column", help="CSV column holding the prompt (default: prompt/goal/behavior/...)")
    p.add_argument("--field", help="JSON(L) key holding the prompt (default: prompt/goal/behavior/...)")
    p.add_argument("--limit", type=positive_int, help="use only the first N prompts of each file (N >= 1)")
    p.add_argument("--layers", help="layer indices, e.g. '0,2,5-8' (default: all)")
    p.add_argument("--layer-path", help="dotted path to the decoder layers when discovery fails")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="auto = bfloat16 on GPU, float32 on CPU (activations are accumulated in float32)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--device-map", help="e.g. 'auto' to split the model over several GPUs (overrides --device)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    from ._methods import METHODS  # not .extract: transformers must not be imported before main() decides on offline

    parser = ArgumentParser(prog="python -m steering", description="Steering vectors and gates for transformers models.")
    sub = parser.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="harmful-minus-harmless vectors per layer -> DIR")
    _common(ex)
    ex.add_argument("--out", required=True, help="folder for vectors.safetensors + manifest.json")
    ex.add_argument("--method", default="mean_diff", choices=METHODS)
    ex.add_argument("--normalize", default="none", choices=("none", "unit"))
    cal = sub.add_parser("calibrate", help="choose the gate layer and bias on held-out prompts")
    _common(cal)
    cal.add_argument("--vectors", required=True, help="the target model's own vectors (from extract)")
    cal.add_argument("--out", help="where to write gate.safetensors + gate.json (default: the --vectors folder)")
    cal.add_argument("--allow-template-mismatch", action="store_true",
                     help="warn instead of refusing when the chat template differs from the vectors'")
    cal.add_argument("--hard-negatives", help="benign prompts that use dangerous words: added to the harmless side of "
                     "the gate (its false-positive rate on them is reported separately)")
    cal.add_argument("--max-fpr", type=float, help="choose the gate by recall at most this false-positive rate on the "
                     "harmless prompts (e.g. 0.05) instead of by F1")
    cal.add_argument("--gate-method", default="projection", choices=("projection", "logistic"),
                     help="the gate's direction: the layer's safety vector (projection, the paper) or a logistic "
                          "regression fitted on these prompts, chosen on out-of-fold scores (logistic)")
    cal.add_argument("--gate-c", type=float, default=0.1, help="inverse L2 strength of the logistic gate (default 0.1)")
    cal.add_argument("--gate-folds", type=int, default=5, help="cross-validation folds of the logistic gate (default 5)")
    cal.add_argument("--gate-only", action="store_true", help="calibrate the gate only, not where and how strongly to steer")
    cal.add_argument("--steer-layers", default="auto",
                     help="candidate layers for steering, each tried alone, e.g. '6,10,14' (auto: every 4th from a quarter "
                          "to three quarters of the depth)")
    cal.add_argument("--alphas", default="0.25,0.5,1", help="candidate strengths, a fraction of the activation norm "
                     "(scale relative)")
    cal.add_argument("--scale", default="relative", choices=("relative", "absolute"))
    cal.add_argument("--positions", default="generated", choices=("generated", "all"))
    cal.add_argument("--steer-limit", type=positive_int, default=32,
                     help="prompts of each kind (harmful, harmless + hard negatives) generated per candidate")
    cal.add_argument("--max-new-tokens", type=positive_int, default=32)
    return parser


def _extract(args: argparse.Namespace, model: Any, processor: Any, harmful: list, harmless: list) -> None:
    from .extract import extract_activations
    from .vectors import SteeringVectors

    kw = dict(processor=processor, layers=parse_layers(args.layers), batch_size=args.batch_size,
              progress=not args.no_progress, path=args.layer_path)
    pos = extract_activations(model, harmful, desc="harmful", **kw)
    neg = extract_activations(model, harmless, desc="harmless", **kw)
    sv = SteeringVectors.from_activations(model, pos, neg, method=args.method, normalize=args.normalize,
                                          processor=processor, path=args.layer_path)
    out = sv.save(args.out)
    print(f"{'layer':>5}  {'norm':>10}  {'harmful proj':>12}  {'harmless proj':>13}")
    for layer, v in sv.vectors.items():
        unit = v / v.norm() if float(v.norm()) > 0 else v
        print(f"{layer:>5}  {float(v.norm()):>10.4g}  {float((pos.at(layer) @ unit).mean()):>12.4g}  "
              f"{float((neg.at(layer) @ unit).mean()):>13.4g}")
    print(f"saved {len(sv)} vectors ({args.method}, {len(harmful)} harmful / {len(harmless)} harmless prompts) "
          f"to {out}")


def _calibrate(args: argparse.Namespace, model: Any, processor: Any, harmful: list, harmless: list) -> None:
    from .gate import calibrate_gate_from_prompts
    from .vectors import SteeringVectors

    sv = SteeringVectors.load(args.vectors, with_gate=False)
    for note in sv.check_compatible(model, processor, strict_template=not args.allow_template_mismatch,
                                    path=args.layer_path):
        print(f"note: {note}", file=sys.stderr)
    hard = read_prompts(args.hard_negatives, column=args.column, field=args.field, limit=args.limit) if args.hard_negatives else []
    if args.max_fpr is not None and not 0 <= args.max_fpr < 1:
        raise CliError(f"--max-fpr is a false-positive rate in [0, 1), got {args.max_fpr}")
    cal = calibrate_gate_from_prompts(model, sv, harmful, harmless + hard, processor=processor,
                                      layers=parse_layers(args.layers), batch_size=args.batch_size,
                                      progress=not args.no_progress, path=args.layer_path, max_fpr=args.max_fpr,
                                      method=args.gate_method, C=args.gate_c, folds=args.gate_folds)
    gate = cal.gate
    if hard:  # the hard negatives are the last harmless rows
        gate.metrics["hard_negative_fpr"] = cal.fpr_on(slice(len(harmless), None))
        gate.metrics["num_hard_negatives"] = float(len(hard))
    b = cal.best
    print(cal.table())
    how = args.gate_method + (", out-of-fold figures" if args.gate_method == "logistic" else "")
    print(f"gate ({how}): layer {b.layer}, threshold {gate.threshold:.4g} (bias {gate.bias:.4g}), precision {b.precision:.3f}, "
          f"recall {b.recall:.3f}, F1 {b.f1:.3f}, false positives {b.fpr:.1%} on {len(harmful)} harmful / "
          f"{len(harmless) + len(hard)} harmless prompts"
          + (f" (hard negatives: {gate.metrics['hard_negative_fpr']:.1%} of {len(hard)})" if hard else ""))
    if not args.gate_only:
        sv = _calibrate_steering(args, model, processor, sv, harmful, harmless + hard)
    target = args.out or args.vectors
    out = gate.save(target) if args.gate_only else sv.with_gate(gate).save(target)
    print(f"saved to {out}")


def _calibrate_steering(args: argparse.Namespace, model: Any, processor: Any, sv: Any, harmful: list, benign: list) -> Any:
    """Choose steering layers and alpha by generating (steering.tune); the choice goes into the manifest."""
    from .layers import find_decoder_layers
    from .tune import calibrate_steering

    try:  # the refusal markers ship with guardrails (same distribution); steering itself has none
        from guardrails.classifiers.keywords import keyword_lists
    except ImportError as e:  # pragma: no cover - guardrails is part of this distribution
        raise CliError(f"steering calibration judges refusals with guardrails' keyword lists: {e}; pass --gate-only") from None
    markers = keyword_lists()["llm_attacks"]["keywords"]
    n = find_decoder_layers(model, args.layer_path).num_layers
    if args.steer_layers == "auto":
        candidates = [[i] for i in range(n // 4, (3 * n) // 4 + 1, 4) if i in sv.vectors]
    else:
        candidates = [[i] for i in (parse_layers(args.steer_layers) or [])]
    try:
        alphas = [float(a) for a in args.alphas.split(",") if a.strip()]
    except ValueError:
        raise CliError(f"--alphas takes numbers separated by commas, got {args.alphas!r}") from None
    if not candidates or not alphas:
        raise CliError("give at least one --steer-layers layer and one --alphas value")
    k = args.steer_limit
    # Spread the benign side over harmless prompts and hard negatives alike.
    step = max(1, len(benign) // k)
    cal = calibrate_steering(model, processor, sv, harmful[:k], benign[::step][:k], is_refusal=lambda t: any(m in t for m in markers),
                             layer_sets=candidates, alphas=alphas, scale=args.scale, positions=args.positions,
                             max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, path=args.layer_path,
                             progress=None if args.no_progress else (lambda line: print(line, file=sys.stderr)))
    print(cal.table())
    try:
        chosen = sv.with_choice(cal)
    except ValueError as e:
        raise CliError(str(e).splitlines()[0] + "; nothing was written (see the table above)") from None
    b = cal.best
    assert b is not None  # with_choice refused otherwise
    print(f"steering: layers {list(b.layers)}, alpha {b.alpha:g} ({b.scale}, {b.positions} positions): harmful refused "
          f"{b.harmful_refusal:.0%} (bare {cal.bare.harmful_refusal:.0%}), benign refused {b.benign_refusal:.0%} "
          f"(bare {cal.bare.benign_refusal:.0%}), garbled {b.garbled:.0%}")
    return chosen


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (0 ok, 2 user error, one ``error:`` line; see steering._cli)."""
    args = build_parser().parse_args(argv)
    # Before transformers is imported: a local folder needs no hub, and a hub id with no network
    # would otherwise cost ~25 s of retries before the same error.
    if expand_user(args.model).exists():
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    else:
        go_offline_if_unreachable(args.model)
    harmful = read_prompts(args.harmful, column=args.column, field=args.field, limit=args.limit)
    harmless = read_prompts(args.harmless, column=args.column, field=args.field, limit=args.limit)
    model, processor = load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map)
    if args.command == "extract":
        _extract(args, model, processor, harmful, harmless)
    else:
        _calibrate(args, model, processor, harmful, harmless)
    return 0
